//! The Lambda Runtime API (`2018-06-01`) of one execution environment: what
//! a `lambda_runtime` binary talks to at `AWS_LAMBDA_RUNTIME_API`.
//!
//! `GET /runtime/invocation/next` hands out the next event of the function's
//! [`Queue`] with the headers Lambda sends (request id, deadline, function
//! ARN, trace id); `POST .../{id}/response` and `.../{id}/error` answer it;
//! `POST /runtime/init/error` reports a failed start. An environment runs one
//! event at a time, as Lambda does, and an event that runs past the
//! function's timeout is answered `Sandbox.Timedout` and the process is asked
//! to be killed ([`RuntimeApi::kill_requested`]).
//!
//! Each environment has a *generation*: one per process started on it
//! ([`RuntimeApi::begin`]). A process that exits ([`RuntimeApi::end`]) fails
//! its event (`Runtime.ExitError`), and a `/next` request still pending from
//! it never takes another event: events are never handed to a dead process.
//!
//! The Lambda tests use one environment on its own ([`RuntimeApi::start`],
//! [`RuntimeApi::invoke`]); `aws-local` gives every environment of a
//! function one shared queue ([`crate::local::pool`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch, Notify};

/// A function's answer (`Ok`) or its error (`Err`, the error body Lambda
/// reports: `{"errorType": ..., "errorMessage": ...}`).
pub type Outcome = Result<Value, Value>;

/// An error body in Lambda's shape.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"errorType": kind, "errorMessage": message})
}

/// One event waiting for an environment, or running in one.
pub struct Invocation {
    pub id: String,
    pub event: Value,
    pub reply: oneshot::Sender<Outcome>,
}

/// A function's events waiting for an environment, first in first out.
#[derive(Default)]
pub struct Queue {
    items: Mutex<VecDeque<Invocation>>,
    notify: Notify,
}

impl Queue {
    pub fn push(&self, inv: Invocation) {
        self.items.lock().unwrap().push_back(inv);
        self.notify.notify_one();
    }

    fn push_front(&self, inv: Invocation) {
        self.items.lock().unwrap().push_front(inv);
        self.notify.notify_one();
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.items.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn pop(&self) -> Invocation {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(inv) = self.items.lock().unwrap().pop_front() {
                return inv;
            }
            notified.await;
        }
    }
}

struct Running {
    id: String,
    reply: oneshot::Sender<Outcome>,
}

struct Inner {
    generation: u64,
    alive: bool,
    running: Option<Running>,
    first_next: Option<Instant>,
}

struct EnvState {
    queue: Arc<Queue>,
    timeout: Duration,
    function_arn: String,
    inner: Mutex<Inner>,
    /// The latest generation that asked for an event.
    ready: watch::Sender<u64>,
    /// The latest generation whose event ran past the timeout.
    kill: watch::Sender<u64>,
    /// Set: `/next` answers an error, which ends a `lambda_runtime` loop.
    stop: watch::Sender<bool>,
    next_id: AtomicU64,
}

impl EnvState {
    /// Ends the running event with `outcome`, if it is `id` (any, if None).
    fn finish(&self, id: Option<&str>, outcome: Outcome) -> bool {
        let running = {
            let mut inner = self.inner.lock().unwrap();
            match &inner.running {
                Some(r) if id.is_none_or(|id| r.id == id) => inner.running.take(),
                _ => None,
            }
        };
        match running {
            Some(r) => {
                let _ = r.reply.send(outcome);
                true
            }
            None => false,
        }
    }
}

/// The Runtime API of one execution environment.
#[derive(Clone)]
pub struct RuntimeApi {
    /// What `AWS_LAMBDA_RUNTIME_API` is set to.
    pub addr: SocketAddr,
    state: Arc<EnvState>,
}

impl RuntimeApi {
    /// One environment with a queue of its own (the Lambda tests).
    pub async fn start() -> RuntimeApi {
        RuntimeApi::serve(
            Arc::default(),
            Duration::from_secs(60),
            "arn:aws:lambda:us-east-1:123456789012:function:test".into(),
        )
        .await
        .expect("a Runtime API on a free port")
    }

    /// An environment taking events from `queue`, for a function with this
    /// timeout and ARN, on a free loopback port.
    pub async fn serve(
        queue: Arc<Queue>,
        timeout: Duration,
        function_arn: String,
    ) -> std::io::Result<RuntimeApi> {
        let state = Arc::new(EnvState {
            queue,
            timeout,
            function_arn,
            inner: Mutex::new(Inner {
                generation: 0,
                alive: true,
                running: None,
                first_next: None,
            }),
            ready: watch::channel(0).0,
            kill: watch::channel(u64::MAX).0,
            stop: watch::channel(false).0,
            next_id: AtomicU64::new(1),
        });
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(respond),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(fail))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(RuntimeApi { addr, state })
    }

    /// Invokes the function with `event` (through this environment's queue)
    /// and waits for its answer.
    pub async fn invoke(&self, event: Value) -> Outcome {
        let id = format!("req-{}", self.state.next_id.fetch_add(1, Ordering::Relaxed));
        let (reply, rx) = oneshot::channel();
        self.state.queue.push(Invocation { id, event, reply });
        rx.await
            .unwrap_or_else(|_| Err(error_body("Runtime.Unknown", "the invocation was dropped")))
    }

    /// Ends the function's loop: its next `/next` (or the one it is
    /// waiting in) answers an error, and a `lambda_runtime` binary exits.
    pub fn shutdown(&self) {
        self.state.stop.send_replace(true);
    }

    /// When the function first asked for an event.
    pub fn first_next(&self) -> Option<Instant> {
        self.state.inner.lock().unwrap().first_next
    }

    /// A new process is about to start here: its generation.
    pub fn begin(&self) -> u64 {
        let mut inner = self.state.inner.lock().unwrap();
        inner.generation += 1;
        inner.alive = true;
        inner.generation
    }

    /// The process of the current generation is gone (`why`): its running
    /// event fails, and nothing is handed out until the next [`begin`](Self::begin).
    pub fn end(&self, why: &str) {
        self.state.inner.lock().unwrap().alive = false;
        self.state
            .finish(None, Err(error_body("Runtime.ExitError", why)));
    }

    /// Hands out no more events to the current process (it is about to be
    /// replaced); the one it runs, if any, finishes.
    pub fn retire(&self) {
        self.state.inner.lock().unwrap().alive = false;
    }

    /// Waits until generation `generation` asks for its first event (its
    /// init is done).
    pub async fn ready(&self, generation: u64) {
        let mut rx = self.state.ready.subscribe();
        let _ = rx.wait_for(|g| *g >= generation).await;
    }

    /// Resolves when an event of `generation` ran past the timeout: its
    /// process must go.
    pub async fn kill_requested(&self, generation: u64) {
        let mut rx = self.state.kill.subscribe();
        let _ = rx.wait_for(|g| *g == generation).await;
    }

    /// Whether an event is running here now.
    pub fn busy(&self) -> bool {
        self.state.inner.lock().unwrap().running.is_some()
    }
}

async fn next(State(s): State<Arc<EnvState>>) -> Response {
    let generation = {
        let mut inner = s.inner.lock().unwrap();
        if inner.first_next.is_none() {
            inner.first_next = Some(Instant::now());
        }
        inner.generation
    };
    // A /next while an event runs: the process gave up on it.
    s.finish(
        None,
        Err(error_body(
            "Runtime.InvalidState",
            "the function asked for the next event without answering this one",
        )),
    );
    s.ready.send_if_modified(|g| {
        let newer = *g < generation;
        if newer {
            *g = generation;
        }
        newer
    });
    let mut stop = s.stop.subscribe();
    loop {
        let inv = tokio::select! {
            inv = s.queue.pop() => inv,
            _ = stop.wait_for(|stopped| *stopped) => return StatusCode::GONE.into_response(),
        };
        if inv.reply.is_closed() {
            continue; // the caller stopped waiting
        }
        {
            let mut inner = s.inner.lock().unwrap();
            if !inner.alive || inner.generation != generation {
                drop(inner);
                s.queue.push_front(inv);
                return StatusCode::GONE.into_response();
            }
            inner.running = Some(Running {
                id: inv.id.clone(),
                reply: inv.reply,
            });
        }
        let deadline = crate::now_millis() + s.timeout.as_millis() as i64;
        let timer = s.clone();
        let id = inv.id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timer.timeout).await;
            let secs = timer.timeout.as_secs_f64();
            if timer.finish(
                Some(&id),
                Err(error_body(
                    "Sandbox.Timedout",
                    &format!("Task timed out after {secs:.2} seconds"),
                )),
            ) {
                timer.kill.send_replace(generation);
            }
        });
        let mut headers = HeaderMap::new();
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = value.parse() {
                headers.insert(name, v);
            }
        };
        set("lambda-runtime-aws-request-id", inv.id);
        set("lambda-runtime-deadline-ms", deadline.to_string());
        set(
            "lambda-runtime-invoked-function-arn",
            s.function_arn.clone(),
        );
        set(
            "lambda-runtime-trace-id",
            format!(
                "Root=1-{:08x}-{};Parent={};Sampled=0",
                crate::now_secs(),
                &crate::local::ids::uuid().replace('-', "")[..24],
                &crate::local::ids::uuid().replace('-', "")[..16]
            ),
        );
        set("content-type", "application/json".into());
        return (StatusCode::OK, headers, inv.event.to_string()).into_response();
    }
}

fn body_value(body: &Bytes) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

async fn respond(
    State(s): State<Arc<EnvState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> StatusCode {
    if s.finish(Some(&id), Ok(body_value(&body))) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::BAD_REQUEST
    }
}

async fn fail(State(s): State<Arc<EnvState>>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    if s.finish(Some(&id), Err(body_value(&body))) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::BAD_REQUEST
    }
}

/// A failed init is acknowledged, as the real Runtime API does; the process
/// exits after it, and its supervisor reports that.
async fn init_error(body: Bytes) -> StatusCode {
    tracing::warn!(error = %body_value(&body), "a function reported an init error");
    StatusCode::ACCEPTED
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn http(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, HeaderMap, String) {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}{path}");
        let req = match method {
            "GET" => client.get(url),
            _ => client.post(url).body(body.to_string()),
        };
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap())
    }

    #[tokio::test]
    async fn one_event_at_a_time_with_lambdas_headers() {
        let api = RuntimeApi::start().await;
        let invoke = {
            let api = api.clone();
            tokio::spawn(async move { api.invoke(json!({"n": 1})).await })
        };
        let (status, headers, body) =
            http(api.addr, "GET", "/2018-06-01/runtime/invocation/next", "").await;
        assert_eq!(status, 200);
        assert_eq!(body, r#"{"n":1}"#);
        let id = headers["lambda-runtime-aws-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let deadline: i64 = headers["lambda-runtime-deadline-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(deadline > crate::now_millis());
        assert!(headers.contains_key("lambda-runtime-invoked-function-arn"));
        assert!(api.busy());
        // An unknown id is refused; the right one answers the caller.
        let (status, ..) = http(
            api.addr,
            "POST",
            "/2018-06-01/runtime/invocation/nope/response",
            "1",
        )
        .await;
        assert_eq!(status, 400);
        let path = format!("/2018-06-01/runtime/invocation/{id}/response");
        let (status, ..) = http(api.addr, "POST", &path, r#"{"ok":true}"#).await;
        assert_eq!(status, 202);
        assert_eq!(invoke.await.unwrap(), Ok(json!({"ok": true})));
        assert!(!api.busy());
    }

    #[tokio::test]
    async fn a_dead_process_fails_its_event_and_takes_no_more() {
        let api = RuntimeApi::start().await;
        let generation = api.begin();
        let first = {
            let api = api.clone();
            tokio::spawn(async move { api.invoke(json!(1)).await })
        };
        let (status, ..) = http(api.addr, "GET", "/2018-06-01/runtime/invocation/next", "").await;
        assert_eq!(status, 200);
        api.ready(generation).await;
        // The process dies while the event runs.
        api.end("exit status 134");
        let outcome = first.await.unwrap().unwrap_err();
        assert_eq!(outcome["errorType"], "Runtime.ExitError");
        // A /next that the dead process left behind gives the event back.
        let stale = tokio::spawn({
            let addr = api.addr;
            async move {
                http(addr, "GET", "/2018-06-01/runtime/invocation/next", "")
                    .await
                    .0
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = {
            let api = api.clone();
            tokio::spawn(async move { api.invoke(json!(2)).await })
        };
        assert_eq!(stale.await.unwrap(), 410);
        // The next process gets it.
        api.begin();
        let (status, headers, body) =
            http(api.addr, "GET", "/2018-06-01/runtime/invocation/next", "").await;
        assert_eq!((status, body.as_str()), (200, "2"));
        let id = headers["lambda-runtime-aws-request-id"].to_str().unwrap();
        let path = format!("/2018-06-01/runtime/invocation/{id}/error");
        http(
            api.addr,
            "POST",
            &path,
            r#"{"errorType":"X","errorMessage":"Unauthorized"}"#,
        )
        .await;
        assert_eq!(
            second.await.unwrap().unwrap_err()["errorMessage"],
            "Unauthorized"
        );
    }

    #[tokio::test]
    async fn an_event_past_the_timeout_fails_and_asks_for_a_kill() {
        let api = RuntimeApi::serve(Arc::default(), Duration::from_millis(100), "arn".into())
            .await
            .unwrap();
        let call = {
            let api = api.clone();
            tokio::spawn(async move { api.invoke(json!(1)).await })
        };
        let (status, ..) = http(api.addr, "GET", "/2018-06-01/runtime/invocation/next", "").await;
        assert_eq!(status, 200);
        tokio::time::timeout(Duration::from_secs(5), api.kill_requested(0))
            .await
            .expect("a kill request");
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e["errorType"], "Sandbox.Timedout");
    }
}
