//! A real browser: headless Chromium runs web/channels.js against the bridge,
//! and a device talks to it through the broker both ways.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tests::{http_get, Backend, Setup};

fn chromium() -> &'static str {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_round_trip() {
    let s = Setup::new(Backend::Embedded);
    // The bridge serves the demo page and the client library.
    let (status, page) = http_get(&s.bridge.http("/")).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>Channel bridge</title>"));
    let (status, js) = http_get(&s.bridge.http("/channels.js")).await;
    assert_eq!(status, 200);
    assert!(js.contains("class ChannelClient"));

    let mut dev = s.device("dev").await;
    dev.subscribe("browser/#").await;

    let dir = std::env::temp_dir().join(format!("bridge-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("test.html");
    std::fs::write(
        &page,
        format!(
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
        ),
    )
    .unwrap();
    let mut browser = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");

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
    let _ = browser.kill();
    let _ = browser.wait();
    std::fs::remove_dir_all(&dir).ok();
    result.expect("the browser round trip timed out");
}
