//! `iot-fanout`: the IoT topic rule's target (see `lambdas::fanout`). Thin:
//! settings and clients at init, then the runtime loop.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use lambdas::aws;
use lambdas::calls::Calls;
use lambdas::config::{process_env, FanoutConfig};
use lambdas::fanout::Fanout;
use lambdas::sender::Sender;
use lambdas::store::Store;

// Multi-threaded: signing and sending thousands of posts is CPU work, and a
// Lambda function gets more vCPUs with more memory.
#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config =
        FanoutConfig::from_env(&process_env).inspect_err(|e| eprintln!("iot-fanout: {e}"))?;
    let sdk = aws::sdk_config().await;
    let calls = Calls::new();
    let fanout = Fanout::new(
        config.clone(),
        Store::new(aws::dynamodb(&sdk, &calls), &config.table),
        Sender::new(aws::management(&sdk, &calls, &config.websocket_endpoint)),
        calls,
    );
    let fanout = &fanout;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            fanout.handle(event.payload).await.map_err(Error::from)
        },
    ))
    .await
}
