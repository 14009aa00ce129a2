"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), against a
real `python -m engine serve`, real workers and a real Postgres.

Runs are submitted over HTTP, never through the page; every change the tests wait for
reaches the page over its WebSockets (the page is never reloaded: a marker set on `window`
at the start must still be there at the end). Waits are Playwright waits with deadlines.

Skipped, with the reason, only when ``/usr/bin/chromium`` is absent (CI installs it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.support import Proc, api_server, base_env, wait_run_finished, workers

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOOLS = "tests.testtools"
VIEWPORT = {"width": 1440, "height": 860}
# Where test_screenshot_of_the_run_view also writes its picture (the README's docs/ image).
SCREENSHOT_ENV = "PGDAG_DASHBOARD_SCREENSHOT"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is absent: install Debian's chromium package (.ci/run does)",
    ),
]


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def live(db_url: str, tmp_path: Path) -> Iterator[str]:
    """An API (with the test tools) and two workers; yields the API's base URL."""
    with (
        api_server(db_url, tmp_path, PGDAG_TOOLS=TOOLS) as base,
        workers(db_url, tmp_path, n=2, concurrency=8, PGDAG_TOOLS=TOOLS),
    ):
        yield base


def delay(name: str, *deps: str, ms: int = 0, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": ms}, "dependsOn": list(deps), **extra}


def submit(base: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.post(f"{base}/runs", json=body, headers=headers, timeout=60)
    assert r.status_code == 201, r.text[:500]
    run: dict[str, Any] = r.json()
    return run


def node(page: Any, step: str) -> Any:
    return page.locator(f'#graph g.node[data-step="{step}"]')


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector('#conn[data-state="open"]')
    page.evaluate("window.__notReloaded = true")


def assert_not_reloaded(page: Any) -> None:
    assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"


# --- tests -------------------------------------------------------------------------------


def test_page_and_assets_are_served_from_the_package(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path) as base:
        page_ = httpx.get(f"{base}/")
        assert page_.status_code == 200 and "text/html" in page_.headers["content-type"]
        assert page_.headers["cache-control"] == "no-store"
        assert "/dashboard/static/app.js" in page_.text and "//cdn" not in page_.text
        asset = httpx.get(f"{base}/dashboard/static/app.js")
        assert asset.status_code == 200 and asset.headers["cache-control"] == "no-cache"
        again = httpx.get(
            f"{base}/dashboard/static/app.js", headers={"If-None-Match": asset.headers["etag"]}
        )
        assert again.status_code == 304
        vendor = httpx.get(f"{base}/dashboard/static/vendor/dagre-3.1.3.min.js")
        assert vendor.status_code == 200 and "immutable" in vendor.headers["cache-control"]
        licence = httpx.get(f"{base}/dashboard/static/vendor/LICENSE-dagre")
        assert licence.status_code == 200 and "Permission is hereby granted" in licence.text
        runs = httpx.get(f"{base}/dashboard/runs").json()
        assert runs == {"runs": [], "nextCursor": None}


def test_submitted_run_appears_and_its_nodes_turn_succeeded_live(page: Any, live: str) -> None:
    open_page(page, f"{live}/")
    run = submit(
        live,
        {
            "goal": "live colours",
            "steps": [
                delay("extract", ms=300),
                delay("transform-a", "extract", ms=300),
                delay("transform-b", "extract", ms=500),
                delay("load", "transform-a", "transform-b", ms=200),
            ],
        },
    )
    row = page.locator(f'li.run-row[data-run-id="{run["id"]}"]')
    row.wait_for()  # arrived over /ws
    row.click()
    page.wait_for_selector(f'#graph[data-ready="{run["id"]}"]')
    assert page.locator("#graph g.node").count() == 4
    for name in ("extract", "transform-a", "transform-b", "load"):
        node(page, name).and_(page.locator('[data-status="succeeded"]')).wait_for()
    page.wait_for_selector('#run-status[data-status="completed"]')
    page.wait_for_selector(f'li.run-row[data-run-id="{run["id"]}"][data-status="completed"]')
    assert page.locator('#run-counts .chip[data-status="succeeded"]').get_attribute(
        "data-count"
    ) == ("4")
    assert_not_reloaded(page)


def test_click_dead_lettered_step_and_retry(page: Any, live: str, tmp_path: Path) -> None:
    flag = tmp_path / "fixed"
    run = submit(
        live,
        {
            "goal": "retry from the dashboard",
            "steps": [
                delay("prepare"),
                {
                    "name": "flaky",
                    "tool": "TEST_FAIL_UNTIL_FILE",
                    "input": {"path": str(flag)},
                    "dependsOn": ["prepare"],
                    "maxAttempts": 1,
                },
                delay("after", "flaky"),
            ],
        },
    )
    open_page(page, f"{live}/#/runs/{run['id']}")
    node(page, "flaky").and_(page.locator('[data-status="dead_letter"]')).wait_for()
    node(page, "after").and_(page.locator('[data-status="skipped"]')).wait_for()
    page.wait_for_selector('#run-status[data-status="failed"]')
    node(page, "flaky").click()
    page.wait_for_selector('#detail:not([hidden]) #step-name:text-is("flaky")')
    page.wait_for_selector('#step-error:has-text("does not exist yet")')
    page.wait_for_selector('#step-history tr:has-text("step_dead_lettered")')
    flag.write_text("the cause is fixed")
    page.locator("#retry-step").click()
    # Back to ready (or already claimed), then done; all of it over the WebSocket.
    node(page, "flaky").and_(
        page.locator('[data-status="ready"], [data-status="running"], [data-status="succeeded"]')
    ).wait_for()
    node(page, "flaky").and_(page.locator('[data-status="succeeded"]')).wait_for()
    node(page, "after").and_(page.locator('[data-status="succeeded"]')).wait_for()
    page.wait_for_selector('#run-status[data-status="completed"]')
    page.wait_for_selector('#step-history tr:has-text("step_retried")')
    assert page.locator("#retry-step").is_hidden()
    events = httpx.get(f"{live}/runs/{run['id']}/events").json()["events"]
    retried = [e for e in events if e["stepName"] == "flaky" and e["event"] == "step_retried"]
    assert len(retried) == 1 and retried[0]["toStatus"] == "ready"
    assert httpx.get(f"{live}/runs/{run['id']}").json()["status"] == "completed"
    assert_not_reloaded(page)


def test_map_children_appear_live_and_a_step_says_what_it_waits_for(
    page: Any, live: str, tmp_path: Path
) -> None:
    """A map step's children are not in the first snapshot: they appear once it expands,
    joined to it by edges; a waiting step's detail names what it waits for."""
    flag = tmp_path / "go"
    run = submit(
        live,
        {
            "goal": "map on the page",
            "steps": [
                {"name": "list", "tool": "TEST_EMIT", "input": {"value": [1, 2, 3]}},
                {
                    "name": "each",
                    "tool": "TEST_FAIL_UNTIL_FILE",
                    "input": {"path": str(flag)},
                    "map": {"$ref": "steps.list.output"},
                    "dependsOn": ["list"],
                    "maxAttempts": 50,
                },
                delay("after", "each"),
            ],
        },
    )
    open_page(page, f"{live}/#/runs/{run['id']}")
    for i in range(3):
        node(page, f"each[{i}]").wait_for()  # the children arrived without a reload
    node(page, "after").click()
    page.wait_for_selector('#step-facts:has-text("waiting for")')
    page.wait_for_selector('#step-facts:has-text("dependencies: each")')
    node(page, "each").click()
    page.wait_for_selector('#step-facts:has-text("map over")')
    page.wait_for_selector('#step-facts:has-text("3 children")')
    flag.write_text("go")
    node(page, "after").and_(page.locator('[data-status="succeeded"]')).wait_for()
    page.wait_for_selector('#run-status[data-status="completed"]')
    assert page.locator("#graph g.node").count() == 6
    assert_not_reloaded(page)


def test_step_no_live_worker_can_run_shows_its_tool_then_runs(
    page: Any, db_url: str, tmp_path: Path
) -> None:
    """Only workers without the test tools are running: a TEST_EMIT step stays ready,
    unclaimed, and its detail says it waits for a live worker with that tool; a worker
    with the tool started later runs it, and the page follows without a reload."""
    with (
        api_server(db_url, tmp_path, PGDAG_TOOLS=TOOLS) as base,
        workers(db_url, tmp_path, n=2, id_prefix="plain"),
    ):
        run = submit(
            base,
            {
                "goal": "a tool no live worker has",
                "steps": [
                    delay("plain"),
                    {"name": "custom", "tool": "TEST_EMIT", "input": {"value": 1}},
                    delay("after", "custom"),
                ],
            },
        )
        open_page(page, f"{base}/#/runs/{run['id']}")
        node(page, "plain").and_(page.locator('[data-status="succeeded"]')).wait_for()
        node(page, "custom").click()
        page.wait_for_selector('#detail:not([hidden]) #step-name:text-is("custom")')
        page.wait_for_selector(
            '#step-facts:has-text("waiting for"):has-text("a live worker with the tool TEST_EMIT")'
        )
        assert page.locator('#step-status[data-status="ready"]').count() == 1
        assert page.locator("#step-facts").inner_text().count("0 of 3") == 1  # attempt 0
        with workers(db_url, tmp_path, n=1, id_prefix="cap", PGDAG_TOOLS=TOOLS):
            node(page, "after").and_(page.locator('[data-status="succeeded"]')).wait_for()
            page.wait_for_selector('#run-status[data-status="completed"]')
        assert wait_run_finished(db_url, run["id"]) == "completed"
    assert_not_reloaded(page)


def test_cancel_button_cancels_the_run(page: Any, live: str, db_url: str) -> None:
    steps = [delay("slow", ms=60_000), delay("b", "slow")]
    run = submit(live, {"goal": "to cancel", "steps": steps})
    open_page(page, f"{live}/#/runs/{run['id']}")
    node(page, "slow").and_(page.locator('[data-status="running"]')).wait_for()
    button = page.locator("#cancel-run")
    button.click()  # arms
    assert button.get_attribute("data-armed") == "1"
    button.click()  # confirms
    node(page, "slow").and_(page.locator('[data-status="cancelled"]')).wait_for()
    node(page, "b").and_(page.locator('[data-status="cancelled"]')).wait_for()
    page.wait_for_selector('#run-status[data-status="cancelled"]')
    assert button.is_disabled()
    assert wait_run_finished(db_url, run["id"], timeout_s=30) == "cancelled"
    assert_not_reloaded(page)


def test_api_error_is_shown_to_the_user(page: Any, live: str, tmp_path: Path) -> None:
    """A retry the API refuses (409: the step is not in dead_letter any more) shows the
    API's message next to the button and in a toast."""
    flag = tmp_path / "fixed"
    run = submit(
        live,
        {
            "goal": "refused retry",
            "steps": [
                {
                    "name": "x",
                    "tool": "TEST_FAIL_UNTIL_FILE",
                    "input": {"path": str(flag)},
                    "maxAttempts": 1,
                }
            ],
        },
    )
    open_page(page, f"{live}/#/runs/{run['id']}/steps/x")
    page.wait_for_selector("#retry-step:visible")
    # Someone else retries it first, over the API, and it succeeds; the page's button is
    # hidden as that arrives live, so the late click is made through the button's handler.
    flag.write_text("fixed")
    r = httpx.post(f"{live}/runs/{run['id']}/steps/x/retry", json={})
    assert r.status_code == 200, r.text
    page.wait_for_selector('#run-status[data-status="completed"]')
    page.evaluate("document.getElementById('retry-step').click()")
    page.wait_for_selector('#step-error-msg:visible:has-text("409")')
    assert "not dead_letter" in page.locator("#step-error-msg").inner_text()
    page.wait_for_selector('.toast.error:has-text("Retry failed")')


# `openssl rand -base64`-shaped: every character that URL encoding changes ('+', '/', '=').
B64_TOKEN = "q+Lz/9Xw0r+T1sA/bcQ="


@pytest.mark.parametrize("spelling", ["percent-encoded", "pasted-as-is"])
def test_token_mode(page: Any, db_url: str, tmp_path: Path, spelling: str) -> None:
    """A base64 token works end to end: the page, its assets, HTTP calls, the WebSockets,
    the layout worker and a POST (cancel) made by the page, whether the address bar holds
    it percent-encoded or as `openssl` printed it."""
    token = B64_TOKEN
    in_url = quote(token, safe="") if spelling == "percent-encoded" else token
    with (
        api_server(db_url, tmp_path, PGDAG_API_TOKEN=token) as base,
        workers(db_url, tmp_path, n=1),
    ):
        assert httpx.get(f"{base}/").status_code == 401
        assert httpx.get(f"{base}/dashboard/static/app.js").status_code == 401
        open_page(page, f"{base}/?token={in_url}")
        run = submit(base, {"goal": "with a token", "steps": [delay("a"), delay("b", "a")]}, token)
        page.locator(f'li.run-row[data-run-id="{run["id"]}"]').click()
        node(page, "b").and_(page.locator('[data-status="succeeded"]')).wait_for()
        page.wait_for_selector('#workers li.worker[data-state="alive"]')
        assert "token=" in page.url
        slow = submit(base, {"goal": "cancel me", "steps": [delay("slow", ms=60_000)]}, token)
        page.locator(f'li.run-row[data-run-id="{slow["id"]}"]').click()
        node(page, "slow").and_(page.locator('[data-status="running"]')).wait_for()
        page.locator("#cancel-run").click()  # arms
        page.locator("#cancel-run").click()  # confirms: a POST with the token
        page.wait_for_selector('#run-status[data-status="cancelled"]')
        assert wait_run_finished(db_url, slow["id"], timeout_s=30) == "cancelled"
        assert_not_reloaded(page)


def layered_dag(layers: int, width: int, *, seed: int) -> list[dict[str, Any]]:
    """`layers` x `width` DELAY steps; each step after the first layer depends on one or two
    steps of the layer before."""
    rng = random.Random(seed)
    steps = []
    for layer in range(layers):
        for i in range(width):
            parents = {rng.randrange(width) for _ in range(rng.randint(1, 2))} if layer else set()
            deps = [f"L{layer - 1:02d}-{p:03d}" for p in sorted(parents)]
            steps.append(delay(f"L{layer:02d}-{i:03d}", *deps, ms=rng.randint(0, 40)))
    return steps


def fan_dag(width: int) -> list[dict[str, Any]]:
    """One root, `width` steps after it, two sinks after half of them each (a step may
    depend on at most 1,000 others)."""
    middle = [delay(f"m{i:04d}", "root", ms=i % 40) for i in range(width)]
    return [
        delay("root"),
        *middle,
        delay("sink-even", *(s["name"] for s in middle[0::2])),
        delay("sink-odd", *(s["name"] for s in middle[1::2])),
    ]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("shape", ["layered", "fan"])
def test_2000_step_run_renders_and_recolours_live(
    page: Any, db_url: str, tmp_path: Path, shape: str
) -> None:
    steps = layered_dag(40, 50, seed=3) if shape == "layered" else fan_dag(1997)
    assert len(steps) == 2000
    with api_server(db_url, tmp_path) as base:
        run = submit(base, {"goal": f"2,000 steps ({shape})", "steps": steps})
        open_page(page, f"{base}/#/runs/{run['id']}")
        page.wait_for_selector(f'#graph[data-ready="{run["id"]}"]', timeout=240_000)
        assert page.locator("#graph g.node").count() == 2000
        roots = sum(1 for s in steps if not s["dependsOn"])
        assert page.locator('#graph g.node[data-status="ready"]').count() == roots
        graph = page.evaluate("window.pgdagMetrics.graph")
        # Workers start only now, so every recolour below happens on the rendered graph.
        with workers(db_url, tmp_path, n=2, concurrency=8):
            succeeded = page.locator('#graph g.node[data-status="succeeded"]')
            succeeded.nth(299).wait_for(timeout=120_000)
        samples = page.evaluate(
            """(() => {
              const q = (a, p) => { const s = [...a].sort((x, y) => x - y);
                return s.length ? Math.round(s[Math.floor((s.length - 1) * p)]) : null; };
              const m = window.pgdagMetrics;
              return {events: m.events, eventToPaintP50: q(m.eventToPaintMs, 0.5),
                      eventToPaintP99: q(m.eventToPaintMs, 0.99),
                      commitToPaintP50: q(m.commitToPaintMs, 0.5),
                      commitToPaintP99: q(m.commitToPaintMs, 0.99)};
            })()"""
        )
        httpx.post(f"{base}/runs/{run['id']}/cancel", json={}, timeout=60)
    assert graph["nodes"] == 2000 and graph["fastLayout"] is True
    assert samples["events"] >= 300
    print(f"\n2,000-step {shape} run in Chromium:", json.dumps({**graph, **samples}))


def test_screenshot_of_the_run_view(page: Any, live: str, tmp_path: Path) -> None:
    """A picture of a real run: saved under tmp_path, and where PGDAG_DASHBOARD_SCREENSHOT
    says (``docs/dashboard-run.png`` is made this way)."""
    steps = [
        delay("fetch-customers", ms=300),
        delay("fetch-orders", ms=500),
        delay("join", "fetch-customers", "fetch-orders", ms=300),
        {
            "name": "charge-cards",
            "tool": "TEST_FAIL_TIMES",
            "input": {"failTimes": 9},
            "dependsOn": ["join"],
            "maxAttempts": 2,
        },
        delay("email-receipts", "charge-cards"),
        delay("score-a", "join", ms=400),
        delay("score-b", "join", ms=700),
        delay("score-c", "join", ms=120_000),
        delay("summarize", "score-a", "score-b", "score-c"),
        delay("publish", "summarize"),
    ]
    run = submit(live, {"goal": "Nightly billing and scoring", "steps": steps})
    submit(live, {"goal": "Warm caches", "steps": [delay("warm", ms=100)]})
    open_page(page, f"{live}/#/runs/{run['id']}")
    node(page, "charge-cards").and_(page.locator('[data-status="dead_letter"]')).wait_for()
    node(page, "score-b").and_(page.locator('[data-status="succeeded"]')).wait_for()
    node(page, "score-c").and_(page.locator('[data-status="running"]')).wait_for()
    node(page, "charge-cards").click()
    page.wait_for_selector('#step-history tr:has-text("step_dead_lettered")')
    page.locator('#workers li.worker[data-state="alive"]').nth(1).wait_for()
    page.wait_for_selector('li.run-row[data-status="completed"]')
    shot = tmp_path / "dashboard-run.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
    httpx.post(f"{live}/runs/{run['id']}/cancel", json={})


def test_workers_panel_shows_a_supervised_restart(page: Any, db_url: str, tmp_path: Path) -> None:
    """A worker under ``python -m workers --processes 1`` killed with SIGKILL comes back;
    the workers panel says it was restarted once and how its previous process ended."""
    sup = Proc(
        ["-m", "workers", "--processes", "1", "--worker-id", "dash"],
        base_env(db_url, PGDAG_RESTART_BACKOFF_FIRST="0.2"),
        tmp_path / "supervisor.log",
    )
    try:
        with api_server(db_url, tmp_path) as base:
            open_page(page, f"{base}/")
            row = page.locator('#workers li.worker[data-worker-id="dash-1"][data-state="alive"]')
            row.wait_for()
            assert row.locator(".worker-restarts").count() == 0
            pid = httpx.get(f"{base}/workers").json()["workers"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            restarted = row.locator(
                '.worker-restarts:has-text("restarted 1 time · last exit -9 (SIGKILL)")'
            )
            restarted.wait_for()
            assert f"pid {pid}" not in row.inner_text()  # the new process's row
            assert_not_reloaded(page)
    finally:
        sup.stop()


def test_approval_buttons_approve_and_reject_waiting_steps(page: Any, live: str) -> None:
    """A wait step declared as an approval shows what it waits for and its deadline, with
    Approve / Reject buttons; Approve completes it (its payload is the output) and its
    dependent runs; Reject dead-letters it with the reason and skips its dependent."""

    def approval(name: str, *deps: str) -> dict[str, Any]:
        wait = {"signal": f"ok-{name}", "timeoutS": 3600, "approval": True}
        return {"name": name, "wait": wait, "dependsOn": list(deps)}

    run = submit(
        live,
        {
            "goal": "approvals from the dashboard",
            "steps": [
                *(delay("prepare", ms=800), approval("ship", "prepare"), delay("shipped", "ship")),
                *(approval("risky"), delay("done-risky", "risky")),
            ],
        },
    )
    open_page(page, f"{live}/#/runs/{run['id']}")
    # selected while it waits for "prepare": the buttons come when it starts waiting (live)
    node(page, "ship").click()
    page.wait_for_selector('#detail:not([hidden]) #step-name:text-is("ship")')
    page.wait_for_selector('#step-facts dd:has-text("an approval ok-ship (deadline")')
    ship = {s["name"]: s for s in httpx.get(f"{live}/runs/{run['id']}").json()["steps"]}["ship"]
    deadline = ship["waitingFor"]["deadline"]
    shown = page.locator('#step-facts dd:has-text("an approval ok-ship")').inner_text()
    local = page.evaluate(
        "(iso) => new Date(iso).toLocaleTimeString([], { hour12: false })", deadline
    )
    assert local in shown, (local, shown)  # the deadline, in the page's time format
    assert page.locator("#approve-step").is_visible() and page.locator("#reject-step").is_visible()
    page.locator("#approve-step").click()
    node(page, "ship").and_(page.locator('[data-status="succeeded"]')).wait_for()
    node(page, "shipped").and_(page.locator('[data-status="succeeded"]')).wait_for()
    page.wait_for_selector('#step-history tr:has-text("step_signalled")')
    page.wait_for_selector('#step-output:has-text("dashboard")')
    assert page.locator("#approve-step").is_hidden() and page.locator("#reject-step").is_hidden()

    node(page, "risky").click()
    page.wait_for_selector('#detail:not([hidden]) #step-name:text-is("risky")')
    page.locator("#reject-step").click()
    node(page, "risky").and_(page.locator('[data-status="dead_letter"]')).wait_for()
    node(page, "done-risky").and_(page.locator('[data-status="skipped"]')).wait_for()
    page.wait_for_selector('#run-status[data-status="failed"]')
    page.wait_for_selector('#step-error:has-text("rejected in the dashboard")')
    steps = {s["name"]: s for s in httpx.get(f"{live}/runs/{run['id']}").json()["steps"]}
    assert steps["ship"]["output"] == {"approved": True, "by": "dashboard"}
    assert steps["risky"]["status"] == "dead_letter"
    assert_not_reloaded(page)
