//! Slow readers: connections that subscribe to the honest channel and then
//! never read, with a 4 KiB TCP receive buffer so the kernel cannot hide the
//! backlog from the server (as tests/tests/slow_reader.rs does).
//!
//! The server should keep each one's queue bounded (losing messages for it
//! alone, `lagged`) and close it (1008) once its socket has accepted nothing
//! for the write timeout. A client that does not read cannot see that while
//! it happens, so when told to stop each one reads what is left and says how
//! its connection ended.
//!
//! Before the server's writes stall, the kernel takes what the server writes
//! into the socket's send buffer (autotuned up to `net.ipv4.tcp_wmem`'s
//! maximum, 4 MiB by default): memory outside the server's RSS. While the
//! attack runs, the bytes queued there for the slow readers are sampled from
//! /proc/net/tcp.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::attacker::{stopped, Outcome, Signals};
use crate::clients::{self, BridgeWs};
use crate::fanout::TOPIC;
use crate::procs;
use crate::report::thousands;

/// The TCP receive buffer (and tungstenite's read buffer) of a slow reader.
const RECV_BUFFER: u32 = 4096;
/// How long a slow reader reads, once stopped, to find out how it ended.
const FINAL_READ: Duration = Duration::from_secs(5);
/// How often the kernel's send queues are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// How a slow reader's connection had ended when it looked.
enum End {
    /// A close frame with this code.
    Close(u16),
    /// The server closed the TCP connection without a close frame.
    Eof,
    /// The connection was reset.
    Reset(String),
    /// Still open: nothing ended it within [`FINAL_READ`].
    Open,
}

pub async fn run(addr: SocketAddr, n: usize, mut signals: Signals) -> Outcome {
    let mut opened = Vec::with_capacity(n);
    let mut failed: Option<String> = None;
    // Connected one after the other: 50 connections take well under a second.
    for _ in 0..n {
        match connect(addr).await {
            Ok(ws) => opened.push(ws),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let subscribed = opened.len();
    let ports: HashSet<u16> = opened
        .iter()
        .filter_map(|ws| ws.get_ref().local_addr().ok())
        .map(|a| a.port())
        .collect();
    signals.ready(match (&failed, subscribed) {
        (Some(e), 0) => Err(format!("no slow reader could subscribe: {e}")),
        _ => Ok(()),
    });
    // From here on nobody reads; the kernel's queues are sampled meanwhile.
    let mut peak = (0usize, 0u64);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = stopped(&mut signals.stop) => break,
            _ = tick.tick() => {
                let (sockets, bytes) = procs::tcp_send_queues(addr.port(), &ports);
                if bytes > peak.1 {
                    peak = (sockets, bytes);
                }
            }
        }
    }
    let ends = futures_util::future::join_all(opened.into_iter().map(final_read)).await;
    let (mut close_1008, mut close_other, mut eof, mut reset, mut open) = (0, 0, 0, 0, 0);
    let (mut messages, mut first_reset, mut other_codes) = (0u64, None, Vec::new());
    for (end, read) in ends {
        messages += read;
        match end {
            End::Close(1008) => close_1008 += 1,
            End::Close(code) => {
                close_other += 1;
                other_codes.push(code);
            }
            End::Eof => eof += 1,
            End::Reset(e) => {
                reset += 1;
                first_reset.get_or_insert(e);
            }
            End::Open => open += 1,
        }
    }
    let closed = close_1008 + close_other + eof + reset;
    let mut notes = vec![
        format!(
            "slow readers, when they finally read: {close_1008} close frames 1008, {close_other} \
             other close frames {other_codes:?}, {eof} TCP closes without a close frame, \
             {reset} resets, {open} still open; {} messages were still buffered for them",
            thousands(messages as f64)
        ),
        format!(
            "kernel send queues of the bridge's sockets to the slow readers at their peak: \
             {:.1} MiB over {} sockets ({:.2} MiB each; not in the bridge's RSS)",
            peak.1 as f64 / 1048576.0,
            peak.0,
            peak.1 as f64 / 1048576.0 / peak.0.max(1) as f64
        ),
    ];
    if let Some(e) = failed {
        notes.push(format!(
            "{} of {n} slow readers could not subscribe; first: {e}",
            n - subscribed
        ));
    }
    if let Some(e) = first_reset {
        notes.push(format!("first reset: {e}"));
    }
    Outcome {
        summary: format!(
            "{subscribed} subscribed and stopped reading; {closed} found closed by the server \
             ({close_1008} with a 1008 frame), {open} still open"
        ),
        notes,
    }
}

async fn connect(addr: SocketAddr) -> Result<BridgeWs, String> {
    let mut ws = clients::connect_ws(addr, RECV_BUFFER as usize, Some(RECV_BUFFER)).await?;
    clients::subscribe(&mut ws, TOPIC).await?;
    Ok(ws)
}

/// Reads what is left; returns how the connection ended and how many
/// messages were read on the way.
async fn final_read(mut ws: BridgeWs) -> (End, u64) {
    let deadline = tokio::time::Instant::now() + FINAL_READ;
    let mut read = 0;
    loop {
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(next) => next,
            Err(_) => return (End::Open, read),
        };
        match next {
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                return (End::Close(code), read);
            }
            Some(Ok(Message::Text(_))) => read += 1,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                let text = e.to_string();
                // tungstenite reports a TCP close without a close frame as
                // a protocol error ("reset without closing handshake").
                if text.contains("without closing handshake") {
                    return (End::Eof, read);
                }
                return (End::Reset(text), read);
            }
            None => return (End::Eof, read),
        }
    }
}
