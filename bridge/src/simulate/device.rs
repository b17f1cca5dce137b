//! One simulated device: its own MQTT connection, as a real device has.
//!
//! On every CONNACK it subscribes to `ROOT/{id}/commands` and publishes a
//! retained `online` to `ROOT/{id}/status`; its last will is a retained
//! `offline` there, so a device that dies (killed, network gone) is reported
//! offline by the broker. It publishes telemetry (JSON) to
//! `ROOT/{id}/telemetry` at its rate, and at once after a command changed
//! something. Commands:
//!
//! * `{"led":"on"}` / `{"led":"off"}`: the LED, reported in telemetry;
//! * `{"reboot":true}`: retained `offline`, a clean disconnect (so no will),
//!   2 s away, then a new connection (`uptime` starts over, the LED is off).
//!
//! Anything else is logged (at most every 10 s per device) and changes
//! nothing. Stopping (`stop`) says `offline` and disconnects cleanly.
//!
//! rumqttc's event loop is polled in a task of its own ([`poll`]) that hands
//! the device its sessions (a `watch`, never blocking) and its commands (a
//! small bounded queue: a flood of commands is dropped, not stored).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::sensors::{Rng, Sensors};

/// How long a reboot keeps the device away.
pub const REBOOT_PAUSE: Duration = Duration::from_secs(2);
/// Commands waiting for the device; more are dropped.
const COMMAND_QUEUE: usize = 8;
/// Largest command accepted from the broker (a larger packet ends the
/// connection, as rumqttc does, and the device reconnects).
const MAX_INCOMING: usize = 64 * 1024;
/// Largest packet the device sends.
const MAX_OUTGOING: usize = 4 * 1024;
/// Reconnect waits: from the first to the longest.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a clean goodbye may take before the connection is just dropped.
const GOODBYE: Duration = Duration::from_secs(2);
/// At most one warning about bad commands per device in this time.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A device's three topics.
#[derive(Debug, Clone)]
pub struct Topics {
    pub telemetry: String,
    pub status: String,
    pub commands: String,
}

impl Topics {
    pub fn new(root: &str, id: &str) -> Topics {
        Topics {
            telemetry: format!("{root}/{id}/telemetry"),
            status: format!("{root}/{id}/status"),
            commands: format!("{root}/{id}/commands"),
        }
    }
}

/// What a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Led(bool),
    Reboot,
}

impl Command {
    /// `{"led":"on"|"off"}` or `{"reboot":true}`; other fields are ignored.
    pub fn parse(payload: &[u8]) -> Result<Command, String> {
        let value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|_| "not JSON".to_string())?;
        let obj = value
            .as_object()
            .ok_or_else(|| "not a JSON object".to_string())?;
        match (obj.get("led"), obj.get("reboot")) {
            (Some(_), Some(_)) => Err("one command at a time: led or reboot".into()),
            (Some(led), None) => match led.as_str() {
                Some("on") => Ok(Command::Led(true)),
                Some("off") => Ok(Command::Led(false)),
                _ => Err("led must be \"on\" or \"off\"".into()),
            },
            (None, Some(reboot)) => match reboot.as_bool() {
                Some(true) => Ok(Command::Reboot),
                _ => Err("reboot must be true".into()),
            },
            (None, None) => Err("no led or reboot field".into()),
        }
    }
}

/// The connection's state as the poll task sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Session {
    up: bool,
    /// CONNACKs so far: a new number is a new session to announce.
    number: u64,
}

/// Everything one device needs.
pub struct Device {
    pub id: String,
    pub topics: Topics,
    /// Connection options (broker, TLS, credentials); the client id and the
    /// will are set here.
    pub options: MqttOptions,
    /// Time between telemetry messages.
    pub period: Duration,
    /// Wait before the first connect (spreads a fleet's connects out).
    pub start_after: Duration,
    pub stop: CancellationToken,
    /// Devices of the fleet connected right now.
    pub online: Arc<AtomicUsize>,
    pub rng: Rng,
}

/// How a connection ended.
enum End {
    Stop,
    Reboot,
}

impl Device {
    /// Runs the device until `stop`.
    pub async fn run(mut self) {
        let mut sensors = Sensors::new(self.rng.clone());
        let mut led = false;
        let mut warned: Option<Instant> = None;
        tokio::select! {
            _ = tokio::time::sleep(self.start_after) => {}
            _ = self.stop.cancelled() => return,
        }
        loop {
            let mut options = self.options.clone();
            options
                .set_client_id(self.id.clone())
                .set_clean_session(true)
                .set_max_packet_size(MAX_INCOMING, MAX_OUTGOING)
                .set_last_will(LastWill::new(
                    &self.topics.status,
                    "offline",
                    QoS::AtLeastOnce,
                    true,
                ));
            let (client, eventloop) = AsyncClient::new(options, 64);
            let (session_tx, mut session) = watch::channel(Session::default());
            let (command_tx, mut commands) = mpsc::channel(COMMAND_QUEUE);
            let poller = tokio::spawn(poll(
                eventloop,
                self.id.clone(),
                self.topics.commands.clone(),
                session_tx,
                command_tx,
                self.rng.next_u64(),
            ));
            let booted = Instant::now();
            let mut last_step = Instant::now();
            let phase = Duration::from_secs_f64(self.period.as_secs_f64() * self.rng.unit());
            let mut ticker =
                tokio::time::interval_at(tokio::time::Instant::now() + phase, self.period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut up = false;
            let mut announced = 0;

            let end = loop {
                let mut send_telemetry = false;
                tokio::select! {
                    _ = self.stop.cancelled() => break End::Stop,
                    changed = session.changed() => {
                        if changed.is_err() {
                            // The poll task ended on its own: cannot happen
                            // before a disconnect; treat as a stop.
                            break End::Stop;
                        }
                        let now = *session.borrow_and_update();
                        if now.up != up {
                            up = now.up;
                            if up {
                                self.online.fetch_add(1, Ordering::Relaxed);
                            } else {
                                self.online.fetch_sub(1, Ordering::Relaxed);
                            }
                        }
                        if now.up && now.number != announced {
                            announced = now.number;
                            // A new session: the will may have fired, and a
                            // clean session holds no subscription.
                            let _ = client.subscribe(&self.topics.commands, QoS::AtLeastOnce).await;
                            let _ = client
                                .publish(&self.topics.status, QoS::AtLeastOnce, true, "online")
                                .await;
                            send_telemetry = true;
                        }
                    }
                    Some(payload) = commands.recv() => match Command::parse(&payload) {
                        Ok(Command::Led(on)) => {
                            led = on;
                            send_telemetry = true;
                        }
                        Ok(Command::Reboot) => break End::Reboot,
                        Err(why) => {
                            if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                                warned = Some(Instant::now());
                                tracing::warn!(
                                    device = %self.id,
                                    bytes = payload.len(),
                                    "ignored a command: {why} (expected {{\"led\":\"on\"|\"off\"}} or {{\"reboot\":true}})"
                                );
                            }
                        }
                    },
                    _ = ticker.tick() => send_telemetry = true,
                }
                if send_telemetry && up {
                    sensors.step(last_step.elapsed().as_secs_f64(), led);
                    last_step = Instant::now();
                    let message = sensors.telemetry(led, booted.elapsed().as_secs());
                    // QoS 0: a reading lost is replaced by the next one; when
                    // the queue to the broker is full, this one is skipped.
                    let _ =
                        client.try_publish(&self.topics.telemetry, QoS::AtMostOnce, false, message);
                }
            };

            if up {
                self.online.fetch_sub(1, Ordering::Relaxed);
                // Goodbye: a retained offline, then DISCONNECT (which tells
                // the broker not to publish the will).
                let _ = client.try_publish(&self.topics.status, QoS::AtLeastOnce, true, "offline");
                let _ = client.try_disconnect();
                let mut poller = poller;
                if tokio::time::timeout(GOODBYE, &mut poller).await.is_err() {
                    poller.abort();
                }
            } else {
                poller.abort();
            }
            match end {
                End::Stop => return,
                End::Reboot => {
                    // It comes back as a device does after a reboot: LED off.
                    led = false;
                    tracing::info!(device = %self.id, "rebooting (back in {REBOOT_PAUSE:?})");
                    tokio::select! {
                        _ = tokio::time::sleep(REBOOT_PAUSE) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// Polls the device's event loop until it has sent DISCONNECT (or the
/// device is gone), reconnecting with backoff.
async fn poll(
    mut eventloop: EventLoop,
    id: String,
    commands_topic: String,
    session: watch::Sender<Session>,
    commands: mpsc::Sender<Bytes>,
    seed: u64,
) {
    let mut rng = Rng::seeded(seed);
    let mut backoff = FIRST_BACKOFF;
    // Logged once per outage, not once per attempt.
    let mut told = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                backoff = FIRST_BACKOFF;
                if told {
                    tracing::info!(device = %id, "connected again");
                    told = false;
                }
                session.send_modify(|s| {
                    s.up = true;
                    s.number += 1;
                });
            }
            Ok(Event::Incoming(Incoming::Publish(p))) if p.topic == commands_topic => {
                // Full: the device is busy; a flood is dropped here.
                let _ = commands.try_send(p.payload);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                // rumqttc has written DISCONNECT: the goodbye is out.
                return;
            }
            Ok(_) => {}
            Err(e) => {
                if session.is_closed() {
                    return;
                }
                session.send_if_modified(|s| std::mem::replace(&mut s.up, false));
                if !told {
                    tracing::warn!(device = %id, "MQTT connection: {e} (retrying)");
                    told = true;
                }
                let jitter = backoff.mul_f64(0.5 * rng.unit());
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(Command::parse(br#"{"led":"on"}"#), Ok(Command::Led(true)));
        assert_eq!(Command::parse(br#"{"led":"off"}"#), Ok(Command::Led(false)));
        assert_eq!(Command::parse(br#"{"reboot":true}"#), Ok(Command::Reboot));
        assert_eq!(
            Command::parse(br#"{"led":"on","by":"ops"}"#),
            Ok(Command::Led(true))
        );
        for bad in [
            &br#"{"led":"purple"}"#[..],
            br#"{"led":true}"#,
            br#"{"reboot":false}"#,
            br#"{"reboot":"yes"}"#,
            br#"{"led":"on","reboot":true}"#,
            br#"{}"#,
            br#"["led","on"]"#,
            br#""on""#,
            b"led on",
            b"\xff\xfe",
            b"",
        ] {
            assert!(
                Command::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn topics() {
        let t = Topics::new("fleet", "ab12-01");
        assert_eq!(t.telemetry, "fleet/ab12-01/telemetry");
        assert_eq!(t.status, "fleet/ab12-01/status");
        assert_eq!(t.commands, "fleet/ab12-01/commands");
    }
}
