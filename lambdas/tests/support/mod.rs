//! Real local parts for the Lambda tests, started by the tests on free ports:
//!
//! * [`moto`]: moto's server (`pip install 'moto[server]'`) for DynamoDB, one
//!   per test process; each test creates its own table from the definition in
//!   `infra/template.yaml` ([`create_table`]);
//! * [`StandIn`]: an HTTP stand-in for the API Gateway management API, the
//!   IoT Data Plane and Lambda's `Invoke` (moto answers 200 for unknown
//!   connections and lacks `ListRetainedMessages`): it records what the
//!   functions' clients sent, answers 410 or 429 on demand, and queues
//!   asynchronous invocations for the test to run (or forwards them);
//! * [`RuntimeApi`] / [`LambdaProcess`]: the Lambda Runtime API, so the built
//!   `lambda_runtime` binaries run their real loop end to end;
//! * [`capacity`]: a DynamoDB request recorder that bills each request as
//!   DynamoDB would, per partition key;
//! * [`pool`]: a pool of Lambda processes running asynchronous invocations
//!   as Lambda does (the fan-out's parts, in parallel).
#![allow(dead_code)]

pub mod capacity;
pub mod pool;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub const REGION: &str = "us-east-1";
pub const STAGE: &str = "test";

/// A file in the repository's `infra/`.
pub fn infra(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../infra")
        .join(name)
}

/// The repository's `infra/template.yaml`.
pub fn template_path() -> std::path::PathBuf {
    infra("template.yaml")
}

pub fn template() -> serde_yaml::Value {
    let text = std::fs::read_to_string(template_path()).expect("read infra/template.yaml");
    serde_yaml::from_str(&text).expect("infra/template.yaml is YAML")
}

/// The child gets SIGKILL when the thread that spawned it exits
/// (PR_SET_PDEATHSIG), so nothing a test starts outlives the test process.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// An environment lookup (what the configs' `from_env` take) over these
/// variables; a later entry wins over an earlier one with the same name.
pub fn env_lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// ------------------------------------------------------------------ moto

pub struct Moto {
    pub endpoint: String,
}

/// Runs `serve` on a thread of its own with a runtime of its own, for the
/// rest of the process (what it starts dies with that thread, which never
/// ends); what it sends back.
fn for_the_process<T, F, Fut>(name: &str, serve: F) -> T
where
    T: Send + 'static,
    F: FnOnce(std::sync::mpsc::Sender<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                serve(tx).await;
                std::future::pending::<()>().await
            });
        })
        .expect("a thread");
    rx.recv().expect("the thread answers")
}

/// moto's server for this test process (`lambdas::local::dynamodb::Moto`,
/// started on first use, stopped when the process exits).
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        let started = for_the_process("moto", |tx| async move {
            match lambdas::local::dynamodb::Moto::start(None).await {
                Ok(moto) => {
                    let _ = tx.send(Ok(moto.endpoint.clone()));
                    // Kept for the process's life.
                    std::future::pending::<()>().await;
                    drop(moto);
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        });
        match started {
            Ok(endpoint) => Moto { endpoint },
            Err(e) => panic!("the Lambda tests need moto's server for DynamoDB: {e}"),
        }
    })
}

/// moto behind aws-local's proxy that passes one request at a time
/// (`lambdas::local::dynamodb::serializing_proxy` says why), for this process.
pub fn dynamodb_endpoint() -> &'static str {
    static PROXY: OnceLock<String> = OnceLock::new();
    PROXY.get_or_init(|| {
        let upstream = moto().endpoint.clone();
        for_the_process("dynamodb-proxy", |tx| async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a free port");
            let endpoint = lambdas::local::dynamodb::serializing_proxy(upstream, listener)
                .await
                .expect("the proxy");
            let _ = tx.send(endpoint);
        })
    })
}

/// An SDK configuration for a local endpoint, with dummy credentials.
pub fn sdk(endpoint: &str) -> SdkConfig {
    let creds = aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "test");
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            creds,
        ))
        .endpoint_url(endpoint)
        .build()
}

/// Environment for a Lambda binary talking to local endpoints.
pub fn aws_env(moto: &str, standin: &StandIn) -> Vec<(String, String)> {
    [
        ("AWS_REGION", REGION.to_string()),
        ("AWS_DEFAULT_REGION", REGION.to_string()),
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_SESSION_TOKEN", "test".to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_ENDPOINT_URL_DYNAMODB", moto.to_string()),
        ("AWS_ENDPOINT_URL_IOT_DATA_PLANE", standin.url.clone()),
        ("AWS_ENDPOINT_URL_LAMBDA", standin.url.clone()),
        ("WEBSOCKET_ENDPOINT", standin.websocket_endpoint()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

static TABLES: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh table from `ConnectionsTable` in infra/template.yaml, as
/// aws-local creates it (`lambdas::local::dynamodb::create_table`).
pub async fn create_table(client: &aws_sdk_dynamodb::Client) -> String {
    use lambdas::local::{dynamodb, parameters, template};
    let name = format!(
        "bridge-{}-{}",
        std::process::id(),
        TABLES.fetch_add(1, Ordering::SeqCst)
    );
    let text = std::fs::read_to_string(template_path()).expect("read infra/template.yaml");
    let (params, _) = parameters::resolve(&text, &|_| None, &[], REGION).expect("parameters");
    let names = template::Names {
        region: REGION.into(),
        account: "123456789012".into(),
        stack: "test".into(),
        api_id: "abcd1234".into(),
        table: name.clone(),
    };
    let table = template::read_table(&text, &params, &names).expect("the template's table");
    assert!(
        dynamodb::create_table(client, &table)
            .await
            .expect("CreateTable on moto"),
        "{name} existed"
    );
    name
}

/// Every item of a table (tests only: the code never scans).
pub async fn scan(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Vec<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
    let mut out = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("Scan");
        out.extend(page.items.unwrap_or_default());
        match page.last_evaluated_key {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => return out,
        }
    }
}

/// The `pk|sk` of every item, sorted.
pub async fn keys(client: &aws_sdk_dynamodb::Client, table: &str) -> Vec<String> {
    let mut keys: Vec<String> = scan(client, table)
        .await
        .iter()
        .map(|i| format!("{}|{}", i["pk"].as_s().unwrap(), i["sk"].as_s().unwrap()))
        .collect();
    keys.sort();
    keys
}

/// Writes `items` in `BatchWriteItem`'s batches of 25 (the benches' seeding).
pub async fn put_items(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    items: Vec<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>,
) {
    use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
    let requests: Vec<WriteRequest> = items
        .into_iter()
        .map(|item| {
            let put = PutRequest::builder().set_item(Some(item)).build().unwrap();
            WriteRequest::builder().put_request(put).build()
        })
        .collect();
    for chunk in requests.chunks(25) {
        client
            .batch_write_item()
            .request_items(table, chunk.to_vec())
            .send()
            .await
            .expect("BatchWriteItem");
    }
}

// ------------------------------------------------------------------ stand-in

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Record {
    pub method: String,
    /// The path as sent (percent-encoded).
    pub raw_path: String,
    pub query: String,
    pub body: Vec<u8>,
    /// The `Authorization` header (a SigV4 signature).
    pub authorization: Option<String>,
    /// `X-Amz-Invocation-Type` (`Event` for an asynchronous `Invoke`).
    pub invocation_type: Option<String>,
}

impl Record {
    /// The decoded connection id of a `POST /{stage}/@connections/{id}`.
    pub fn connection(&self) -> Option<String> {
        let rest = self
            .raw_path
            .strip_prefix(&format!("/{STAGE}/@connections/"))?;
        Some(percent_decode(rest))
    }

    /// The decoded topic of a `POST /topics/{topic}`.
    pub fn topic(&self) -> Option<String> {
        Some(percent_decode(self.raw_path.strip_prefix("/topics/")?))
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        })
    }

    pub fn body_json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Default)]
struct StandInState {
    records: Mutex<Vec<Record>>,
    gone: Mutex<HashSet<String>>,
    throttle: Mutex<HashMap<String, u32>>,
    delay: Mutex<Duration>,
    retained_delay: Mutex<Duration>,
    retained: Mutex<BTreeMap<String, Vec<u8>>>,
    publish_status: Mutex<VecDeque<u16>>,
    /// Lambda `Invoke` events not yet taken, and where to send them instead.
    invocations: Mutex<Vec<Value>>,
    invoke_status: Mutex<VecDeque<u16>>,
    invoke_target: Mutex<Option<mpsc::UnboundedSender<Value>>>,
}

/// The recording stand-in for `@connections` and the IoT Data Plane.
#[derive(Clone)]
pub struct StandIn {
    pub url: String,
    state: Arc<StandInState>,
}

impl StandIn {
    pub async fn start() -> StandIn {
        let state = Arc::new(StandInState::default());
        let app = Router::new().fallback(standin).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StandIn {
            url: format!("http://{addr}"),
            state,
        }
    }

    /// The stage's management endpoint (`WEBSOCKET_ENDPOINT`).
    pub fn websocket_endpoint(&self) -> String {
        format!("{}/{STAGE}", self.url)
    }

    pub fn records(&self) -> Vec<Record> {
        self.state.records.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.state.records.lock().unwrap().clear();
    }

    /// Posts to the management API, oldest first.
    pub fn posts(&self) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.method == "POST" && r.connection().is_some())
            .collect()
    }

    /// (connection, frame) of every post, oldest first.
    pub fn posted(&self) -> Vec<(String, Value)> {
        self.posts()
            .iter()
            .map(|r| (r.connection().unwrap(), r.body_json()))
            .collect()
    }

    /// IoT Data Plane publishes, oldest first.
    pub fn publishes(&self) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.method == "POST" && r.topic().is_some())
            .collect()
    }

    /// IoT Data Plane `ListRetainedMessages` pages requested.
    pub fn retained_listings(&self) -> usize {
        self.records()
            .iter()
            .filter(|r| r.raw_path == "/retainedMessage")
            .count()
    }

    /// Posts to this connection answer 410 Gone from now on.
    pub fn set_gone(&self, connection: &str) {
        self.state.gone.lock().unwrap().insert(connection.into());
    }

    /// The next `n` posts to this connection answer 429.
    pub fn throttle(&self, connection: &str, n: u32) {
        self.state
            .throttle
            .lock()
            .unwrap()
            .insert(connection.into(), n);
    }

    /// Every post is answered after this delay.
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Every retained-message read (list or get) is answered after this delay.
    pub fn set_retained_delay(&self, delay: Duration) {
        *self.state.retained_delay.lock().unwrap() = delay;
    }

    /// The next IoT Data Plane requests (publish, retained reads) answer these statuses.
    pub fn fail_publishes(&self, statuses: &[u16]) {
        self.state
            .publish_status
            .lock()
            .unwrap()
            .extend(statuses.iter().copied());
    }

    /// The asynchronous Lambda invocations queued since the last call, oldest
    /// first (the stand-in answers `Invoke` like Lambda: 202, queued).
    pub fn take_invocations(&self) -> Vec<Value> {
        std::mem::take(&mut *self.state.invocations.lock().unwrap())
    }

    /// Queued invocations go to `target` instead (a pool of functions).
    pub fn forward_invocations(&self, target: mpsc::UnboundedSender<Value>) {
        *self.state.invoke_target.lock().unwrap() = Some(target);
    }

    /// The next `Invoke` calls answer these statuses (and queue nothing).
    pub fn fail_invocations(&self, statuses: &[u16]) {
        self.state
            .invoke_status
            .lock()
            .unwrap()
            .extend(statuses.iter().copied());
    }

    /// A retained message, as a device's retained publish leaves it.
    pub fn set_retained(&self, topic: &str, payload: &[u8]) {
        self.state
            .retained
            .lock()
            .unwrap()
            .insert(topic.into(), payload.to_vec());
    }
}

fn error(status: StatusCode, kind: &str) -> Response {
    (
        status,
        [
            ("x-amzn-errortype", kind),
            ("content-type", "application/json"),
        ],
        json!({"message": kind}).to_string(),
    )
        .into_response()
}

fn ok_json(v: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn standin(
    State(state): State<Arc<StandInState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw_path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let record = Record {
        method: method.to_string(),
        raw_path: raw_path.clone(),
        query: query.clone(),
        body: body.to_vec(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        invocation_type: headers
            .get("x-amz-invocation-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    state.records.lock().unwrap().push(record.clone());
    let b64 = base64::engine::general_purpose::STANDARD;

    if method == Method::POST
        && raw_path.starts_with("/2015-03-31/functions/")
        && raw_path.ends_with("/invocations")
    {
        if let Some(status) = state.invoke_status.lock().unwrap().pop_front() {
            let kind = match status {
                429 => "TooManyRequestsException",
                _ => "ServiceException",
            };
            return error(StatusCode::from_u16(status).unwrap(), kind);
        }
        let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let target = state.invoke_target.lock().unwrap().clone();
        match target {
            Some(tx) => {
                let _ = tx.send(event);
            }
            None => state.invocations.lock().unwrap().push(event),
        }
        return StatusCode::ACCEPTED.into_response();
    }

    if let Some(conn) = record.connection() {
        if state.gone.lock().unwrap().contains(&conn) {
            return error(StatusCode::GONE, "GoneException");
        }
        {
            let mut throttle = state.throttle.lock().unwrap();
            if let Some(n) = throttle.get_mut(&conn) {
                if *n > 0 {
                    *n -= 1;
                    return error(StatusCode::TOO_MANY_REQUESTS, "LimitExceededException");
                }
            }
        }
        let delay = *state.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        return StatusCode::OK.into_response();
    }
    if let Some(topic) = record.topic() {
        if let Some(status) = state.publish_status.lock().unwrap().pop_front() {
            let kind = match status {
                429 => "ThrottlingException",
                413 => "RequestEntityTooLargeException",
                403 => "ForbiddenException",
                _ => "InternalFailureException",
            };
            return error(StatusCode::from_u16(status).unwrap(), kind);
        }
        if record.query_param("retain").as_deref() == Some("true") {
            let mut retained = state.retained.lock().unwrap();
            if body.is_empty() {
                retained.remove(&topic);
            } else {
                retained.insert(topic, body.to_vec());
            }
        }
        return ok_json(json!({}));
    }
    if method == Method::GET && raw_path.starts_with("/retainedMessage") {
        let delay = *state.retained_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = state.publish_status.lock().unwrap().pop_front() {
            return error(
                StatusCode::from_u16(status).unwrap(),
                "InternalFailureException",
            );
        }
    }
    if method == Method::GET {
        if let Some(topic) = raw_path.strip_prefix("/retainedMessage/") {
            let topic = percent_decode(topic);
            return match state.retained.lock().unwrap().get(&topic) {
                Some(p) => ok_json(json!({
                    "topic": topic, "payload": b64.encode(p), "qos": 0, "lastModifiedTime": 1
                })),
                None => error(StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            };
        }
        if raw_path == "/retainedMessage" {
            let max: usize = record
                .query_param("maxResults")
                .and_then(|m| m.parse().ok())
                .unwrap_or(200);
            let start: usize = record
                .query_param("nextToken")
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            let all: Vec<(String, usize)> = state
                .retained
                .lock()
                .unwrap()
                .iter()
                .map(|(t, p)| (t.clone(), p.len()))
                .collect();
            let page: Vec<Value> = all
                .iter()
                .skip(start)
                .take(max)
                .map(
                    |(t, n)| json!({"topic": t, "payloadSize": n, "qos": 0, "lastModifiedTime": 1}),
                )
                .collect();
            let mut out = json!({ "retainedTopics": page });
            if start + max < all.len() {
                out["nextToken"] = json!((start + max).to_string());
            }
            return ok_json(out);
        }
    }
    error(StatusCode::NOT_FOUND, "UnknownOperationException")
}

// ------------------------------------------------------------------ Lambda Runtime API

/// aws-local's Runtime API, one environment of its own per process here.
pub use lambdas::local::runtime_api::{Outcome, RuntimeApi};

/// A Lambda binary running against a [`RuntimeApi`]; killed on drop.
pub struct LambdaProcess {
    child: Child,
    pub started: Instant,
    pub runtime: RuntimeApi,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl LambdaProcess {
    pub async fn start(binary: &str, name: &str, env: &[(String, String)]) -> LambdaProcess {
        Self::start_wrapped(&[], binary, name, env).await
    }

    /// The binary run by `wrapper` (a profiler: `["valgrind", "--tool=callgrind"]`).
    pub async fn start_wrapped(
        wrapper: &[&str],
        binary: &str,
        name: &str,
        env: &[(String, String)],
    ) -> LambdaProcess {
        let runtime = RuntimeApi::start().await;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", runtime.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = stdout.clone();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        LambdaProcess {
            child,
            started,
            runtime,
            stdout,
        }
    }

    pub async fn invoke(&self, event: Value) -> Outcome {
        tokio::time::timeout(Duration::from_secs(60), self.runtime.invoke(event))
            .await
            .expect("the function answers within 60 s")
    }

    /// Time from process start to its first `/next` request (waits for it).
    pub async fn init_time(&mut self) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(t) = self.runtime.first_next() {
                return t - self.started;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the function exited during init: {status}");
            }
            assert!(Instant::now() < deadline, "no /next request within 30 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// CPU time (user + system) the process used so far (Linux /proc).
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name: state is 3rd, utime 14th, stime 15th.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Ends the function's loop and waits (at most 60 s) for the process to
    /// exit on its own (a profiler wrapping it then writes its output).
    pub async fn shutdown(&mut self) -> Option<std::process::ExitStatus> {
        self.runtime.shutdown();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Whether the process has exited, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Lines the function wrote to stdout (EMF metrics among them).
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The EMF lines it wrote, once there are at least `n` (its stdout is
    /// read by another thread, which may lag the invocation's answer; at
    /// most 10 s).
    pub async fn metrics_after(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = self.metrics();
            if metrics.len() >= n || Instant::now() > deadline {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The EMF lines it wrote, parsed.
    pub fn metrics(&self) -> Vec<Value> {
        self.stdout()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("_aws").is_some())
            .collect()
    }
}

impl Drop for LambdaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ events and tokens

/// A `$connect` / `$disconnect` / `$default` event as API Gateway sends it
/// (the shape of aws_lambda_events' fixtures).
pub fn ws_event(
    route: &str,
    connection: &str,
    body: Option<&str>,
    authorizer: Option<Value>,
) -> Value {
    let event_type = match route {
        "$connect" => "CONNECT",
        "$disconnect" => "DISCONNECT",
        _ => "MESSAGE",
    };
    let now = now_millis();
    let mut ctx = json!({
        "routeKey": route,
        "eventType": event_type,
        "extendedRequestId": "ext-1",
        "requestTime": "09/Feb/2024:18:23:28 +0000",
        "messageDirection": "IN",
        "stage": STAGE,
        "connectedAt": now,
        "requestTimeEpoch": now,
        "identity": {"sourceIp": "192.0.2.1"},
        "requestId": "req-1",
        "domainName": "abcd1234.execute-api.us-east-1.amazonaws.com",
        "connectionId": connection,
        "apiId": "abcd1234"
    });
    if route != "$connect" && route != "$disconnect" {
        ctx["messageId"] = json!("msg-1");
    }
    if let Some(a) = authorizer {
        ctx["authorizer"] = a;
    }
    let mut event = json!({
        "requestContext": ctx,
        "isBase64Encoded": false
    });
    if route == "$connect" {
        event["headers"] = json!({
            "Host": "abcd1234.execute-api.us-east-1.amazonaws.com",
            "Sec-WebSocket-Key": "x3JJHMbDL1EzLkh9GBhXDw==",
            "Sec-WebSocket-Version": "13"
        });
        event["multiValueHeaders"] = json!({
            "Host": ["abcd1234.execute-api.us-east-1.amazonaws.com"],
            "Sec-WebSocket-Key": ["x3JJHMbDL1EzLkh9GBhXDw=="],
            "Sec-WebSocket-Version": ["13"]
        });
    }
    if let Some(b) = body {
        event["body"] = json!(b);
    }
    event
}

/// The REQUEST authorizer event for `$connect` (the shape of the fixture
/// example-apigw-v2-custom-authorizer-websocket-request.json).
pub fn authorizer_event(query_token: Option<&str>, header: Option<&str>) -> Value {
    let mut headers = json!({"Host": "abcd1234.execute-api.us-east-1.amazonaws.com"});
    let mut multi = json!({"Host": ["abcd1234.execute-api.us-east-1.amazonaws.com"]});
    if let Some(h) = header {
        headers["Authorization"] = json!(h);
        multi["Authorization"] = json!([h]);
    }
    let (q, mq) = match query_token {
        Some(t) => (json!({"token": t}), json!({"token": [t]})),
        None => (json!({}), json!({})),
    };
    json!({
        "type": "REQUEST",
        "methodArn": "arn:aws:execute-api:us-east-1:123456789012:abcd1234/test/$connect",
        "headers": headers,
        "multiValueHeaders": multi,
        "queryStringParameters": q,
        "multiValueQueryStringParameters": mq,
        "stageVariables": {},
        "requestContext": {
            "apiId": "abcd1234",
            "connectedAt": 1655103417248i64,
            "connectionId": "connection-id",
            "domainName": "abcd1234.execute-api.us-east-1.amazonaws.com",
            "eventType": "CONNECT",
            "extendedRequestId": "extended-req-id",
            "identity": {"sourceIp": "192.0.2.1", "userAgent": "test"},
            "messageDirection": "IN",
            "requestId": "req-id",
            "requestTime": "13/Jun/2022:06:56:57 +0000",
            "requestTimeEpoch": 1655103417249i64,
            "routeKey": "$connect",
            "stage": STAGE
        }
    })
}

/// The id [`rule_event`] gives every message (the rule's `newuuid()`).
pub const RULE_ID: &str = "7d2c1b7e-0000-4000-8000-000000000001";

/// The topic rule's output for one MQTT message.
pub fn rule_event(topic: &str, payload: &[u8]) -> Value {
    rule_event_with_id(topic, payload, RULE_ID)
}

/// The topic rule's output for one MQTT message with this id.
pub fn rule_event_with_id(topic: &str, payload: &[u8], id: &str) -> Value {
    json!({
        "topic": topic,
        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
        "timestamp": 1700000000000i64,
        "id": id
    })
}

// The crate's clocks, so tests and functions agree on the time (re-exported
// for the tests and benches/fanout.rs, which `use support::*`; not every
// target that includes this module calls both).
#[allow(unused_imports)]
pub use lambdas::{now_millis, now_secs};

/// An HS256 token.
pub fn hs256_token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

// ------------------------------------------------------------------ in-process functions

/// A fresh table on moto, a stand-in, and the functions built on them
/// in-process (the same constructors the binaries use).
pub struct Kit {
    pub standin: StandIn,
    pub ddb: aws_sdk_dynamodb::Client,
    pub table: String,
    pub calls: lambdas::calls::Calls,
    ddb_sdk: SdkConfig,
    standin_sdk: SdkConfig,
}

impl Kit {
    pub async fn new() -> Kit {
        let standin = StandIn::start().await;
        let ddb_sdk = sdk(dynamodb_endpoint());
        let standin_sdk = sdk(&standin.url);
        let calls = lambdas::calls::Calls::new();
        let ddb = lambdas::aws::dynamodb(&ddb_sdk, &calls);
        let table = create_table(&ddb).await;
        Kit {
            standin,
            ddb,
            table,
            calls,
            ddb_sdk,
            standin_sdk,
        }
    }

    /// The environment a deployed function would see, plus `extra`.
    pub fn env(&self, extra: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let endpoint = self.standin.websocket_endpoint();
        let mut vars = vec![
            ("TABLE_NAME", self.table.as_str()),
            ("WEBSOCKET_ENDPOINT", endpoint.as_str()),
            ("BRIDGE_JWT_SECRET", KIT_SECRET),
            // No lookup cache, so no subscribe waits for one (tests of the
            // cache set it, for both functions alike).
            ("BRIDGE_LOOKUP_CACHE_MS", "0"),
        ];
        vars.extend_from_slice(extra);
        env_lookup(&vars)
    }

    pub fn store(&self, calls: &lambdas::calls::Calls) -> lambdas::store::Store {
        lambdas::store::Store::new(lambdas::aws::dynamodb(&self.ddb_sdk, calls), &self.table)
    }

    /// The store, each of its requests billed in `recorder` (and counted in
    /// the kit's calls).
    pub fn recorded_store(&self, recorder: &capacity::Recorder) -> lambdas::store::Store {
        let conf = aws_sdk_dynamodb::config::Builder::from(&self.ddb_sdk)
            .interceptor(self.calls.interceptor())
            .interceptor(recorder.interceptor())
            .build();
        lambdas::store::Store::new(aws_sdk_dynamodb::Client::from_conf(conf), &self.table)
    }

    pub fn sender(&self, calls: &lambdas::calls::Calls) -> lambdas::sender::Sender {
        lambdas::aws::sender(&self.standin_sdk, calls, &self.standin.websocket_endpoint())
            .expect("a sender")
    }

    /// An invoker of the function `name` whose invocations the stand-in
    /// queues (see [`StandIn::invocations`]).
    pub fn invoker(&self, name: &str, calls: &lambdas::calls::Calls) -> lambdas::invoke::Invoker {
        lambdas::invoke::Invoker::new(
            &self.standin_sdk,
            name,
            Some(self.standin.url.clone()),
            calls,
        )
        .expect("an invoker")
    }

    pub fn handler(&self, extra: &[(&str, &str)]) -> lambdas::handler::Handler {
        self.handler_with(extra, &self.calls)
    }

    /// The handler, counting its requests in `calls`.
    pub fn handler_with(
        &self,
        extra: &[(&str, &str)],
        calls: &lambdas::calls::Calls,
    ) -> lambdas::handler::Handler {
        let config = lambdas::config::HandlerConfig::from_env(&self.env(extra)).unwrap();
        lambdas::handler::Handler::new(
            config,
            self.store(calls),
            lambdas::iot::Iot::new(lambdas::aws::iot_data(&self.standin_sdk, calls)),
            self.sender(calls),
        )
        .expect("the handler starts")
    }

    pub fn fanout(&self, extra: &[(&str, &str)]) -> lambdas::fanout::Fanout {
        self.fanout_with(extra, &self.calls)
    }

    /// The fan-out, counting its requests in `calls`.
    pub fn fanout_with(
        &self,
        extra: &[(&str, &str)],
        calls: &lambdas::calls::Calls,
    ) -> lambdas::fanout::Fanout {
        let config = lambdas::config::FanoutConfig::from_env(&self.env(extra)).unwrap();
        lambdas::fanout::Fanout::new(config, self.store(calls), self.sender(calls), calls.clone())
    }

    pub async fn keys(&self) -> Vec<String> {
        keys(&self.ddb, &self.table).await
    }
}

/// The HS256 secret the kit's functions check `auth` tokens with.
pub const KIT_SECRET: &str = "kit-secret-0123456789abcdef0123456789";

/// The authorizer context API Gateway passes on for these permissions.
pub fn context_for(perms: &bridge::permissions::Permissions) -> Value {
    json!({"permissions": serde_json::to_string(perms).unwrap(), "principalId": "p"})
}

/// Passes an event, as JSON, to the handler; its response (panics if the
/// event does not parse or the handler fails).
pub async fn handle(
    h: &lambdas::handler::Handler,
    event: Value,
) -> aws_lambda_events::apigw::ApiGatewayProxyResponse {
    let event = serde_json::from_value(event).expect("the event parses");
    h.handle(event).await.expect("the handler answers")
}

/// A response's body, parsed as JSON (panics unless it is JSON text).
pub fn body(r: &aws_lambda_events::apigw::ApiGatewayProxyResponse) -> Option<Value> {
    match &r.body {
        Some(aws_lambda_events::encodings::Body::Text(t)) => {
            Some(serde_json::from_str(t).expect("a JSON body"))
        }
        Some(other) => panic!("unexpected body {other:?}"),
        None => None,
    }
}

/// Connects `id` through the handler with these permissions; panics unless 200.
pub async fn connect(
    h: &lambdas::handler::Handler,
    id: &str,
    perms: &bridge::permissions::Permissions,
) {
    let r = handle(h, ws_event("$connect", id, None, Some(context_for(perms)))).await;
    assert_eq!(r.status_code, 200);
}

/// Sends one text frame; the reply body, parsed.
pub async fn send(h: &lambdas::handler::Handler, id: &str, frame: &str) -> Option<Value> {
    let r = handle(h, ws_event("$default", id, Some(frame), None)).await;
    assert_eq!(r.status_code, 200);
    body(&r)
}

/// Permissions from a channels claim.
pub fn perms(
    subject: &str,
    subscribe: &[&str],
    publish: &[&str],
) -> bridge::permissions::Permissions {
    bridge::permissions::Permissions::from_claims(
        Some(subject),
        &bridge::permissions::ChannelsClaim {
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            publish: publish.iter().map(|s| s.to_string()).collect(),
        },
    )
}
