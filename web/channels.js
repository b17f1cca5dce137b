/*
 * channels.js: a small browser client for the channel bridge protocol
 * (docs/PROTOCOL.md). One file, no dependencies, a plain <script>.
 *
 *   const client = new ChannelClient("ws://127.0.0.1:8080/ws", { getToken });
 *   client.subscribe("fleet/+/telemetry", (data, msg) => console.log(msg.channel, data));
 *   await client.publish("fleet/dev-7/commands", { reboot: true });
 *
 * It keeps the connection alive (a ping every 4 minutes: API Gateway closes
 * connections idle for 10), reconnects with backoff when closed (API Gateway
 * also ends every connection after 2 hours) and then resubscribes, keeps its
 * token fresh, and tells you about lost messages (`onlagged`).
 *
 * Options (all optional):
 *
 *   getToken()  returns a JWT, or a Promise of one. Called before the first
 *               connect and before every reconnect (the token goes into
 *               `?token=`), and again before the current token's `exp`: the
 *               client then sends `{"action":"auth"}` with the fresh token, so
 *               the connection outlives any one token. The refresh comes 30 s
 *               before `exp`, or at 80 % of the remaining life for tokens
 *               shorter than that; a token without a readable `exp` is never
 *               refreshed. (The JWT payload is only decoded, not verified: the
 *               server verifies.) If the server refuses the fresh token
 *               (`unauthorized`: bad, expired or another subject; `forbidden`:
 *               it no longer allows a channel this client holds), `onerror`
 *               gets that ChannelError and the connection stays until the old
 *               token ends; the server then says `token_expired` and closes
 *               (code 4001), and the client reconnects at once, with no
 *               backoff, with a token from getToken() and resubscribes. If
 *               getToken() throws or rejects, `onerror` gets the error: on
 *               connect the client retries with backoff, on refresh a little
 *               later while the old token lasts.
 *   token       a fixed token, used for every connect and never refreshed
 *               (ignored when getToken is given). When it expires the server
 *               closes the connection and reconnects are refused.
 *   onstatus(s) "open", or "reconnecting" when the connection was lost.
 *   onerror(e)  a ChannelError (e.code, e.message) that answers no request
 *               of yours: a refused token refresh, `token_expired`, a failed
 *               resubscribe after a reconnect; or what getToken() threw, or
 *               the browser's error for a URL it refuses (then retried
 *               with backoff). Frames that are not JSON objects are ignored.
 *   onlagged(n) the server dropped n messages because this page read too
 *               slowly.
 *
 * On AWS a message may, rarely, come twice (docs/PROTOCOL.md, "On AWS"): its
 * copies carry the same `mid`, and the client hands each `mid` to your
 * handlers once (it remembers the last 4,096).
 */
(function (root) {
  "use strict";

  /** setTimeout's longest delay (about 24.8 days); longer ones fire at once. */
  const MAX_TIMEOUT = 2147483647;
  /** A refresh is never scheduled sooner than this after the last one. */
  const MIN_REFRESH_MS = 1000;
  /** How many message ids (`mid`, AWS) are remembered to drop copies. */
  const MAX_MIDS = 4096;

  class ChannelError extends Error {
    constructor(code, message) {
      super(code + ": " + message);
      this.code = code;
    }
  }

  class ChannelClient {
    constructor(url, options) {
      options = options || {};
      this.url = url;
      this.getToken = typeof options.getToken === "function" ? options.getToken : null;
      this.token = this.getToken ? null : options.token || null;
      this.subscriptions = new Map(); // filter -> { handlers: Set, retained }
      this.pending = new Map(); // id -> { resolve, reject }
      this.nextId = 1;
      this.backoff = 500;
      this.closed = false;
      this.ws = null;
      this.refreshTimer = null;
      this.expiryTimer = null;
      this.onstatus = options.onstatus || function () {};
      this.onlagged = options.onlagged || function () {};
      this.onerror = options.onerror || function () {};
      this._notReady();
      this._open();
    }

    /**
     * Requests made while disconnected wait for the next open. A connect
     * that fails before it opens keeps the promise they wait on (a new one
     * would leave them waiting forever).
     */
    _notReady() {
      if (this._waiting) return;
      this._waiting = true;
      this.ready = new Promise((resolve) => { this._resolveReady = resolve; });
    }

    /** Connects with a fresh token from getToken(), or the fixed one. */
    _open() {
      if (this.closed) return;
      if (!this.getToken) {
        this._connect(this.token);
        return;
      }
      this._fetchToken().then(
        (token) => { if (!this.closed) this._connect(token); },
        (e) => {
          if (this.closed) return;
          this.onerror(e);
          this._reconnect(false);
        },
      );
    }

    async _fetchToken() {
      const token = await this.getToken();
      if (typeof token !== "string" || token === "") {
        throw new ChannelError("unauthorized", "getToken() returned no token");
      }
      return token;
    }

    _connect(token) {
      const url = token ? this.url + (this.url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : this.url;
      let ws;
      try {
        ws = new WebSocket(url);
      } catch (e) {
        // A URL the browser refuses outright (not ws:// or wss://, a
        // blocked port): told once per attempt (after the constructor has
        // returned), retried with backoff.
        Promise.resolve().then(() => { if (!this.closed) this.onerror(e); });
        this._reconnect(false);
        return;
      }
      this.ws = ws;
      let toldExpired = false; // the server said token_expired on this socket
      ws.onopen = () => {
        this.backoff = 500;
        this.onstatus("open");
        this._waiting = false;
        this._resolveReady();
        for (const [filter, sub] of this.subscriptions) {
          this._request({ action: "subscribe", channel: filter, retained: sub.retained }).catch((e) => this.onerror(e));
        }
        this.pinger = setInterval(() => this._send({ action: "ping" }), 240000);
        this._tokenInUse(ws, token);
      };
      ws.onmessage = (event) => {
        let f;
        try {
          f = JSON.parse(event.data);
        } catch (e) {
          return; // not a frame of this protocol
        }
        if (!f || typeof f !== "object") return;
        if (f.type === "error" && f.code === "token_expired") toldExpired = true;
        this._frame(f);
      };
      ws.onclose = (event) => {
        clearInterval(this.pinger);
        this._clearTokenTimers();
        for (const [, p] of this.pending) p.reject(new ChannelError("unavailable", "connection closed"));
        this.pending.clear();
        this._notReady();
        if (this.closed || ws !== this.ws) return;
        this.onstatus("reconnecting");
        // The token ran out (4001 self-hosted; on AWS the close code is API
        // Gateway's, but token_expired came first): not the server's trouble,
        // so no backoff, provided a fresh token can be had.
        this._reconnect(!!this.getToken && (event.code === 4001 || toldExpired));
      };
    }

    _reconnect(now) {
      if (now) {
        setTimeout(() => this._open(), 0);
        return;
      }
      setTimeout(() => this._open(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, 30000);
    }

    /**
     * `token` is the connection's token now (connected with it, or the server
     * acknowledged it): schedule its refresh, and a ping just after its end.
     */
    _tokenInUse(ws, token) {
      this._clearTokenTimers();
      if (!this.getToken) return;
      const claims = ChannelClient.claims(token);
      const delay = ChannelClient.refreshDelay(claims, Date.now());
      if (delay === null) return;
      this._at(Date.now() + delay, (t) => { this.refreshTimer = t; }, () => this._refresh(ws, token));
      // Should every refresh fail, a frame after `exp` makes a server that
      // closes only on traffic (AWS) close now, and the client reconnects.
      const end = ChannelClient.remaining(claims, Date.now());
      this._at(Date.now() + end + 1000, (t) => { this.expiryTimer = t; }, () => { if (ws === this.ws) this._send({ action: "ping" }); });
    }

    /** Runs `fn` at time `at` (ms), also when that is beyond setTimeout's range. */
    _at(at, store, fn) {
      const wait = at - Date.now();
      if (wait > MAX_TIMEOUT) store(setTimeout(() => this._at(at, store, fn), MAX_TIMEOUT));
      else store(setTimeout(fn, Math.max(wait, 0)));
    }

    _clearTokenTimers() {
      clearTimeout(this.refreshTimer);
      clearTimeout(this.expiryTimer);
      this.refreshTimer = this.expiryTimer = null;
    }

    /** Replaces the connection's token `old` with a fresh one (`auth`). */
    async _refresh(ws, old) {
      if (ws !== this.ws || ws.readyState !== WebSocket.OPEN) return;
      try {
        const token = await this._fetchToken();
        if (ws !== this.ws || ws.readyState !== WebSocket.OPEN) return;
        await this._call(ws, { action: "auth", token });
        if (ws === this.ws) this._tokenInUse(ws, token);
      } catch (e) {
        if (ws !== this.ws || ws.readyState !== WebSocket.OPEN) return; // reconnecting anyway
        this.onerror(e);
        if (e && (e.code === "unauthorized" || e.code === "forbidden")) return; // until the server closes
        // getToken() failed, or the request did (rate_limited...): try again
        // later while the old token lasts.
        const claims = ChannelClient.claims(old);
        const delay = ChannelClient.refreshDelay(claims, Date.now());
        clearTimeout(this.refreshTimer);
        if (delay !== null && delay < ChannelClient.remaining(claims, Date.now())) {
          this._at(Date.now() + delay, (t) => { this.refreshTimer = t; }, () => this._refresh(ws, old));
        }
      }
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
        if (typeof f.mid === "string" && this._seenBefore(f.mid)) return;
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

    /** Whether a message with this id came already; remembers it if not. */
    _seenBefore(mid) {
      if (!this.mids) this.mids = new Set();
      if (this.mids.has(mid)) return true;
      this.mids.add(mid);
      if (this.mids.size > MAX_MIDS) this.mids.delete(this.mids.values().next().value);
      return false;
    }

    _send(frame) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
    }

    /** A request on this very socket, now (not on a later connection). */
    _call(ws, frame) {
      const id = "r" + this.nextId++;
      return new Promise((resolve, reject) => {
        this.pending.set(id, { resolve, reject });
        ws.send(JSON.stringify(Object.assign({}, frame, { id })));
      });
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
      this._clearTokenTimers();
      if (this.ws) this.ws.close();
    }

    /** A JWT's payload claims, decoded (not verified); null if unreadable. */
    static claims(token) {
      try {
        const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
        const bytes = Uint8Array.from(atob(part + "===".slice((part.length + 3) % 4)), (c) => c.charCodeAt(0));
        const claims = JSON.parse(new TextDecoder().decode(bytes));
        return claims && typeof claims === "object" ? claims : null;
      } catch (e) {
        return null;
      }
    }

    /**
     * Milliseconds the token has left at `now` by its `exp`; null without one.
     * When the local clock disagrees with the issuer's (it puts `now` before
     * `iat` or past `exp`), the token's own lifespan `exp - iat` counts.
     */
    static remaining(claims, now) {
      if (!claims || typeof claims.exp !== "number" || !isFinite(claims.exp)) return null;
      let left = claims.exp * 1000 - now;
      if (typeof claims.iat === "number" && claims.iat < claims.exp) {
        const life = (claims.exp - claims.iat) * 1000;
        if (left > life || left <= 0) left = life;
      }
      return left;
    }

    /**
     * Milliseconds from `now` until the token should be refreshed: 30 s
     * before it ends, or after 80 % of its remaining life if that is sooner
     * to the end (a short token is not refreshed in a loop), never sooner
     * than 1 s. Null when it has no `exp`.
     */
    static refreshDelay(claims, now) {
      const left = ChannelClient.remaining(claims, now);
      if (left === null) return null;
      return Math.max(left - Math.min(30000, left * 0.2), MIN_REFRESH_MS);
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
