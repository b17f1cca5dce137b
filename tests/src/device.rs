//! The device side: an ordinary MQTT client (rumqttc) on the broker that
//! publishes, subscribes and collects what it receives. Under a bridge with a
//! topic prefix, the device lives under it too: it names channels, the broker
//! sees `PREFIX/channel`.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;

use crate::processes::{free_port, QUIET, WAIT};

/// A device: an ordinary MQTT client (rumqttc) on the broker.
pub struct Device {
    /// The raw client: it does not apply the topic prefix.
    pub client: AsyncClient,
    /// Put before every topic and filter, and taken off received topics.
    prefix: Option<String>,
    rx: mpsc::UnboundedReceiver<rumqttc::Publish>,
    /// Per SUBACK: did the broker grant every filter?
    subacks: mpsc::UnboundedReceiver<bool>,
    pubacks: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    pub async fn connect(port: u16, id: &str) -> Device {
        Device::connect_under(port, id, None).await
    }

    /// Connects a device whose topics and filters live under `prefix` (the
    /// bridge's `--topic-prefix`), so that it names the channels web clients
    /// name.
    pub async fn connect_under(port: u16, id: &str, prefix: Option<&str>) -> Device {
        let mut opts = MqttOptions::new(format!("{id}-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        opts.set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(opts, 100_000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (stx, subacks) = mpsc::unbounded_channel();
        let (ptx, pubacks) = mpsc::unbounded_channel();
        let (ctx, mut connected) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = ctx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                        let granted = !ack.return_codes.contains(&SubscribeReasonCode::Failure);
                        let _ = stx.send(granted);
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        let _ = ptx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, connected.recv())
            .await
            .expect("device connect")
            .unwrap();
        Device {
            client,
            prefix: prefix.map(str::to_string),
            rx,
            subacks,
            pubacks,
            task,
        }
    }

    /// Publishes and, for QoS 1, waits for the broker's PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: u8,
        retain: bool,
    ) {
        let q = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        self.client
            .publish(self.to_broker(topic), q, retain, payload.into())
            .await
            .unwrap();
        if qos == 1 {
            tokio::time::timeout(WAIT, self.pubacks.recv())
                .await
                .expect("puback")
                .unwrap();
        }
    }

    /// Subscribes with QoS 1 and waits for the broker to grant it.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(self.to_broker(filter), QoS::AtLeastOnce)
            .await
            .unwrap();
        let granted = tokio::time::timeout(WAIT, self.subacks.recv())
            .await
            .expect("suback")
            .unwrap();
        assert!(granted, "the broker refused the subscription to {filter}");
    }

    /// The next message, its topic as the device named it (without prefix).
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        let mut p = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("no MQTT message")
            .unwrap();
        if let Some(prefix) = &self.prefix {
            p.topic = p
                .topic
                .strip_prefix(prefix.as_str())
                .and_then(|t| t.strip_prefix('/'))
                .unwrap_or_else(|| panic!("{} is outside the prefix {prefix}", p.topic))
                .to_string();
        }
        p
    }

    /// The broker's name for a topic or filter.
    fn to_broker(&self, name: &str) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}/{name}"),
            None => name.to_string(),
        }
    }

    pub async fn expect_silence(&mut self) {
        if let Ok(Some(p)) = tokio::time::timeout(QUIET, self.rx.recv()).await {
            panic!("expected no MQTT message, got {p:?}");
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}
