// pgdag dashboard: the runs list (live from /ws), a run's graph (live from /ws/runs/{id}),
// a step's detail with its history, the workers, the cancel and retry buttons, and while no
// run is open the queue view (GET /queue every 2 s).
"use strict";
(function () {
  const { api, DagView, esc } = window.pgdag;
  const STATUSES = ["pending", "ready", "running", "succeeded", "dead_letter", "skipped", "cancelled"];
  const BAR_ORDER = ["succeeded", "dead_letter", "skipped", "cancelled", "running", "ready", "pending"];
  const TERMINAL_RUN = new Set(["completed", "failed", "cancelled"]);
  const TERMINAL_STEP = new Set(["succeeded", "dead_letter", "skipped", "cancelled"]);
  const RUNS_PAGE = 50;
  const WORKERS_EVERY_MS = 2000;
  const QUEUE_EVERY_MS = 2000;
  const EVENTS_PAGE = 10000;
  const SAMPLES_MAX = 20000;
  const $ = (id) => document.getElementById(id);
  const label = (status) => (status ? status.replace("_", " ") : "");

  const state = {
    runs: new Map(), // run id -> summary (GET /dashboard/runs item), counts kept live
    order: [], // run ids, newest first
    rows: new Map(), // run id -> <li>
    nextCursor: null,
    dirtyRows: new Set(),
    headerDirty: false,
    current: null, // the open run: {id, run, steps, counts, lastEventId, socket, events}
    selected: null, // step name shown in the detail panel
    refreshTimer: null,
  };

  // Measurements for docs/benchmarks.md and the tests (see tests/dashboard).
  const metrics = (window.pgdagMetrics = { graph: null, eventToPaintMs: [], commitToPaintMs: [], events: 0 });
  let paintWaiters = [];

  const graph = new DagView($("graph"), $("graph-edges"), {
    onSelect: (name) => navigate(state.current && state.current.id, name),
    onMessage: (text) => {
      $("graph-msg").textContent = text;
      $("graph-msg").hidden = !text;
    },
  });

  // --- small helpers ---------------------------------------------------------------------
  function toast(message, kind = "info") {
    const el = document.createElement("div");
    el.className = `toast ${kind}`;
    el.textContent = message;
    $("toasts").appendChild(el);
    setTimeout(() => el.remove(), kind === "error" ? 10000 : 5000);
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function fmtDuration(ms) {
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    const m = Math.floor(ms / 60000);
    return `${m} min ${Math.round((ms % 60000) / 1000)} s`;
  }

  function ago(iso) {
    if (!iso) return "never";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(iso).toLocaleDateString();
  }

  function json(value) {
    if (value === null || value === undefined) return "—";
    return JSON.stringify(value, null, 2);
  }

  function emptyCounts() {
    const c = {};
    for (const s of STATUSES) c[s] = 0;
    return c;
  }

  function countsFrom(obj) {
    const c = emptyCounts();
    for (const [k, v] of Object.entries(obj || {})) c[k] = (c[k] || 0) + v;
    return c;
  }

  // --- routing: #/runs/<id>[/steps/<name>] -----------------------------------------------
  function navigate(runId, stepName) {
    let hash = "#/";
    if (runId) hash = `#/runs/${runId}`;
    if (runId && stepName) hash += `/steps/${encodeURIComponent(stepName)}`;
    if (window.location.hash !== hash) window.location.hash = hash;
    else route();
  }

  function route() {
    const m = window.location.hash.match(/^#\/runs\/([0-9a-f-]{36})(?:\/steps\/(.+))?$/);
    const runId = m ? m[1] : null;
    const stepName = m && m[2] ? decodeURIComponent(m[2]) : null;
    if (!runId) {
      closeRun();
    } else if (!state.current || state.current.id !== runId) {
      openRun(runId);
    }
    for (const [id, row] of state.rows) row.classList.toggle("active", id === runId);
    selectStep(stepName);
  }

  // --- the runs list ---------------------------------------------------------------------
  async function loadRuns({ reset = false, older = false } = {}) {
    let page;
    try {
      page = await api.http("GET", "/dashboard/runs", {
        params: { limit: RUNS_PAGE, cursor: older ? state.nextCursor : null },
      });
    } catch (err) {
      toast(`Could not load runs: ${err.message}`, "error");
      return;
    }
    if (reset) {
      state.order = [];
      state.nextCursor = null;
    }
    const known = new Set(state.order);
    const fresh = [];
    for (const run of page.runs) {
      run.stepCounts = countsFrom(run.stepCounts);
      const mine = state.runs.get(run.id);
      const isCurrent = state.current && state.current.id === run.id && state.current.counts;
      if (isCurrent && mine) {
        Object.assign(mine, { goal: run.goal, createdAt: run.createdAt });
      } else if (mine && !reset && !TERMINAL_RUN.has(run.status) && mine.goal !== undefined && !mine.provisional) {
        // A running run's counts are kept live by the event stream; take the rest.
        Object.assign(mine, { goal: run.goal, startedAt: run.startedAt });
      } else {
        state.runs.set(run.id, Object.assign(mine || {}, run, { provisional: false }));
      }
      if (!known.has(run.id)) fresh.push(run.id);
      state.dirtyRows.add(run.id);
    }
    if (older || !reset) {
      // Newest first: runs we did not know go in by creation time.
      state.order = [...new Set([...state.order, ...fresh])];
      state.order.sort((a, b) => Date.parse(state.runs.get(b).createdAt) - Date.parse(state.runs.get(a).createdAt));
    } else {
      state.order = page.runs.map((r) => r.id);
    }
    if (older || reset || state.nextCursor === null) state.nextCursor = page.nextCursor;
    renderRunsList();
  }

  function scheduleListRefresh() {
    if (state.refreshTimer) return;
    state.refreshTimer = setTimeout(() => {
      state.refreshTimer = null;
      loadRuns();
    }, 400);
  }

  function renderRunsList() {
    const ul = $("runs");
    const wanted = new Set(state.order);
    for (const [id, row] of state.rows) {
      if (!wanted.has(id)) {
        row.remove();
        state.rows.delete(id);
      }
    }
    let prev = null;
    for (const id of state.order) {
      let row = state.rows.get(id);
      if (!row) {
        row = document.createElement("li");
        row.className = "run-row";
        row.dataset.runId = id;
        row.tabIndex = 0;
        row.addEventListener("click", () => navigate(id));
        row.addEventListener("keydown", (ev) => {
          if (ev.key === "Enter") navigate(id);
        });
        state.rows.set(id, row);
        state.dirtyRows.add(id);
      }
      const want = prev ? prev.nextSibling : ul.firstChild;
      if (want !== row) ul.insertBefore(row, want);
      prev = row;
    }
    $("runs-count").textContent = state.order.length ? String(state.order.length) : "";
    $("runs-more").hidden = !state.nextCursor;
    if (!state.order.length) {
      ul.innerHTML = '<li class="placeholder">No runs yet.</li>';
      state.rows.clear();
    } else {
      const placeholder = ul.querySelector(".placeholder");
      if (placeholder) placeholder.remove();
    }
    flushRows();
  }

  function renderRow(id) {
    const row = state.rows.get(id);
    const run = state.runs.get(id);
    if (!row || !run) return;
    const c = run.stepCounts;
    const total = run.stepsTotal || STATUSES.reduce((n, s) => n + (c[s] || 0), 0) || 1;
    const bar = BAR_ORDER.filter((s) => c[s] > 0)
      .map((s) => `<span class="seg" data-status="${s}" style="width:${((100 * c[s]) / total).toFixed(2)}%"></span>`)
      .join("");
    const parts = [`${c.succeeded || 0}/${run.stepsTotal} succeeded`];
    for (const s of ["running", "dead_letter", "skipped", "cancelled"]) {
      if (c[s] > 0) parts.push(`${c[s]} ${label(s)}`);
    }
    row.dataset.status = run.status;
    row.classList.toggle("active", !!state.current && state.current.id === id);
    row.innerHTML =
      `<div class="run-row-top"><span class="badge" data-status="${esc(run.status)}">${esc(label(run.status))}</span>` +
      `<span class="run-goal">${esc(run.goal || "(no goal)")}</span>` +
      `<span class="muted run-when" title="${esc(run.id)} · ${esc(run.createdAt || "")}">${esc(ago(run.createdAt))}</span></div>` +
      `<div class="bar">${bar}</div>` +
      `<div class="run-row-bottom"><span class="run-counts">${esc(parts.join(" · "))}</span>` +
      `<code class="muted">${esc(run.id.slice(0, 8))}</code></div>`;
  }

  function flushRows() {
    for (const id of state.dirtyRows) renderRow(id);
    state.dirtyRows.clear();
  }

  // /ws: a reconnect asks for ?after=<last id seen>, so the server replays what was missed;
  // when it cannot (resync), the list is fetched afresh.
  let globalLastId = null;
  function onGlobalMessage(msg) {
    if (msg.type === "hello") {
      if (globalLastId === null) {
        globalLastId = msg.lastEventId;
        loadRuns({ reset: true });
      }
      return;
    }
    if (msg.type === "resync") {
      if (typeof msg.lastEventId === "number") globalLastId = msg.lastEventId;
      loadRuns({ reset: true });
      return;
    }
    if (msg.type !== "event") return;
    const e = msg.event;
    if (globalLastId !== null && e.id <= globalLastId) return;
    globalLastId = e.id;
    if (e.workerId) workersSoon();
    let run = state.runs.get(e.runId);
    if (!run) {
      if (e.event !== "run_created") return; // an older run beyond the loaded page
      const d = e.detail || {};
      const counts = emptyCounts();
      counts.ready = d.ready || 0;
      counts.pending = (d.steps || 0) - counts.ready;
      run = { id: e.runId, goal: null, status: "pending", stepsTotal: d.steps || 0, stepCounts: counts, createdAt: e.at, provisional: true };
      state.runs.set(run.id, run);
      state.order.unshift(run.id);
      renderRunsList();
      scheduleListRefresh(); // for its goal
      return;
    }
    if (state.current && state.current.id === e.runId && state.current.counts) return; // kept exact by the run socket
    if (e.stepName) {
      const c = run.stepCounts;
      if (e.fromStatus && e.toStatus && e.fromStatus !== e.toStatus) {
        c[e.fromStatus] = Math.max(0, (c[e.fromStatus] || 0) - 1);
        c[e.toStatus] = (c[e.toStatus] || 0) + 1;
      }
    } else if (e.toStatus) {
      run.status = e.toStatus;
      if (TERMINAL_RUN.has(e.toStatus)) scheduleListRefresh(); // settle counts exactly
    }
    markRow(run.id);
  }

  // --- batching DOM work per frame ---------------------------------------------------------
  let frameQueued = false;
  function queueFrame() {
    if (frameQueued) return;
    frameQueued = true;
    requestAnimationFrame(() => {
      frameQueued = false;
      flushRows();
      if (state.headerDirty) renderHeader();
      const waiters = paintWaiters;
      paintWaiters = [];
      if (waiters.length) {
        setTimeout(() => {
          // after the frame that shows the change has been painted
          const now = performance.now();
          const wall = Date.now();
          for (const [received, at] of waiters) {
            pushSample(metrics.eventToPaintMs, now - received);
            if (at) pushSample(metrics.commitToPaintMs, wall - Date.parse(at));
          }
        }, 0);
      }
    });
  }

  function pushSample(list, value) {
    if (list.length >= SAMPLES_MAX) list.shift();
    list.push(value);
  }

  function markRow(id) {
    state.dirtyRows.add(id);
    queueFrame();
  }

  // --- the open run ----------------------------------------------------------------------
  function closeRun() {
    if (state.current && state.current.socket) state.current.socket.close();
    state.current = null;
    graph.clear();
    $("run-view").hidden = true;
    $("empty").hidden = false;
    pollQueue(false); // at once, not at the next tick
  }

  function openRun(id) {
    closeRun();
    const cur = { id, run: null, steps: new Map(), counts: null, lastEventId: null, snapshotId: 0, seen: new Set(), socket: null, events: null };
    state.current = cur;
    $("empty").hidden = true;
    $("run-view").hidden = false;
    $("run-error").hidden = true;
    $("run-goal").textContent = "Loading…";
    $("run-id").textContent = id;
    $("run-status").textContent = "";
    $("run-counts").innerHTML = "";
    $("graph-msg").textContent = "Connecting…";
    $("graph-msg").hidden = false;
    resetCancel();
    cur.socket = new api.LiveSocket(
      // ?batch=1: a burst of events (a fan-out's 2,000 steps turning ready) comes in one
      // frame and is applied in one task and painted once.
      () => api.withToken(`/ws/runs/${id}`, { batch: 1, after: cur.lastEventId }),
      {
        onMessage: (msg, received) => onRunMessage(cur, msg, received),
        onState: (s, why, final) => {
          if (s === "closed" && !cur.run) {
            $("graph-msg").textContent = final ? `Cannot follow this run: ${why}.` : `Live connection ${why}; retrying…`;
            $("graph-msg").hidden = false;
          }
        },
      },
    );
  }

  function onRunMessage(cur, msg, received) {
    if (state.current !== cur) return;
    if (msg.type === "snapshot") {
      const run = msg.run;
      cur.run = run;
      cur.steps = new Map(run.steps.map((s) => [s.name, s]));
      cur.counts = emptyCounts();
      for (const s of run.steps) cur.counts[s.status] = (cur.counts[s.status] || 0) + 1;
      cur.lastEventId = msg.lastEventId;
      cur.snapshotId = msg.lastEventId;
      cur.seen = new Set();
      syncListRow(cur);
      renderHeader();
      graph.show(run, received).then(() => {
        if (state.current !== cur) return;
        if (graph.metrics && graph.metrics.runId === cur.id) metrics.graph = graph.metrics;
        graph.select(state.selected);
        if (state.selected) graph.reveal(state.selected);
      });
      if (state.selected) renderDetail();
      return;
    }
    if (msg.type === "resync") return; // a fresh snapshot follows on this socket
    if (msg.type === "error") {
      $("run-goal").textContent = msg.error === "not_found" ? "No such run" : "Error";
      $("graph-msg").textContent = msg.message || msg.error;
      $("graph-msg").hidden = false;
      return;
    }
    if (msg.type !== "event" || !cur.run) return;
    const e = msg.event;
    // Events up to the snapshot's id are in it; later ones are applied once each (ids
    // come in commit order, which need not be id order).
    if (e.id <= cur.snapshotId || cur.seen.has(e.id)) return;
    cur.seen.add(e.id);
    if (e.id > cur.lastEventId) cur.lastEventId = e.id;
    metrics.events += 1;
    applyRunEvent(cur, e);
    // Only events that recolour a node already on the page are measured.
    if (graph.metrics && graph.metrics.runId === cur.id) paintWaiters.push([received, e.at]);
    queueFrame();
  }

  function applyRunEvent(cur, e) {
    if (cur.events) {
      if (cur.events.loading) cur.events.buffer.push(e);
      else if (e.id > cur.events.maxId) {
        cur.events.list.push(e);
        cur.events.maxId = e.id;
      }
    }
    if (e.stepName) {
      if (
        e.event === "step_map_expanded" ||
        e.event === "step_replayed" ||
        e.event === "steps_added"
      ) {
        // Steps were added (a map's children, a planning step's new steps) or may be gone
        // (a replayed map's): the snapshot has the new shape.
        reloadSoon(cur);
      }
      const s = cur.steps.get(e.stepName);
      if (!s) return;
      const prev = s.status;
      if (e.toStatus && e.toStatus !== prev) {
        cur.counts[prev] = Math.max(0, (cur.counts[prev] || 0) - 1);
        cur.counts[e.toStatus] = (cur.counts[e.toStatus] || 0) + 1;
        s.status = e.toStatus;
      }
      if (e.event === "step_retried") {
        s.attempt = 0;
        s.error = null;
        s.output = null;
        s.finishedAt = null;
      } else if (e.attempt !== null && e.attempt !== undefined) {
        s.attempt = e.attempt;
      }
      if (e.toStatus === "running") {
        s.leaseOwner = e.workerId;
        s.startedAt = s.startedAt || e.at;
      } else if (TERMINAL_STEP.has(e.toStatus)) {
        s.finishedAt = e.at;
      }
      if (e.workerId) s.lastWorker = e.workerId;
      s.updatedAt = e.at;
      s.stale = true; // output, error and times come with the next GET
      graph.setStep(s);
      if (state.selected === e.stepName) scheduleDetailRefresh();
    } else if (e.toStatus) {
      cur.run.status = e.toStatus;
      if (e.toStatus === "running" && !cur.run.startedAt) cur.run.startedAt = e.at;
      cur.run.finishedAt = TERMINAL_RUN.has(e.toStatus) ? e.at : null;
    }
    syncListRow(cur);
    state.headerDirty = true;
  }

  // The open run's list row takes its exact counts from the run socket.
  function syncListRow(cur) {
    const row = state.runs.get(cur.id);
    if (!row) return;
    row.stepCounts = Object.assign({}, cur.counts);
    row.status = cur.run.status;
    row.stepsTotal = cur.run.stepsTotal;
    markRow(cur.id);
  }

  function renderHeader() {
    state.headerDirty = false;
    const cur = state.current;
    if (!cur || !cur.run) return;
    const run = cur.run;
    $("run-goal").textContent = run.goal || "(no goal)";
    $("run-id").textContent = run.id;
    const badge = $("run-status");
    badge.dataset.status = run.status;
    badge.textContent = label(run.status);
    const times = [`created ${fmtTime(run.createdAt)}`];
    if (run.startedAt) times.push(`started ${fmtTime(run.startedAt)}`);
    if (run.finishedAt && run.startedAt) {
      times.push(`${run.status} after ${fmtDuration(Date.parse(run.finishedAt) - Date.parse(run.startedAt))}`);
    }
    $("run-times").textContent = `${run.stepsTotal.toLocaleString()} steps · ${times.join(" · ")}`;
    // A child run (a step of kind run started it): a link to that step of its parent run.
    const parent = $("run-parent");
    parent.hidden = !run.parentRunId;
    if (run.parentRunId) {
      parent.href = `#/runs/${run.parentRunId}/steps/${encodeURIComponent(run.parentStepName || "")}`;
      parent.textContent = `child run of ${run.parentRunId.slice(0, 8)}… step ${run.parentStepName || "?"}`;
    }
    $("run-counts").innerHTML = STATUSES.map(
      (s) =>
        `<span class="chip${cur.counts[s] ? "" : " zero"}" data-status="${s}" data-count="${cur.counts[s] || 0}">` +
        `<i class="swatch"></i>${label(s)} <b>${(cur.counts[s] || 0).toLocaleString()}</b></span>`,
    ).join("");
    const cancel = $("cancel-run");
    cancel.disabled = TERMINAL_RUN.has(run.status);
    if (cancel.disabled) resetCancel();
  }

  // --- cancel (two clicks) ---------------------------------------------------------------
  let cancelTimer = null;
  function resetCancel() {
    clearTimeout(cancelTimer);
    const b = $("cancel-run");
    b.dataset.armed = "";
    b.textContent = "Cancel run";
  }

  async function onCancel() {
    const cur = state.current;
    if (!cur) return;
    const b = $("cancel-run");
    if (!b.dataset.armed) {
      b.dataset.armed = "1";
      b.textContent = "Click again to cancel";
      cancelTimer = setTimeout(resetCancel, 4000);
      return;
    }
    resetCancel();
    b.disabled = true;
    $("run-error").hidden = true;
    try {
      await api.http("POST", `/runs/${cur.id}/cancel`);
      toast("Run cancelled.", "ok");
    } catch (err) {
      $("run-error").textContent = `Cancel failed: ${err.message}`;
      $("run-error").hidden = false;
      toast(`Cancel failed: ${err.message}`, "error");
    } finally {
      b.disabled = cur.run ? TERMINAL_RUN.has(cur.run.status) : false;
    }
  }

  // --- the step detail -------------------------------------------------------------------
  let detailTimer = null;
  function selectStep(name) {
    state.selected = name;
    graph.select(name);
    $("detail").hidden = !name;
    document.body.classList.toggle("with-detail", !!name);
    $("step-error-msg").hidden = true;
    if (!name) return;
    graph.reveal(name);
    renderDetail();
    refreshDetail();
  }

  function scheduleDetailRefresh() {
    renderDetail();
    clearTimeout(detailTimer);
    detailTimer = setTimeout(refreshDetail, 250);
  }

  async function refreshDetail() {
    const cur = state.current;
    const name = state.selected;
    if (!cur || !name) return;
    loadEvents(cur);
    let fresh;
    try {
      fresh = await api.http("GET", `/runs/${cur.id}`);
    } catch (err) {
      $("step-error-msg").textContent = `Could not load the step: ${err.message}`;
      $("step-error-msg").hidden = false;
      return;
    }
    if (state.current !== cur) return;
    const got = fresh.steps.find((s) => s.name === name);
    const s = cur.steps.get(name);
    if (got && s) {
      // Status and attempt stay as the live stream has them; the rest comes from the GET.
      for (const k of ["input", "resolvedInput", "output", "error", "waitingFor", "availableAt", "leaseOwner", "leaseExpiresAt", "startedAt", "finishedAt", "createdAt", "timeoutMs", "idempotent", "maxAttempts", "childRunId"]) {
        s[k] = got[k];
      }
      if (got.status === s.status) s.stale = false;
    }
    if (state.selected === name) renderDetail();
  }

  async function loadEvents(cur) {
    if (cur.events) return;
    cur.events = { list: [], maxId: 0, loading: true, buffer: [] };
    try {
      for (;;) {
        const page = await api.http("GET", `/runs/${cur.id}/events`, { params: { after: cur.events.maxId, limit: EVENTS_PAGE } });
        for (const e of page.events) cur.events.list.push(e);
        if (page.events.length) cur.events.maxId = page.events[page.events.length - 1].id;
        if (page.events.length < EVENTS_PAGE) break;
      }
    } catch (err) {
      $("history-note").textContent = `could not load: ${err.message}`;
      cur.events = null;
      return;
    }
    for (const e of cur.events.buffer) {
      if (e.id > cur.events.maxId) {
        cur.events.list.push(e);
        cur.events.maxId = e.id;
      }
    }
    cur.events.buffer = [];
    cur.events.loading = false;
    if (state.current === cur && state.selected) renderDetail();
  }

  function reloadSoon(cur) {
    if (cur.reload) return;
    cur.reload = setTimeout(() => {
      if (state.current === cur) openRun(cur.id);
    }, 250);
  }

  function describeWaiting(w) {
    if (!w || w.reason === "running") return null;
    switch (w.reason) {
      case "dependencies":
        return `dependencies: ${w.steps.join(", ")}`;
      case "mapChildren":
        return `${w.remaining} of ${w.width} map children`;
      case "startAt":
        return `the run's start time, ${fmtTime(w.until)}`;
      case "signal":
        return `${w.approval ? "an approval" : "the signal"} ${w.signal} (deadline ${fmtTime(w.deadline)})`;
      case "delay":
        return `a sleep of ${w.delayMs} ms (no worker held), until ${fmtTime(w.until)}`;
      case "childRun":
        return w.runId ? `its child run ${w.runId} (no worker held)` : "the maintenance leader to start its child run";
      case "backoff":
        return `backoff after attempt ${w.attempt}, until ${fmtTime(w.until)}`;
      case "concurrencyKey":
        return `concurrency key ${w.key} (${w.running} of ${w.maxConcurrency} running)`;
      case "noLiveWorker":
        return `a live worker with the tool ${w.tool}`;
      default:
        return "a free worker slot";
    }
  }

  function renderDetail() {
    const cur = state.current;
    const name = state.selected;
    if (!cur || !name || !cur.run) return;
    const s = cur.steps.get(name);
    $("step-name").textContent = name;
    if (!s) {
      $("step-status").textContent = "";
      $("step-facts").innerHTML = `<dt>step</dt><dd>no step named ${esc(name)} in this run</dd>`;
      return;
    }
    const badge = $("step-status");
    badge.dataset.status = s.status;
    badge.textContent = label(s.status);
    $("detail").dataset.status = s.status;
    $("retry-step").hidden = s.status !== "dead_letter";
    // An approval the step waits for now (its dependencies done): Approve / Reject send its
    // signal (POST /runs/{runId}/signals/{signal}), {"approved": true|false}.
    const approval = s.status === "pending" && s.waitingFor && s.waitingFor.reason === "signal" && s.waitingFor.approval;
    $("approve-step").hidden = !approval;
    $("reject-step").hidden = !approval;
    const history = cur.events ? cur.events.list.filter((e) => e.stepName === name) : null;
    let worker = s.leaseOwner || s.lastWorker;
    if (!worker && history) {
      for (let i = history.length - 1; i >= 0 && !worker; i--) worker = history[i].workerId;
    }
    const facts = [
      ["tool", s.tool],
      ["attempt", `${s.attempt} of ${s.maxAttempts}`],
      ["worker", worker || "—"],
      ["depends on", s.dependsOn.length ? s.dependsOn.join(", ") : "—"],
    ];
    if (s.runIf && s.runIf !== "all_succeeded") facts.push(["runs if", s.runIf]);
    if (s.map) facts.push(["map over", s.mapWidth == null ? s.map : `${s.map} (${s.mapWidth} children)`]);
    if (s.mapOf) facts.push(["map child", `${s.mapOf} #${s.mapIndex}`]);
    if (s.wait) facts.push(["waits for", `${s.wait.approval ? "approval" : "signal"} ${s.wait.signal}, up to ${fmtDuration(s.wait.timeoutS * 1000)}`]);
    if (s.concurrencyKey) facts.push(["concurrency key", `${s.concurrencyKey} (at most ${s.maxConcurrency})`]);
    const waiting = TERMINAL_STEP.has(s.status) ? null : describeWaiting(s.waitingFor);
    if (waiting) facts.push(["waiting for", waiting]);
    facts.push(
      ["created", fmtTime(s.createdAt)],
      ["started", s.startedAt ? fmtTime(s.startedAt) : "—"],
      ["finished", s.finishedAt ? fmtTime(s.finishedAt) : "—"],
    );
    if (s.startedAt && s.finishedAt) facts.push(["took", fmtDuration(Date.parse(s.finishedAt) - Date.parse(s.startedAt))]);
    if (s.status === "ready" && s.availableAt) facts.push(["available at", fmtTime(s.availableAt)]);
    if (s.status === "running" && s.leaseExpiresAt) facts.push(["lease expires", fmtTime(s.leaseExpiresAt)]);
    facts.push(["timeout", s.timeoutMs ? fmtDuration(s.timeoutMs) : "—"]);
    facts.push(["idempotent", s.idempotent ? "yes" : "no (never re-run automatically)"]);
    facts.push(["idempotency key", s.idempotencyKey]);
    $("step-facts").innerHTML = facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("");
    if (s.childRunId) {
      // A step of kind run: a link to the child run of its latest attempt.
      $("step-facts").insertAdjacentHTML(
        "beforeend",
        `<dt>child run</dt><dd><a id="child-run-link" href="#/runs/${esc(s.childRunId)}">${esc(s.childRunId)}</a></dd>`,
      );
    }
    $("step-input").textContent = s.resolvedInput == null ? json(s.input) : `${json(s.resolvedInput)}\n\n(as submitted: ${json(s.input)})`;
    $("step-output").textContent = s.stale && s.status === "succeeded" && s.output == null ? "loading…" : json(s.output);
    $("step-error-block").hidden = !s.error;
    $("step-error").textContent = s.error || "";
    const tbody = $("step-history");
    if (!history) {
      $("history-note").textContent = "loading…";
      tbody.innerHTML = "";
      return;
    }
    $("history-note").textContent = `${history.length} event${history.length === 1 ? "" : "s"} from the audit log`;
    tbody.innerHTML = history
      .map((e) => {
        const d = e.detail && (e.detail.error || e.detail.reason);
        const transition = e.fromStatus ? `${label(e.fromStatus)} → ${label(e.toStatus)}` : label(e.toStatus);
        const who = [e.attempt ? `try ${e.attempt}` : "", e.workerId || ""].filter(Boolean).join(" · ");
        return (
          `<tr data-status="${esc(e.toStatus || "")}"><td class="mono">${esc(fmtTime(e.at))}</td>` +
          `<td>${esc(e.event)}${who ? `<div class="muted small">${esc(who)}</div>` : ""}</td>` +
          `<td>${esc(transition)}</td></tr>` +
          (d ? `<tr class="history-detail"><td></td><td colspan="2">${esc(typeof d === "string" ? d : JSON.stringify(d))}</td></tr>` : "")
        );
      })
      .join("");
  }

  async function onRetry() {
    const cur = state.current;
    const name = state.selected;
    if (!cur || !name) return;
    const b = $("retry-step");
    b.disabled = true;
    $("step-error-msg").hidden = true;
    try {
      await api.http("POST", `/runs/${cur.id}/steps/${encodeURIComponent(name)}/retry`);
      toast(`Step ${name} goes back to ready.`, "ok");
    } catch (err) {
      $("step-error-msg").textContent = `Retry failed: ${err.message}`;
      $("step-error-msg").hidden = false;
      toast(`Retry failed: ${err.message}`, "error");
    } finally {
      b.disabled = false;
    }
  }

  // --- approvals (a wait step with "approval": true) ---------------------------------------
  async function onDecide(approved) {
    const cur = state.current;
    const name = state.selected;
    const s = cur && name ? cur.steps.get(name) : null;
    if (!s || !s.waitingFor || s.waitingFor.reason !== "signal") return;
    const buttons = [$("approve-step"), $("reject-step")];
    for (const b of buttons) b.disabled = true;
    $("step-error-msg").hidden = true;
    const body = approved ? { approved: true, by: "dashboard" } : { approved: false, reason: "rejected in the dashboard" };
    try {
      await api.http("POST", `/runs/${cur.id}/signals/${encodeURIComponent(s.waitingFor.signal)}`, { body });
      toast(approved ? `Step ${name} approved.` : `Step ${name} rejected.`, "ok");
    } catch (err) {
      $("step-error-msg").textContent = `${approved ? "Approve" : "Reject"} failed: ${err.message}`;
      $("step-error-msg").hidden = false;
      toast(`${approved ? "Approve" : "Reject"} failed: ${err.message}`, "error");
    } finally {
      for (const b of buttons) b.disabled = false;
    }
  }

  // --- workers ---------------------------------------------------------------------------
  // Periodic, and soon after an event that names a worker (at most once a second).
  let workersTimer = null;
  let workersBusy = false;
  let workersAt = 0;
  function workersSoon() {
    if (workersTimer || workersBusy) return;
    const wait = Math.max(300, 1000 - (performance.now() - workersAt));
    workersTimer = setTimeout(() => {
      workersTimer = null;
      pollWorkers(false);
    }, wait);
  }

  async function pollWorkers(again = true) {
    if (again) setTimeout(pollWorkers, WORKERS_EVERY_MS);
    if (!document.hidden && !workersBusy) {
      workersBusy = true;
      workersAt = performance.now();
      try {
        const { workers } = await api.http("GET", "/workers");
        renderWorkers(workers);
      } catch (err) {
        $("workers").innerHTML = `<li class="placeholder error-text">${esc(err.message)}</li>`;
      } finally {
        workersBusy = false;
      }
    }
  }

  function renderWorkers(workers) {
    const live = workers.filter((w) => w.alive).length;
    $("workers-count").textContent = workers.length ? `${live} live` : "";
    if (!workers.length) {
      $("workers").innerHTML = '<li class="placeholder">No worker has registered yet. Start one with <code>python -m workers</code>.</li>';
      return;
    }
    $("workers").innerHTML = workers
      .map((w) => {
        const st = w.alive ? "alive" : w.status === "stopped" ? "stopped" : "stale";
        const steps = w.currentSteps
          .map(
            (s) =>
              `<li><a href="#/runs/${esc(s.runId)}/steps/${encodeURIComponent(s.stepName)}">${esc(s.stepName)}</a>` +
              ` <span class="muted">run ${esc(s.runId.slice(0, 8))} · try ${s.attempt}</span></li>`,
          )
          .join("");
        return (
          `<li class="worker" data-worker-id="${esc(w.id)}" data-state="${st}">` +
          `<div class="worker-top"><i class="dot" title="${st}"></i><b>${esc(w.id)}</b>` +
          `<span class="muted">${w.currentSteps.length}/${w.concurrency} busy</span></div>` +
          `<div class="muted small">${esc(w.hostname)} · pid ${w.pid} · heartbeat ${esc(ago(w.lastHeartbeatAt))}` +
          `${st === "stopped" ? " · stopped" : ""}</div>` +
          restartsLine(w) +
          (steps ? `<ul class="worker-steps">${steps}</ul>` : "") +
          `</li>`
        );
      })
      .join("");
  }

  // A supervised worker (python -m workers --processes N) that was restarted: how many
  // times, and how its previous process ended (negative exit code: the killing signal).
  const SIGNALS = { 1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM" };
  function exitText(code) {
    if (code === null || code === undefined) return "unknown";
    if (code < 0) return `${code} (${SIGNALS[-code] || `signal ${-code}`})`;
    return String(code);
  }
  function restartsLine(w) {
    if (!w.restarts) return "";
    const times = w.restarts === 1 ? "1 time" : `${w.restarts} times`;
    return (
      `<div class="worker-restarts small" title="restarted by its supervisor">` +
      `restarted ${times} · last exit ${esc(exitText(w.lastExitCode))}</div>`
    );
  }

  // --- the queue view (GET /queue: the numbers of /metrics), while no run is open --------
  let queueBusy = false;
  async function pollQueue(again = true) {
    if (again) setTimeout(pollQueue, QUEUE_EVERY_MS);
    if (document.hidden || $("empty").hidden || queueBusy) return;
    queueBusy = true;
    try {
      renderQueue(await api.http("GET", "/queue"));
      $("queue-error").hidden = true;
    } catch (err) {
      $("queue-error").textContent = `Queue: ${err.message}`;
      $("queue-error").hidden = false;
    } finally {
      queueBusy = false;
    }
  }

  function ageText(s) {
    if (!s) return "—";
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    if (s < 3600) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function renderQueue(q) {
    const busy = (t) => t.ready + t.running + t.deadLetter;
    const tools = q.tools.slice().sort((a, b) => busy(b) - busy(a) || a.tool.localeCompare(b.tool));
    const cell = (field, n, text) =>
      `<td data-field="${field}" data-value="${n}"${n ? ' class="hot"' : ""}>${text === undefined ? n : text}</td>`;
    $("queue-tools").innerHTML = tools.length
      ? tools
          .map(
            (t) =>
              `<tr data-tool="${esc(t.tool)}"${busy(t) ? "" : ' class="idle"'}><td>${esc(t.tool)}</td>` +
              cell("ready", t.ready) +
              cell("running", t.running) +
              `<td data-field="oldestReadyAgeSeconds" data-value="${t.oldestReadyAgeSeconds}">${ageText(t.oldestReadyAgeSeconds)}</td>` +
              cell("deadLetter", t.deadLetter) +
              `<td data-field="workersLive" data-value="${t.workersLive}"${t.ready && !t.workersLive ? ' class="none" title="no live worker has this tool"' : ""}>${t.workersLive}</td></tr>`,
          )
          .join("")
      : '<tr><td colspan="6" class="placeholder">No tool known yet.</td></tr>';
    $("queue-runs").textContent = `${q.runs.running} running · ${q.runs.pending} pending runs`;
    $("queue-age").textContent = `as of ${q.snapshotAgeSeconds.toFixed(1)} s ago`;
    const minutes = q.completionsPerMinute;
    const max = Math.max(1, ...minutes.map((m) => m.succeeded));
    const total = minutes.reduce((n, m) => n + m.succeeded, 0);
    $("queue-total").textContent = `${total} in ${minutes.length} min`;
    const chart = $("queue-throughput");
    chart.dataset.total = String(total);
    chart.innerHTML = minutes
      .map((m, i) => {
        const at = new Date(m.minute).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
        const tick = i === minutes.length - 1 ? "now" : i % 3 === 0 ? `-${minutes.length - 1 - i}m` : "";
        return (
          `<div class="col" data-minute="${esc(m.minute)}" data-value="${m.succeeded}" title="${esc(at)}: ${m.succeeded} succeeded">` +
          `<b>${m.succeeded || ""}</b><i style="height:${((m.succeeded / max) * 70).toFixed(1)}px"></i><span>${tick}</span></div>`
        );
      })
      .join("");
  }

  // --- start -----------------------------------------------------------------------------
  function setConn(s, why) {
    const el = $("conn");
    el.dataset.state = s;
    el.textContent = s === "open" ? "live" : s === "connecting" ? "connecting…" : `reconnecting (${why || "closed"})`;
  }

  $("cancel-run").addEventListener("click", onCancel);
  $("retry-step").addEventListener("click", onRetry);
  $("approve-step").addEventListener("click", () => onDecide(true));
  $("reject-step").addEventListener("click", () => onDecide(false));
  $("detail-close").addEventListener("click", () => navigate(state.current && state.current.id));
  $("zoom-in").addEventListener("click", () => graph.zoom(1.4));
  $("zoom-out").addEventListener("click", () => graph.zoom(1 / 1.4));
  $("zoom-fit").addEventListener("click", () => graph.fit());
  $("runs-more").addEventListener("click", () => loadRuns({ older: true }));
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && state.selected) navigate(state.current && state.current.id);
  });
  window.addEventListener("hashchange", route);
  setInterval(() => {
    for (const id of state.order) state.dirtyRows.add(id); // "3 min ago" labels
    queueFrame();
  }, 30000);

  new api.LiveSocket(() => api.withToken("/ws", { batch: 1, after: globalLastId }), {
    onMessage: onGlobalMessage,
    onState: setConn,
  });
  // Without a live connection after a few seconds, show the list anyway (it goes live
  // once /ws says hello).
  setTimeout(() => {
    if (globalLastId === null) loadRuns({ reset: true });
  }, 3000);
  route();
  pollWorkers();
  pollQueue();
})();
