//! A real browser: headless Chromium runs web/channels.js against the bridge,
//! and a device talks to it through the broker.
//!
//! The pages come from a small web server of the test's own ([`Web`]): its
//! origin is a real `http://` one, it mints the tokens a page's `getToken()`
//! fetches (and can be told to mint tokens of another subject), and it
//! collects what the page reports (`POST /event`), so no report travels over
//! the connection under test. The token pages load `web/channels.js` as it is
//! on disk, or the file `CHANNELS_JS` names (to see a test fail against
//! another version of the library).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tests::{hs256_token, http_get, now, Backend, Browser, Opts, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "browser-tests-secret-0123456789abcdef";
/// Life of the tokens the test's web server mints, in seconds.
const LIFE: u64 = 4;
/// How long a test waits for Chromium to start and its page to connect.
const STARTUP: Duration = Duration::from_secs(30);
/// How long a test waits for a page to report what should happen.
const WAIT: Duration = Duration::from_secs(10);

/// Which tokens `GET /token` hands out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Minting {
    /// For `user-7`, who may subscribe to `fleet/+/telemetry`.
    Good,
    /// Valid and signed with the bridge's secret, but for `user-8`: the
    /// bridge refuses it as a replacement for a `user-7` token.
    OtherSubject,
}

/// A token `GET /token` handed out.
#[derive(Debug, Clone)]
struct Mint {
    /// When, in seconds since the epoch.
    at: f64,
    minting: Minting,
    exp: u64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn mint(minting: Minting) -> (String, Mint) {
    let sub = match minting {
        Minting::Good => "user-7",
        Minting::OtherSubject => "user-8",
    };
    let (iat, exp) = (now(), now() + LIFE);
    let token = hs256_token(
        SECRET,
        json!({"sub": sub, "iat": iat, "exp": exp,
               "channels": {"subscribe": ["fleet/+/telemetry"], "publish": ["fleet/+/commands"]}}),
    );
    let m = Mint {
        at: unix_now(),
        minting,
        exp,
    };
    (token, m)
}

#[derive(Default)]
struct WebState {
    page: String,
    minting: Option<Minting>,
    mints: Vec<Mint>,
    events: Vec<Value>,
}

/// The test's web server: `GET /page.html` (the page under test),
/// `GET /channels.js` (the library under test), `GET /token` (a fresh
/// token), `POST /event` (the page's reports, JSON objects with a `seq`).
struct Web {
    addr: SocketAddr,
    state: Arc<Mutex<WebState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Web {
    async fn start() -> Web {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(WebState {
            minting: Some(Minting::Good),
            ..Default::default()
        }));
        let library = std::sync::Arc::new(library());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, library) = (shared.clone(), library.clone());
                tokio::spawn(async move { serve(stream, &state, &library).await });
            }
        });
        Web { addr, state, task }
    }

    /// The origin the pages have.
    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn page_url(&self) -> String {
        format!("{}/page.html", self.origin())
    }

    fn set_page(&self, html: String) {
        self.state.lock().unwrap().page = html;
    }

    fn set_minting(&self, minting: Minting) {
        self.state.lock().unwrap().minting = Some(minting);
    }

    fn mints(&self) -> Vec<Mint> {
        self.state.lock().unwrap().mints.clone()
    }

    /// What the page reported so far, in the order it reported it.
    fn events(&self) -> Vec<Value> {
        let mut events = self.state.lock().unwrap().events.clone();
        events.sort_by_key(|e| e["seq"].as_u64());
        events
    }

    /// Waits until `done(events)`; panics with the events after `within`.
    async fn wait_for(&self, what: &str, within: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let events = self.events();
            if done(&events) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}; the page reported {events:#?}\nmints: {:#?}",
                self.mints()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The library the token pages load: web/channels.js, or `CHANNELS_JS`.
fn library() -> String {
    let path = std::env::var_os("CHANNELS_JS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web/channels.js"),
        PathBuf::from,
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One HTTP/1.1 request on `stream`, answered and closed.
async fn serve(mut stream: tokio::net::TcpStream, state: &Mutex<WebState>, library: &str) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = &buf[head_end..head_end + length];
    let (status, kind, answer) = match (method, path) {
        ("GET", "/page.html") => (
            "200 OK",
            "text/html; charset=utf-8",
            state.lock().unwrap().page.clone(),
        ),
        ("GET", "/channels.js") => ("200 OK", "text/javascript", library.to_string()),
        ("GET", "/token") => {
            let mut state = state.lock().unwrap();
            let minting = state.minting.expect("minting");
            let (token, m) = mint(minting);
            state.mints.push(m);
            ("200 OK", "text/plain", token)
        }
        ("POST", "/event") => {
            let event: Value =
                serde_json::from_slice(body).unwrap_or_else(|e| json!({"bad": e.to_string()}));
            state.lock().unwrap().events.push(event);
            ("204 No Content", "text/plain", String::new())
        }
        _ => ("404 Not Found", "text/plain", String::new()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A page that subscribes to `fleet/+/telemetry` with `options` (a JS object
/// literal) and reports, in order: `status` (onstatus), `error` (onerror's
/// code), `message` (the data), `subscribed`, and `failed` for anything
/// that should not happen (a script error, a rejected subscribe).
fn token_page(bridge: &str, options: &str) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8">
<script src="/channels.js"></script>
<script>
  let seq = 0;
  const report = (e) => fetch("/event", {{ method: "POST", body: JSON.stringify(Object.assign({{ seq: seq++ }}, e)) }});
  window.onerror = (m) => report({{ failed: String(m) }});
  window.onunhandledrejection = (e) => report({{ failed: String(e.reason) }});
  const client = new ChannelClient("ws://{bridge}/ws", Object.assign({options}, {{
    onstatus: (status) => report({{ status }}),
    onerror: (e) => report({{ error: e.code || String(e) }}),
  }}));
  client.subscribe("fleet/+/telemetry", (data) => report({{ message: data }}))
    .then(() => report({{ subscribed: true }}), (e) => report({{ failed: String(e) }}));
</script>"#
    )
}

/// The `getToken()` of the token pages: a fresh token from the web server.
const GET_TOKEN: &str = r#"{ getToken: () => fetch("/token").then((r) => r.text()) }"#;

fn secured() -> Setup {
    Setup::with(
        Backend::Embedded,
        Opts::default().env("BRIDGE_JWT_SECRET", SECRET),
    )
}

fn with_key<'a>(events: &'a [Value], key: &str) -> Vec<&'a Value> {
    events.iter().filter_map(|e| e.get(key)).collect()
}

fn subscribed(events: &[Value]) -> bool {
    events.iter().any(|e| e["subscribed"] == true)
}

/// `bridge_errors_total{code="CODE"}`: error frames of that code sent.
async fn errors_sent(s: &Setup, code: &str) -> f64 {
    let (_, text) = http_get(&s.bridge.http("/metrics")).await;
    let sample = format!("bridge_errors_total{{code=\"{code}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_round_trip() {
    let web = Web::start().await;
    // Auth off: the page's origin must be one the bridge allows.
    let s = Setup::with(
        Backend::Embedded,
        Opts::default().args(["--allowed-origin".to_string(), web.origin()]),
    );
    // The bridge serves the demo page and the client library.
    let (status, page) = http_get(&s.bridge.http("/")).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>Channel bridge</title>"));
    let (status, js) = http_get(&s.bridge.http("/channels.js")).await;
    assert_eq!(status, 200);
    assert!(js.contains("class ChannelClient"));

    let mut dev = s.device("dev").await;
    dev.subscribe("browser/#").await;

    // The page loads the library the bridge serves.
    web.set_page(format!(
        r#"<!doctype html><meta charset="utf-8">
<script src="http://{addr}/channels.js"></script>
<script>
  const c = new ChannelClient("ws://{addr}/ws");
  (async () => {{
    await c.subscribe("browser/in", (data, m) => {{
      const got = data instanceof Uint8Array ? Array.from(data) : data;
      c.publish("browser/out", {{ got, encoding: m.encoding || null }});
    }});
    await c.publish("browser/ready", {{ userAgent: navigator.userAgent }});
    try {{ await c.publish("browser/+", 1); }}
    catch (e) {{ await c.publish("browser/refused", {{ code: e.code }}); }}
  }})().catch((e) => c.publish("browser/failed", String(e)));
</script>"#,
        addr = s.bridge.addr
    ));
    let _browser = Browser::open(&web.page_url());

    let result = tokio::time::timeout(Duration::from_secs(60), async {
        let ready = dev.next_publish().await;
        assert_eq!(
            ready.topic,
            "browser/ready",
            "{:?}",
            String::from_utf8_lossy(&ready.payload)
        );
        let ua: Value = serde_json::from_slice(&ready.payload).unwrap();
        assert!(ua["userAgent"].as_str().unwrap().contains("Chrome"), "{ua}");
        let refused = dev.next_publish().await;
        assert_eq!(refused.topic, "browser/refused");
        assert_eq!(
            serde_json::from_slice::<Value>(&refused.payload).unwrap(),
            json!({"code":"invalid_channel"})
        );
        for (payload, echoed) in [
            (
                br#"{"temp":21.5}"#.to_vec(),
                json!({"got":{"temp":21.5},"encoding":null}),
            ),
            (b"plain".to_vec(), json!({"got":"plain","encoding":"text"})),
            (vec![0u8, 255], json!({"got":[0,255],"encoding":"base64"})),
        ] {
            dev.publish("browser/in", payload, 1, false).await;
            // The device also sees its own message on browser/#.
            let own = dev.next_publish().await;
            assert_eq!(own.topic, "browser/in");
            let out = dev.next_publish().await;
            assert_eq!(out.topic, "browser/out");
            assert_eq!(
                serde_json::from_slice::<Value>(&out.payload).unwrap(),
                echoed
            );
        }
    })
    .await;
    result.expect("the browser round trip timed out");
}

/// getToken() with tokens that live 4 s: the library refreshes each with
/// `auth` before it ends, so one connection lives through four of them and
/// every message, most published after the first token's `exp`, arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_token_refreshes_before_expiry() {
    let web = Web::start().await;
    let s = secured();
    web.set_page(token_page(&s.bridge.addr.to_string(), GET_TOKEN));
    let mut dev = s.device("dev-1").await;
    let _browser = Browser::open(&web.page_url());
    web.wait_for("the page to subscribe", STARTUP, subscribed)
        .await;
    let first_exp = web.mints()[0].exp;

    // Four token lifetimes, a message every half second.
    let count = 8 * LIFE;
    let mut after_first_exp = 0;
    for n in 0..count {
        dev.publish(
            "fleet/dev-1/telemetry",
            json!({ "n": n }).to_string(),
            1,
            false,
        )
        .await;
        if now() >= first_exp {
            after_first_exp += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        now() >= first_exp + 3 * LIFE,
        "the test outlived three tokens"
    );
    web.wait_for("every message", WAIT, |ev| {
        with_key(ev, "message").len() as u64 >= count
    })
    .await;

    let events = web.events();
    let got: Vec<u64> = with_key(&events, "message")
        .iter()
        .map(|m| m["n"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (0..count).collect::<Vec<_>>(), "{events:#?}");
    assert!(
        after_first_exp >= count / 2,
        "{after_first_exp} of {count} published after the first token's exp"
    );
    // One connection all along: never closed, never told token_expired.
    assert_eq!(with_key(&events, "status"), [&json!("open")], "{events:#?}");
    assert!(with_key(&events, "error").is_empty(), "{events:#?}");
    assert!(with_key(&events, "failed").is_empty(), "{events:#?}");
    let mints = web.mints();
    assert!(
        mints.len() >= 5,
        "one token to connect and at least four refreshes in {count} half seconds: {mints:#?}"
    );
    // The bridge agrees: every refresh accepted, no expiry, one connection.
    assert_eq!(errors_sent(&s, "token_expired").await, 0.0);
    assert_eq!(errors_sent(&s, "unauthorized").await, 0.0);
    assert_eq!(s.bridge.metric("bridge_connections").await, 1.0);
}

/// getToken() starts handing out tokens of another subject: the refresh is
/// refused (`unauthorized`, seen by onerror), the connection lives on until
/// the old token ends, the bridge then says `token_expired` and closes, and
/// the library reconnects at once with a fresh (good again) token and
/// resubscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_refresh_ends_in_expiry_and_a_fresh_connection() {
    let web = Web::start().await;
    let s = secured();
    web.set_page(token_page(&s.bridge.addr.to_string(), GET_TOKEN));
    let mut dev = s.device("dev-1").await;
    let _browser = Browser::open(&web.page_url());
    web.wait_for("the page to subscribe", STARTUP, subscribed)
        .await;

    web.set_minting(Minting::OtherSubject);
    web.wait_for("the refused refresh", WAIT, |ev| {
        with_key(ev, "error").contains(&&json!("unauthorized"))
    })
    .await;
    web.set_minting(Minting::Good);
    web.wait_for("the reconnect", WAIT, |ev| {
        with_key(ev, "status")
            .iter()
            .filter(|s| **s == "open")
            .count()
            == 2
    })
    .await;
    // Resubscribed: a message published now arrives (publish until one
    // does, as the resubscribe may still be on its way).
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    while with_key(&web.events(), "message").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no message after the reconnect: {:#?}",
            web.events()
        );
        dev.publish(
            "fleet/dev-1/telemetry",
            json!({ "n": n }).to_string(),
            1,
            false,
        )
        .await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let events = web.events();
    let story: Vec<String> = events
        .iter()
        .filter_map(|e| {
            e.get("status")
                .or_else(|| e.get("error"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        story,
        [
            "open",
            "unauthorized",
            "token_expired",
            "reconnecting",
            "open"
        ],
        "{events:#?}"
    );
    assert!(with_key(&events, "failed").is_empty(), "{events:#?}");
    // Tokens: the first connect's, the refused refresh's (not retried), and
    // the reconnect's, fetched only once the first token had ended.
    let mints = web.mints();
    assert!(mints.len() >= 3, "{mints:#?}");
    assert_eq!(
        mints[..3].iter().map(|m| m.minting).collect::<Vec<_>>(),
        [Minting::Good, Minting::OtherSubject, Minting::Good],
        "{mints:#?}"
    );
    assert!(
        mints[2].at >= mints[0].exp as f64 - 0.5,
        "the library left before the server closed: reconnected at {}, first token ends {}",
        mints[2].at,
        mints[0].exp
    );
    // The bridge agrees: one refusal, one expiry, no handshake refused.
    assert_eq!(errors_sent(&s, "unauthorized").await, 1.0);
    assert_eq!(errors_sent(&s, "token_expired").await, 1.0);
    assert_eq!(s.bridge.metric("bridge_auth_rejected_total").await, 0.0);
    assert_eq!(s.bridge.metric("bridge_connections").await, 1.0);
}

/// A fixed `token` works as it always did: it goes into `?token=` and the
/// library never asks for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_token_still_connects() {
    let web = Web::start().await;
    let s = secured();
    let token = hs256_token(
        SECRET,
        json!({"sub": "user-7", "exp": now() + 600,
               "channels": {"subscribe": ["fleet/+/telemetry"]}}),
    );
    web.set_page(token_page(
        &s.bridge.addr.to_string(),
        &format!("{{ token: {} }}", json!(token)),
    ));
    let mut dev = s.device("dev-1").await;
    let _browser = Browser::open(&web.page_url());
    web.wait_for("the page to subscribe", STARTUP, subscribed)
        .await;
    dev.publish("fleet/dev-1/telemetry", r#"{"n":1}"#, 1, false)
        .await;
    web.wait_for("the message", WAIT, |ev| {
        !with_key(ev, "message").is_empty()
    })
    .await;
    let events = web.events();
    assert_eq!(with_key(&events, "status"), [&json!("open")], "{events:#?}");
    assert!(with_key(&events, "error").is_empty(), "{events:#?}");
    assert!(web.mints().is_empty(), "a static token needs no getToken()");
}

/// A server that speaks the protocol as the AWS deployment does, sending a
/// message twice with its `mid` (Lambda's at-least-once delivery): the
/// library hands each `mid` to the page once; messages without one (the
/// self-hosted bridge's) are never taken for copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_message_are_dropped_by_their_mid() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let web = Web::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let mut sent = false;
        while let Some(Ok(msg)) = ws.next().await {
            let Ok(text) = msg.to_text() else { continue };
            let Ok(req) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if req["action"] == "subscribe" {
                let ack = json!({"type":"ack","id":req["id"]});
                ws.send(Message::text(ack.to_string())).await.unwrap();
                // The library may subscribe twice as it opens: send once.
                if std::mem::replace(&mut sent, true) {
                    continue;
                }
                let frame = |n: u32, mid: Option<&str>| {
                    let mut f = json!({"type":"message","channel":"fleet/d/telemetry","data":n});
                    if let Some(mid) = mid {
                        f["mid"] = json!(mid);
                    }
                    Message::text(f.to_string())
                };
                for f in [
                    frame(1, Some("a-1")),
                    frame(1, Some("a-1")),
                    frame(2, Some("b-2")),
                    frame(3, None),
                    frame(3, None),
                    frame(1, Some("a-1")),
                    frame(4, Some("c-4")),
                ] {
                    ws.send(f).await.unwrap();
                }
            }
        }
    });
    web.set_page(token_page(&addr.to_string(), "{}"));
    let _browser = Browser::open(&web.page_url());
    web.wait_for("the last message", WAIT, |ev| {
        with_key(ev, "message").contains(&&json!(4))
    })
    .await;
    tokio::time::sleep(tests::QUIET).await;
    let events = web.events();
    assert_eq!(
        with_key(&events, "message"),
        [&json!(1), &json!(2), &json!(3), &json!(3), &json!(4)],
        "{events:#?}"
    );
    server.abort();
}
