//! `ws-handler`: the WebSocket API's `$connect`, `$disconnect` and `$default`
//! routes (see `lambdas::handler`). Thin: settings and clients at init, then
//! the runtime loop.

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use lambdas::aws;
use lambdas::calls::Calls;
use lambdas::config::{process_env, HandlerConfig};
use lambdas::handler::Handler;
use lambdas::iot::Iot;
use lambdas::store::Store;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config =
        HandlerConfig::from_env(&process_env).inspect_err(|e| eprintln!("ws-handler: {e}"))?;
    let sdk = aws::sdk_config().await;
    let calls = Calls::new();
    let handler = Handler::new(
        config.clone(),
        Store::new(aws::dynamodb(&sdk, &calls), &config.table),
        Iot::new(aws::iot_data(&sdk, &calls)),
        aws::sender(&sdk, &calls, &config.websocket_endpoint)
            .inspect_err(|e| eprintln!("ws-handler: {e}"))?,
    )
    .inspect_err(|e| eprintln!("ws-handler: {e}"))?;
    let handler = &handler;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<ApiGatewayWebsocketProxyRequest>| async move {
            handler.handle(event.payload).await.map_err(Error::from)
        },
    ))
    .await
}
