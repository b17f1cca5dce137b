//! `aws-local`: the AWS deployment on one machine, with the real,
//! unmodified `ws-handler`, `ws-authorizer` and `iot-fanout` binaries.
//!
//! What is real: the three function binaries and their `lambda_runtime`
//! loop, the AWS SDK clients inside them, the MQTT broker (yours, at
//! `--mqtt-url`), DynamoDB's API (moto's server). What is played, each
//! configured from `infra/template.yaml` ([`template`], with the
//! parameters `deploy.sh` would pass: [`parameters`]):
//!
//! * [`api_gateway`]: the WebSocket API (handshake, authorizer, routes and
//!   route responses, API Gateway's limits and timeouts, `$disconnect`),
//!   over the live [`connections`], with [`events`] in AWS's shapes;
//! * [`management`]: the `@connections` API the functions post to;
//! * [`iot_data`]: the IoT Data Plane (publish, retained reads) on the
//!   [`broker`], whose retained messages [`retained`] mirrors;
//! * [`topic_rule`]: the IoT rule that invokes `iot-fanout`;
//! * [`runtime_api`] and [`pool`]: Lambda, each function a pool of
//!   processes, and [`lambda_api`] its `Invoke` API;
//! * [`dynamodb`]: moto, one request at a time, and the table.
//!
//! [`serve`] wires them; [`logs`] makes one tagged stream of every part's
//! output; [`rest`] is the error shape and signature check of AWS's HTTP
//! APIs; [`ids`] and [`time`] write identifiers and times as AWS does;
//! [`cli`] is the command line.

pub mod api_gateway;
pub mod broker;
pub mod cli;
pub mod connections;
pub mod dynamodb;
pub mod events;
pub mod ids;
pub mod iot_data;
pub mod lambda_api;
pub mod logs;
pub mod management;
pub mod parameters;
pub mod pool;
pub mod rest;
pub mod retained;
pub mod runtime_api;
pub mod serve;
pub mod template;
pub mod time;
pub mod topic_rule;

use std::process::ExitCode;

use clap::Parser;

/// The `aws-local` binary.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logs::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aws-local: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            cli::Command::Serve(args) => serve::serve(*args).await,
            cli::Command::Dynamodb(args) => serve::dynamodb_only(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logs::line("aws-local", &format!("ERROR {e}"));
            eprintln!("aws-local: {e}");
            ExitCode::FAILURE
        }
    }
}
