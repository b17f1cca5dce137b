//! The `bridge` command: `serve` runs the bridge, `sub` and `pub` are a small
//! client, `smoke` checks an AWS deployment, `simulate` runs simulated
//! devices. Thin: parsing and dispatch only.

use std::process::ExitCode;

use bridge::config::{LogFormat, ServeArgs, Settings};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bridge",
    version,
    about = "MQTT topics as WebSocket channels: devices speak MQTT, browsers speak WebSocket, one channel space."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge: a WebSocket server at /ws in front of an MQTT broker
    /// (an embedded one unless --mqtt-url is given).
    Serve(Box<ServeArgs>),
    /// Subscribe to CHANNEL and print each message as a JSON line (token: BRIDGE_TOKEN).
    Sub {
        /// The bridge's WebSocket URL, e.g. ws://127.0.0.1:8080/ws
        url: String,
        /// Channel filter (MQTT wildcards + and # allowed)
        channel: String,
        /// First replay the retained messages that match
        #[arg(long)]
        retained: bool,
        /// Exit after this many messages
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Publish DATA to CHANNEL and wait for the ack (token: BRIDGE_TOKEN).
    Pub {
        /// The bridge's WebSocket URL, e.g. ws://127.0.0.1:8080/ws
        url: String,
        /// Channel (an MQTT topic, no wildcards)
        channel: String,
        /// The message: JSON if it parses as JSON, else text (see --encoding)
        data: String,
        /// How DATA becomes the payload
        #[arg(long, value_enum)]
        encoding: Option<Encoding>,
        /// MQTT QoS (0 or 1)
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// Ask the broker to retain the message
        #[arg(long)]
        retain: bool,
    },
    /// Check a deployed AWS stack end to end: a WebSocket client (token: BRIDGE_TOKEN) and
    /// an MQTT device (X.509 certificate) exchange messages both ways.
    Smoke(bridge::smoke::SmokeArgs),
    /// Run N simulated devices, each its own MQTT connection: telemetry, a retained
    /// online/offline status with a last will, and commands (MQTT password: BRIDGE_MQTT_PASSWORD).
    Simulate(bridge::simulate::SimulateArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Encoding {
    Json,
    Text,
    Base64,
}

/// Logs go to stderr. The embedded broker (rmqtt) and the MQTT client
/// (rumqttc) say only warnings unless RUST_LOG names them.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rmqtt=warn,rmqtt_net=warn,rumqttc=warn")
    });
    // Colour codes only for a person at a terminal, never into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    // The TLS provider for every rustls user in the process (mqtts://,
    // wss://): the dependency tree enables both aws-lc-rs and ring (rmqtt's
    // QUIC support brings ring), and with two rustls cannot pick one itself.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token = std::env::var("BRIDGE_TOKEN").ok().filter(|t| !t.is_empty());
    let result: Result<(), String> = match cli.command {
        Command::Serve(mut args) => {
            args.embedded_broker_password = std::env::var("BRIDGE_EMBEDDED_BROKER_PASSWORD")
                .ok()
                .map(bridge::config::Secret::new);
            let settings = match Settings::resolve(
                &args,
                std::env::var("BRIDGE_JWT_SECRET").ok(),
                std::env::var("BRIDGE_MQTT_PASSWORD").ok(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bridge: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logs(settings.log_format);
            raise_fd_limit();
            runtime
                .block_on(bridge::server::run(
                    settings,
                    tokio_util::sync::CancellationToken::new(),
                ))
                .map_err(|e| e.to_string())
        }
        Command::Sub {
            url,
            channel,
            retained,
            count,
        } => runtime
            .block_on(bridge::client::sub(
                &url,
                &channel,
                retained,
                count,
                token.as_deref(),
            ))
            .map_err(|e| e.to_string()),
        Command::Pub {
            url,
            channel,
            data,
            encoding,
            qos,
            retain,
        } => {
            let encoding = encoding.map(|e| match e {
                Encoding::Json => "json",
                Encoding::Text => "text",
                Encoding::Base64 => "base64",
            });
            runtime
                .block_on(bridge::client::publish(
                    &url,
                    &channel,
                    &data,
                    encoding,
                    qos,
                    retain,
                    token.as_deref(),
                ))
                .map_err(|e| e.to_string())
        }
        Command::Smoke(args) => runtime.block_on(bridge::smoke::run(args)),
        Command::Simulate(args) => {
            let plan =
                match bridge::simulate::plan(&args, std::env::var("BRIDGE_MQTT_PASSWORD").ok()) {
                    Ok(plan) => plan,
                    Err(e) => {
                        eprintln!("bridge: {e}");
                        return ExitCode::from(2);
                    }
                };
            init_logs(LogFormat::Text);
            raise_fd_limit();
            runtime.block_on(bridge::simulate::run(plan))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bridge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Many connections need many file descriptors: raise the soft limit to
/// the hard one.
fn raise_fd_limit() {
    #[cfg(unix)]
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
