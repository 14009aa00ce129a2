"""The dashboard's queue view (``GET /queue`` polled every 2 s) in a real headless Chromium,
against a real `python -m engine serve`, a real worker and Postgres (see
test_dashboard_page.py for the browser set-up). Waits are Playwright waits with deadlines.

Skipped, with the reason, only when ``/usr/bin/chromium`` is absent (CI installs it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import responses
from tests.support import api_server, wait_run_finished, workers

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
TOOLS = "tests.testtools"
# Where the test also writes its picture (docs/dashboard-queue.png is made this way).
SCREENSHOT_ENV = "PGDAG_QUEUE_SCREENSHOT"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is absent: install Debian's chromium package (.ci/run does)",
    ),
]


@pytest.fixture
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_context(viewport={"width": 1440, "height": 860}).new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            pg.set_default_timeout(30_000)
            yield pg
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


def submit(base: str, body: dict[str, Any]) -> str:
    r = httpx.post(f"{base}/runs", json=body, timeout=60)
    assert r.status_code == 201, r.text[:500]
    run_id: str = r.json()["id"]
    return run_id


def cell(tool: str, field: str, value: int | None = None) -> str:
    """The selector of `tool`'s `field` cell in the queue table (showing `value`)."""
    has = f'[data-value="{value}"]' if value is not None else ""
    return f'#queue-tools tr[data-tool="{tool}"] td[data-field="{field}"]{has}'


def test_queue_view_shows_ready_running_dead_letters_and_throughput(
    page: Any, db_url: str, tmp_path: Path
) -> None:
    with (
        api_server(db_url, tmp_path, PGDAG_TOOLS=TOOLS) as base,
        workers(db_url, tmp_path, n=1, concurrency=1, PGDAG_TOOLS=TOOLS),
    ):
        failed = submit(
            base,
            {
                "goal": "a dead letter",
                "steps": [
                    {"name": "ok", "tool": "DELAY", "input": {"ms": 0}},
                    {
                        "name": "charge",
                        "tool": "TEST_FAIL_TIMES",
                        "input": {"failTimes": 5},
                        "maxAttempts": 1,
                    },
                ],
            },
        )
        assert wait_run_finished(db_url, failed) == "failed"
        # One worker of concurrency 1: one of these runs, three wait ready.
        backlog = submit(
            base,
            {
                "goal": "a backlog",
                "steps": [
                    {"name": f"slow-{i}", "tool": "DELAY", "input": {"ms": 60_000}}
                    for i in range(4)
                ],
            },
        )
        page.goto(f"{base}/")
        page.wait_for_selector(cell("DELAY", "ready", 3))
        page.wait_for_selector(cell("DELAY", "running", 1))
        page.wait_for_selector(cell("TEST_FAIL_TIMES", "deadLetter", 1))
        page.wait_for_selector(cell("DELAY", "workersLive", 1))
        # The ready steps age; the one DELAY step of the failed run succeeded (at least:
        # the worker may have counted none of the backlog yet, it sleeps 60 s each).
        page.wait_for_function(
            f"() => Number(document.querySelector('{cell('DELAY', 'oldestReadyAgeSeconds')}')"
            ".dataset.value) > 0"
        )
        page.wait_for_function(
            "() => Number(document.getElementById('queue-throughput').dataset.total) >= 1"
        )
        assert page.locator("#queue-throughput .col").count() == 10
        assert "running" in page.locator("#queue-runs").inner_text()
        # The JSON the page reads has the documented shape (extra keys are refused).
        view = responses.QueueView.model_validate(httpx.get(f"{base}/queue").json())
        delay = next(t for t in view.tools if t.tool == "DELAY")
        assert (delay.ready, delay.running) == (3, 1)
        assert sum(m.succeeded for m in view.completions_per_minute) >= 1
        shot = tmp_path / "dashboard-queue.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
        httpx.post(f"{base}/runs/{backlog}/cancel", json={})
