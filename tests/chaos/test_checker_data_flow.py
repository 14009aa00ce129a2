"""The invariant checker on real data-flow histories: trigger rules, map fan-out with flaky
elements, manual retries of dead map children, replays (from a step, from a map child, from
the root) and a delayed run, each driven by real worker processes and judged whole from the
audit log with `check_database`. Every history must check clean."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from chaos.checker import Report, check_database
from engine.tools import load_tool_modules
from tests.support import (
    api_server,
    events,
    query,
    steps_by_name,
    submit,
    wait_run_finished,
    workers,
)
from tests.testtools import echo, emit

load_tool_modules(["workers.tools.builtin", "tests.testtools"])  # submit() validates inputs

TOOLS = {"PGDAG_TOOLS": "tests.testtools"}


def until_file(name: str, marker: Path, *deps: str, **extra: Any) -> dict[str, Any]:
    """Fails (dead letter at once with maxAttempts 1) until `marker` exists."""
    return {
        "name": name,
        "tool": "TEST_FAIL_UNTIL_FILE",
        "input": {"path": str(marker)},
        "dependsOn": list(deps),
        "maxAttempts": 1,
        **extra,
    }


def check(db_url: str, run_ids: list[str]) -> Report:
    with psycopg.connect(db_url) as conn:
        report = check_database(conn, run_ids)
    if not report.ok:
        for v in report.violations:
            print(f"{v.kind} run {v.run_id} step {v.step}: {v.detail}")
    return report


def event_names(db_url: str, run_id: str) -> list[str]:
    return [str(e["event"]) for e in events(db_url, run_id)]


def replay(base: str, run_id: str, start: str) -> None:
    r = httpx.post(f"{base}/runs/{run_id}/replay", json={"from": start}, timeout=10)
    assert r.status_code == 200, r.text


def test_trigger_rules_then_a_replay_of_the_failed_step(db_url: str, tmp_path: Path) -> None:
    """all_done and any_failed steps run after a dead letter, all_succeeded ones are skipped
    (in cascade); a second run where everything succeeds skips its any_failed branch and
    completes. Then the cause is fixed and the first run is replayed from the dead step:
    the succeeded cleanup steps are reopened and succeed again, the alert is skipped."""
    marker = tmp_path / "fixed"
    failing = submit(
        db_url,
        {
            "steps": [
                until_file("work", marker),
                emit("other", 1),
                emit("next", 1, "work"),  # all_succeeded: skipped
                emit("after_next", 1, "next"),  # skipped in turn
                emit("cleanup", 1, "work", "other", runIf="all_done"),
                echo("alert", {"why": {"$ref": "steps.work.error"}}, "work", runIf="any_failed"),
                emit("not_alerted", 1, "other", runIf="any_failed"),  # nothing failed: skipped
                emit("after_skip", 1, "next", runIf="all_done"),  # runs after a skipped dep
            ]
        },
    )
    succeeding = submit(
        db_url,
        {
            "steps": [
                emit("a", 1),
                emit("on_fail", 1, "a", runIf="any_failed"),
                emit("page_someone", 1, "on_fail"),
                emit("notify", 1, "page_someone", "a", runIf="all_done"),
            ]
        },
    )
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, failing) == "failed"
        assert wait_run_finished(db_url, succeeding) == "completed"
        report = check(db_url, [failing, succeeding])
        assert report.ok
        marker.touch()
        replay(base, failing, "work")
        assert wait_run_finished(db_url, failing) == "completed"
    status = {n: s["status"] for n, s in steps_by_name(db_url, failing).items()}
    assert status["alert"] == "skipped" and status["cleanup"] == "succeeded"
    assert "step_replayed" in event_names(db_url, failing)
    report = check(db_url, [failing, succeeding])
    assert report.ok
    assert report.dead_letters == 1


def test_map_with_flaky_elements_and_an_empty_map(db_url: str, tmp_path: Path) -> None:
    """A 60-wide map where every 6th element fails once (retried), joined and read by a
    dependent; an empty map joins at once. Each map step is claimed twice (expansion and
    join)."""
    elements = [{"n": i, "flaky": i % 6 == 1} for i in range(60)]
    run_id = submit(
        db_url,
        {
            "steps": [
                emit("list", {"items": elements, "none": []}),
                {
                    "name": "each",
                    "tool": "TEST_MAP_ITEM",
                    "input": {"n": {"$ref": "item.n"}, "flaky": {"$ref": "item.flaky"}},
                    "map": {"$ref": "steps.list.output.items"},
                    "dependsOn": ["list"],
                    "maxAttempts": 3,
                },
                {
                    "name": "empty",
                    "tool": "TEST_ECHO",
                    "input": {"i": {"$ref": "index"}},
                    "map": {"$ref": "steps.list.output.none"},
                    "dependsOn": ["list"],
                },
                echo("join", {"all": {"$ref": "steps.each.output"}}, "each", "empty"),
            ]
        },
    )
    with workers(db_url, tmp_path, 2, concurrency=8, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "completed"
    claims = [e["step_name"] for e in events(db_url, run_id) if e["event"] == "step_claimed"]
    assert claims.count("each") == 2 and claims.count("empty") == 2
    report = check(db_url, [run_id])
    assert report.ok
    assert report.retries == 10
    assert report.steps == 64
    # Without its recorded success, each[7] was still running when the join was claimed.
    query(
        db_url,
        "DELETE FROM audit_log WHERE run_id = %(id)s AND step_name = 'each[7]'"
        " AND event = 'step_succeeded'",
        {"id": run_id},
    )
    with psycopg.connect(db_url) as conn:
        joins = [v for v in check_database(conn, [run_id]).violations if v.step == "each"]
    assert [v.kind for v in joins] == ["dependency_not_met"], joins
    assert "child 'each[7]' was running" in joins[0].detail


def test_retried_dead_map_children_and_rules_below_the_map(db_url: str, tmp_path: Path) -> None:
    """Every child of a map dead-letters: the map step is skipped, so is its all_succeeded
    dependent, while an all_done and an any_failed one run. The children are retried by
    hand: the map step is unskipped, joins, and its all_succeeded dependent runs."""
    marker = tmp_path / "fixed"
    run_id = submit(
        db_url,
        {
            "steps": [
                emit("items", [0, 1, 2]),
                {
                    **until_file("m", marker, "items"),
                    "map": {"$ref": "steps.items.output"},
                },
                emit("after", 1, "m"),
                emit("always", 1, "m", runIf="all_done"),
                emit("on_fail", 1, "m", runIf="any_failed"),
            ]
        },
    )
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
        status = {n: s["status"] for n, s in steps_by_name(db_url, run_id).items()}
        assert status["m"] == "skipped" and status["after"] == "skipped"
        assert status["always"] == "succeeded" and status["on_fail"] == "succeeded"
        report = check(db_url, [run_id])
        assert report.ok
        marker.touch()
        for i in range(3):
            r = httpx.post(f"{base}/runs/{run_id}/steps/m[{i}]/retry", json={}, timeout=10)
            assert r.status_code == 200, r.text
        assert wait_run_finished(db_url, run_id) == "completed"
    assert steps_by_name(db_url, run_id)["after"]["status"] == "succeeded"
    names = event_names(db_url, run_id)
    assert names.count("step_retried") == 3 and "step_unskipped" in names
    report = check(db_url, [run_id])
    assert report.ok
    assert report.dead_letters == 3


def test_replays_from_a_step_a_map_child_and_the_root_of_a_delayed_run(
    db_url: str, tmp_path: Path
) -> None:
    """A delayed run (startAt) with a map step below a chain: replayed from the middle of
    the chain (the map step expands again into new children), then from one map child (the
    expansion is kept: only the child and the join run again), then from the root."""
    start_at = datetime.now(UTC) + timedelta(seconds=1)
    run_id = submit(
        db_url,
        {
            "startAt": start_at.isoformat(),
            "steps": [
                emit("root", {"items": [1, 2, 3]}),
                emit("mid", 1, "root"),
                {
                    "name": "m",
                    "tool": "TEST_ECHO",
                    "input": {"i": {"$ref": "item"}},
                    "map": {"$ref": "steps.root.output.items"},
                    "dependsOn": ["mid"],
                },
                echo("use", {"all": {"$ref": "steps.m.output"}}, "m"),
                emit("done", 1, "use", "mid", runIf="all_done"),
            ],
        },
    )
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "completed"
        assert "step_ready" in event_names(db_url, run_id)  # the root promoted at startAt
        for start in ("mid", "m[1]", "root"):
            replay(base, run_id, start)
            assert wait_run_finished(db_url, run_id) == "completed"
            report = check(db_url, [run_id])
            assert report.ok, start
    names = event_names(db_url, run_id)
    assert names.count("run_replayed") == 3
    assert names.count("step_map_expanded") == 3  # first run, replay from mid, from root
    steps = steps_by_name(db_url, run_id)
    assert steps["use"]["output"]["got"]["all"] == [
        {"got": {"i": i}, "step": f"m[{i - 1}]"} for i in (1, 2, 3)
    ]
