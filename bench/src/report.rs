//! The report printed at the end: the command line, the machine, the
//! versions and load, then each scenario's section (markdown), and the
//! number formats every section uses.

use std::fmt::Write as _;

use crate::cli::Opts;

/// The whole report: what ran where, each scenario's section, what failed.
pub fn report(opts: &Opts, sections: &[String], failures: &[String], load_before: &str) -> String {
    let mut out = String::new();
    let args: Vec<String> = std::env::args().collect();
    let _ = writeln!(out, "\n# Channel bridge benchmark\n");
    let _ = writeln!(out, "Command: `{}`  ", args.join(" "));
    let _ = writeln!(out, "Machine: {}  ", machine());
    if opts.targets.iter().any(|t| t.needs_bridge()) {
        let _ = writeln!(
            out,
            "Bridge: {} ({})  ",
            opts.bridge.display(),
            version(&opts.bridge, "--version")
        );
    }
    if opts.targets.iter().any(|t| t.needs_mosquitto()) {
        let _ = writeln!(
            out,
            "Mosquitto: {} ({})  ",
            opts.mosquitto.display(),
            version(&opts.mosquitto, "-h")
        );
    }
    let _ = writeln!(
        out,
        "Load average before the run: {load_before}; after: {}. The servers and the load \
         tool share this machine's cores (anything else running skews the figures): CPU \
         shares below are per process over the phase, 100% = one core.",
        loadavg()
    );
    for s in sections {
        out.push_str(s);
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failed\n");
        for f in failures {
            let _ = writeln!(out, "- {f}");
        }
    }
    out
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} cores ({model}), Linux {}", kernel.trim())
}

fn version(bin: &std::path::Path, arg: &str) -> String {
    std::process::Command::new(bin)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

pub fn thousands(n: f64) -> String {
    let n = n.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A note "`n` `what`, first: `first`", when `n` is not zero.
pub fn counted(n: u64, what: &str, first: Option<&str>) -> Option<String> {
    (n > 0).then(|| format!("{n} {what}, first: {}", first.unwrap_or("-")))
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}
