// pgdag dashboard: the schedules view (GET /schedules every 5 s), below the queue view
// while no run is open. One row per schedule: name, cron, zone, next fire, paused or
// active (with a Pause / Resume button), and a link to the run of its latest fire.
"use strict";
(function () {
  const api = window.pgdag.api;
  const EVERY_MS = 5000;
  const $ = (id) => document.getElementById(id);
  const esc = (s) =>
    String(s === null || s === undefined ? "" : s).replace(
      /[&<>"']/g,
      (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c],
    );
  let busy = false;

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function lastRun(s) {
    const f = s.lastFire;
    if (!f) return '<span class="muted">never fired</span>';
    if (!f.runId) return `<span class="error-text" title="${esc(f.error)}">refused</span>`;
    const status = f.runStatus || "pruned";
    return (
      `<a class="last-run" href="#/runs/${esc(f.runId)}" title="fired ${esc(f.fireAt)}">` +
      `<span class="badge small" data-status="${esc(status)}">${esc(status)}</span> ${esc(when(f.fireAt))}</a>`
    );
  }

  function render(list) {
    $("schedules-count").textContent = list.length ? String(list.length) : "";
    $("schedules-view").hidden = false;
    $("schedules-rows").innerHTML = list.length
      ? list
          .map(
            (s) =>
              `<tr data-schedule="${esc(s.name)}" data-paused="${s.paused}">` +
              `<td data-field="name">${esc(s.name)}</td>` +
              `<td data-field="cron"><code>${esc(s.cron)}</code></td>` +
              `<td data-field="timezone">${esc(s.timezone)}</td>` +
              `<td data-field="nextFireAt" title="${esc(s.nextFireAt || "")}">${s.paused ? '<span class="muted">paused</span>' : esc(when(s.nextFireAt))}</td>` +
              `<td data-field="lastRun">${lastRun(s)}</td>` +
              `<td><button type="button" class="link-button" data-action="${s.paused ? "resume" : "pause"}" data-id="${esc(s.id)}">${s.paused ? "Resume" : "Pause"}</button></td>` +
              "</tr>",
          )
          .join("")
      : '<tr><td colspan="6" class="placeholder">No schedule yet (<code>POST /schedules</code>).</td></tr>';
  }

  async function poll(again = true) {
    if (again) setTimeout(poll, EVERY_MS);
    if (document.hidden || $("empty").hidden || busy) return;
    busy = true;
    try {
      render((await api.http("GET", "/schedules")).schedules);
      $("schedules-error").hidden = true;
    } catch (err) {
      $("schedules-error").textContent = `Schedules: ${err.message}`;
      $("schedules-error").hidden = false;
    } finally {
      busy = false;
    }
  }

  $("schedules-rows").addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (!button) return;
    button.disabled = true;
    try {
      await api.http("POST", `/schedules/${encodeURIComponent(button.dataset.id)}/${button.dataset.action}`);
      $("schedules-error").hidden = true;
    } catch (err) {
      $("schedules-error").textContent = `Schedules: ${err.message}`;
      $("schedules-error").hidden = false;
    }
    await poll(false);
  });
  window.addEventListener("hashchange", () => poll(false));
  poll();
})();
