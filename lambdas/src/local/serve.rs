//! `aws-local serve`: puts the parts together, in the order they need each
//! other, and says what runs where.
//!
//! 1. the template and its parameters ([`crate::local::parameters`]);
//! 2. the listener, so the functions can be told where API Gateway is;
//! 3. DynamoDB (moto unless `--dynamodb-endpoint`), the table from the template;
//! 4. the broker: the IoT Data Plane's publisher and the retained mirror;
//! 5. every function the template's routes, authorizer and rules invoke, as
//!    pools of processes with the template's environment, where only the
//!    endpoints differ from AWS (`AWS_ENDPOINT_URL_DYNAMODB`,
//!    `..._IOT_DATA_PLANE`, `..._APIGATEWAYMANAGEMENTAPI`, `..._LAMBDA` point
//!    at aws-local);
//! 6. the HTTP side: `/ws`, `/{stage}/@connections/{id}`, `/topics/...`,
//!    `/retainedMessage...`, `/2015-03-31/functions/{name}/invocations`;
//! 7. the topic rules.
//!
//! It runs until SIGINT or SIGTERM; every process it started goes with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::local::api_gateway::{self, Gateway, Limits};
use crate::local::broker::{self, Publisher};
use crate::local::cli::{concurrency_for, DynamodbArgs, ServeArgs};
use crate::local::connections::Connections;
use crate::local::dynamodb::{self, Moto};
use crate::local::iot_data::{self, IotData};
use crate::local::lambda_api;
use crate::local::management;
use crate::local::parameters::{self, Auth};
use crate::local::pool::{self, Functions, Pool, Spec};
use crate::local::retained::Mirror;
use crate::local::template::{Deployment, Names};
use crate::local::topic_rule::{self, Sql};

/// The local account.
pub const ACCOUNT: &str = "123456789012";
/// The local API id.
pub const API_ID: &str = "awslocal00";

/// The template: `--template`, else `infra/template.yaml` here or in the
/// repository the binary was built in (`target/<profile>/aws-local`).
fn template_path(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let mut candidates = vec![PathBuf::from("infra/template.yaml")];
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join("infra/template.yaml"));
        }
    }
    candidates.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../infra/template.yaml"
    )));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        "infra/template.yaml not found: run aws-local in the repository or pass --template".into()
    })
}

fn functions_dir(given: Option<&Path>) -> Result<PathBuf, String> {
    match given {
        Some(d) => Ok(d.to_path_buf()),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
            .ok_or_else(|| "cannot tell where aws-local is; pass --functions-dir".into()),
    }
}

/// The region the functions run in.
fn region() -> String {
    std::env::var("AWS_REGION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "us-east-1".into())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn serve(args: ServeArgs) -> Result<(), String> {
    let template = template_path(args.template.as_deref())?;
    let text = std::fs::read_to_string(&template)
        .map_err(|e| format!("cannot read {}: {e}", template.display()))?;
    let region = region();
    let (params, auth) = parameters::resolve(
        &text,
        &crate::config::process_env,
        &args.parameters,
        &region,
    )
    .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let names = Names {
        region: region.clone(),
        account: ACCOUNT.into(),
        stack: "aws-local".into(),
        api_id: API_ID.into(),
        table: args.table_name.clone(),
    };
    let deployment = Arc::new(Deployment::read(&text, &params, names).map_err(|e| e.to_string())?);
    for note in &deployment.notes {
        tracing::info!("not played: {note}");
    }

    // DynamoDB.
    let mut _moto = None;
    let dynamodb_endpoint = match &args.dynamodb_endpoint {
        Some(e) => e.trim_end_matches('/').to_string(),
        None => {
            let moto = Moto::start(Some("moto")).await.map_err(|e| e.to_string())?;
            let front = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())?;
            let endpoint = dynamodb::serializing_proxy(moto.endpoint.clone(), front)
                .await
                .map_err(|e| e.to_string())?;
            _moto = Some(moto);
            endpoint
        }
    };
    let ddb = aws_sdk_dynamodb::Client::new(&dynamodb::sdk(&dynamodb_endpoint, &region));
    let created = dynamodb::create_table(&ddb, &deployment.table).await?;

    // The broker.
    let url = broker::parse_url(&args.mqtt_url)?;
    let publisher = Publisher::connect(&url).await?;
    let mirror = Mirror::follow(&url).await?;

    // The functions.
    let base = format!("http://{addr}");
    let endpoints = [
        ("AWS_ENDPOINT_URL_DYNAMODB", dynamodb_endpoint.clone()),
        ("AWS_ENDPOINT_URL_IOT_DATA_PLANE", base.clone()),
        ("AWS_ENDPOINT_URL_LAMBDA", base.clone()),
        (
            "AWS_ENDPOINT_URL_APIGATEWAYMANAGEMENTAPI",
            format!("{base}/{}", deployment.stage),
        ),
    ];
    let dir = functions_dir(args.functions_dir.as_deref())?;
    let mut starting = Vec::new();
    for id in deployment.invoked() {
        let f = deployment.function(&id);
        let mut env: BTreeMap<String, String> = f.env.clone();
        env.extend(pool::lambda_env(&f.name, f.memory_mb, &region));
        env.extend(endpoints.iter().map(|(k, v)| (k.to_string(), v.clone())));
        // Colours only where aws-local's own output is a terminal.
        if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            env.insert("NO_COLOR".into(), "1".into());
        }
        for passed in ["RUST_LOG", "RUST_BACKTRACE", "AWS_LAMBDA_LOG_LEVEL"] {
            if let Ok(v) = std::env::var(passed) {
                env.insert(passed.into(), v);
            }
        }
        env.extend(args.env.iter().cloned());
        let mut size = concurrency_for(&args.concurrency, &f.name)?;
        if let Some(reserved) = f.reserved.filter(|r| *r > 0) {
            size = size.min(reserved);
        }
        let spec = Spec {
            name: f.name.clone(),
            binary: dir.join(&f.name),
            env: env.into_iter().collect(),
            timeout: f.timeout,
            arn: f.arn(&deployment.names),
            size,
            retries: f.retries,
            max_event_age: f.max_event_age,
        };
        starting.push(async move { (id, Pool::start(spec).await) });
    }
    let mut functions: Functions = BTreeMap::new();
    for (id, pool) in futures_util::future::join_all(starting).await {
        functions.insert(id, pool.map_err(|e| e.to_string())?);
    }

    // The HTTP side.
    let gateway = Arc::new(Gateway {
        deployment: deployment.clone(),
        functions: functions.clone(),
        connections: Arc::new(Connections::default()),
        limits: Limits {
            idle: args.idle_timeout,
            max_life: args.max_connection_time,
            client_buffer: args.client_buffer_bytes,
            ..Limits::default()
        },
    });
    let iot = Arc::new(IotData {
        publisher,
        mirror: mirror.clone(),
    });
    let app = Router::new()
        .route("/ws", get(api_gateway::websocket))
        .route(
            "/{stage}/@connections/{id}",
            post(management::post)
                .get(management::get)
                .delete(management::delete),
        )
        .with_state(gateway)
        .merge(
            Router::new()
                .route("/topics/{*topic}", post(iot_data::publish))
                .route("/retainedMessage", get(iot_data::list_retained))
                .route("/retainedMessage/{*topic}", get(iot_data::get_retained))
                .with_state(iot),
        )
        .merge(
            Router::new()
                .route(
                    "/2015-03-31/functions/{function}/invocations",
                    post(lambda_api::invoke),
                )
                .with_state(Arc::new(functions.clone())),
        )
        .layer(axum::extract::DefaultBodyLimit::max(1024 * 1024));
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    });

    // The topic rules.
    for rule in &deployment.rules {
        let sql =
            Sql::parse(&rule.sql).map_err(|e| format!("topic rule {}: {e}", rule.logical_id))?;
        let filter = sql.filter.clone();
        let pools: Vec<Arc<Pool>> = rule
            .functions
            .iter()
            .map(|f| functions[f].clone())
            .collect();
        topic_rule::run(&rule.logical_id, sql, &url, pools).await?;
        tracing::info!(
            "topic rule {}: {:?} on {url} → {}",
            rule.logical_id,
            filter,
            rule.functions
                .iter()
                .map(|f| deployment.function(f).name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let stage = &deployment.stage;
    tracing::info!("template {} (stage {stage})", template.display());
    tracing::info!(
        "DynamoDB {dynamodb_endpoint}{}, table {} ({})",
        if _moto.is_some() { " (moto)" } else { "" },
        deployment.table.name,
        if created { "created" } else { "existing" }
    );
    tracing::info!(
        "functions {} from {}",
        functions
            .values()
            .map(|p| format!("{} ×{}", p.spec.name, p.spec.size))
            .collect::<Vec<_>>()
            .join(", "),
        dir.display()
    );
    tracing::info!(
        "auth {}",
        match &auth {
            Auth::Off => "off (set BRIDGE_JWT_SECRET or BRIDGE_JWKS_URL to turn it on)".to_string(),
            Auth::Secret => "on: HS256 tokens signed with BRIDGE_JWT_SECRET".to_string(),
            Auth::Jwks(url) => format!("on: tokens checked with the keys of {url}"),
        }
    );
    tracing::info!(
        "@connections {base}/{stage}/@connections/{{id}}, IoT Data Plane and Lambda {base}"
    );
    tracing::info!("listening on ws://{addr}/ws");

    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
        }
        result = server => {
            return Err(format!("the HTTP server stopped: {result:?}"));
        }
    }
    drop(functions);
    Ok(())
}

/// `aws-local dynamodb`.
pub async fn dynamodb_only(args: DynamodbArgs) -> Result<(), String> {
    let moto = Moto::start(Some("moto")).await.map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let endpoint = dynamodb::serializing_proxy(moto.endpoint.clone(), listener)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        "dynamodb listening on {endpoint} (moto at {})",
        moto.endpoint
    );
    shutdown_signal().await;
    drop(moto);
    Ok(())
}
