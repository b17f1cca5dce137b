//! The attacker's own thread: one single-threaded tokio runtime per attack,
//! apart from the honest subscribers' runtime.
//!
//! Why a thread of its own: an attacker that runs as fast as the server
//! answers would otherwise take turns with the honest subscribers in one
//! runtime's queues, and their latency would measure the load tool, not the
//! server. On its own thread it competes for the cores only, as another
//! machine's client would for the server's network; its CPU time is measured
//! so the report can say what it took from the shared cores.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::procs;

/// What an attack reports when it stops.
pub struct Outcome {
    /// What the attacker got, in a few words (the table cell).
    pub summary: String,
    /// Details (the notes under the table).
    pub notes: Vec<String>,
}

/// What an attack is given: say when it is in place, and when to stop.
pub struct Signals {
    ready: Option<oneshot::Sender<Result<(), String>>>,
    pub stop: watch::Receiver<bool>,
}

impl Signals {
    /// The attack is in place (or could not be set up: `Err`).
    pub fn ready(&mut self, result: Result<(), String>) {
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(result);
        }
    }
}

/// Resolves once `stop` says so (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A running attack.
pub struct Attacker {
    stop: watch::Sender<bool>,
    ready: Option<oneshot::Receiver<Result<(), String>>>,
    done: Option<oneshot::Receiver<(Outcome, f64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Attacker {
    /// Starts `attack` on a thread of its own.
    pub fn start<F, Fut>(name: &str, attack: F) -> Result<Attacker, String>
    where
        F: FnOnce(Signals) -> Fut + Send + 'static,
        Fut: Future<Output = Outcome> + 'static,
    {
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("attacker-{name}"))
            .spawn(move || {
                let tid = procs::thread_id();
                let signals = Signals {
                    ready: Some(ready_tx),
                    stop: stop_rx,
                };
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let mut signals = signals;
                        signals.ready(Err(format!("attacker runtime: {e}")));
                        return;
                    }
                };
                let outcome = rt.block_on(attack(signals));
                // Every socket the attack held closes with the runtime.
                drop(rt);
                let _ = done_tx.send((outcome, procs::thread_cpu_secs(tid)));
            })
            .map_err(|e| format!("cannot start the attacker thread: {e}"))?;
        Ok(Attacker {
            stop,
            ready: Some(ready),
            done: Some(done),
            thread: Some(thread),
            started: Instant::now(),
        })
    }

    /// Waits until the attack is in place (at most `limit`).
    pub async fn ready(&mut self, limit: Duration) -> Result<(), String> {
        let Some(ready) = self.ready.take() else {
            return Ok(());
        };
        match tokio::time::timeout(limit, ready).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the attacker thread ended before it was ready".into()),
            Err(_) => Err(format!("the attacker was not in place within {limit:?}")),
        }
    }

    /// Stops the attack and returns what it got, with the share of one core
    /// its thread used over its life.
    pub async fn stop(mut self) -> Result<(Outcome, f64), String> {
        let _ = self.stop.send(true);
        let done = self.done.take().expect("present until stopped");
        let (outcome, cpu) = done
            .await
            .map_err(|_| "the attacker thread ended without a result".to_string())?;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        Ok((outcome, cpu / secs * 100.0))
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::block_in_place(|| t.join());
        }
    }
}
