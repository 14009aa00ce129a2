"""Sleeps that free the worker (``delayMs``, issue 15 part 2) on a real Postgres with real
worker and API processes: a delayed step parks in Postgres (pending, no lease, waitingFor
says delay and until when) once its dependencies are done, and the maintenance leader makes
it ready when its time comes. Every wait is on a condition with a deadline."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from chaos.checker import check_database
from engine.tools import load_tool_modules
from tests.support import (
    api_server,
    events,
    query,
    steps_by_name,
    submit,
    wait_for,
    wait_run_finished,
    workers,
)
from tests.testtools import emit

load_tool_modules(["workers.tools.builtin", "tests.testtools"])  # submit() validates inputs

TOOLS = {"PGDAG_TOOLS": "tests.testtools"}
HOUR_MS = 3_600_000


def api_steps(base: str, run_id: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{base}/runs/{run_id}", timeout=30).json()
    return {s["name"]: s for s in body["steps"]}


def named(evs: list[dict[str, Any]], event: str, step: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == event and e["step_name"] == step]


def assert_checker_clean(db_url: str, run_id: str) -> None:
    import psycopg

    with psycopg.connect(db_url) as conn:
        report = check_database(conn, [run_id])
    assert report.ok, report.violations


def test_a_delayed_step_parks_after_its_dependency_and_runs_after_its_time(
    db_url: str, tmp_path: Path
) -> None:
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        r = httpx.post(
            f"{base}/runs",
            json={"steps": [emit("a", 1), emit("b", 2, "a", delayMs=1500)]},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        parked = wait_for(
            lambda: named(events(db_url, run_id), "step_delayed", "b"), what="b parked"
        )[0]
        assert (parked["from_status"], parked["to_status"]) == ("pending", "pending")
        assert parked["detail"]["reason"] == "delay" and parked["detail"]["delayMs"] == 1500
        b = api_steps(base, run_id)["b"]
        assert b["delayMs"] == 1500
        if b["status"] == "pending":  # (the test machine may be slow: it may be awake already)
            assert b["waitingFor"]["reason"] == "delay"
            assert b["waitingFor"]["delayMs"] == 1500
            assert b["leaseOwner"] is None and b["leaseExpiresAt"] is None
            until = datetime.fromisoformat(b["waitingFor"]["until"])
            assert until == datetime.fromisoformat(parked["detail"]["until"])
            row = steps_by_name(db_url, run_id)["b"]
            assert row["deps_remaining"] == 0 and row["lease_owner"] is None
        assert wait_run_finished(db_url, run_id) == "completed"
    evs = events(db_url, run_id)
    a_done = named(evs, "step_succeeded", "a")[0]["created_at"]
    ready = named(evs, "step_ready", "b")
    assert len(ready) == 1 and ready[0]["detail"] == {"reason": "delay", "delayMs": 1500}
    b_row = steps_by_name(db_url, run_id)["b"]
    assert b_row["started_at"] - a_done >= timedelta(milliseconds=1500)
    assert ready[0]["created_at"] >= datetime.fromisoformat(parked["detail"]["until"])
    assert_checker_clean(db_url, run_id)


def test_a_root_with_delay_waits_from_the_run_start(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, **TOOLS) as base:
        r = httpx.post(
            f"{base}/runs",
            json={"steps": [emit("root", 1, delayMs=800), emit("now", 1)]},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        run = r.json()
        steps = {s["name"]: s for s in run["steps"]}
        assert steps["root"]["status"] == "pending"
        assert steps["root"]["waitingFor"]["reason"] == "delay"
        assert steps["now"]["status"] == "ready"
        created = datetime.fromisoformat(run["createdAt"])
        until = datetime.fromisoformat(steps["root"]["waitingFor"]["until"])
        assert until - created >= timedelta(milliseconds=800)
        with workers(db_url, tmp_path, 1, **TOOLS):
            assert wait_run_finished(db_url, run["id"]) == "completed"
    root = steps_by_name(db_url, run["id"])["root"]
    assert root["started_at"] >= until
    run_created = next(e for e in events(db_url, run["id"]) if e["event"] == "run_created")
    assert run_created["detail"]["delayed"] == 1 and run_created["detail"]["ready"] == 1
    assert_checker_clean(db_url, run["id"])


def test_trigger_rules_with_delayed_dependents(db_url: str, tmp_path: Path) -> None:
    """A failure decides its all_done and any_failed dependents: with a delayMs they park
    (fail_dependents), then run; an all_succeeded one is skipped at once, never parked."""
    fail = {"failTimes": 9, "retryable": False}
    run_id = submit(
        db_url,
        {
            "steps": [
                {"name": "work", "tool": "TEST_FAIL_TIMES", "input": fail, "maxAttempts": 1},
                emit("next", 1, "work", delayMs=300),
                emit("cleanup", 1, "work", runIf="all_done", delayMs=300),
                emit("alert", 1, "work", runIf="any_failed", delayMs=300),
                emit("ok", 1),
                emit("not_alerted", 1, "ok", runIf="any_failed", delayMs=300),
            ]
        },
    )
    with workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
    status = {n: s["status"] for n, s in steps_by_name(db_url, run_id).items()}
    assert status == {
        "work": "dead_letter",
        "next": "skipped",
        "cleanup": "succeeded",
        "alert": "succeeded",
        "ok": "succeeded",
        "not_alerted": "skipped",
    }
    evs = events(db_url, run_id)
    assert {e["step_name"] for e in evs if e["event"] == "step_delayed"} == {"cleanup", "alert"}
    for name in ("cleanup", "alert"):
        ready = named(evs, "step_ready", name)
        assert [e["detail"]["reason"] for e in ready] == ["delay"]
    assert_checker_clean(db_url, run_id)


def test_cancel_while_parked(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        run_id = submit(db_url, {"steps": [emit("a", 1), emit("b", 1, "a", delayMs=HOUR_MS)]})
        wait_for(lambda: named(events(db_url, run_id), "step_delayed", "b"), what="b parked")
        r = httpx.post(f"{base}/runs/{run_id}/cancel", json={"reason": "no wait"}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
    b = steps_by_name(db_url, run_id)["b"]
    assert b["status"] == "cancelled"
    cancelled = named(events(db_url, run_id), "step_cancelled", "b")
    assert len(cancelled) == 1 and cancelled[0]["from_status"] == "pending"
    # promotion never wakes a cancelled step, even when its time has passed
    query(
        db_url,
        "UPDATE steps SET available_at = now() - interval '1 s' WHERE id = %(id)s",
        {"id": b["id"]},
    )
    assert steps_by_name(db_url, run_id)["b"]["status"] == "cancelled"
    assert_checker_clean(db_url, run_id)


def test_replay_sleeps_again_and_a_manual_retry_does_not(db_url: str, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    run_id = submit(
        db_url,
        {
            "steps": [
                emit("a", 1),
                emit("b", 2, "a", delayMs=400),
                {
                    "name": "c",
                    "tool": "TEST_FAIL_UNTIL_FILE",
                    "input": {"path": str(fixed)},
                    "maxAttempts": 1,
                    "dependsOn": ["a"],
                    "delayMs": 400,
                },
            ]
        },
    )
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
        r = httpx.post(f"{base}/runs/{run_id}/replay", json={"from": "b"}, timeout=10)
        assert r.status_code == 200, r.text
        replayed = named(events(db_url, run_id), "step_replayed", "b")
        assert len(replayed) == 1 and replayed[0]["to_status"] == "pending"
        assert replayed[0]["detail"]["delayMs"] == 400 and "until" in replayed[0]["detail"]
        fixed.write_text("")
        r = httpx.post(f"{base}/runs/{run_id}/steps/c/retry", json={}, timeout=10)
        assert r.status_code == 200, r.text
        assert wait_run_finished(db_url, run_id) == "completed"
    evs = events(db_url, run_id)
    b_ready = named(evs, "step_ready", "b")
    assert [e["detail"]["reason"] for e in b_ready] == ["delay", "delay"]
    until = datetime.fromisoformat(replayed[0]["detail"]["until"])
    assert b_ready[1]["created_at"] >= until
    c_ready = named(evs, "step_ready", "c")
    assert len(c_ready) == 1  # the retry made it ready at once (step_retried), no new sleep
    assert len(named(evs, "step_retried", "c")) == 1
    assert_checker_clean(db_url, run_id)


def test_bad_delay_is_refused_naming_the_field(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, **TOOLS) as base:
        for bad in (-1, "soon", 1.5, 30 * 24 * HOUR_MS + 1, True):
            r = httpx.post(f"{base}/runs", json={"steps": [emit("a", 1, delayMs=bad)]}, timeout=10)
            assert r.status_code == 422, (bad, r.text)
            problems = r.json()["problems"]
            assert problems[0]["step"] == "a" and problems[0]["field"] == "delayMs", problems
        assert query(db_url, "SELECT count(*) AS n FROM runs")[0]["n"] == 0


def test_10000_parked_sleeps_hold_no_worker(db_url: str, tmp_path: Path) -> None:
    """A run of 10,000 one-hour sleeps parks them all in Postgres: one worker of concurrency
    2 stays free and runs another run's step at once, and no sleep holds a lease."""
    sleepers = submit(
        db_url,
        {"steps": [emit(f"s{i}", i, delayMs=HOUR_MS) for i in range(10_000)]},
    )
    with (
        api_server(db_url, tmp_path, **TOOLS) as base,
        workers(db_url, tmp_path, 1, concurrency=2, **TOOLS),
    ):
        wait_for(
            lambda: any(
                w["alive"] for w in httpx.get(f"{base}/workers", timeout=10).json()["workers"]
            ),
            what="the worker registered",
        )
        t0 = time.monotonic()
        other = submit(db_url, {"steps": [emit("now", 1), emit("then", 2, "now")]})
        assert wait_run_finished(db_url, other, timeout_s=30) == "completed"
        took_s = time.monotonic() - t0
        assert took_s < 15, took_s
        held = query(
            db_url,
            "SELECT count(*) FILTER (WHERE status = 'pending') AS pending,"
            " count(*) FILTER (WHERE lease_owner IS NOT NULL OR status <> 'pending') AS busy,"
            " min(available_at) - now() AS first_wake"
            " FROM steps WHERE run_id = %(id)s",
            {"id": sleepers},
        )[0]
        assert held["pending"] == 10_000 and held["busy"] == 0
        assert held["first_wake"] > timedelta(minutes=59)
        ws = httpx.get(f"{base}/workers", timeout=10).json()["workers"]
        assert [len(w["currentSteps"]) for w in ws if w["alive"]] == [0]
        running = query(db_url, "SELECT count(*) AS n FROM steps WHERE status = 'running'")
        assert running[0]["n"] == 0
        waiting = api_steps(base, sleepers)["s9999"]["waitingFor"]
        assert waiting["reason"] == "delay" and waiting["delayMs"] == HOUR_MS
