/*
 * dashboard.js: the live fleet view the bridge serves at `/` (web/index.html),
 * built on channels.js, with uPlot for the small charts.
 *
 * It watches ROOT/+/status (retained first: who is online) and
 * ROOT/+/telemetry (JSON objects of readings), makes one tile per device
 * with its state, its latest values and a chart per reading over the last
 * five minutes, and sends commands to ROOT/{id}/commands ({"led":"on"|"off"},
 * {"reboot":true}), showing the device's reaction when it comes. ROOT is
 * `fleet` unless `?prefix=` says otherwise; the bridge URL and a token come
 * from `?url=` / `?token=` or the Connection form, so the same page watches
 * any deployment.
 *
 * For tools (and the tests): each tile has data-device (the id, as sent),
 * data-online ("true"/"false") and data-led; <body data-connected> is
 * "true" while the WebSocket is open.
 *
 * Everything a device sends is untrusted. It reaches the page as text
 * (textContent, never markup); ids are shown with invisible and
 * direction-changing characters made visible; only finite numbers become
 * readings. A flood of devices is capped: at most MAX_DEVICES are tracked
 * and MAX_TILES shown (the page says so, and Find picks others), and
 * drawing is batched, so the page stays usable.
 */
(function () {
  "use strict";

  const MAX_DEVICES = 2000; // devices tracked; beyond, ids are ignored
  const MAX_TILES = 48; // tiles drawn at once
  const MAX_READINGS = 6; // readings (charts) per device
  const WINDOW_S = 300; // chart span, seconds
  const MAX_POINTS = 300; // points per chart (the newest, at high rates)
  const LOG_LINES = 500; // console lines kept
  const QUIET_S = 30; // a device without a status is online while it talks
  const COMMAND_WAIT_MS = 10000; // how long a command waits for a reaction
  const REBOOT_WAIT_MS = 20000;
  const DRAW_EVERY_MS = 250; // batching of DOM updates
  const CHART_EVERY_MS = 1000; // charts redraw at most this often per tile
  const UNITS = { temperature: "°C", humidity: "%", battery: "%", signal: "dBm" };
  const KNOWN = ["temperature", "humidity", "battery", "signal"];
  const COLORS = ["#d9480f", "#1971c2", "#2b8a3e", "#7048e8", "#c2255c", "#087f8c"];
  const $ = (id) => document.getElementById(id);

  // ---- text from untrusted sources ----

  /**
   * A device id or other untrusted text as it should be shown: control,
   * format (bidi overrides, zero-width), private-use, unassigned and
   * separator characters other than a plain space become visible \u{...}.
   */
  function visible(text, max) {
    let s = String(text).replace(/[\p{C}\p{Z}]/gu, (c) =>
      c === " " ? c : "\\u{" + c.codePointAt(0).toString(16).toUpperCase() + "}");
    if (max && s.length > max) s = s.slice(0, max - 1) + "…";
    return s;
  }

  /** An element with text children only (never markup). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("aria-") || k === "role" || k === "type") node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c); // strings become text nodes
    return node;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a >= 1e6 || (a > 0 && a < 1e-3)) return v.toPrecision(4);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 100) return v.toFixed(1);
    return String(Math.round(v * 100) / 100);
  }

  function span(seconds) {
    if (seconds < 90) return Math.max(0, Math.round(seconds)) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return Math.round(seconds / 3600) + " h";
  }

  // ---- settings: query, then this tab's storage, then defaults ----

  const params = new URLSearchParams(location.search);
  const ownUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  const settings = {
    url: params.get("url") || ownUrl,
    root: params.get("prefix") || "fleet",
    token: null,
  };
  // A token is kept per URL, in this tab only, so a link that points the
  // page at another bridge never carries a token entered for this one.
  const tokenKey = (url) => "bridge-token " + url;
  function loadToken(url) {
    try { return sessionStorage.getItem(tokenKey(url)); } catch (e) { return null; }
  }
  function storeToken(url, token) {
    try {
      if (token) sessionStorage.setItem(tokenKey(url), token);
      else sessionStorage.removeItem(tokenKey(url));
    } catch (e) { /* storage off: the token lasts until reload */ }
  }
  settings.token = params.get("token") || loadToken(settings.url);
  if (params.has("token")) {
    // Out of the address bar (and history, screenshots, shared links).
    storeToken(settings.url, settings.token);
    params.delete("token");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
  }

  function checkSettings(url, root) {
    if (!/^wss?:\/\/[^\s/?#]+/.test(url)) return "The URL must start with ws:// or wss:// and name a host.";
    if (!root || root.length > 200 || /[+#]/.test(root) || root.startsWith("$") || root.startsWith("/") || root.endsWith("/")) {
      return "The topic root must be a channel name without + or #, e.g. fleet.";
    }
    return null;
  }

  // ---- devices ----

  /** id -> device state, for at most MAX_DEVICES devices. */
  const devices = new Map();
  let overflow = false; // more devices than MAX_DEVICES were seen
  let lagged = 0;
  let connected = false;
  let layoutDirty = true;
  let drawTimer = null;
  const dirty = new Set();

  function device(id) {
    let d = devices.get(id);
    if (d) return d;
    if (devices.size >= MAX_DEVICES) {
      overflow = true;
      return null;
    }
    d = {
      id,
      label: visible(id, 80),
      status: null, // the last status text, null if none yet
      lastSeen: 0, // seconds (Date.now() / 1000) of the last message
      readings: new Map(), // name -> latest value
      led: null,
      uptime: null,
      tile: null,
      // name -> { t: [], v: [] } over the last WINDOW_S, kept from the
      // device's first tile on (so hiding a tile loses no history).
      history: null,
    };
    devices.set(id, d);
    layoutDirty = true;
    return d;
  }

  function record(d, name, t, v) {
    let h = d.history.get(name);
    if (!h) d.history.set(name, (h = { t: [], v: [] }));
    h.t.push(t);
    h.v.push(v);
    const from = t - WINDOW_S;
    let cut = 0;
    while (cut < h.t.length && (h.t[cut] < from || h.t.length - cut > MAX_POINTS)) cut++;
    if (cut) {
      h.t.splice(0, cut);
      h.v.splice(0, cut);
    }
  }

  function isOnline(d, now) {
    if (d.status !== null) return d.status === "online";
    return now - d.lastSeen < QUIET_S;
  }

  /** Splits ROOT/{id}/{kind}; null for anything else. */
  function parse(channel) {
    const prefix = settings.root + "/";
    if (!channel.startsWith(prefix)) return null;
    const rest = channel.slice(prefix.length).split("/");
    if (rest.length !== 2 || rest[0] === "") return null;
    return { id: rest[0], kind: rest[1] };
  }

  function onStatus(data, msg) {
    const p = parse(msg.channel);
    if (!p || p.kind !== "status") return;
    if (data === "") {
      // A cleared retained status: the device is gone for good.
      const d = devices.get(p.id);
      if (d) {
        if (d.tile) dropTile(d);
        devices.delete(p.id);
        layoutDirty = true;
        schedule();
      }
      return;
    }
    const d = device(p.id);
    if (!d) return schedule();
    const before = isOnline(d, Date.now() / 1000);
    d.status = typeof data === "string" ? data : data instanceof Uint8Array ? "(binary)" : JSON.stringify(data);
    if (!msg.retained) d.lastSeen = Date.now() / 1000;
    const after = isOnline(d, Date.now() / 1000);
    if (d.tile && d.tile.pending && d.tile.pending.kind === "reboot") rebootProgress(d, after);
    if (before !== after && $("hide-offline").checked) layoutDirty = true;
    touch(d);
  }

  function onTelemetry(data, msg) {
    const p = parse(msg.channel);
    if (!p || p.kind !== "telemetry") return;
    const d = device(p.id);
    if (!d) return schedule();
    const now = Date.now() / 1000;
    d.lastSeen = now;
    if (!data || typeof data !== "object" || Array.isArray(data) || data instanceof Uint8Array) return touch(d);
    let looked = 0;
    for (const key in data) {
      // A message with thousands of fields costs no more than one with 64.
      if (++looked > 64) break;
      if (!Object.prototype.hasOwnProperty.call(data, key)) continue;
      const value = data[key];
      if (key === "led") {
        if (value === "on" || value === "off") d.led = value;
      } else if (key === "uptime") {
        if (typeof value === "number" && isFinite(value)) d.uptime = value;
      } else if (typeof value === "number" && isFinite(value)) {
        if (d.readings.has(key) || d.readings.size < MAX_READINGS) {
          d.readings.set(key, value);
          if (d.history) record(d, key, now, value);
        }
      }
    }
    if (d.tile && d.tile.pending && d.tile.pending.kind === "led" && d.led === d.tile.pending.want) {
      const ms = Date.now() - d.tile.pending.at;
      d.tile.settle("ok", "The device reports LED " + d.led + " (" + (ms / 1000).toFixed(1) + " s after the command).");
      d.tile.flash();
    }
    touch(d);
  }

  function rebootProgress(d, online) {
    const t = d.tile;
    if (!online && t.pending.phase === "sent") {
      t.pending.phase = "away";
      t.feedback("", "Rebooting: the device went offline…");
    } else if (online && t.pending.phase === "away") {
      const ms = Date.now() - t.pending.at;
      t.settle("ok", "Back online " + (ms / 1000).toFixed(1) + " s after the reboot command.");
      t.flash();
    }
  }

  function touch(d) {
    if (d.tile) dirty.add(d);
    schedule();
  }

  function schedule() {
    if (drawTimer === null) drawTimer = setTimeout(draw, DRAW_EVERY_MS);
  }

  // ---- tiles ----

  const collator = new Intl.Collator(undefined, { numeric: true });

  /** Which devices get tiles: those Find and Hide offline let through, by id. */
  function layout() {
    const find = $("find").value.trim().toLowerCase();
    const hideOffline = $("hide-offline").checked;
    const now = Date.now() / 1000;
    const wanted = [];
    let matching = 0;
    for (const d of devices.values()) {
      if (find && !d.id.toLowerCase().includes(find) && !d.label.toLowerCase().includes(find)) continue;
      if (hideOffline && !isOnline(d, now)) continue;
      matching++;
      wanted.push(d);
    }
    wanted.sort((a, b) => collator.compare(a.id, b.id));
    const shown = wanted.slice(0, MAX_TILES);
    const keep = new Set(shown);
    for (const d of devices.values()) if (d.tile && !keep.has(d)) dropTile(d);
    const box = $("tiles");
    let i = 0;
    for (const d of shown) {
      if (!d.tile) {
        d.tile = new Tile(d);
        dirty.add(d);
      }
      if (box.children[i] !== d.tile.root) box.insertBefore(d.tile.root, box.children[i] || null);
      i++;
    }
    const cap = $("cap");
    const notes = [];
    if (matching > shown.length) {
      notes.push("Showing " + shown.length + " of " + matching + " devices (at most " + MAX_TILES +
        " tiles); use Find to see others.");
    }
    if (overflow) notes.push("More than " + MAX_DEVICES + " devices: only the first " + MAX_DEVICES + " seen are tracked.");
    cap.textContent = notes.join(" ");
    cap.hidden = notes.length === 0;
    $("empty").hidden = devices.size > 0;
  }

  function dropTile(d) {
    d.tile.destroy();
    d.tile = null;
    dirty.delete(d);
  }

  function draw() {
    drawTimer = null;
    if (layoutDirty) {
      layoutDirty = false;
      layout();
    }
    const now = Date.now();
    const batch = [...dirty];
    dirty.clear();
    for (const d of batch) if (d.tile) d.tile.render(now);
    summarize();
  }

  function summarize() {
    const now = Date.now() / 1000;
    let online = 0;
    for (const d of devices.values()) if (isOnline(d, now)) online++;
    const n = devices.size;
    let text = n === 0 ? "No devices yet." :
      n + (n === 1 ? " device" : " devices") + " · " + online + " online · " + (n - online) + " offline";
    if (lagged) text += " · " + lagged + " messages missed (this page read too slowly)";
    $("summary").textContent = text;
  }

  let tileNumber = 0;

  class Tile {
    constructor(d) {
      this.d = d;
      this.series = new Map(); // reading -> { row, value, range, box, chart, color }
      if (!d.history) d.history = new Map();
      this.pending = null; // a command waiting for the device's reaction
      this.lastChart = 0;
      const headingId = "tile-" + ++tileNumber;
      this.badge = el("span", { class: "badge" });
      this.metrics = el("dl", { class: "metrics" });
      this.lampText = el("span", {}, "unknown");
      this.ledButton = el("button", { type: "button", class: "led-button" }, "Turn LED on");
      this.rebootButton = el("button", { type: "button", class: "reboot-button" }, "Reboot");
      this.feedbackLine = el("p", { class: "feedback", role: "status", "aria-live": "polite" });
      this.seen = el("p", { class: "seen" });
      this.root = el("article", { class: "tile", role: "listitem", "aria-labelledby": headingId },
        el("div", { class: "tile-head" },
          el("h2", { id: headingId, title: d.id }, el("bdi", {}, d.label)),
          this.badge),
        this.metrics,
        el("p", { class: "led" }, el("span", { class: "lamp", "aria-hidden": "true" }), "LED ", this.lampText),
        el("div", { class: "actions" }, this.ledButton, this.rebootButton),
        this.feedbackLine,
        this.seen);
      this.root.dataset.device = d.id;
      this.root.dataset.online = "false";
      this.ledButton.addEventListener("click", () => {
        const want = this.d.led === "on" ? "off" : "on";
        this.command({ led: want }, { kind: "led", want }, "LED " + want);
      });
      this.rebootButton.addEventListener("click", () => this.command({ reboot: true }, { kind: "reboot", phase: "sent" }, "reboot"));
      this.resize = new ResizeObserver(() => this.fit());
      this.resize.observe(this.metrics);
    }

    addSeries(name) {
      const color = KNOWN.includes(name) ? COLORS[KNOWN.indexOf(name)] : COLORS[KNOWN.length + (this.series.size % 2)];
      const s = {
        color, chart: null,
        value: el("dd"),
        range: el("span", { class: "range" }),
        box: el("div", { class: "spark", "aria-hidden": "true" }),
      };
      const unit = UNITS[name] ? " (" + UNITS[name] + ")" : "";
      s.row = el("div", { class: "metric" }, el("dt", { title: name }, visible(name, 32) + unit), s.value, s.range, s.box);
      s.row.dataset.reading = name;
      // Known readings first, in their order; others after, as they came.
      const rank = (n) => (KNOWN.includes(n) ? KNOWN.indexOf(n) : KNOWN.length);
      let before = null;
      for (const row of this.metrics.children) {
        if (rank(row.dataset.reading) > rank(name)) { before = row; break; }
      }
      this.metrics.insertBefore(s.row, before);
      this.series.set(name, s);
      return s;
    }

    render(now) {
      const d = this.d;
      const online = isOnline(d, now / 1000);
      this.root.dataset.online = String(online);
      this.root.dataset.led = d.led || "";
      this.badge.textContent = d.status === null ? (online ? "online" : "quiet") : visible(d.status, 24);
      this.badge.title = d.status === null ? "no status received; going by its telemetry" : "";
      for (const [name, value] of d.readings) {
        const s = this.series.get(name) || this.addSeries(name);
        s.value.textContent = fmt(value) + (UNITS[name] ? " " + UNITS[name] : "");
      }
      this.lampText.textContent = d.led || "unknown";
      this.ledButton.textContent = d.led === "on" ? "Turn LED off" : "Turn LED on";
      const busy = this.pending !== null;
      const why = !connected ? "not connected to the bridge" : !online ? "the device is offline" : busy ? "waiting for the device" : "";
      this.ledButton.disabled = this.rebootButton.disabled = why !== "";
      this.ledButton.title = this.rebootButton.title = why;
      this.tick(now);
      if (now - this.lastChart >= CHART_EVERY_MS) {
        this.lastChart = now;
        this.charts();
      } else {
        // Draw the rest on a later pass.
        dirty.add(d);
        schedule();
      }
    }

    tick(now) {
      const d = this.d;
      const parts = [];
      parts.push(d.lastSeen ? "Heard from " + span(now / 1000 - d.lastSeen) + " ago" : "Not heard from since this page opened");
      if (d.uptime !== null) parts.push("up " + span(d.uptime));
      this.seen.textContent = parts.join(" · ");
    }

    charts() {
      for (const [name, s] of this.series) {
        const h = this.d.history.get(name);
        if (!h || h.v.length === 0) continue;
        let lo = Infinity, hi = -Infinity;
        for (const v of h.v) { if (v < lo) lo = v; if (v > hi) hi = v; }
        s.range.textContent = fmt(lo) + " to " + fmt(hi) + " in the last " + span(h.t[h.t.length - 1] - h.t[0]);
        if (typeof uPlot !== "function") continue; // charts are optional
        if (!s.chart) s.chart = this.makeChart(s, h);
        else s.chart.setData([h.t, h.v]);
      }
    }

    makeChart(s, h) {
      const width = Math.max(s.box.clientWidth, 60);
      return new uPlot({
        width,
        height: 36,
        padding: [2, 0, 2, 0],
        legend: { show: false },
        cursor: { show: false },
        select: { show: false },
        axes: [{ show: false }, { show: false }],
        scales: { x: { time: true } },
        series: [{}, { stroke: s.color, width: 1.5, fill: s.color + "22", points: { show: false } }],
      }, [h.t, h.v], s.box);
    }

    fit() {
      for (const s of this.series.values()) {
        if (s.chart) s.chart.setSize({ width: Math.max(s.box.clientWidth, 60), height: 36 });
      }
    }

    feedback(kind, text) {
      this.feedbackLine.className = "feedback" + (kind ? " " + kind : "");
      this.feedbackLine.textContent = text;
    }

    /** Publishes `data` to the device's commands and waits for its reaction. */
    async command(data, pending, what) {
      if (this.pending || !client) return;
      const channel = settings.root + "/" + this.d.id + "/commands";
      this.pending = Object.assign({ at: Date.now() }, pending);
      this.pending.timer = setTimeout(() => {
        this.settle("bad", "No reaction from the device to " + what + " within " +
          (pending.kind === "reboot" ? REBOOT_WAIT_MS : COMMAND_WAIT_MS) / 1000 + " s.");
      }, pending.kind === "reboot" ? REBOOT_WAIT_MS : COMMAND_WAIT_MS);
      this.feedback("", "Sending " + what + "…");
      touch(this.d);
      const mine = this.pending;
      try {
        await client.publish(channel, data, { qos: 1 });
        if (this.pending === mine && mine.phase !== "away") this.feedback("", "Sent " + what + "; waiting for the device…");
      } catch (e) {
        if (this.pending === mine) this.settle("bad", "Could not send " + what + ": " + (e.code || "") + " " + visible(e.message || e, 200));
      }
    }

    settle(kind, text) {
      if (this.pending) clearTimeout(this.pending.timer);
      this.pending = null;
      this.feedback(kind, text);
      touch(this.d);
    }

    flash() {
      this.root.classList.remove("changed");
      void this.root.offsetWidth; // restart the animation
      this.root.classList.add("changed");
    }

    destroy() {
      if (this.pending) clearTimeout(this.pending.timer);
      this.resize.disconnect();
      for (const s of this.series.values()) if (s.chart) s.chart.destroy();
      this.root.remove();
    }
  }

  // Once a second: "heard from" times, and devices without a status that
  // fell quiet.
  setInterval(() => {
    const now = Date.now();
    for (const d of devices.values()) {
      if (!d.tile) continue;
      if (d.status === null && d.tile.root.dataset.online !== String(isOnline(d, now / 1000))) dirty.add(d);
      else d.tile.tick(now);
    }
    summarize();
    if (dirty.size) schedule();
  }, 1000);

  // ---- the connection ----

  let client = null;

  function setConnected(yes, text) {
    connected = yes;
    document.body.dataset.connected = String(yes);
    $("conn-text").textContent = text;
    for (const d of devices.values()) if (d.tile) dirty.add(d);
    schedule();
  }

  function showError(text) {
    log("! " + text);
    $("conn-text").textContent = (connected ? "Connected to " : "Not connected to ") + visible(settings.url, 120) + " — " + text;
  }

  function connect() {
    if (client) client.close();
    setConnected(false, "Connecting to " + visible(settings.url, 120) + "…");
    const c = new ChannelClient(settings.url, {
      token: settings.token || null,
      onstatus: (s) => {
        if (c !== client) return;
        if (s === "open") setConnected(true, "Connected to " + visible(settings.url, 120));
        else setConnected(false, "Reconnecting to " + visible(settings.url, 120) + "…");
      },
      onlagged: (n) => {
        lagged += n;
        log("! " + n + " messages dropped (this page read too slowly)");
        schedule();
      },
      onerror: (e) => { if (c === client) showError(e.code ? e.code + ": " + e.message : String(e)); },
    });
    client = c;
    const root = settings.root;
    $("empty-filter").textContent = root + "/+/status";
    $("empty-filter-2").textContent = root + "/+/telemetry";
    c.subscribe(root + "/+/status", onStatus, { retained: true })
      .catch((e) => { if (c === client) showError("cannot watch " + root + "/+/status: " + e.message); });
    c.subscribe(root + "/+/telemetry", onTelemetry)
      .catch((e) => { if (c === client) showError("cannot watch " + root + "/+/telemetry: " + e.message); });
  }

  function forgetDevices() {
    for (const d of devices.values()) if (d.tile) dropTile(d);
    devices.clear();
    overflow = false;
    lagged = 0;
    layoutDirty = true;
    schedule();
  }

  // Settings from the address are checked as the form's are.
  const refused = checkSettings(settings.url, settings.root);
  if (refused) {
    $("connect-error").textContent = refused + " Watching this bridge's own fleet instead.";
    $("connect-error").hidden = false;
    $("connection").open = true;
    settings.url = ownUrl;
    settings.root = "fleet";
    settings.token = loadToken(ownUrl);
  }
  $("url").value = settings.url;
  $("root").value = settings.root;
  $("token").value = settings.token || "";
  $("connect-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const url = $("url").value.trim();
    const root = $("root").value.trim();
    const problem = checkSettings(url, root);
    const err = $("connect-error");
    err.hidden = !problem;
    err.textContent = problem || "";
    if (problem) return;
    const token = $("token").value.trim();
    storeToken(url, token);
    if (url !== settings.url || root !== settings.root) forgetDevices();
    Object.assign(settings, { url, root, token: token || null });
    const q = new URLSearchParams(location.search);
    if (url === ownUrl) q.delete("url"); else q.set("url", url);
    if (root === "fleet") q.delete("prefix"); else q.set("prefix", root);
    const query = q.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
    $("connection").open = false;
    connect();
  });

  // ---- find / hide offline ----

  $("find-form").addEventListener("submit", (e) => e.preventDefault());
  $("find").addEventListener("input", () => { layoutDirty = true; schedule(); });
  $("hide-offline").addEventListener("change", () => { layoutDirty = true; schedule(); });

  // ---- views: the fleet, and the console one click away ----

  function showView() {
    const consoleView = location.hash === "#console";
    $("fleet").hidden = consoleView;
    $("console").hidden = !consoleView;
    $("tab-fleet").toggleAttribute("aria-current", !consoleView);
    $("tab-console").toggleAttribute("aria-current", consoleView);
    if (!consoleView) $("tab-fleet").setAttribute("aria-current", "page");
    else $("tab-console").setAttribute("aria-current", "page");
    if (!consoleView) for (const d of devices.values()) if (d.tile) dirty.add(d);
    schedule();
  }
  window.addEventListener("hashchange", showView);

  // ---- the console ----

  function log(line) {
    const box = $("log");
    const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    box.append(el("div", {}, visible(line)));
    while (box.childElementCount > LOG_LINES) box.firstElementChild.remove();
    if (atEnd) box.scrollTop = box.scrollHeight;
  }

  $("sub").addEventListener("submit", async (e) => {
    e.preventDefault();
    const filter = $("filter").value;
    try {
      await client.subscribe(filter, (data, m) => {
        const shown = data instanceof Uint8Array ? "(" + data.length + " bytes) " + btoa(String.fromCharCode(...data.slice(0, 96))) : JSON.stringify(data);
        log((m.retained ? "(retained) " : "") + m.channel + " " + shown);
      }, { retained: $("retained").checked });
      log("subscribed to " + filter);
    } catch (err) { log("! " + err.message); }
  });

  $("pub").addEventListener("submit", async (e) => {
    e.preventDefault();
    const channel = $("channel").value;
    const raw = $("data").value;
    let data, encoding = "json";
    try { data = JSON.parse(raw); } catch (err) { data = raw; encoding = "text"; }
    try {
      await client.publish(channel, data, { encoding });
      log("published to " + channel);
    } catch (err) { log("! " + err.message); }
  });

  showView();
  connect();
})();
