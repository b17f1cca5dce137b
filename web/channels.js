/*
 * channels.js: a small browser client for the channel bridge protocol
 * (docs/PROTOCOL.md). One file, no dependencies, a plain <script>.
 *
 *   const client = new ChannelClient("ws://127.0.0.1:8080/ws", { token });
 *   client.subscribe("fleet/+/telemetry", (data, msg) => console.log(msg.channel, data));
 *   await client.publish("fleet/dev-7/commands", { reboot: true });
 *
 * It keeps the connection alive (a ping every 4 minutes: API Gateway closes
 * connections idle for 10), reconnects with backoff when closed (API Gateway
 * also ends every connection after 2 hours) and then resubscribes, and tells
 * you about lost messages (`onlagged`).
 */
(function (root) {
  "use strict";

  class ChannelError extends Error {
    constructor(code, message) {
      super(code + ": " + message);
      this.code = code;
    }
  }

  class ChannelClient {
    constructor(url, options) {
      options = options || {};
      this.url = options.token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(options.token) : url;
      this.subscriptions = new Map(); // filter -> { handlers: Set, retained }
      this.pending = new Map(); // id -> { resolve, reject }
      this.nextId = 1;
      this.backoff = 500;
      this.closed = false;
      this.onstatus = options.onstatus || function () {};
      this.onlagged = options.onlagged || function () {};
      this.onerror = options.onerror || function () {};
      this._notReady();
      this._open();
    }

    /** Requests made while disconnected wait for the next open. */
    _notReady() {
      this.ready = new Promise((resolve) => { this._resolveReady = resolve; });
    }

    _open() {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      ws.onopen = () => {
        this.backoff = 500;
        this.onstatus("open");
        this._resolveReady();
        for (const [filter, sub] of this.subscriptions) {
          this._request({ action: "subscribe", channel: filter, retained: sub.retained }).catch((e) => this.onerror(e));
        }
        this.pinger = setInterval(() => this._send({ action: "ping" }), 240000);
      };
      ws.onmessage = (event) => this._frame(JSON.parse(event.data));
      ws.onclose = () => {
        clearInterval(this.pinger);
        for (const [, p] of this.pending) p.reject(new ChannelError("unavailable", "connection closed"));
        this.pending.clear();
        this._notReady();
        if (this.closed) return;
        this.onstatus("reconnecting");
        setTimeout(() => this._open(), this.backoff);
        this.backoff = Math.min(this.backoff * 2, 30000);
      };
    }

    _frame(f) {
      if ((f.type === "ack" || f.type === "error" || f.type === "pong") && f.id !== undefined && this.pending.has(f.id)) {
        const p = this.pending.get(f.id);
        this.pending.delete(f.id);
        if (f.type === "error") p.reject(new ChannelError(f.code, f.message));
        else p.resolve(f);
        return;
      }
      if (f.type === "message") {
        const data = f.encoding === "base64" ? Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0)) : f.data;
        for (const [filter, sub] of this.subscriptions) {
          if (ChannelClient.matches(filter, f.channel)) for (const h of sub.handlers) h(data, f);
        }
      } else if (f.type === "lagged") {
        this.onlagged(f.dropped);
      } else if (f.type === "error") {
        this.onerror(new ChannelError(f.code, f.message));
      }
    }

    _send(frame) {
      if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
    }

    async _request(frame) {
      await this.ready;
      const id = "r" + this.nextId++;
      return new Promise((resolve, reject) => {
        this.pending.set(id, { resolve, reject });
        this._send(Object.assign({}, frame, { id }));
      });
    }

    /** Calls handler(data, frame) for each message on a topic `filter` matches. */
    async subscribe(filter, handler, options) {
      const retained = !!(options && options.retained);
      let sub = this.subscriptions.get(filter);
      if (!sub) {
        sub = { handlers: new Set(), retained };
        this.subscriptions.set(filter, sub);
      }
      sub.handlers.add(handler);
      try {
        await this._request({ action: "subscribe", channel: filter, retained });
      } catch (e) {
        sub.handlers.delete(handler);
        if (sub.handlers.size === 0) this.subscriptions.delete(filter);
        throw e;
      }
    }

    async unsubscribe(filter) {
      this.subscriptions.delete(filter);
      await this._request({ action: "unsubscribe", channel: filter });
    }

    /** Resolves when the broker has the message; rejects with a ChannelError. */
    publish(channel, data, options) {
      const frame = Object.assign({ action: "publish", channel, data }, options || {});
      return this._request(frame);
    }

    close() {
      this.closed = true;
      this.ws.close();
    }

    /** MQTT topic matching, as the bridge does it. */
    static matches(filter, topic) {
      const f = filter.split("/");
      const t = topic.split("/");
      if (topic.startsWith("$") && (f[0] === "+" || f[0] === "#")) return false;
      for (let i = 0; i < f.length; i++) {
        if (f[i] === "#") return true;
        if (i >= t.length) return false;
        if (f[i] !== "+" && f[i] !== t[i]) return false;
      }
      return f.length === t.length;
    }
  }

  root.ChannelClient = ChannelClient;
  root.ChannelError = ChannelError;
  if (typeof module !== "undefined" && module.exports) module.exports = { ChannelClient, ChannelError };
})(typeof window !== "undefined" ? window : globalThis);
