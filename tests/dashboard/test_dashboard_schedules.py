"""The dashboard's schedules view (``GET /schedules`` every 5 s, below the queue view) in a
real headless Chromium against a real `python -m engine serve` (the maintenance leader, so
the schedules fire) and Postgres; the browser fixture is test_dashboard_queue.py's.

A schedule made due by SQL fires: its row links the run of its latest fire, and the link
opens that run; a paused schedule says so; the Pause button pauses (the row turns paused,
and the API agrees).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from tests.dashboard.test_dashboard_queue import page, pytestmark  # noqa: F401 (fixture, marks)
from tests.support import api_server, query, wait_for

SCREENSHOT_ENV = "PGDAG_SCHEDULES_SCREENSHOT"
JSON = {"content-type": "application/json"}
RUN = {"goal": "nightly", "steps": [{"name": "wait", "tool": "DELAY", "input": {"ms": 1}}]}


def test_schedules_view_lists_links_the_last_run_and_pauses(
    page: Any,  # noqa: F811 (the imported fixture)
    db_url: str,
    tmp_path: Path,
) -> None:
    fast = {"PGDAG_SCHEDULER_INTERVAL_S": "0.05"}
    with (
        api_server(db_url, tmp_path, **fast) as base,
        httpx.Client(base_url=base, headers=JSON) as c,
    ):
        minute = c.post(
            "/schedules",
            json={
                "name": "every-minute",
                "cron": "* * * * *",
                "timezone": "Europe/Paris",
                "run": RUN,
            },
        ).json()
        c.post("/schedules", json={"name": "weekly", "cron": "0 6 * * 1", "run": RUN})
        assert c.post("/schedules/weekly/pause").status_code == 200
        query(
            db_url,
            "UPDATE schedules SET next_fire_at = now() - interval '1 second' WHERE id = %(id)s",
            {"id": minute["id"]},
        )
        run_id = wait_for(
            lambda: (c.get("/schedules/every-minute").json()["recentFires"] or [{}])[0].get(
                "runId"
            ),
            what="the schedule to fire",
        )

        page.goto(f"{base}/")
        row = 'tr[data-schedule="every-minute"]'
        page.wait_for_selector(f'{row}[data-paused="false"] a.last-run[href="#/runs/{run_id}"]')
        assert page.locator(f'{row} td[data-field="cron"]').inner_text() == "* * * * *"
        assert page.locator(f'{row} td[data-field="timezone"]').inner_text() == "Europe/Paris"
        assert page.locator(f'{row} td[data-field="nextFireAt"]').inner_text() not in ("", "—")
        weekly = 'tr[data-schedule="weekly"][data-paused="true"]'
        page.wait_for_selector(weekly)
        assert page.locator(f'{weekly} td[data-field="nextFireAt"]').inner_text() == "paused"
        assert page.locator(f'{weekly} td[data-field="lastRun"]').inner_text() == "never fired"

        if os.environ.get(SCREENSHOT_ENV):  # docs/dashboard-schedules.png is made this way
            page.locator("#schedules-view").screenshot(path=os.environ[SCREENSHOT_ENV])

        page.click(f'{row} button[data-action="pause"]')
        page.wait_for_selector(f'{row}[data-paused="true"] button[data-action="resume"]')
        assert c.get("/schedules/every-minute").json()["paused"] is True

        page.click(f"{row} a.last-run")
        page.wait_for_selector("#run-view:not([hidden])")
        page.wait_for_function(
            f"() => document.getElementById('run-id').textContent.includes('{run_id}')"
        )
