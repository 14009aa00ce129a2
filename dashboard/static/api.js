// pgdag dashboard: talking to the API. HTTP JSON calls and self-reconnecting WebSockets.
// When the page was opened with ?token=..., every URL carries the same token
// (browsers cannot set an Authorization header on a WebSocket).
"use strict";
(function () {
  const pgdag = (window.pgdag = window.pgdag || {});
  const token = pageToken();

  // The page's ?token=, percent-decoded with "+" kept as "+" (URLSearchParams would read it
  // as a space): a bearer token never holds a space (RFC 6750 section 2.1), and a base64
  // token pasted into the address bar as it is keeps its "+". Every URL below sends it
  // percent-encoded (URLSearchParams.set: "+" as %2B, "/" as %2F, "=" as %3D).
  function pageToken() {
    for (const part of window.location.search.slice(1).split("&")) {
      const eq = part.indexOf("=");
      if (eq <= 0 || part.slice(0, eq) !== "token") continue;
      const raw = part.slice(eq + 1);
      try {
        return decodeURIComponent(raw) || null;
      } catch (_err) {
        return raw || null; // a stray "%": the server reads it as it is too
      }
    }
    return null;
  }

  function withToken(path, params) {
    const url = new URL(path, window.location.origin);
    if (params) {
      for (const [k, v] of Object.entries(params)) {
        if (v !== undefined && v !== null) url.searchParams.set(k, String(v));
      }
    }
    if (token) url.searchParams.set("token", token);
    return url;
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // fetch JSON; throws ApiError carrying the API's {"error", "message"} when not 2xx.
  // Every request but a GET says it is JSON, body or not: the API refuses (415) a
  // state-changing request that does not, so that no other site's form can make one.
  async function http(method, path, { params, body } = {}) {
    let response;
    try {
      response = await fetch(withToken(path, params), {
        method,
        headers: method === "GET" ? {} : { "Content-Type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, "network", `the API did not answer (${err.message})`);
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch (_err) {
      payload = null;
    }
    if (!response.ok) {
      const message =
        (payload && (payload.message || payload.error)) || `${response.status} ${response.statusText}`;
      throw new ApiError(response.status, payload && payload.error, `${response.status}: ${message}`);
    }
    return payload;
  }

  const CLOSE_REASONS = {
    4401: "unauthorized (wrong or missing token)",
    4403: "forbidden (this token's scope may not read events)",
    4404: "no such run",
    4400: "bad request",
    1013: "the API's database is unavailable",
  };
  const FINAL_CLOSE_CODES = new Set([4400, 4401, 4403, 4404]);

  // A WebSocket that reconnects with backoff. `url()` is asked for the URL before each
  // connection (so a run socket can add ?after=<last event id>). Handlers:
  // onMessage(obj), onState("open"|"closed"|"connecting", detail).
  class LiveSocket {
    constructor(url, { onMessage, onState, onOpen }) {
      this.url = url;
      this.onMessage = onMessage;
      this.onState = onState || (() => {});
      this.onOpen = onOpen || (() => {});
      this.ws = null;
      this.closed = false;
      this.delayMs = 250;
      this.timer = null;
      this.connect();
    }

    connect() {
      if (this.closed) return;
      const url = this.url();
      url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
      this.onState("connecting");
      const ws = new WebSocket(url.toString());
      this.ws = ws;
      ws.onopen = () => {
        this.delayMs = 250;
        this.onState("open");
        this.onOpen();
      };
      ws.onmessage = (ev) => {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch (_err) {
          return;
        }
        const received = performance.now();
        if (msg.type === "events") {
          // ?batch=1: several events in one frame, in order
          for (const event of msg.events) this.onMessage({ type: "event", event }, received);
        } else {
          this.onMessage(msg, received);
        }
      };
      ws.onclose = (ev) => {
        if (this.ws !== ws) return;
        this.ws = null;
        if (this.closed) return;
        const why = CLOSE_REASONS[ev.code] || `closed (${ev.code})`;
        const final = FINAL_CLOSE_CODES.has(ev.code); // retrying cannot help
        this.onState("closed", why, final);
        if (final) return;
        this.timer = setTimeout(() => this.connect(), this.delayMs);
        this.delayMs = Math.min(this.delayMs * 2, 5000);
      };
    }

    close() {
      this.closed = true;
      clearTimeout(this.timer);
      if (this.ws) {
        const ws = this.ws;
        this.ws = null;
        ws.close();
      }
    }
  }

  pgdag.api = { token, withToken, http, ApiError, LiveSocket };
})();
