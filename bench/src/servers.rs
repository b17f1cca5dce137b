//! The servers of one scenario run ([`Servers`]): started together, stopped
//! together (the bridge before its broker), and what the bench reads from
//! them while they run.

use std::net::SocketAddr;

use crate::cli::{Opts, Target};
use crate::procs::{self, BrokerMode, MosquittoPorts, Proc, TempDir};

/// The bridge's settings in the fan-out and idle scenarios: per-connection
/// queues as long as Mosquitto's (`--outbound-queue`), no publish rate.
pub fn throughput_bridge_args(opts: &Opts) -> Vec<String> {
    [
        "--outbound-queue",
        &opts.outbound_queue.to_string(),
        "--publish-rate",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

/// The servers of one scenario run; dropped = stopped.
pub struct Servers {
    // Field order is drop order: the bridge stops before its broker.
    pub bridge: Option<(Proc, SocketAddr)>,
    pub mosquitto: Option<(Proc, MosquittoPorts)>,
    /// Where the device publishes (MQTT over TCP).
    pub broker_port: u16,
}

impl Servers {
    /// Starts what `target` needs; `bridge_args` are the bridge's settings
    /// beyond where it listens and which broker it uses.
    pub async fn start(
        opts: &Opts,
        target: Target,
        dir: &TempDir,
        tag: &str,
        bridge_args: &[String],
    ) -> Result<Servers, String> {
        let tag = format!("{}-{tag}", target.tag());
        // Mosquitto first: it is the bridge's broker when both run.
        let mosquitto = if target.needs_mosquitto() {
            Some(
                procs::start_mosquitto(
                    &opts.mosquitto,
                    target == Target::Mosquitto,
                    opts.outbound_queue,
                    &dir.path,
                    &tag,
                )
                .await?,
            )
        } else {
            None
        };
        let broker_port = match &mosquitto {
            Some((_, ports)) => ports.mqtt,
            None => procs::free_port()?,
        };
        // The bridge prints its listening line once its own MQTT link is in:
        // with the embedded broker, the broker is up then.
        let bridge = if target.needs_bridge() {
            let broker = if mosquitto.is_some() {
                BrokerMode::External(broker_port)
            } else {
                BrokerMode::Embedded(broker_port)
            };
            Some(procs::start_bridge(
                &opts.bridge,
                &broker,
                bridge_args,
                &opts.bridge_log,
                &dir.path,
                &tag,
            )?)
        } else {
            None
        };
        Ok(Servers {
            bridge,
            mosquitto,
            broker_port,
        })
    }

    /// The bridge's WebSocket and HTTP address, when a bridge runs.
    pub fn bridge_addr(&self) -> Option<SocketAddr> {
        self.bridge.as_ref().map(|(_, addr)| *addr)
    }

    pub fn procs(&self) -> Vec<&Proc> {
        self.bridge
            .iter()
            .map(|(p, _)| p)
            .chain(self.mosquitto.iter().map(|(p, _)| p))
            .collect()
    }

    pub fn check_alive(&mut self) -> Result<(), String> {
        if let Some((p, _)) = &mut self.bridge {
            p.check_alive()?;
        }
        if let Some((p, _)) = &mut self.mosquitto {
            p.check_alive()?;
        }
        Ok(())
    }

    /// Stops the servers (bridge first) and says how long each took.
    pub fn stop(self) -> String {
        let Servers {
            bridge, mosquitto, ..
        } = self;
        tokio::task::block_in_place(|| {
            let mut out = Vec::new();
            if let Some((p, _)) = bridge {
                out.push(p.stop());
            }
            if let Some((p, _)) = mosquitto {
                out.push(p.stop());
            }
            out.join("; ")
        })
    }

    pub async fn bridge_metrics(&self) -> Option<String> {
        procs::http_get(self.bridge_addr()?, "/metrics").await.ok()
    }
}
