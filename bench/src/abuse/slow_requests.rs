//! Slow HTTP requests (slowloris): N connections, each sending a WebSocket
//! upgrade request's head a few bytes a second and never finishing it. Each
//! one the server closes is reopened at once, so N stay pending all along.
//!
//! The server should close each after its header timeout (PROTOCOL.md: 10 s)
//! and stay reachable for everyone else.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::attacker::{stopped, Outcome, Signals};
use crate::report::{counted, thousands};

/// The head sent, a few bytes at a time; once it is out, [`FILLER`] follows
/// for ever. No blank line ever ends it.
const HEAD: &[u8] = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
const FILLER: &[u8] = b"X-Slow: 1\r\n";
/// Bytes per write, and how often.
const CHUNK: usize = 4;
const EVERY: Duration = Duration::from_secs(1);

/// What every connection slot adds up to.
#[derive(Default)]
struct Tally {
    opened: u64,
    /// Closed by the server: how long each had been open (seconds).
    lifetimes: Vec<f64>,
    /// Closed with an HTTP response first (its first line).
    answered: u64,
    first_answer: Option<String>,
    connect_failed: u64,
    first_connect_error: Option<String>,
    /// Open when the attack stopped.
    open_at_stop: u64,
}

pub async fn run(addr: SocketAddr, n: usize, mut signals: Signals) -> Outcome {
    let tally = std::sync::Arc::new(Mutex::new(Tally::default()));
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(n.max(1));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (tally, stop, first_tx) = (tally.clone(), signals.stop.clone(), first_tx.clone());
        // Writes spread over the second rather than all at once.
        let offset = EVERY.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            slot(addr, offset, stop, &tally, first_tx).await;
        }));
    }
    drop(first_tx);
    // In place once every slot has made its first attempt.
    for _ in 0..n {
        if first_rx.recv().await.is_none() {
            break;
        }
    }
    signals.ready(Ok(()));
    stopped(&mut signals.stop).await;
    for t in tasks {
        let _ = t.await;
    }
    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    summarize(n, t)
}

/// One connection slot: open, trickle, and when the server closes, reopen.
async fn slot(
    addr: SocketAddr,
    offset: Duration,
    mut stop: watch::Receiver<bool>,
    tally: &Mutex<Tally>,
    first: tokio::sync::mpsc::Sender<()>,
) {
    let lock = || tally.lock().unwrap_or_else(|e| e.into_inner());
    let mut first = Some(first);
    loop {
        if *stop.borrow() {
            return;
        }
        let connected = TcpStream::connect(addr).await;
        if let Some(tx) = first.take() {
            let _ = tx.try_send(());
        }
        let mut stream = match connected {
            Ok(s) => s,
            Err(e) => {
                {
                    let mut t = lock();
                    t.connect_failed += 1;
                    t.first_connect_error.get_or_insert_with(|| e.to_string());
                }
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        lock().opened += 1;
        let opened = Instant::now();
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, EVERY);
        let mut sent = 0usize;
        let mut buf = [0u8; 64];
        let mut answer: Option<String> = None;
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => {
                    lock().open_at_stop += 1;
                    return;
                }
                read = stream.read(&mut buf) => match read {
                    // The server closed (or reset) the connection.
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        answer.get_or_insert_with(|| {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            text.lines().next().unwrap_or("").to_string()
                        });
                    }
                },
                _ = ticks.tick() => {
                    let chunk = next_chunk(sent);
                    if stream.write_all(chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
            }
        }
        let mut t = lock();
        t.lifetimes.push(opened.elapsed().as_secs_f64());
        if let Some(a) = answer {
            t.answered += 1;
            t.first_answer.get_or_insert(a);
        }
    }
}

/// At most `CHUNK` bytes after the first `sent` bytes of the endless head.
fn next_chunk(sent: usize) -> &'static [u8] {
    if sent < HEAD.len() {
        &HEAD[sent..(sent + CHUNK).min(HEAD.len())]
    } else {
        let at = (sent - HEAD.len()) % FILLER.len();
        &FILLER[at..(at + CHUNK).min(FILLER.len())]
    }
}

fn summarize(n: usize, mut t: Tally) -> Outcome {
    t.lifetimes.sort_by(f64::total_cmp);
    let closed = t.lifetimes.len();
    let at = |q: f64| {
        t.lifetimes
            .get(((closed as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let mut notes = vec![format!(
        "slow requests: {} opened in all, {closed} closed by the server after {:.1} s (min) / \
         {:.1} s (median) / {:.1} s (max), {} still open when the attack stopped",
        thousands(t.opened as f64),
        at(0.0),
        at(0.5),
        at(1.0),
        t.open_at_stop
    )];
    notes.extend(counted(
        t.answered,
        "slow requests got an HTTP answer before the close",
        t.first_answer.as_deref(),
    ));
    notes.extend(counted(
        t.connect_failed,
        "connection attempts failed",
        t.first_connect_error.as_deref(),
    ));
    let answered = match t.answered {
        0 => String::new(),
        a => format!(", {a} with an HTTP answer"),
    };
    Outcome {
        summary: format!(
            "{n} held open at once ({} opened in all); {} closed by the server {:.1} s after \
             opening (median){answered}",
            thousands(t.opened as f64),
            thousands(closed as f64),
            at(0.5)
        ),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_never_ends() {
        let mut out = Vec::new();
        let mut sent = 0;
        while out.len() < HEAD.len() + 10 * FILLER.len() {
            let chunk = next_chunk(sent);
            assert!(!chunk.is_empty() && chunk.len() <= CHUNK);
            out.extend_from_slice(chunk);
            sent += chunk.len();
        }
        assert!(out.starts_with(HEAD));
        assert!(!out.windows(4).any(|w| w == b"\r\n\r\n"));
    }
}
