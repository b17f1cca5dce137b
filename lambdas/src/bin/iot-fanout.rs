//! `iot-fanout`: the IoT topic rule's target, and the target of its own
//! parts (see `lambdas::fanout`). Thin: settings and clients at init, then
//! the runtime loop, each event within the time its deadline leaves.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use lambdas::aws;
use lambdas::budget::{Budget, RESERVE};
use lambdas::calls::Calls;
use lambdas::config::{process_env, FanoutConfig};
use lambdas::fanout::Fanout;
use lambdas::store::Store;

// Multi-threaded: signing and sending thousands of posts is CPU work, and a
// Lambda function gets more vCPUs with more memory.
#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let fail = |e: &dyn std::fmt::Display| eprintln!("iot-fanout: {e}");
    let config = FanoutConfig::from_env(&process_env).inspect_err(|e| fail(e))?;
    let sdk = aws::sdk_config().await;
    let calls = Calls::new();
    let sender = aws::sender(&sdk, &calls, &config.websocket_endpoint).inspect_err(|e| fail(e))?;
    let mut fanout = Fanout::new(
        config.clone(),
        Store::new(aws::dynamodb(&sdk, &calls), &config.table),
        sender,
        calls.clone(),
    );
    if let Some(name) = &config.function_name {
        fanout = fanout.with_invoker(aws::invoker(&sdk, &calls, name).inspect_err(|e| fail(e))?);
    }
    let fanout = &fanout;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            let budget = Budget::from_deadline_ms(event.context.deadline, RESERVE);
            fanout
                .handle_within(event.payload, budget)
                .await
                .map_err(Error::from)
        },
    ))
    .await
}
