//! The device: one ordinary MQTT client (rumqttc over TCP) that publishes
//! the bench payloads to the broker, at a fixed offered rate or as fast as
//! the broker takes them, for a fixed time.
//!
//! It runs on its own OS thread with its own single-threaded runtime, so its
//! send timestamps and pacing do not depend on how busy the subscribers'
//! runtime is. The event loop is polled in its own task (rumqttc's event loop
//! must not be polled inside a `select!`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

use crate::payload::{self, Stamp};
use crate::stats::Clock;

/// The offered load of a phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second.
    Fixed(f64),
    /// As fast as the client and broker allow (QoS 1: bounded by the
    /// in-flight window).
    Max,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Fixed(r) => write!(f, "{r}"),
            Rate::Max => f.write_str("max"),
        }
    }
}

pub fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::Fixed(r)),
        _ => Err(format!(
            "{s:?}: expected messages per second (> 0) or `max`"
        )),
    }
}

/// What one phase published.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub count: u64,
    pub first_us: u64,
    pub elapsed: Duration,
}

struct Phase {
    run: u32,
    rate: Rate,
    duration: Duration,
    reply: oneshot::Sender<Published>,
}

/// A running device thread.
pub struct Device {
    tx: mpsc::UnboundedSender<Phase>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// PUBACKs received (QoS 1) or publishes written (QoS 0).
    pub acked: Arc<AtomicU64>,
    pub error: Arc<Mutex<Option<String>>>,
}

pub struct DeviceConfig {
    pub port: u16,
    pub topic: String,
    pub qos: QoS,
    pub payload_size: usize,
}

impl Device {
    /// Connects to the broker at 127.0.0.1:`port`; returns once connected.
    pub async fn start(cfg: DeviceConfig, clock: Arc<Clock>) -> Result<Device, String> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Phase>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let acked = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None::<String>));
        let (acked2, error2) = (acked.clone(), error.clone());
        let thread = std::thread::Builder::new()
            .name("device".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("device runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut opts = MqttOptions::new("bench-device", "127.0.0.1", cfg.port);
                    opts.set_keep_alive(Duration::from_secs(30));
                    opts.set_clean_session(true);
                    opts.set_inflight(100);
                    // A short request queue: the send timestamp is taken
                    // close to the socket even when publishing at full speed.
                    opts.set_request_channel_capacity(16);
                    let (client, mut eventloop) = AsyncClient::new(opts, 16);
                    let qos = cfg.qos;
                    let mut ready_tx = Some(ready_tx);
                    let (conn_tx, conn_rx) = oneshot::channel::<Result<(), String>>();
                    let mut conn_tx = Some(conn_tx);
                    tokio::spawn(async move {
                        loop {
                            match eventloop.poll().await {
                                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                    if let Some(tx) = conn_tx.take() {
                                        let _ = tx.send(Ok(()));
                                    }
                                }
                                Ok(Event::Incoming(Packet::PubAck(_))) => {
                                    acked2.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(Event::Outgoing(Outgoing::Publish(_)))
                                    if qos == QoS::AtMostOnce =>
                                {
                                    acked2.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    let msg = format!("device MQTT connection: {e}");
                                    if let Some(tx) = conn_tx.take() {
                                        let _ = tx.send(Err(msg));
                                        return;
                                    }
                                    {
                                        let mut slot =
                                            error2.lock().unwrap_or_else(|e| e.into_inner());
                                        if slot.is_none() {
                                            *slot = Some(msg);
                                        }
                                    }
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                            }
                        }
                    });
                    let connected =
                        match tokio::time::timeout(Duration::from_secs(10), conn_rx).await {
                            Ok(Ok(r)) => r,
                            Ok(Err(_)) => Err("device event loop ended".to_string()),
                            Err(_) => Err("device: no CONNACK within 10 s".to_string()),
                        };
                    let ok = connected.is_ok();
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(connected);
                    }
                    if !ok {
                        return;
                    }
                    while let Some(phase) = rx.recv().await {
                        let published = publish_phase(&client, &cfg, &clock, &phase).await;
                        let _ = phase.reply.send(published);
                    }
                    // Not `disconnect().await`: with the broker gone the
                    // request channel may be full and never drained.
                    let _ = client.try_disconnect();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            })
            .map_err(|e| format!("cannot start the device thread: {e}"))?;
        let device = Device {
            tx,
            thread: Some(thread),
            acked,
            error,
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(device),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("device thread ended before connecting".into()),
        }
    }

    /// Publishes run `run` at `rate` for `duration`.
    pub async fn phase(
        &self,
        run: u32,
        rate: Rate,
        duration: Duration,
    ) -> Result<Published, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Phase {
                run,
                rate,
                duration,
                reply,
            })
            .map_err(|_| "the device thread has stopped".to_string())?;
        rx.await
            .map_err(|_| "the device thread has stopped".to_string())
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Closing the command channel ends the thread after a DISCONNECT.
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn publish_phase(
    client: &AsyncClient,
    cfg: &DeviceConfig,
    clock: &Clock,
    phase: &Phase,
) -> Published {
    let start = Instant::now();
    let end = tokio::time::Instant::from_std(start + phase.duration);
    let mut out = Published::default();
    let mut seq: u64 = 0;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= phase.duration {
            break;
        }
        let due = match phase.rate {
            Rate::Fixed(r) => (elapsed.as_secs_f64() * r) as u64 + 1,
            Rate::Max => seq + 64,
        };
        // A broker that acknowledges slowly (QoS 1) holds `publish` back:
        // the deadline is checked per message, and what could not be sent
        // in time is not sent late. A broker that died holds it back for
        // good (the event loop stops taking requests): the phase ends then.
        while seq < due && start.elapsed() < phase.duration {
            let ts_us = clock.now_us();
            let body = payload::encode(
                Stamp {
                    run: phase.run,
                    seq,
                    ts_us,
                },
                cfg.payload_size,
            );
            let sent = tokio::time::timeout_at(
                end,
                client.publish(cfg.topic.as_str(), cfg.qos, false, body),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                out.elapsed = start.elapsed();
                return out;
            }
            if out.count == 0 {
                out.first_us = ts_us;
            }
            out.count += 1;
            seq += 1;
        }
        if let Rate::Fixed(r) = phase.rate {
            // Sleep until the next message is due.
            let next = start + Duration::from_secs_f64(seq as f64 / r);
            tokio::time::sleep_until(next.into()).await;
        }
    }
    out.elapsed = start.elapsed();
    out
}
