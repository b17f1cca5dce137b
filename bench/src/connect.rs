//! Opening many subscribers at once: [`open_many`] (bounded concurrency,
//! progress on stderr) and [`open_subscribers`], which connects the right
//! kind of client for the server measured (bridge JSON protocol, or MQTT
//! over WebSocket or TCP for Mosquitto) and runs each as a [`Role`] says.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::cli::{MqttClient, Opts, Target};
use crate::clients::{BridgeSub, MqttSub, MqttTransport, Subscriber};
use crate::procs::MosquittoPorts;
use crate::rawmqtt::RawMqttSub;
use crate::servers::Servers;
use crate::stats::Recorder;

/// How long one connect + subscribe may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Opens `n` connections, `concurrency` at a time. `connect(i)` connects and
/// subscribes (within [`SETUP_TIMEOUT`] from taking its turn), and returns
/// the future that then runs the connection.
/// Returns the running tasks, how many connected and the first error.
async fn open_many<F, Fut, R>(
    n: usize,
    concurrency: usize,
    what: &str,
    connect: F,
) -> (Vec<JoinHandle<()>>, usize, Option<String>)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<R, String>> + Send + 'static,
    R: Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let fut = connect(i);
        let sem = sem.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let connected = tokio::time::timeout(SETUP_TIMEOUT, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(format!("connect + subscribe took over {SETUP_TIMEOUT:?}"))
                });
            match connected {
                Ok(run) => {
                    drop(permit);
                    let _ = tx.send(Ok(()));
                    drop(tx);
                    run.await;
                }
                Err(e) => {
                    drop(permit);
                    let _ = tx.send(Err(e));
                }
            }
        }));
    }
    drop(tx);
    let started = Instant::now();
    let (mut ok, mut failed, mut first_err) = (0usize, 0usize, None);
    let step = (n / 10).max(1);
    while let Some(r) = rx.recv().await {
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
        }
        let done = ok + failed;
        if done.is_multiple_of(step) || done == n {
            eprintln!(
                "  {what}: {ok} connected, {failed} failed ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    (tasks, ok, first_err)
}

/// A connected subscriber's work, until the connection ends or is aborted.
type Running = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// What each subscriber does once its subscription is acknowledged.
#[derive(Clone, Copy)]
pub enum Role<'a> {
    /// Subscriber i records every message in `recorders[i]` (fan-out).
    Receive(&'a [Recorder]),
    /// Holds the connection open and records nothing (idle memory).
    Idle,
}

impl Role<'_> {
    /// tungstenite's read buffer, the progress label and the MQTT client-id
    /// prefix.
    fn settings(self) -> (usize, &'static str, &'static str) {
        match self {
            Role::Receive(_) => (64 * 1024, "subscribers", "bench-sub"),
            Role::Idle => (4 * 1024, "idle connections", "bench-idle"),
        }
    }

    fn recorder(self, i: usize) -> Option<Recorder> {
        match self {
            Role::Receive(recorders) => Some(recorders[i].clone()),
            Role::Idle => None,
        }
    }
}

fn running<S: Subscriber>(sub: S, rec: Option<Recorder>) -> Running {
    match rec {
        Some(rec) => Box::pin(sub.receive(rec)),
        None => Box::pin(sub.idle()),
    }
}

/// Subscribers running against a server.
pub struct Subscribers {
    tasks: Vec<JoinHandle<()>>,
    pub connected: usize,
    pub first_error: Option<String>,
}

impl Subscribers {
    /// Connections whose task has not ended.
    pub fn still_open(&self) -> usize {
        self.tasks.iter().filter(|t| !t.is_finished()).count()
    }

    /// Closes every connection (the tasks are aborted, their sockets
    /// dropped) and waits until they are.
    pub async fn close(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Opens `n` subscribers to `servers` (the bridge when one runs, else
/// Mosquitto's listener for `target`), subscriber i on `channel(i)`, each
/// doing what `role` says once subscribed.
pub async fn open_subscribers(
    opts: &Opts,
    target: Target,
    servers: &Servers,
    n: usize,
    channel: &dyn Fn(usize) -> String,
    role: Role<'_>,
) -> Result<Subscribers, String> {
    let (read_buffer, what, id_prefix) = role.settings();
    let (tasks, connected, first_error) = match (servers.bridge_addr(), &servers.mosquitto) {
        (Some(addr), _) => {
            open_many(n, opts.concurrency, what, |i| {
                let (ch, rec) = (channel(i), role.recorder(i));
                async move {
                    let sub = BridgeSub::connect(addr, &ch, read_buffer).await?;
                    Ok(running(sub, rec))
                }
            })
            .await
        }
        (None, Some((_, ports))) => {
            let (transport, port) = mqtt_endpoint(target, ports)?;
            let (qos, client) = (opts.sub_qos, opts.mqtt_client);
            open_many(n, opts.concurrency, what, |i| {
                let (ch, rec) = (channel(i), role.recorder(i));
                async move {
                    let id = format!("{id_prefix}-{i}");
                    Ok(match client {
                        MqttClient::Raw => {
                            let ws = transport == MqttTransport::WebSocket;
                            let sub =
                                RawMqttSub::connect(ws, port, &id, &ch, qos as u8, read_buffer)
                                    .await?;
                            running(sub, rec)
                        }
                        MqttClient::Rumqttc => {
                            let sub = MqttSub::connect(transport, port, &id, &ch, qos).await?;
                            running(sub, rec)
                        }
                    })
                }
            })
            .await
        }
        (None, None) => return Err("no server".into()),
    };
    Ok(Subscribers {
        tasks,
        connected,
        first_error,
    })
}

/// Where MQTT subscribers of `target` connect.
fn mqtt_endpoint(target: Target, ports: &MosquittoPorts) -> Result<(MqttTransport, u16), String> {
    match target {
        Target::MosquittoTcp => Ok((MqttTransport::Tcp, ports.mqtt)),
        _ => ports
            .ws
            .map(|ws| (MqttTransport::WebSocket, ws))
            .ok_or_else(|| "Mosquitto has no WebSocket listener".to_string()),
    }
}
