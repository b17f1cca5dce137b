//! A real browser: headless Chromium with a profile of its own
//! ([`Browser`]), and a small Chrome DevTools Protocol client for the page
//! it shows ([`Page`]): evaluate script, click like a user (mouse events at
//! the element's place, so a hidden or covered control cannot be clicked),
//! resize to a phone, read the accessibility tree, take screenshots, and
//! collect every console error and uncaught exception the page produces.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::processes::free_port;

/// How long Chromium may take to start and show its DevTools endpoint.
const STARTUP: Duration = Duration::from_secs(30);

/// The Chromium command on this machine.
pub fn chromium() -> &'static str {
    for bin in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return bin;
        }
    }
    panic!("no Chromium found: install the Debian package `chromium` (.ci/run does)");
}

/// Headless Chromium showing one page, with a profile of its own; killed
/// (and the profile removed) when dropped.
pub struct Browser {
    child: Child,
    dir: PathBuf,
}

impl Browser {
    /// Starts Chromium on `url` (`about:blank` to navigate later with
    /// [`Page::navigate`], after the page's errors are being collected).
    pub fn open(url: &str) -> Browser {
        let dir = std::env::temp_dir().join(format!(
            "bridge-browser-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-background-timer-throttling",
                "--window-size=1280,900",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        Browser { child, dir }
    }

    /// A DevTools connection to the page the browser shows.
    pub async fn page(&self) -> Page {
        let file = self.dir.join("profile").join("DevToolsActivePort");
        let deadline = Instant::now() + STARTUP;
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "Chromium did not open its DevTools port within {STARTUP:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let ws_url = loop {
            let list = devtools_get(port, "/json/list").await;
            let targets: Value = serde_json::from_str(&list).unwrap_or(Value::Null);
            let page = targets.as_array().and_then(|ts| {
                ts.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    .map(str::to_string)
            });
            if let Some(url) = page {
                break url;
            }
            assert!(Instant::now() < deadline, "Chromium shows no page: {list}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Page::connect(&ws_url).await
    }
}

/// GET on Chromium's DevTools HTTP endpoint: the body, read by its
/// Content-Length (Chromium keeps the connection open whatever the request
/// says).
async fn devtools_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to Chromium's DevTools port");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    return String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).to_string();
                }
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return String::new(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(STARTUP, read)
        .await
        .expect("Chromium's DevTools endpoint did not answer")
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// Something the page reported that a working page does not: a console
/// error, an uncaught exception, a failed load.
#[derive(Debug, Clone)]
pub struct Problem {
    /// `exception`, `console`, or the Log domain's source (`network`,
    /// `security`, `javascript`, ...).
    pub source: String,
    pub text: String,
}

type Replies = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A DevTools Protocol session with one page.
pub struct Page {
    out: mpsc::UnboundedSender<Message>,
    replies: Replies,
    problems: Arc<Mutex<Vec<Problem>>>,
    next_id: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Page {
    async fn connect(ws_url: &str) -> Page {
        let (socket, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .unwrap_or_else(|e| panic!("DevTools connection to {ws_url}: {e}"));
        let (mut sink, mut stream) = socket.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let replies: Replies = Arc::default();
        let problems: Arc<Mutex<Vec<Problem>>> = Arc::default();
        let (r, p) = (replies.clone(), problems.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = out_rx.recv() => match msg {
                        Some(m) => if sink.send(m).await.is_err() { return },
                        None => return,
                    },
                    msg = stream.next() => {
                        let Some(Ok(Message::Text(text))) = msg else {
                            if msg.is_none() { return }
                            continue;
                        };
                        let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                        if let Some(id) = v["id"].as_u64() {
                            if let Some(tx) = r.lock().unwrap().remove(&id) {
                                let _ = tx.send(v);
                            }
                        } else if let Some(problem) = problem(&v) {
                            p.lock().unwrap().push(problem);
                        }
                    }
                }
            }
        });
        let page = Page {
            out,
            replies,
            problems,
            next_id: AtomicU64::new(1),
            task,
        };
        page.call("Runtime.enable", json!({})).await;
        page.call("Log.enable", json!({})).await;
        page.call("Page.enable", json!({})).await;
        page
    }

    /// Calls a DevTools method and returns its `result`; panics on an error.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.replies.lock().unwrap().insert(id, tx);
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.out.send(Message::text(msg)).expect("DevTools session");
        let reply = tokio::time::timeout(STARTUP, rx)
            .await
            .unwrap_or_else(|_| panic!("no DevTools answer to {method}"))
            .expect("DevTools session");
        if let Some(e) = reply.get("error") {
            panic!("DevTools {method}: {e}");
        }
        reply["result"].clone()
    }

    /// Evaluates `expression` in the page (awaiting a Promise) and returns
    /// its value as JSON; an exception fails the test.
    pub async fn eval(&self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}\nthrew {e:#}");
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is truthy and returns that value;
    /// after `within`, fails with `what`, the last value and the page's
    /// problems.
    pub async fn wait_for(&self, what: &str, within: Duration, expression: &str) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(expression).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what} ({expression} is {v}); the page reported {:#?}",
                self.problems()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Loads `url` and waits for its `load` event.
    pub async fn navigate(&self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for(
            "the page to load",
            STARTUP,
            "document.readyState === 'complete' && location.href !== 'about:blank'",
        )
        .await;
    }

    /// Clicks the element `selector` (a CSS selector, or a JS expression
    /// giving an element when it starts with `js:`) like a user: scrolled
    /// into view, mouse down and up at its centre.
    pub async fn click(&self, selector: &str) {
        let element = match selector.strip_prefix("js:") {
            Some(js) => js.to_string(),
            None => format!("document.querySelector({})", json!(selector)),
        };
        let point = self
            .eval(&format!(
                "(() => {{ const e = {element}; if (!e) return null; e.scrollIntoView({{block: 'center'}});
                 const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = match point.as_array().map(|p| (p[0].as_f64(), p[1].as_f64())) {
            Some((Some(x), Some(y))) => (x, y),
            _ => panic!("nothing to click at {selector}"),
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    /// Types `text` into the focused element, as keystrokes would.
    pub async fn type_text(&self, text: &str) {
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    /// Shows the page at `width` × `height` CSS pixels (`mobile`: as a
    /// phone does, with touch and the viewport meta tag applied).
    pub async fn emulate(&self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": if mobile { 2 } else { 1 }, "mobile": mobile}),
        )
        .await;
        self.call(
            "Emulation.setTouchEmulationEnabled",
            json!({ "enabled": mobile }),
        )
        .await;
    }

    /// Saves a PNG of the whole page (not just the viewport) to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let viewport = &metrics["cssLayoutViewport"];
        let width = size["width"].as_f64().unwrap_or(1280.0);
        let height = size["height"]
            .as_f64()
            .unwrap_or(900.0)
            .max(viewport["clientHeight"].as_f64().unwrap_or(0.0));
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true,
                       "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// The page's accessibility tree (Accessibility.getFullAXTree nodes).
    pub async fn accessibility_tree(&self) -> Vec<Value> {
        let tree = self.call("Accessibility.getFullAXTree", json!({})).await;
        tree["nodes"].as_array().cloned().unwrap_or_default()
    }

    /// What the page reported so far that a working page does not.
    pub fn problems(&self) -> Vec<Problem> {
        self.problems.lock().unwrap().clone()
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A console error, an uncaught exception or an error log entry, from a
/// DevTools event.
fn problem(event: &Value) -> Option<Problem> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Runtime.exceptionThrown" => {
            let d = &params["exceptionDetails"];
            let text = d["exception"]["description"]
                .as_str()
                .or_else(|| d["text"].as_str())
                .unwrap_or("exception");
            Some(Problem {
                source: "exception".into(),
                text: text.to_string(),
            })
        }
        "Runtime.consoleAPICalled"
            if matches!(params["type"].as_str(), Some("error" | "assert")) =>
        {
            let text = params["args"]
                .as_array()
                .map(|args| {
                    args.iter()
                        .map(|a| {
                            a["value"]
                                .as_str()
                                .map(str::to_string)
                                .or_else(|| a["description"].as_str().map(str::to_string))
                                .unwrap_or_else(|| a["value"].to_string())
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            Some(Problem {
                source: "console".into(),
                text,
            })
        }
        "Log.entryAdded" if params["entry"]["level"] == "error" => {
            let entry = &params["entry"];
            Some(Problem {
                source: entry["source"].as_str().unwrap_or("log").to_string(),
                text: format!(
                    "{} {}",
                    entry["text"].as_str().unwrap_or(""),
                    entry["url"].as_str().unwrap_or("")
                ),
            })
        }
        _ => None,
    }
}
