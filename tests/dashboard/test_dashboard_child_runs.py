"""The dashboard links a step of kind run and its child run both ways (issue 15 part 4), in
a real headless Chromium against a real API, workers and Postgres; the fixtures are those of
test_dashboard_page.py. The page is never reloaded: the links change its route only."""

from __future__ import annotations

from typing import Any

from tests.dashboard.test_dashboard_page import (  # noqa: F401 (pytest fixtures, by name)
    assert_not_reloaded,
    browser,
    delay,
    live,
    node,
    open_page,
    page,
    pytestmark,
    submit,
)


def test_a_run_step_links_to_its_child_and_the_child_back(page: Any, live: str) -> None:  # noqa: F811
    run = submit(
        live,
        {
            "goal": "parent with a child",
            "steps": [
                delay("plan"),
                {
                    "name": "sub",
                    "dependsOn": ["plan"],
                    "input": {"ms": 5},
                    "run": {"goal": "the child", "steps": [delay("inner", ms=5)]},
                },
                delay("after", "sub"),
            ],
        },
    )
    open_page(page, f"{live}/#/runs/{run['id']}")
    node(page, "after").and_(page.locator('[data-status="succeeded"]')).wait_for()
    assert page.locator("#run-parent").is_hidden()
    node(page, "sub").click()
    page.wait_for_selector('#detail:not([hidden]) #step-name:text-is("sub")')
    link = page.locator("#child-run-link")
    link.wait_for()
    child_id = link.inner_text()
    link.click()
    page.wait_for_selector('#run-goal:text-is("the child")')
    assert page.evaluate("window.location.hash") == f"#/runs/{child_id}"
    node(page, "inner").wait_for()
    back = page.locator("#run-parent")
    back.wait_for()
    assert "step sub" in back.inner_text()
    back.click()
    page.wait_for_selector('#run-goal:text-is("parent with a child")')
    page.wait_for_selector('#detail:not([hidden]) #step-name:text-is("sub")')
    assert page.evaluate("window.location.hash") == f"#/runs/{run['id']}/steps/sub"
    assert_not_reloaded(page)
