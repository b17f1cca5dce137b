//! The AWS SDK clients, built once per process (at init, before the first
//! event) from one shared configuration.
//!
//! Every client honours `AWS_ENDPOINT_URL` and `AWS_ENDPOINT_URL_<SERVICE>`
//! (`..._DYNAMODB`, `..._IOT_DATA_PLANE`, `..._APIGATEWAYMANAGEMENTAPI`,
//! `..._LAMBDA`), so the whole path runs against local endpoints. The two
//! clients on the fan-out's hot path (`@connections` posts and Lambda
//! `Invoke`) sign their own requests ([`crate::signed`]) and read the same
//! variables.

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};

use crate::calls::Calls;
use crate::invoke::Invoker;
use crate::sender::Sender;
use crate::signed::{SendError, Signer};

/// One `@connections` request attempt is cut after this.
pub const POST_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The shared SDK configuration: region, credentials and endpoints from the
/// environment, as the Lambda runtime provides them.
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// The endpoint the environment names for this service
/// (`AWS_ENDPOINT_URL_<SUFFIX>`, else `AWS_ENDPOINT_URL`), as the SDK reads
/// them (see the module doc).
pub fn configured_endpoint(service_suffix: &str) -> Option<String> {
    let get = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let ignored = std::env::var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
        .is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if ignored {
        return None;
    }
    get(&format!("AWS_ENDPOINT_URL_{service_suffix}")).or_else(|| get("AWS_ENDPOINT_URL"))
}

pub fn dynamodb(sdk: &SdkConfig, calls: &Calls) -> aws_sdk_dynamodb::Client {
    let conf = aws_sdk_dynamodb::config::Builder::from(sdk)
        .interceptor(calls.interceptor())
        .build();
    aws_sdk_dynamodb::Client::from_conf(conf)
}

pub fn iot_data(sdk: &SdkConfig, calls: &Calls) -> aws_sdk_iotdataplane::Client {
    let conf = aws_sdk_iotdataplane::config::Builder::from(sdk)
        .interceptor(calls.interceptor())
        .build();
    aws_sdk_iotdataplane::Client::from_conf(conf)
}

/// The `@connections` sender ([`crate::sender`]), its requests signed by
/// [`crate::signed`] (no SDK client: posts are the hot path). It posts to
/// the stage's own URL (never a custom domain: `@connections` is only served
/// on the execute-api host), or to `AWS_ENDPOINT_URL_APIGATEWAYMANAGEMENTAPI`.
pub fn sender(
    sdk: &SdkConfig,
    calls: &Calls,
    websocket_endpoint: &str,
) -> Result<Sender, SendError> {
    let endpoint = configured_endpoint("APIGATEWAYMANAGEMENTAPI")
        .unwrap_or_else(|| websocket_endpoint.to_string());
    let signer = Signer::new(
        sdk,
        "execute-api",
        "ApiGatewayManagementApi",
        POST_ATTEMPT_TIMEOUT,
        calls,
    )?;
    Ok(Sender::new(signer, &endpoint))
}

/// The invoker of `function` (this function's name) for parts
/// ([`crate::invoke`]), at Lambda's endpoint or `AWS_ENDPOINT_URL_LAMBDA`.
pub fn invoker(sdk: &SdkConfig, calls: &Calls, function: &str) -> Result<Invoker, SendError> {
    Invoker::new(sdk, function, configured_endpoint("LAMBDA"), calls)
}
