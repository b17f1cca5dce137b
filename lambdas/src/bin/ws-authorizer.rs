//! `ws-authorizer`: the REQUEST authorizer of `$connect` (see
//! `lambdas::authorizer`). Thin: settings and keys at init, then the runtime
//! loop.

use aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use lambdas::authorizer::Authorizer;
use lambdas::config::{process_env, AuthorizerConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = AuthorizerConfig::from_env(&process_env)
        .inspect_err(|e| eprintln!("ws-authorizer: {e}"))?;
    let authorizer = Authorizer::new(&config).inspect_err(|e| eprintln!("ws-authorizer: {e}"))?;
    let authorizer = &authorizer;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<ApiGatewayCustomAuthorizerRequestTypeRequest>| async move {
            // The error's message is exactly "Unauthorized": API Gateway answers 401.
            authorizer.handle(event.payload).await.map_err(Error::from)
        },
    ))
    .await
}
