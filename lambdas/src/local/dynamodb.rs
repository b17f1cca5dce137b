//! DynamoDB on one machine: moto's server (`pip install 'moto[server]'`),
//! started on a free port, behind a proxy that passes one request at a
//! time, and the table created from the template's definition.
//!
//! Why the proxy: moto's server is threaded, and its `TransactWriteItems`
//! undoes a cancelled transaction by restoring a copy of the whole table
//! taken before it, so two transactions at once can erase each other's
//! writes, which DynamoDB's isolation never does. One request at a time
//! gives moto the isolation the functions rely on, while they still send
//! their requests concurrently.
//!
//! Shared by `aws-local serve` (its own moto when `--dynamodb-endpoint` is
//! not given), `aws-local dynamodb` (one moto for several `serve`s, as the
//! black-box tests use it) and the Lambda tests.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::local::logs;
use crate::local::pool::die_with_parent;
use crate::local::template::Table;

/// How long moto may take to listen.
const MOTO_START: Duration = Duration::from_secs(30);

/// A running moto server (killed when dropped, or with this process).
pub struct Moto {
    pub endpoint: String,
    _child: tokio::process::Child,
}

/// Why moto did not start.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error("moto_server is not on PATH: DynamoDB runs in moto's server. Install it with: pip install 'moto[server]' (scripts/install-test-deps.sh does)")]
    Missing,
    #[error("cannot start moto_server: {0}")]
    Spawn(String),
    #[error("moto_server did not listen within {MOTO_START:?} (exit status: {0})")]
    Slow(String),
}

/// moto's access log says nothing a user needs; its errors do.
fn interesting(line: &str) -> bool {
    let access = line.contains("\" 200 ") || line.contains("\" 400 ");
    !access || line.contains("\" 5")
}

impl Moto {
    /// Starts `moto_server` on a free loopback port; its output goes to the
    /// log stream tagged `tag` (or nowhere).
    pub async fn start(tag: Option<&str>) -> Result<Moto, MotoError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| MotoError::Spawn(e.to_string()))?;
        let mut cmd = tokio::process::Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(if tag.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(if tag.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => MotoError::Missing,
            _ => MotoError::Spawn(e.to_string()),
        })?;
        let (out, err) = (child.stdout.take(), child.stderr.take());
        if let (Some(tag), Some(out), Some(err)) = (tag, out, err) {
            logs::forward(tag.to_string(), out, interesting);
            logs::forward(tag.to_string(), err, interesting);
        }
        let deadline = Instant::now() + MOTO_START;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Moto {
                    endpoint: format!("http://127.0.0.1:{port}"),
                    _child: child,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(MotoError::Slow(status.to_string()));
            }
            if Instant::now() > deadline {
                return Err(MotoError::Slow("still running".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Serves a proxy to `upstream` on `listener` that passes one request at a
/// time (see the module doc); its endpoint.
pub async fn serializing_proxy(
    upstream: String,
    listener: tokio::net::TcpListener,
) -> std::io::Result<String> {
    let addr: SocketAddr = listener.local_addr()?;
    let client = reqwest::Client::new();
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    let app = Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (client, turn, upstream) = (client.clone(), turn.clone(), upstream.clone());
            async move {
                let _one_at_a_time = turn.lock().await;
                forward(&client, &upstream, method, uri, headers, body).await
            }
        },
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let hop = |k: &str| {
        matches!(
            k,
            "host" | "content-length" | "connection" | "transfer-encoding"
        )
    };
    let mut out_headers = reqwest::header::HeaderMap::new();
    for (k, v) in headers.iter().filter(|(k, _)| !hop(k.as_str())) {
        out_headers.insert(k.clone(), v.clone());
    }
    let url = format!(
        "{upstream}{}",
        uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    );
    match client
        .request(method, url)
        .headers(out_headers)
        .body(body)
        .send()
        .await
    {
        Ok(resp) => {
            let status = resp.status();
            let mut back = HeaderMap::new();
            for (k, v) in resp.headers().iter().filter(|(k, _)| !hop(k.as_str())) {
                back.insert(k.clone(), v.clone());
            }
            let body = resp.bytes().await.unwrap_or_default();
            (status, back, body).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// An SDK configuration for a local endpoint, with dummy credentials.
pub fn sdk(endpoint: &str, region: &str) -> SdkConfig {
    let creds = aws_sdk_dynamodb::config::Credentials::new(
        "aws-local",
        "aws-local",
        None,
        None,
        "aws-local",
    );
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            creds,
        ))
        .endpoint_url(endpoint)
        .build()
}

/// Creates `table` as the template defines it (keys, attributes, billing
/// mode, TTL, global secondary indexes). A table of that name that exists
/// already is kept: `Ok(false)`.
pub async fn create_table(
    client: &aws_sdk_dynamodb::Client,
    table: &Table,
) -> Result<bool, String> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
        Projection, ProjectionType, ProvisionedThroughput, ScalarAttributeType,
        TimeToLiveSpecification,
    };
    let key = |(name, kind): &(String, String)| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(KeyType::from(kind.as_str()))
            .build()
            .map_err(|e| e.to_string())
    };
    let billing = BillingMode::from(table.billing_mode.as_str());
    let provisioned = || {
        ProvisionedThroughput::builder()
            .read_capacity_units(5)
            .write_capacity_units(5)
            .build()
            .map_err(|e| e.to_string())
    };
    let mut create = client
        .create_table()
        .table_name(&table.name)
        .billing_mode(billing.clone());
    if billing == BillingMode::Provisioned {
        create = create.provisioned_throughput(provisioned()?);
    }
    for (name, kind) in &table.attributes {
        create = create.attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::from(kind.as_str()))
                .build()
                .map_err(|e| e.to_string())?,
        );
    }
    for k in &table.keys {
        create = create.key_schema(key(k)?);
    }
    for index in &table.indexes {
        let mut projection =
            Projection::builder().projection_type(ProjectionType::from(index.projection.as_str()));
        for a in &index.non_key {
            projection = projection.non_key_attributes(a);
        }
        let mut gsi = GlobalSecondaryIndex::builder()
            .index_name(&index.name)
            .projection(projection.build());
        for k in &index.keys {
            gsi = gsi.key_schema(key(k)?);
        }
        if billing == BillingMode::Provisioned {
            gsi = gsi.provisioned_throughput(provisioned()?);
        }
        create = create.global_secondary_indexes(gsi.build().map_err(|e| e.to_string())?);
    }
    match create.send().await {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_resource_in_use_exception()) =>
        {
            return Ok(false)
        }
        Err(e) => {
            return Err(format!(
                "CreateTable {}: {}",
                table.name,
                aws_sdk_dynamodb::error::DisplayErrorContext(&e)
            ))
        }
    }
    if let Some(attr) = &table.ttl_attribute {
        client
            .update_time_to_live()
            .table_name(&table.name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name(attr)
                    .enabled(true)
                    .build()
                    .map_err(|e| e.to_string())?,
            )
            .send()
            .await
            .map_err(|e| {
                format!(
                    "UpdateTimeToLive {}: {}",
                    table.name,
                    aws_sdk_dynamodb::error::DisplayErrorContext(&e)
                )
            })?;
    }
    Ok(true)
}
