//! The AWS SDK clients, built once per process (at init, before the first
//! event) from one shared configuration.
//!
//! Every client honours `AWS_ENDPOINT_URL` and `AWS_ENDPOINT_URL_<SERVICE>`
//! (`..._DYNAMODB`, `..._IOT_DATA_PLANE`, `..._APIGATEWAYMANAGEMENTAPI`), so
//! the whole path runs against local endpoints. The management API client
//! otherwise uses `WEBSOCKET_ENDPOINT`, the stage's own URL (never a custom
//! domain: `@connections` is only served on the execute-api host).

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::calls::Calls;

/// One `@connections` request attempt is cut after this.
pub const POST_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The shared SDK configuration: region, credentials and endpoints from the
/// environment, as the Lambda runtime provides them.
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// Whether the environment names an endpoint for this service (the SDK then
/// uses it; see the module doc).
fn endpoint_from_env(service_suffix: &str) -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let ignored = std::env::var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
        .is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !ignored && (set(&format!("AWS_ENDPOINT_URL_{service_suffix}")) || set("AWS_ENDPOINT_URL"))
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

/// The `@connections` client. The SDK's own retries are off: [`crate::sender`]
/// retries throttled posts itself with jittered backoff, and a post that may
/// have been delivered is never repeated. One slow post is cut after 5 s so it
/// cannot hold a fan-out.
pub fn management(
    sdk: &SdkConfig,
    calls: &Calls,
    websocket_endpoint: &str,
) -> aws_sdk_apigatewaymanagement::Client {
    let mut builder = aws_sdk_apigatewaymanagement::config::Builder::from(sdk)
        .interceptor(calls.interceptor())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(POST_ATTEMPT_TIMEOUT)
                .build(),
        );
    if !endpoint_from_env("APIGATEWAYMANAGEMENTAPI") {
        builder = builder.endpoint_url(websocket_endpoint);
    }
    aws_sdk_apigatewaymanagement::Client::from_conf(builder.build())
}
