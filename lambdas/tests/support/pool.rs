//! A pool of Lambda processes that runs asynchronous invocations as Lambda
//! does: each event goes to an idle execution environment (one event at a
//! time per process), and waits while every environment is busy (the
//! function's concurrency). The stand-in forwards the `Invoke` calls it
//! receives into the pool ([`super::StandIn::forward_invocations`]), so a
//! fan-out that splits runs its parts in parallel processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::LambdaProcess;

/// What one run (an event and everything it handed on) did.
#[derive(Debug, Clone)]
pub struct PoolRun {
    /// From handing the first event in to the last invocation's end.
    pub wall: Duration,
    /// Every invocation's answer (its response, or its error), in the order
    /// they ended.
    pub answers: Vec<Result<Value, Value>>,
}

enum Msg {
    Done(usize, Result<Value, Value>),
}

/// Every invocation's answer.
type Answers = Vec<Result<Value, Value>>;
/// Told when the pool falls quiet.
type Quiet = Arc<Mutex<Option<oneshot::Sender<Answers>>>>;

/// The pool.
pub struct FunctionPool {
    events: mpsc::UnboundedSender<Value>,
    quiet: Quiet,
    processes: Arc<Vec<LambdaProcess>>,
}

impl FunctionPool {
    /// `size` processes of `binary`, each named `name` (its
    /// `AWS_LAMBDA_FUNCTION_NAME`) with `env`.
    pub async fn start(
        binary: &str,
        name: &str,
        env: &[(String, String)],
        size: usize,
    ) -> FunctionPool {
        let mut processes = Vec::new();
        for _ in 0..size {
            let mut p = LambdaProcess::start(binary, name, env).await;
            p.init_time().await;
            processes.push(p);
        }
        let processes = Arc::new(processes);
        let (events, mut queue) = mpsc::unbounded_channel::<Value>();
        let (done_tx, mut done) = mpsc::unbounded_channel::<Msg>();
        let quiet: Quiet = Arc::default();
        let (procs, waiting) = (processes.clone(), quiet.clone());
        tokio::spawn(async move {
            let mut idle: Vec<usize> = (0..procs.len()).collect();
            let mut running = 0usize;
            let mut answers = Vec::new();
            loop {
                tokio::select! {
                    Some(event) = queue.recv(), if !idle.is_empty() => {
                        let i = idle.pop().unwrap();
                        running += 1;
                        let (procs, tx) = (procs.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            let answer = procs[i].invoke(event).await;
                            let _ = tx.send(Msg::Done(i, answer));
                        });
                    }
                    Some(Msg::Done(i, answer)) = done.recv() => {
                        idle.push(i);
                        running -= 1;
                        answers.push(answer);
                        // Quiet: nothing running and nothing queued (a part
                        // is queued before the invocation that sent it ends).
                        if running == 0 && queue.is_empty() {
                            if let Some(tx) = waiting.lock().await.take() {
                                let _ = tx.send(std::mem::take(&mut answers));
                            }
                        }
                    }
                    else => return,
                }
            }
        });
        FunctionPool {
            events,
            quiet,
            processes,
        }
    }

    /// Where the stand-in forwards `Invoke` calls.
    pub fn inbox(&self) -> mpsc::UnboundedSender<Value> {
        self.events.clone()
    }

    /// Hands `event` in and waits until it and everything it handed on has
    /// run (at most `limit`).
    pub async fn run(&self, event: Value, limit: Duration) -> PoolRun {
        let (tx, rx) = oneshot::channel();
        *self.quiet.lock().await = Some(tx);
        let started = Instant::now();
        self.events.send(event).expect("the pool runs");
        let answers = tokio::time::timeout(limit, rx)
            .await
            .expect("the run ends in time")
            .expect("the pool answers");
        PoolRun {
            wall: started.elapsed(),
            answers,
        }
    }

    /// CPU time (user + system) all processes used so far.
    pub fn cpu_time(&self) -> Duration {
        self.processes.iter().map(LambdaProcess::cpu_time).sum()
    }

    /// Every process's EMF lines, parsed.
    pub fn metrics(&self) -> Vec<Value> {
        self.processes.iter().flat_map(|p| p.metrics()).collect()
    }
}
