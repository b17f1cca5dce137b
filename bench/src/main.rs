//! `bench`: the channel bridge's load tool (a program, not a timed test).
//!
//! It measures, on this machine, for the self-hosted `bridge serve` and side
//! by side for Mosquitto's own WebSocket listener (MQTT over WebSocket
//! clients, same tool, same device):
//!
//! * **fan-out** ([`fanout`]): one channel, N WebSocket subscribers (default
//!   1,000), one MQTT device publishing 256-byte messages at fixed offered
//!   rates and as fast as the broker takes them; deliveries per second,
//!   publish-to-receive latency p50/p99, lost messages and `lagged` notices;
//! * **idle memory** ([`idle`]): M connections (default 10,000), each with
//!   one subscription, and the server's resident memory (VmRSS) before and
//!   after: KiB per idle connection;
//! * **abuse** ([`abuse`], on request): the honest fan-out at 100 msg/s
//!   beside, in turn, slow readers, slow HTTP requests, a request flood and
//!   a poison-name publisher; what the honest clients keep, the server's
//!   peak memory, and what each attacker got.
//!
//! It builds nothing: it runs `target/release/bridge` (next to its own
//! executable, or `--bridge PATH`) and `/usr/sbin/mosquitto`, each on free
//! ports of 127.0.0.1, and stops them when done. Results are printed as
//! markdown tables at the end, with the command line that produced them.
//!
//! Other modules: [`cli`] (options), [`servers`] and [`procs`] (the
//! processes, /proc), [`connect`] and [`clients`] (the subscribers),
//! [`device`] (the MQTT publisher), [`stats`] (counting), [`payload`],
//! [`report`].

mod abuse;
mod cli;
mod clients;
mod connect;
mod device;
mod fanout;
mod idle;
mod payload;
mod procs;
mod rawmqtt;
mod report;
mod servers;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Opts, Scenario};
use crate::procs::TempDir;

fn main() -> ExitCode {
    let opts = match Opts::resolve(Cli::parse()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On Ctrl-C or SIGTERM the run is dropped, which stops the servers.
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(opts) => r,
            s = interrupted() => Err(format!("interrupted by {s}; servers stopped")),
        }
    });
    // Subscriber tasks still hold sockets: do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(opts: Opts) -> Result<(), String> {
    // Checked here once for every server started below.
    if opts.targets.iter().any(|t| t.needs_bridge()) {
        procs::check_executable(&opts.bridge, "the bridge binary", procs::BRIDGE_HINT)?;
    }
    if opts.targets.iter().any(|t| t.needs_mosquitto()) {
        procs::check_executable(&opts.mosquitto, "mosquitto", procs::MOSQUITTO_HINT)?;
    }
    let fd_limit = procs::raise_fd_limit();
    let load_before = report::loadavg();
    if load_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > 0.5)
    {
        eprintln!(
            "bench: warning: load average {load_before}: something else is using the CPU; \
             figures will be lower and noisier than on a quiet machine"
        );
    }
    let mut dir = TempDir::new()?;
    dir.keep = opts.keep_logs;
    // Scenarios run one after the other: the largest one counts.
    let needed = opts
        .scenarios
        .iter()
        .map(|s| match s {
            Scenario::Fanout => opts.subscribers,
            Scenario::Idle => opts.idle_connections,
            Scenario::Abuse => opts.subscribers + abuse::connections(&opts.abuse),
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "bench: file limit {fd_limit}; logs in {}{}",
        dir.path.display(),
        if dir.keep { " (kept)" } else { "" }
    );
    if (fd_limit as usize) < needed + 100 {
        eprintln!(
            "bench: warning: the open-file limit ({fd_limit}) is below the {needed} connections \
             asked for; expect failures (raise the hard limit, e.g. `ulimit -Hn`)"
        );
    }
    let mut fanout_rows = Vec::new();
    let mut idle_rows = Vec::new();
    let mut abuse_rows = Vec::new();
    let mut failures = Vec::new();
    for &target in &opts.targets {
        if opts.scenarios.contains(&Scenario::Fanout) {
            eprintln!("\n== fan-out: {} ==", target.label());
            match fanout::fanout(&opts, target, &dir).await {
                Ok(rows) => fanout_rows.extend(rows),
                Err(e) => {
                    eprintln!("bench: fan-out against {} failed: {e}", target.label());
                    failures.push(format!("fan-out, {}: {e}", target.label()));
                }
            }
        }
        if opts.scenarios.contains(&Scenario::Idle) {
            for &topics in &opts.idle_topics {
                eprintln!(
                    "\n== idle memory: {}, {} ==",
                    target.label(),
                    idle::topics_label(topics)
                );
                match idle::idle(&opts, target, topics, &dir).await {
                    Ok(row) => idle_rows.push(row),
                    Err(e) => {
                        eprintln!("bench: idle memory against {} failed: {e}", target.label());
                        failures.push(format!("idle, {}: {e}", target.label()));
                    }
                }
            }
        }
        if opts.scenarios.contains(&Scenario::Abuse) {
            if !target.needs_bridge() {
                eprintln!(
                    "\n== abuse: {} skipped (the attacks speak the bridge's protocol) ==",
                    target.label()
                );
                continue;
            }
            eprintln!("\n== abuse: {} ==", target.label());
            let (rows, failed) = abuse::abuse(&opts, target, &dir).await;
            abuse_rows.extend(rows);
            for e in failed {
                failures.push(format!("abuse, {}, {e}", target.label()));
            }
        }
    }
    let sections = [
        fanout::section(&opts, &fanout_rows),
        idle::section(&opts, &idle_rows),
        abuse::section(&opts, &abuse_rows),
    ];
    print!(
        "{}",
        report::report(&opts, &sections, &failures, &load_before)
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} part(s) failed (see above)", failures.len()))
    }
}

async fn interrupted() -> &'static str {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
