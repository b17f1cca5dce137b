//! The fleet dashboard (the page `bridge serve` serves at `/`) and
//! `bridge simulate`, black box.
//!
//! Headless Chromium shows the bridge's own page and is driven over the
//! DevTools protocol ([`tests::Page`]): the test reads the page's state the
//! way users' tooling would (`data-device`, `data-online`, `data-led` on
//! tiles, `document.body.dataset.connected`) and clicks its buttons with
//! mouse events. The devices are real `bridge simulate` processes; a plain
//! MQTT client watches what reaches them. Each run of the fleet test saves
//! screenshots in the target's test directory (`docs/dashboard.png` is one).
//!
//! `bridge simulate` is also tested on its own against Mosquitto: retained
//! status, last will on kill, command reactions, bad commands, TLS with a
//! client certificate; and `bridge serve --demo`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{
    bridge_bin, free_port, http_get, make_pki, Bridge, Browser, Device, Mosquitto, Opts, Page,
    Simulator, WAIT,
};

/// The page must show a new simulator's devices this soon.
const TILES_WITHIN: Duration = Duration::from_secs(5);

/// A JS expression for the tile of device `id` (null if none).
fn tile(id: &str) -> String {
    format!(
        "[...document.querySelectorAll('#tiles [data-device]')].find((t) => t.dataset.device === {})",
        json!(id)
    )
}

/// The text of what `selector` finds in device `id`'s tile.
async fn tile_text(page: &Page, id: &str, selector: &str) -> serde_json::Value {
    page.eval(&format!(
        "{}.querySelector({}).textContent",
        tile(id),
        json!(selector)
    ))
    .await
}

/// Opens the dashboard the bridge serves and waits until it is connected.
async fn open_dashboard(page: &Page, bridge: &Bridge) {
    page.navigate(&bridge.http("/")).await;
    page.wait_for(
        "the page to connect",
        WAIT,
        "document.body.dataset.connected === 'true'",
    )
    .await;
}

/// JS: the ids of the tiles, in page order.
const TILE_IDS: &str =
    "[...document.querySelectorAll('#tiles [data-device]')].map((t) => t.dataset.device)";

async fn tile_ids(page: &Page) -> Vec<String> {
    serde_json::from_value(page.eval(TILE_IDS).await).unwrap()
}

/// Where this run's screenshots go.
fn screenshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Fails on any console error or uncaught exception the page reported,
/// but those `allowed` says may happen.
fn assert_no_problems(page: &Page, allowed: impl Fn(&tests::Problem) -> bool) {
    let problems: Vec<_> = page
        .problems()
        .into_iter()
        .filter(|p| !allowed(p))
        .collect();
    assert!(problems.is_empty(), "the page reported {problems:#?}");
}

/// Reads a device's MQTT traffic until `want` accepts a message; the
/// message's topic and payload.
async fn until(
    dev: &mut Device,
    what: &str,
    want: impl Fn(&str, &[u8]) -> bool,
) -> (String, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
        let p = dev.next_publish().await;
        if want(&p.topic, &p.payload) {
            return (p.topic, p.payload.to_vec());
        }
    }
}

fn telemetry(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or(Value::Null)
}

/// Every control a person can operate has a name a screen reader reads out.
async fn assert_accessible(page: &Page) {
    let nodes = page.accessibility_tree().await;
    let mut unnamed = Vec::new();
    let mut buttons = 0;
    for n in &nodes {
        if n["ignored"] == true {
            continue;
        }
        let role = n["role"]["value"].as_str().unwrap_or("");
        if role == "button" {
            buttons += 1;
        }
        let interactive = matches!(
            role,
            "button" | "link" | "textbox" | "searchbox" | "checkbox" | "combobox"
        );
        let name = n["name"]["value"].as_str().unwrap_or("").trim().to_string();
        if interactive && name.is_empty() {
            unnamed.push(n.clone());
        }
    }
    assert!(buttons > 0, "no buttons in the accessibility tree");
    assert!(unnamed.is_empty(), "controls without a name: {unnamed:#?}");
    assert_eq!(page.eval("document.documentElement.lang").await, "en");
    assert_eq!(page.eval("document.querySelectorAll('h1').length").await, 1);
}

/// `bridge serve` on Mosquitto (so the devices stay connected while the
/// bridge restarts), `bridge simulate --devices 4` and `--devices 1`, the
/// bridge's own page in Chromium.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_dashboard() {
    let mosquitto = Mosquitto::start();
    let listen = free_port();
    let opts = Opts::default().args(["--listen".to_string(), format!("127.0.0.1:{listen}")]);
    let mut bridge = Bridge::external(&mosquitto, opts.clone());
    let browser = Browser::open("about:blank");
    let page = browser.page().await;
    open_dashboard(&page, &bridge).await;

    // Two simulators: five tiles, all online, within 5 s.
    let started = Instant::now();
    // Four readings a second, so the charts have a shape by the screenshot.
    let mut four = Simulator::start(&mosquitto.url(), 4, &["--rate", "4"]);
    let mut one = Simulator::start(&mosquitto.url(), 1, &["--rate", "4"]);
    let ours: Vec<String> = four.ids.iter().chain(&one.ids).cloned().collect();
    page.wait_for(
        "five tiles, all online",
        TILES_WITHIN.saturating_sub(started.elapsed()),
        "(() => { const t = document.querySelectorAll('#tiles [data-device]');
                  return t.length === 5 && [...t].every((x) => x.dataset.online === 'true'); })()",
    )
    .await;
    let shown_after = started.elapsed();
    let mut ids = tile_ids(&page).await;
    ids.sort();
    let mut want = ours.clone();
    want.sort();
    assert_eq!(ids, want, "one tile per device of both simulators");
    assert_ne!(four.ids[0][..4], one.ids[0][..4], "two run tags");

    // A command from the page reaches the device, and its tile shows it.
    let (lit, rebooted, queued) = (&four.ids[0], &four.ids[1], &four.ids[2]);
    let mut watcher = Device::connect(mosquitto.port, "watcher").await;
    watcher.subscribe(&format!("fleet/{lit}/#")).await;
    page.click(&format!("js:{}.querySelector('.led-button')", tile(lit)))
        .await;
    let (_, command) = until(&mut watcher, "the command", |t, _| t.ends_with("/commands")).await;
    assert_eq!(telemetry(&command), json!({"led": "on"}));
    until(&mut watcher, "telemetry with the LED on", |t, p| {
        t.ends_with("/telemetry") && telemetry(p)["led"] == "on"
    })
    .await;
    page.wait_for(
        "the tile to show the LED on",
        WAIT,
        &format!("{t}.dataset.led === 'on' && {t}.querySelector('.feedback').textContent.includes('reports LED on')", t = tile(lit)),
    )
    .await;

    // Reboot from the page: offline, then online again, and the tile says so.
    page.click(&format!(
        "js:{}.querySelector('.reboot-button')",
        tile(rebooted)
    ))
    .await;
    page.wait_for(
        "the rebooting device to go offline",
        WAIT,
        &format!("{}.dataset.online === 'false'", tile(rebooted)),
    )
    .await;
    page.wait_for(
        "the rebooted device to come back",
        WAIT,
        &format!("{t}.dataset.online === 'true' && {t}.querySelector('.feedback').textContent.includes('Back online')", t = tile(rebooted)),
    )
    .await;

    // Killing the second simulator: its device's last will turns the tile offline.
    let gone = one.ids[0].clone();
    one.kill();
    page.wait_for(
        "the killed simulator's tile to go offline",
        WAIT,
        &format!("{t}.dataset.online === 'false' && {t}.querySelector('.badge').textContent === 'offline'", t = tile(&gone)),
    )
    .await;
    // Hide offline hides it, and only it.
    page.click("#hide-offline").await;
    page.wait_for(
        "Hide offline to hide the offline tile",
        WAIT,
        &format!("!{} && {TILE_IDS}.length === 4", tile(&gone)),
    )
    .await;
    page.click("#hide-offline").await;
    page.wait_for(
        "the offline tile back",
        WAIT,
        &format!("{TILE_IDS}.length === 5"),
    )
    .await;
    for id in &four.ids {
        assert_eq!(
            page.eval(&format!("{}.dataset.online", tile(id))).await,
            "true",
            "{id}"
        );
    }

    // Charts have been drawn; the page is named and labelled throughout;
    // nothing went wrong in it.
    page.wait_for(
        "a chart per reading of the online devices",
        WAIT,
        "document.querySelectorAll('#tiles .tile[data-online=\"true\"] canvas').length >= 16",
    )
    .await;
    assert_accessible(&page).await;
    assert_no_problems(&page, |_| false);
    // A few more seconds of readings for the picture.
    tokio::time::sleep(Duration::from_secs(2)).await;
    page.screenshot(&screenshot_path("dashboard.png")).await;

    // A phone: one column, nothing wider than the screen, controls big
    // enough to tap.
    page.emulate(390, 844, true).await;
    page.wait_for(
        "the phone layout",
        WAIT,
        "document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;
    let small: Value = page
        .eval(
            "[...document.querySelectorAll('button, nav a, summary, input')]
               .filter((e) => e.offsetParent !== null)
               .map((e) => { const r = (e.type === 'checkbox' ? e.closest('label') : e).getBoundingClientRect();
                             return [e.textContent.trim() || e.id, Math.round(r.width), Math.round(r.height)]; })
               .filter(([, w, h]) => w < 44 || h < 44)",
        )
        .await;
    assert_eq!(
        small,
        json!([]),
        "controls smaller than 44 × 44 px on a phone"
    );
    page.screenshot(&screenshot_path("dashboard-phone.png"))
        .await;
    page.call("Emulation.clearDeviceMetricsOverride", json!({}))
        .await;

    // The bridge restarts. While it is away the page says so, and a command
    // published from the console waits for the next connection.
    bridge.terminate();
    page.wait_for(
        "the page to see the bridge go",
        WAIT,
        "document.body.dataset.connected === 'false'",
    )
    .await;
    page.click("#tab-console").await;
    page.wait_for(
        "the console",
        WAIT,
        "!document.getElementById('console').hidden",
    )
    .await;
    page.eval(&format!(
        "document.getElementById('channel').value = {}; document.getElementById('data').value = '{{\"led\":\"on\"}}'",
        json!(format!("fleet/{queued}/commands"))
    ))
    .await;
    page.click("#pub button").await;
    // Long enough for the page to fail at least one reconnect.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut bridge = Bridge::external(&mosquitto, opts);
    page.wait_for(
        "the page to reconnect",
        2 * WAIT,
        "document.body.dataset.connected === 'true'",
    )
    .await;
    page.click("#tab-fleet").await;
    // Resubscribed: the queued command went out, the device obeyed, and its
    // telemetry reaches the tile again...
    page.wait_for(
        "the queued command's effect on its tile",
        WAIT,
        &format!("{}.dataset.led === 'on'", tile(queued)),
    )
    .await;
    page.wait_for(
        "the console to confirm the publish",
        WAIT,
        &format!(
            "document.getElementById('log').textContent.includes({})",
            json!(format!("published to fleet/{queued}/commands"))
        ),
    )
    .await;
    // ...and a new simulator's device appears.
    let mut late = Simulator::start(&mosquitto.url(), 1, &[]);
    page.wait_for(
        "the new simulator's tile",
        TILES_WITHIN,
        &format!(
            "{t} && {t}.dataset.online === 'true'",
            t = tile(&late.ids[0])
        ),
    )
    .await;
    assert_eq!(tile_ids(&page).await.len(), 6);
    // Only the browser's own reports of the refused reconnects.
    assert_no_problems(&page, |p| p.text.contains("WebSocket connection to"));

    assert!(four.terminate().success());
    assert!(late.terminate().success());
    bridge.terminate();
    eprintln!(
        "five tiles {shown_after:?} after the simulators started; screenshots: {} and {}",
        screenshot_path("dashboard.png").display(),
        screenshot_path("dashboard-phone.png").display()
    );
}

/// Device ids and payloads come from anyone who can publish: the page shows
/// them as text and stays usable when a flood of devices arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_devices_and_a_flood_of_them() {
    let bridge = Bridge::embedded(Opts::default());
    let browser = Browser::open("about:blank");
    let page = browser.page().await;
    open_dashboard(&page, &bridge).await;
    let mut dev = Device::connect(bridge.mqtt_port, "mallory").await;

    let hostile = [
        "<img src=x onerror=\"window.pwned=1\">",
        "\u{202E}lanigiro-01",
        "dev\u{200B}-01",
        "__proto__",
        "\"'><svg onload=window.pwned=2>",
        "تحكم-٧",
    ];
    for id in hostile {
        dev.publish(&format!("fleet/{id}/status"), "online", 1, true)
            .await;
    }
    let weird = hostile[1];
    page.wait_for(
        "a tile per hostile id",
        WAIT,
        &format!("{TILE_IDS}.length === {}", hostile.len()),
    )
    .await;
    let mut got = tile_ids(&page).await;
    got.sort();
    let mut want: Vec<String> = hostile.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want, "data-device carries each id exactly as sent");

    // Hostile telemetry (published until it arrives: the page's telemetry
    // subscription may still be on its way).
    let nasty = json!({"temperature": "<b>hot</b>", "<img src=x onerror=window.pwned=3>": 5,
                       "__proto__": {"polluted": 1}, "led": "<img src=x>", "humidity": 1e308})
    .to_string();
    let readings_of = |id: &str| format!("{}.querySelectorAll('.metric').length", tile(id));
    let deadline = Instant::now() + WAIT;
    while page.eval(&readings_of(hostile[0])).await == 0 {
        assert!(Instant::now() < deadline, "no telemetry reached the page");
        dev.publish(
            &format!("fleet/{}/telemetry", hostile[0]),
            nasty.clone(),
            1,
            false,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for payload in [
        b"[1,2,3]".to_vec(),
        b"\"a string\"".to_vec(),
        vec![0u8, 159, 146, 150],
        serde_json::to_vec(
            &(0..5000)
                .map(|i| (format!("k{i}"), json!(i)))
                .collect::<serde_json::Map<String, Value>>(),
        )
        .unwrap(),
    ] {
        dev.publish(&format!("fleet/{weird}/telemetry"), payload, 1, false)
            .await;
    }
    // Nothing became markup or code.
    assert_eq!(
        page.eval("document.querySelectorAll('img, svg, #tiles script').length")
            .await,
        0
    );
    assert_eq!(page.eval("typeof window.pwned").await, "undefined");
    assert_eq!(page.eval("({}).polluted === undefined").await, true);
    // Invisible and direction-changing characters are shown, not obeyed.
    assert_eq!(tile_text(&page, weird, "h2").await, "\\u{202E}lanigiro-01");
    assert_eq!(tile_text(&page, hostile[2], "h2").await, "dev\\u{200B}-01");
    // Only finite numbers become readings, and the odd key is text.
    let readings = page.eval(&readings_of(hostile[0])).await;
    assert_eq!(readings, 2, "the two numbers; the odd key shown as text");
    assert_eq!(
        tile_text(&page, hostile[0], ".metric:not([data-reading=humidity]) dt").await,
        "<img src=x onerror=window.pwned…"
    );
    assert_eq!(
        tile_text(&page, hostile[0], "[data-reading=humidity] dd").await,
        "1.000e+308 %"
    );
    // Arrays, strings and binary are no readings; 5,000 numbers make six.
    page.wait_for(
        "six readings from 5,000 fields",
        WAIT,
        &format!("{} === 6", readings_of(weird)),
    )
    .await;

    // A flood: 400 more devices. At most 48 tiles, and the page says so.
    for n in 0..400 {
        dev.publish(&format!("fleet/flood-{n:03}/status"), "online", 0, true)
            .await;
    }
    dev.publish(
        "fleet/flood-399/telemetry",
        r#"{"temperature":21}"#,
        1,
        false,
    )
    .await;
    page.wait_for(
        "the cap note",
        WAIT,
        &format!(
            "document.getElementById('summary').textContent.startsWith('406 devices') && \
             {TILE_IDS}.length === 48 && !document.getElementById('cap').hidden"
        ),
    )
    .await;
    let note = page
        .eval("document.getElementById('cap').textContent")
        .await;
    assert!(
        note.as_str().unwrap().contains("Showing 48 of 406 devices"),
        "{note}"
    );
    // Find picks one that did not fit.
    page.click("#find").await;
    page.type_text("flood-399").await;
    page.wait_for(
        "Find to show flood-399",
        WAIT,
        &format!("{TILE_IDS}.length === 1 && {}", tile("flood-399")),
    )
    .await;
    assert_no_problems(&page, |_| false);

    // A link with settings that make no sense: refused with the reason, and
    // the page watches its own bridge instead.
    page.navigate(&bridge.http("/?url=javascript:window.pwned=4&prefix=fleet%2F%2B"))
        .await;
    page.wait_for(
        "the page to connect to its own bridge",
        WAIT,
        "document.body.dataset.connected === 'true'",
    )
    .await;
    let said = page
        .eval("document.getElementById('connect-error').textContent")
        .await;
    assert!(
        said.as_str().unwrap().contains("must start with ws://"),
        "{said}"
    );
    page.wait_for(
        "the fleet's tiles",
        WAIT,
        &format!("{TILE_IDS}.length === 48"),
    )
    .await;
    assert_eq!(page.eval("typeof window.pwned").await, "undefined");
    // channels.js itself: a URL the browser refuses is an error for
    // onerror, not an exception; a frame that is not JSON is ignored.
    let told = page
        .eval(
            "new Promise((done) => {
               const c = new ChannelClient('javascript:x', { onerror: (e) => { c.close(); done(e.name); } });
             })",
        )
        .await;
    assert_eq!(told, "SyntaxError");
    let survived = page
        .eval(
            "new Promise((done) => {
               const c = new ChannelClient(document.getElementById('url').value, {
                 onstatus: (s) => { if (s !== 'open') return;
                   c.ws.onmessage({ data: 'not json' }); c.ws.onmessage({ data: 'null' });
                   c.close(); done(true); } });
             })",
        )
        .await;
    assert_eq!(survived, true);
    assert_no_problems(&page, |_| false);
}

/// `bridge simulate` against Mosquitto, watched by a plain MQTT client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_against_mosquitto() {
    let mosquitto = Mosquitto::start();
    let mut sim = Simulator::start(&mosquitto.url(), 2, &["--rate", "5"]);
    let mut other = Simulator::start(&mosquitto.url(), 1, &[]);
    sim.wait_online();
    other.wait_online();
    let ids: Vec<String> = sim.ids.iter().chain(&other.ids).cloned().collect();
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "unique ids across simulators: {ids:?}"
    );

    // A client that comes later gets every status, retained, "online".
    let mut watcher = Device::connect(mosquitto.port, "watcher").await;
    watcher.subscribe("fleet/+/status").await;
    let mut online = Vec::new();
    for _ in 0..3 {
        let p = watcher.next_publish().await;
        assert!(p.retain, "{p:?}");
        assert_eq!(&p.payload[..], b"online", "{p:?}");
        online.push(p.topic.split('/').nth(1).unwrap().to_string());
    }
    online.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(online, want);

    // Telemetry: JSON readings in plausible ranges that drift, at the rate.
    let id = &sim.ids[0];
    let mut dev = Device::connect(mosquitto.port, "observer").await;
    dev.subscribe(&format!("fleet/{id}/#")).await;
    let started = Instant::now();
    let mut readings: Vec<Value> = Vec::new();
    while readings.len() < 15 {
        let (_, p) = until(&mut dev, "telemetry", |t, _| t.ends_with("/telemetry")).await;
        readings.push(telemetry(&p));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "15 messages at 5 a second took {took:?}"
    );
    for r in &readings {
        let t = r["temperature"].as_f64().unwrap();
        let h = r["humidity"].as_f64().unwrap();
        let b = r["battery"].as_f64().unwrap();
        let s = r["signal"].as_f64().unwrap();
        assert!(
            (5.0..=40.0).contains(&t) && (5.0..=95.0).contains(&h),
            "{r}"
        );
        assert!(
            (0.0..=100.0).contains(&b) && (-110.0..=-30.0).contains(&s),
            "{r}"
        );
        assert_eq!(r["led"], "off", "{r}");
    }
    let temps: Vec<f64> = readings
        .iter()
        .map(|r| r["temperature"].as_f64().unwrap())
        .collect();
    assert!(
        temps.windows(2).any(|w| w[0] != w[1]),
        "no drift: {temps:?}"
    );
    assert!(
        temps.windows(2).all(|w| (w[0] - w[1]).abs() < 2.0),
        "jumps: {temps:?}"
    );

    // Commands: the LED, reflected in the next telemetry.
    let mut commander = Device::connect(mosquitto.port, "commander").await;
    commander
        .publish(&format!("fleet/{id}/commands"), r#"{"led":"on"}"#, 1, false)
        .await;
    until(&mut dev, "telemetry with the LED on", |t, p| {
        t.ends_with("/telemetry") && telemetry(p)["led"] == "on"
    })
    .await;
    // Bad commands change nothing and end nothing.
    let big = vec![b'x'; 100_000];
    for bad in [
        &br#"{"led":"purple"}"#[..],
        b"not json",
        br#"{"reboot":"please"}"#,
        &big,
    ] {
        commander
            .publish(&format!("fleet/{id}/commands"), bad.to_vec(), 1, false)
            .await;
    }
    for _ in 0..10 {
        let (_, p) = until(&mut dev, "telemetry", |t, _| t.ends_with("/telemetry")).await;
        assert_eq!(telemetry(&p)["led"], "on");
    }
    assert!(sim.logs().contains("ignored a command"), "{}", sim.logs());

    // Reboot: offline, about 2 s away, online, uptime from zero, LED off.
    commander
        .publish(
            &format!("fleet/{id}/commands"),
            r#"{"reboot":true}"#,
            1,
            false,
        )
        .await;
    until(&mut dev, "offline", |t, p| {
        t.ends_with("/status") && p == b"offline"
    })
    .await;
    let away = Instant::now();
    until(&mut dev, "online again", |t, p| {
        t.ends_with("/status") && p == b"online"
    })
    .await;
    let gone_for = away.elapsed();
    assert!(
        gone_for >= Duration::from_millis(1900) && gone_for < Duration::from_secs(6),
        "away for {gone_for:?}"
    );
    let (_, p) = until(&mut dev, "telemetry after the reboot", |t, _| {
        t.ends_with("/telemetry")
    })
    .await;
    assert!(
        telemetry(&p)["uptime"].as_u64().unwrap() <= 1,
        "{}",
        telemetry(&p)
    );
    assert_eq!(telemetry(&p)["led"], "off");

    // Killed: the broker publishes each device's last will, retained.
    other.kill();
    let (_, will) = until(&mut watcher, "the last will", |t, _| {
        t == format!("fleet/{}/status", other.ids[0])
    })
    .await;
    assert_eq!(will, b"offline");
    // Stopped: each device says offline itself, and the process exits 0.
    assert!(sim.terminate().success(), "{}", sim.logs());
    let mut late = Device::connect(mosquitto.port, "late").await;
    late.subscribe("fleet/+/status").await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let p = late.next_publish().await;
        assert!(p.retain);
        statuses.push((p.topic, String::from_utf8_lossy(&p.payload).to_string()));
    }
    assert!(
        statuses.iter().all(|(_, s)| s == "offline"),
        "every device offline, retained: {statuses:?}"
    );
}

/// Over mqtts:// with a client certificate, as against AWS IoT Core: the
/// broker requires the certificate, and the simulator uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_over_mqtts_with_a_client_certificate() {
    let dir = std::env::temp_dir().join(format!("bridge-sim-tls-{}", std::process::id()));
    make_pki(&dir);
    let plain = free_port();
    // A TLS listener that requires client certificates, and a plain one on
    // loopback for the watcher.
    let mosquitto = Mosquitto::start_with(&format!(
        "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\n\
         listener {plain} 127.0.0.1\n",
        d = dir.display()
    ));
    let mut watcher = Device::connect(plain, "watcher").await;
    watcher.subscribe("fleet/+/telemetry").await;
    let url = format!("mqtts://localhost:{}", mosquitto.port);
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let mut sim = Simulator::start(
        &url,
        1,
        &["--mqtt-ca", &ca, "--mqtt-cert", &cert, "--mqtt-key", &key],
    );
    sim.wait_online();
    let (topic, payload) = until(&mut watcher, "telemetry over TLS", |_, _| true).await;
    assert_eq!(topic, format!("fleet/{}/telemetry", sim.ids[0]));
    assert!(telemetry(&payload)["temperature"].is_number());

    // Without the certificate the broker refuses it: never online, and it says why.
    let mut refused = Simulator::start(&url, 1, &["--mqtt-ca", &ca]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!refused.printed("all "), "{}", refused.logs());
    assert!(
        refused.logs().contains("MQTT connection"),
        "{}",
        refused.logs()
    );
    refused.kill();
    std::fs::remove_dir_all(&dir).ok();
}

/// `bridge simulate` refuses what makes no sense, with the reason, exit 2.
#[test]
fn simulate_refuses_bad_flags() {
    for (args, says) in [
        (vec!["--devices", "0"], "--devices"),
        (vec!["--devices", "10001"], "--devices"),
        (vec!["--devices", "2", "--rate", "0"], "--rate"),
        (vec!["--devices", "2", "--rate", "NaN"], "--rate"),
        (vec!["--devices", "2", "--rate", "1000"], "--rate"),
        (vec!["--devices", "2", "--prefix", "fleet/+"], "--prefix"),
        (
            vec!["--devices", "2", "--prefix", "$aws/things"],
            "--prefix",
        ),
        (
            vec!["--devices", "2", "--prefix", "a/b/c/d/e/f/g"],
            "--prefix",
        ),
        (
            vec!["--devices", "2", "--mqtt-cert", "/nonexistent.pem"],
            "go together",
        ),
        (
            vec![
                "--devices",
                "2",
                "--mqtt-cert",
                "/nonexistent.pem",
                "--mqtt-key",
                "/nonexistent.key",
            ],
            "/nonexistent.pem",
        ),
    ] {
        let out = Command::new(bridge_bin())
            .args(["simulate", "--mqtt-url", "mqtts://127.0.0.1:1"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = Command::new(bridge_bin())
        .args(["simulate", "--mqtt-url", "http://x", "--devices", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mqtt or mqtts"));
    // --demo is for the embedded broker.
    let out = Command::new(bridge_bin())
        .args(["serve", "--demo", "--mqtt-url", "mqtt://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bridge simulate"));
}

/// `bridge serve --demo`: twelve devices on the embedded broker; and the
/// bridge serves the page's files itself, uPlot's licence included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_demo_and_the_served_files() {
    let bridge = Bridge::embedded(Opts::default().arg("--demo"));
    let mut dev = Device::connect(bridge.mqtt_port, "watcher").await;
    dev.subscribe("fleet/+/status").await;
    let mut online = Vec::new();
    for _ in 0..12 {
        let p = dev.next_publish().await;
        assert_eq!(&p.payload[..], b"online", "{p:?}");
        online.push(p.topic);
    }
    online.sort();
    let want: Vec<String> = (1..=12)
        .map(|n| format!("fleet/demo-{n:02}/status"))
        .collect();
    assert_eq!(online, want);
    dev.subscribe("fleet/demo-07/telemetry").await;
    let (_, p) = until(&mut dev, "demo telemetry", |t, _| t.ends_with("/telemetry")).await;
    assert!(telemetry(&p)["battery"].is_number());

    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web");
    for (path, file) in [
        ("/", "index.html"),
        ("/dashboard.js", "dashboard.js"),
        ("/dashboard.css", "dashboard.css"),
        ("/channels.js", "channels.js"),
        ("/vendor/uplot.min.js", "vendor/uplot/uPlot.iife.min.js"),
        ("/vendor/uplot.min.css", "vendor/uplot/uPlot.min.css"),
        ("/vendor/uplot.LICENSE", "vendor/uplot/LICENSE"),
    ] {
        let (status, body) = http_get(&bridge.http(path)).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            body,
            std::fs::read_to_string(web.join(file)).unwrap(),
            "{path}"
        );
    }
    let (_, licence) = http_get(&bridge.http("/vendor/uplot.LICENSE")).await;
    assert!(licence.contains("The MIT License") && licence.contains("Leon Sorokin"));
    let (status, _) = http_get(&bridge.http("/vendor/other.js")).await;
    assert_eq!(status, 404);
}
