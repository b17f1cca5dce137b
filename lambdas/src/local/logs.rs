//! One log stream for every component: aws-local's own parts, each Lambda
//! process, moto. Every line goes to standard output, prefixed with the
//! component it came from (`ws-handler.2 | ...`, `api-gateway | ...`), so one
//! terminal, or one test's captured output, shows the whole chain in order.
//!
//! aws-local's own parts log through `tracing`; a line's tag is its module
//! (`lambdas::local::api_gateway` → `api-gateway`). Child processes' output is
//! forwarded line by line ([`forward`]). `RUST_LOG` sets the level of both
//! (default `info`). Nothing here sees a token: query strings and frame bodies
//! are never logged.

use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Width of the tag column.
const TAG_WIDTH: usize = 14;

/// Writes one tagged line (a whole line at a time, so lines of different
/// components never interleave).
pub fn line(tag: &str, text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{tag:<TAG_WIDTH$} | {}", text.trim_end());
    let _ = out.flush();
}

/// Forwards every line `reader` produces (a child's stdout or stderr) as a
/// line tagged `tag`, until it ends. Bytes that are not UTF-8 are replaced.
/// `keep` decides which lines are shown (moto's access log is noise).
pub fn forward<R>(tag: String, reader: R, keep: fn(&str) -> bool) -> tokio::task::JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match lines.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    if keep(&text) {
                        line(&tag, &text);
                    }
                }
            }
        }
    })
}

/// Every line.
pub fn all(_: &str) -> bool {
    true
}

/// aws-local's own tag for a `tracing` target.
fn tag(target: &str) -> String {
    let last = target.rsplit("::").next().unwrap_or(target);
    let name = if target.starts_with("lambdas::local") && !matches!(last, "local" | "serve") {
        last
    } else if target.starts_with("lambdas") {
        "aws-local"
    } else {
        target.split("::").next().unwrap_or(target)
    };
    name.replace('_', "-")
}

/// `tag | LEVEL message fields`.
struct Tagged;

impl<S, N> FormatEvent<S, N> for Tagged
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "{:<TAG_WIDTH$} | {} ",
            tag(meta.target()),
            meta.level()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Sends aws-local's own `tracing` events into the stream (`RUST_LOG`,
/// default `info`; the MQTT client and HTTP internals only at `warn`).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive("rumqttc=warn".parse().expect("a directive"))
        .add_directive("hyper=warn".parse().expect("a directive"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .event_format(Tagged)
        .with_writer(std::io::stdout)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(tag("lambdas::local::api_gateway"), "api-gateway");
        assert_eq!(tag("lambdas::local"), "aws-local");
        assert_eq!(tag("lambdas::local::serve"), "aws-local");
        assert_eq!(tag("lambdas::store"), "aws-local");
        assert_eq!(tag("rumqttc::state"), "rumqttc");
    }
}
