"""The dashboard follows a run that adds steps to itself (issue 15 part 5): the new steps
appear live, joined to their dependencies, without a page reload; in real headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.test_dashboard_page import (  # the shared browser fixtures and helpers
    assert_not_reloaded,
    browser,
    node,
    open_page,
    page,
    pytestmark,
    submit,
)
from tests.plantools import plan_step
from tests.support import api_server, workers
from tests.testtools import echo, emit

__all__ = ["browser", "page", "pytestmark"]

TOOLS = "tests.testtools,tests.plantools"


@pytest.fixture
def planning(db_url: str, tmp_path: Path) -> Iterator[str]:
    """An API and a worker with the planning tool; yields the API's base URL."""
    with (
        api_server(db_url, tmp_path, PGDAG_TOOLS=TOOLS) as base,
        workers(db_url, tmp_path, n=1, concurrency=4, PGDAG_TOOLS=TOOLS),
    ):
        yield base


def test_added_steps_appear_live_with_their_edges(page: Any, planning: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    run = submit(
        planning,
        {
            "goal": "a plan on the page",
            "steps": [
                plan_step(
                    "plan",
                    [
                        emit("found", 1, "plan"),
                        echo("use", {"v": {"$ref": "steps.found.output"}}, "found"),
                    ],
                    gate=str(gate),
                )
            ],
        },
    )
    open_page(page, f"{planning}/#/runs/{run['id']}")
    node(page, "plan").wait_for()
    assert page.locator("#graph g.node").count() == 1
    gate.write_text("go")
    node(page, "use").and_(page.locator('[data-status="succeeded"]')).wait_for()
    page.wait_for_selector('#run-status[data-status="completed"]')
    assert page.locator("#graph g.node").count() == 3
    assert_not_reloaded(page)
