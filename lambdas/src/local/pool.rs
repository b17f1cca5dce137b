//! A Lambda function as a pool of child processes: the unmodified binary,
//! started once per execution environment, each environment with its own
//! [`RuntimeApi`] and all of them taking events from one queue, so up to
//! `size` events run at once (Lambda's concurrency), one per process.
//!
//! Each process gets the environment Lambda gives a `provided.al2023`
//! function (function name, memory, version, log group and stream, region,
//! credentials) plus what the template sets; nothing of aws-local's own
//! environment leaks in. Its output goes to the log stream tagged
//! `NAME.N`. A process that exits is started again (with a growing pause
//! when it keeps dying at once); an event it was running fails, as on
//! Lambda. Processes die with aws-local (`PR_SET_PDEATHSIG`, and killed
//! when the pool is dropped).
//!
//! When the binary changes on disk (a `cargo build` of the functions), each
//! process is replaced by one of the new binary as soon as it is not
//! running an event, as a new version of a function takes over on Lambda;
//! connections and queued events stay.
//!
//! [`Pool::invoke`] is a synchronous invocation (API Gateway's);
//! [`Pool::invoke_async`] an asynchronous one (the IoT rule's): queued, retried
//! `EventInvokeConfig.MaximumRetryAttempts` times on error with a short
//! pause (Lambda pauses a minute, then two), and logged when it finally fails,
//! where Lambda would hand it to the dead-letter queue.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use crate::local::logs;
use crate::local::runtime_api::{error_body, Invocation, Outcome, Queue, RuntimeApi};

/// Longest pause before a crashing process is started again.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(10);
/// How long a process may take to ask for its first event.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// First pause before an asynchronous event is retried (doubling).
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often the binary is looked at, and how long a new one must stay
/// unchanged (a build may still be writing it) before it is used.
const WATCH_EVERY: Duration = Duration::from_millis(500);
const SETTLED: Duration = Duration::from_secs(1);

/// Why a pool did not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{name}: {path} does not exist; build the functions first (cargo build --release -p lambdas), or point --functions-dir at them")]
    Missing { name: String, path: String },
    #[error("{name}: cannot start its process: {reason}")]
    Spawn { name: String, reason: String },
    #[error("{name}.{index} exited during init ({status}); its output is above")]
    Init {
        name: String,
        index: usize,
        status: String,
    },
    #[error("{name}.{index} did not ask for an event within {INIT_TIMEOUT:?}")]
    Slow { name: String, index: usize },
    #[error("{name}: {reason}")]
    RuntimeApi { name: String, reason: String },
}

/// A deployment's running functions, by logical id.
pub type Functions = std::collections::BTreeMap<String, Arc<Pool>>;

/// What a pool runs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The function (and binary) name, e.g. `ws-handler`.
    pub name: String,
    pub binary: PathBuf,
    /// The complete environment of each process (without
    /// `AWS_LAMBDA_RUNTIME_API`, which the pool sets).
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub arn: String,
    /// Processes (concurrent events).
    pub size: usize,
    pub retries: u32,
    pub max_event_age: Duration,
}

/// A running function.
pub struct Pool {
    pub spec: Spec,
    queue: Arc<Queue>,
    envs: Vec<RuntimeApi>,
    supervisors: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropping a supervisor drops its child, which kills it (kill_on_drop).
        for s in &self.supervisors {
            s.abort();
        }
    }
}

impl Pool {
    /// Starts `spec.size` processes and waits until each has finished its
    /// init (asked for its first event).
    pub async fn start(spec: Spec) -> Result<Arc<Pool>, PoolError> {
        if !spec.binary.is_file() {
            return Err(PoolError::Missing {
                name: spec.name.clone(),
                path: spec.binary.display().to_string(),
            });
        }
        let queue: Arc<Queue> = Arc::default();
        let (versions, _) = watch::channel(0u64);
        let mut envs = Vec::new();
        let mut supervisors = Vec::new();
        let mut inits = Vec::new();
        for index in 1..=spec.size.max(1) {
            let env = RuntimeApi::serve(queue.clone(), spec.timeout, spec.arn.clone())
                .await
                .map_err(|e| PoolError::RuntimeApi {
                    name: spec.name.clone(),
                    reason: e.to_string(),
                })?;
            let (tx, rx) = oneshot::channel();
            supervisors.push(tokio::spawn(supervise(
                spec.clone(),
                index,
                env.clone(),
                versions.subscribe(),
                tx,
            )));
            envs.push(env);
            inits.push((index, rx));
        }
        supervisors.push(tokio::spawn(watch_binary(spec.clone(), versions)));
        let pool = Pool {
            spec,
            queue,
            envs,
            supervisors,
        };
        for (index, rx) in inits {
            match tokio::time::timeout(INIT_TIMEOUT, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) | Err(_) => {
                    return Err(PoolError::Slow {
                        name: pool.spec.name.clone(),
                        index,
                    })
                }
            }
        }
        Ok(Arc::new(pool))
    }

    /// A synchronous invocation: the function's answer or error. An event
    /// waits in the queue while every process is busy.
    pub async fn invoke(&self, event: Value) -> Outcome {
        let id = crate::local::ids::uuid();
        let (reply, rx) = oneshot::channel();
        let started = Instant::now();
        self.queue.push(Invocation {
            id: id.clone(),
            event,
            reply,
        });
        let outcome = rx
            .await
            .unwrap_or_else(|_| Err(error_body("Runtime.Unknown", "the invocation was dropped")));
        tracing::debug!(
            function = %self.spec.name,
            request = %id,
            ms = started.elapsed().as_millis() as u64,
            ok = outcome.is_ok(),
            "invoked"
        );
        outcome
    }

    /// An asynchronous invocation: returns at once; the event is retried on
    /// error and logged if it never succeeds.
    pub fn invoke_async(self: &Arc<Self>, event: Value, what: String) {
        let pool = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let tries = pool.spec.retries + 1;
            let mut pause = RETRY_PAUSE;
            for attempt in 1..=tries {
                match pool.invoke(event.clone()).await {
                    Ok(_) => return,
                    Err(e) => {
                        let message = e.get("errorMessage").cloned().unwrap_or(e.clone());
                        tracing::warn!(function = %pool.spec.name, %what, attempt, error = %message, "asynchronous invocation failed");
                    }
                }
                if attempt == tries || started.elapsed() + pause > pool.spec.max_event_age {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            tracing::error!(
                function = %pool.spec.name,
                %what,
                "event dropped after {tries} attempts (on AWS it would go to the dead-letter queue)"
            );
        });
    }

    /// Events waiting for a process.
    pub fn backlog(&self) -> usize {
        self.queue.len()
    }

    /// Processes running an event now.
    pub fn busy(&self) -> usize {
        self.envs.iter().filter(|e| e.busy()).count()
    }
}

/// Starts, watches and restarts the process of one environment. The first
/// generation's init result goes to `init`.
async fn supervise(
    spec: Spec,
    index: usize,
    env: RuntimeApi,
    mut versions: watch::Receiver<u64>,
    init: oneshot::Sender<Result<(), PoolError>>,
) {
    let tag = format!("{}.{index}", spec.name);
    let mut init = Some(init);
    let mut pause = Duration::from_millis(250);
    loop {
        let generation = env.begin();
        let started = Instant::now();
        let mut child = match spawn(&spec, &env, &tag) {
            Ok(child) => child,
            Err(e) => {
                let err = PoolError::Spawn {
                    name: spec.name.clone(),
                    reason: e.to_string(),
                };
                env.end("the process could not be started");
                match init.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(err));
                        return;
                    }
                    None => {
                        tracing::error!(%tag, error = %err, "restart failed");
                        tokio::time::sleep(MAX_RESTART_PAUSE).await;
                        continue;
                    }
                }
            }
        };
        if let Some(tx) = init.take() {
            tokio::select! {
                _ = env.ready(generation) => {
                    let _ = tx.send(Ok(()));
                }
                status = child.wait() => {
                    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    env.end(&status);
                    let _ = tx.send(Err(PoolError::Init { name: spec.name.clone(), index, status }));
                    return;
                }
            }
        }
        versions.mark_unchanged();
        let why = tokio::select! {
            status = child.wait() => {
                status.map(|s| format!("the process exited ({s})")).unwrap_or_else(|e| e.to_string())
            }
            _ = env.kill_requested(generation) => {
                let _ = child.kill().await;
                "killed after the function's timeout".to_string()
            }
            _ = versions.changed() => {
                // The event it runs finishes first; then the new binary.
                env.retire();
                while env.busy() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = child.kill().await;
                let _ = child.wait().await;
                env.end("replaced");
                tracing::info!(%tag, "running the new binary");
                pause = Duration::from_millis(250);
                continue;
            }
        };
        env.end(&why);
        let lived = started.elapsed();
        tracing::warn!(%tag, lived_ms = lived.as_millis() as u64, "{why}; starting it again");
        if lived < Duration::from_secs(2) {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_RESTART_PAUSE);
        } else {
            pause = Duration::from_millis(250);
        }
    }
}

/// Announces a new version whenever the binary changed on disk and then
/// stayed unchanged for [`SETTLED`].
async fn watch_binary(spec: Spec, versions: watch::Sender<u64>) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut running = modified(&spec.binary);
    let mut seen = running;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let now = modified(&spec.binary);
        if now != seen {
            seen = now;
            since = Instant::now();
            continue;
        }
        if now.is_some() && now != running && since.elapsed() >= SETTLED {
            running = now;
            tracing::info!(function = %spec.name, "the binary changed: replacing its processes");
            versions.send_modify(|v| *v += 1);
        }
    }
}

/// The environment variables Lambda itself sets for a function.
pub fn lambda_env(name: &str, memory_mb: u32, region: &str) -> Vec<(String, String)> {
    [
        ("AWS_LAMBDA_FUNCTION_NAME", name.to_string()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory_mb.to_string()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_string()),
        ("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}")),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "aws-local".to_string()),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".to_string()),
        (
            "AWS_EXECUTION_ENV",
            "AWS_Lambda_provided.al2023".to_string(),
        ),
        ("_HANDLER", "bootstrap".to_string()),
        ("TZ", ":UTC".to_string()),
        ("AWS_REGION", region.to_string()),
        ("AWS_DEFAULT_REGION", region.to_string()),
        // The execution role's credentials (local endpoints take any).
        ("AWS_ACCESS_KEY_ID", "aws-local".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "aws-local".to_string()),
        ("AWS_SESSION_TOKEN", "aws-local".to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn spawn(spec: &Spec, env: &RuntimeApi, tag: &str) -> std::io::Result<tokio::process::Child> {
    let mut cmd = Command::new(&spec.binary);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("AWS_LAMBDA_RUNTIME_API", env.addr.to_string())
        .current_dir(spec.binary.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        logs::forward(tag.to_string(), out, logs::all);
    }
    if let Some(err) = child.stderr.take() {
        logs::forward(tag.to_string(), err, logs::all);
    }
    Ok(child)
}

/// The child gets SIGKILL when aws-local goes, however it goes.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}
