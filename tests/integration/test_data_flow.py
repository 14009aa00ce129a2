"""Data flow and DAG power on a real Postgres with real worker processes: references between
steps, trigger rules, map fan-out, replay, bulk retry of dead letters, priorities, delayed
runs, concurrency keys and waitingFor."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from chaos.ledger import Ledger
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
from tests.testtools import echo, emit

load_tool_modules(["workers.tools.builtin", "tests.testtools"])  # submit() validates inputs

TOOLS = {"PGDAG_TOOLS": "tests.testtools", "PGDAG_HTTP_ALLOW_PRIVATE": "1"}


def api_steps(base: str, run_id: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{base}/runs/{run_id}", timeout=10).json()
    return {s["name"]: s for s in body["steps"]}


# --- outputs into inputs -------------------------------------------------------------------


def test_reference_to_a_non_ancestor_is_refused_and_nothing_written(
    db_url: str, tmp_path: Path
) -> None:
    with api_server(db_url, tmp_path, **TOOLS) as base:
        body = {
            "steps": [
                emit("a", {"x": 1}),
                emit("b", 2),
                echo("c", {"v": {"$ref": "steps.a.output.x"}}, "b"),
            ]
        }
        r = httpx.post(f"{base}/runs", json=body, timeout=10)
        assert r.status_code == 422, r.text
        problem = r.json()["problems"][0]
        assert problem["step"] == "c" and problem["field"] == "input.v"
        assert "'a' is not an ancestor of 'c'" in problem["problem"]
        assert query(db_url, "SELECT count(*) AS n FROM runs")[0]["n"] == 0
        assert query(db_url, "SELECT count(*) AS n FROM steps")[0]["n"] == 0


def test_outputs_feed_inputs_and_the_resolved_input_is_audited(db_url: str, tmp_path: Path) -> None:
    ledger = Ledger()
    url = ledger.start()
    try:
        run_id = submit(
            db_url,
            {
                "steps": [
                    {"name": "fetch", "tool": "HTTP_GET_JSON", "input": {"url": f"{url}/page"}},
                    emit("meta", {"tags": ["x", "y", "z"], "next": f"{url}/page2"}),
                    {
                        "name": "follow",
                        "tool": "HTTP_GET_JSON",
                        "input": {"url": {"$ref": "steps.meta.output.next"}},
                        "dependsOn": ["meta"],
                    },
                    echo(
                        "use",
                        {
                            "key": {"$ref": "steps.fetch.output.body.key"},
                            "last": {"$ref": "steps.meta.output.tags.-1"},
                            "nested": [{"$ref": "steps.meta.output.tags.0"}, 7],
                            "seen": {"$ref": "steps.follow.output.body.timesSeen"},
                        },
                        "fetch",
                        "follow",
                    ),
                ]
            },
        )
        with workers(db_url, tmp_path, 2, **TOOLS):
            assert wait_run_finished(db_url, run_id) == "completed"
    finally:
        ledger.stop()
    steps = steps_by_name(db_url, run_id)
    got = steps["use"]["output"]["got"]
    assert got == {"key": f"{run_id}:fetch", "last": "z", "nested": ["x", 7], "seen": 1}
    assert steps["follow"]["resolved_input"] == {"input": {"url": f"{url}/page2"}}
    claimed = [e for e in events(db_url, run_id) if e["event"] == "step_claimed"]
    use_claim = next(e for e in claimed if e["step_name"] == "use")
    assert use_claim["detail"] == {"input": got}  # the audit log shows what ran
    assert sorted(p for _, _, p in ledger._requests) == ["/page", "/page2"]


def test_a_missing_path_fails_the_step_at_once_with_a_clear_error(
    db_url: str, tmp_path: Path
) -> None:
    run_id = submit(
        db_url,
        {
            "steps": [
                emit("a", {"items": [1, 2]}),
                echo("b", {"v": {"$ref": "steps.a.output.items.5"}}, "a", maxAttempts=5),
                echo("c", {"v": {"$ref": "steps.a.output.nope.deeper"}}, "a", maxAttempts=5),
            ]
        },
    )
    with workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
    steps = steps_by_name(db_url, run_id)
    assert steps["b"]["status"] == "dead_letter" and steps["b"]["attempt"] == 1
    assert steps["b"]["error"] == (
        "input.v: $ref steps.a.output.items.5 cannot be resolved: "
        "steps.a.output.items has no element 5 (an array of 2)"
    )
    assert steps["c"]["status"] == "dead_letter" and steps["c"]["attempt"] == 1
    assert 'steps.a.output has no key "nope"' in steps["c"]["error"]


# --- trigger rules ---------------------------------------------------------------------------


def test_trigger_rules_after_a_failure(db_url: str, tmp_path: Path) -> None:
    fail = {"failTimes": 9, "retryable": False}
    run_id = submit(
        db_url,
        {
            "steps": [
                {"name": "work", "tool": "TEST_FAIL_TIMES", "input": fail, "maxAttempts": 1},
                emit("other", 1),
                emit("next", 1, "work"),  # all_succeeded: skipped
                emit("after_next", 1, "next"),  # skipped in turn
                emit("cleanup", 1, "work", "other", runIf="all_done"),
                echo(
                    "alert",
                    {"status": {"$ref": "steps.work.status"}, "why": {"$ref": "steps.work.error"}},
                    "work",
                    runIf="any_failed",
                ),
                emit("not_alerted", 1, "other", runIf="any_failed"),  # nothing failed: skipped
                emit("after_skip", 1, "next", runIf="all_done"),  # runs after a skipped dep
            ]
        },
    )
    with workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
    steps = steps_by_name(db_url, run_id)
    status = {name: s["status"] for name, s in steps.items()}
    assert status == {
        "work": "dead_letter",
        "other": "succeeded",
        "next": "skipped",
        "after_next": "skipped",
        "cleanup": "succeeded",
        "alert": "succeeded",
        "not_alerted": "skipped",
        "after_skip": "succeeded",
    }
    assert steps["alert"]["output"]["got"] == {
        "status": "dead_letter",
        "why": "planned failure 1/9",
    }
    run = query(db_url, "SELECT * FROM runs WHERE id = %(id)s", {"id": run_id})[0]
    assert (run["steps_unfinished"], run["steps_dead"]) == (0, 1)


def test_trigger_rules_when_everything_succeeds(db_url: str, tmp_path: Path) -> None:
    """An any_failed step whose dependencies all succeeded is skipped, its all_succeeded
    dependents with it (the cascade runs in the success's transaction), an all_done one runs,
    and the run is completed: skipped steps do not fail a run."""
    run_id = submit(
        db_url,
        {
            "steps": [
                emit("a", 1),
                emit("on_fail", 1, "a", runIf="any_failed"),
                emit("page_someone", 1, "on_fail"),
                emit("page_more", 1, "page_someone"),
                emit("notify", 1, "page_more", "a", runIf="all_done"),
            ]
        },
    )
    with workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "completed"
    status = {n: s["status"] for n, s in steps_by_name(db_url, run_id).items()}
    assert status == {
        "a": "succeeded",
        "on_fail": "skipped",
        "page_someone": "skipped",
        "page_more": "skipped",
        "notify": "succeeded",
    }


# --- map fan-out -------------------------------------------------------------------------


def test_map_over_1000_elements_with_transient_failures(db_url: str, tmp_path: Path) -> None:
    elements = [{"n": i, "flaky": i % 10 == 3} for i in range(1000)]  # 10 % fail once
    run_id = submit(
        db_url,
        {
            "steps": [
                emit("list", {"body": {"items": elements}}),
                {
                    "name": "each",
                    "tool": "TEST_MAP_ITEM",
                    "input": {"n": {"$ref": "item.n"}, "flaky": {"$ref": "item.flaky"}},
                    "map": {"$ref": "steps.list.output.body.items"},
                    "dependsOn": ["list"],
                    "maxAttempts": 3,
                },
                echo("join", {"all": {"$ref": "steps.each.output"}}, "each"),
            ]
        },
    )
    with workers(db_url, tmp_path, 2, concurrency=16, **TOOLS):
        assert wait_run_finished(db_url, run_id, timeout_s=120) == "completed"
    steps = steps_by_name(db_url, run_id)
    each = steps["each"]
    assert each["map_width"] == 1000 and each["status"] == "succeeded"
    expected = [{"n": i, "double": 2 * i, "key": f"{run_id}:each[{i}]"} for i in range(1000)]
    assert each["output"] == expected  # ordered by index, whatever the finishing order
    assert steps["join"]["output"]["got"]["all"] == expected
    children = [s for name, s in steps.items() if name.startswith("each[")]
    assert len(children) == 1000
    assert sum(1 for c in children if c["attempt"] == 2) == 100
    assert all(c["status"] == "succeeded" for c in children)
    run = query(db_url, "SELECT * FROM runs WHERE id = %(id)s", {"id": run_id})[0]
    assert run["steps_total"] == 1003 and run["steps_unfinished"] == 0


def test_map_source_not_a_list_or_too_wide_fails_for_good(db_url: str, tmp_path: Path) -> None:
    def mapped(name: str, ref: str) -> dict[str, Any]:
        return {
            "name": name,
            "tool": "TEST_ECHO",
            "input": {"i": {"$ref": "index"}},
            "map": {"$ref": ref},
            "dependsOn": ["src"],
            "maxAttempts": 5,
        }

    run_id = submit(
        db_url,
        {
            "steps": [
                emit("src", {"obj": {"a": 1}, "wide": list(range(30)), "none": []}),
                mapped("not_list", "steps.src.output.obj"),
                mapped("too_wide", "steps.src.output.wide"),
                mapped("empty", "steps.src.output.none"),
                echo("after_empty", {"v": {"$ref": "steps.empty.output"}}, "empty"),
            ]
        },
    )
    with workers(db_url, tmp_path, 1, PGDAG_MAX_MAP_WIDTH="20", **TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
    steps = steps_by_name(db_url, run_id)
    assert steps["not_list"]["status"] == "dead_letter" and steps["not_list"]["attempt"] == 1
    assert steps["not_list"]["error"] == "map: $ref steps.src.output.obj is object, not an array"
    assert steps["too_wide"]["status"] == "dead_letter"
    assert steps["too_wide"]["error"] == (
        "map: $ref steps.src.output.wide has 30 elements, over the fan-out cap of 20 "
        "(PGDAG_MAX_MAP_WIDTH)"
    )
    assert not [n for n in steps if n.startswith(("too_wide[", "not_list["))]
    assert steps["empty"]["status"] == "succeeded" and steps["empty"]["output"] == []
    assert steps["after_empty"]["output"]["got"] == {"v": []}


def test_fan_in_counted_right_when_8_workers_finish_siblings_at_once(
    db_url: str, tmp_path: Path
) -> None:
    """8 siblings on 8 workers leave a barrier together and record their successes in the
    same instant; the join is promoted exactly once, for a static fan-in and a map's."""
    runs = []
    for i in range(3):
        static_dir = tmp_path / f"static{i}"
        map_dir = tmp_path / f"map{i}"
        static_dir.mkdir()
        map_dir.mkdir()
        sibling = {"tool": "TEST_BARRIER", "input": {"dir": str(static_dir), "parties": 8}}
        runs.append(
            submit(
                db_url,
                {
                    "steps": [
                        *({"name": f"s{j}", **sibling} for j in range(8)),
                        emit("join", 1, *(f"s{j}" for j in range(8))),
                        emit("items", list(range(8))),
                        {
                            "name": "m",
                            "tool": "TEST_BARRIER",
                            "input": {"dir": str(map_dir), "parties": 8},
                            "map": {"$ref": "steps.items.output"},
                            "dependsOn": ["items"],
                        },
                        emit("map_join", 1, "m"),
                    ]
                },
            )
        )
    with workers(db_url, tmp_path, 8, concurrency=1, **TOOLS):
        for run_id in runs:
            assert wait_run_finished(db_url, run_id, timeout_s=120) == "completed"
    for run_id in runs:
        steps = steps_by_name(db_url, run_id)
        for join in ("join", "map_join"):
            assert steps[join]["status"] == "succeeded" and steps[join]["deps_remaining"] == 0
        assert steps["m"]["deps_remaining"] == 0 and len(steps["m"]["output"]) == 8
        kinds = [(e["step_name"], e["event"]) for e in events(db_url, run_id)]
        assert kinds.count(("join", "step_ready")) == 1
        assert kinds.count(("join", "step_claimed")) == 1
        assert kinds.count(("map_join", "step_claimed")) == 1


def test_retrying_a_dead_map_child_lets_the_map_join(db_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "fixed"
    run_id = submit(
        db_url,
        {
            "steps": [
                emit("items", [0, 1, 2]),
                {
                    "name": "m",
                    "tool": "TEST_FAIL_UNTIL_FILE",
                    "input": {"path": str(marker)},
                    "map": {"$ref": "steps.items.output"},
                    "dependsOn": ["items"],
                    "maxAttempts": 1,
                },
                emit("after", 1, "m"),
            ]
        },
    )
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
        steps = api_steps(base, run_id)
        assert steps["m"]["status"] == "skipped" and steps["after"]["status"] == "skipped"
        marker.touch()
        for i in range(3):
            r = httpx.post(f"{base}/runs/{run_id}/steps/m[{i}]/retry", json={}, timeout=10)
            assert r.status_code == 200, r.text
        assert wait_run_finished(db_url, run_id) == "completed"
    steps = steps_by_name(db_url, run_id)
    assert len(steps["m"]["output"]) == 3 and steps["after"]["status"] == "succeeded"


# --- replay and bulk retry ---------------------------------------------------------------


def test_replay_from_a_step_reuses_upstream_outputs(db_url: str, tmp_path: Path) -> None:
    ledger = Ledger()
    url = ledger.start()
    try:
        run_id = submit(
            db_url,
            {
                "steps": [
                    {"name": "fetch", "tool": "HTTP_GET_JSON", "input": {"url": f"{url}/up"}},
                    {
                        "name": "post",
                        "tool": "HTTP_GET_JSON",
                        "input": {"url": f"{url}/down"},
                        "dependsOn": ["fetch"],
                    },
                    echo("use", {"k": {"$ref": "steps.fetch.output.body.key"}}, "post"),
                    emit("items", [1, 2], "fetch"),
                    {
                        "name": "m",
                        "tool": "TEST_ECHO",
                        "input": {"i": {"$ref": "item"}},
                        "map": {"$ref": "steps.items.output"},
                        "dependsOn": ["items", "post"],
                    },
                ]
            },
        )
        with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
            assert wait_run_finished(db_url, run_id) == "completed"
            before = steps_by_name(db_url, run_id)
            r = httpx.post(
                f"{base}/runs/{run_id}/replay",
                json={"from": "post", "reason": "downstream API fixed"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "running"
            assert wait_run_finished(db_url, run_id) == "completed"
            bad = httpx.post(f"{base}/runs/{run_id}/replay", json={"from": "nope"}, timeout=10)
            assert bad.status_code == 404
            bad = httpx.post(f"{base}/runs/{run_id}/replay", json={"frm": "post"}, timeout=10)
            assert bad.status_code == 422 and bad.json()["problems"][0]["field"] == "from"
    finally:
        ledger.stop()
    paths = [p for _, _, p in ledger._requests]
    assert paths.count("/up") == 1  # upstream not called again
    assert paths.count("/down") == 2
    after = steps_by_name(db_url, run_id)
    assert after["fetch"]["finished_at"] == before["fetch"]["finished_at"]
    assert after["items"]["finished_at"] == before["items"]["finished_at"]
    assert after["post"]["finished_at"] > before["post"]["finished_at"]
    assert after["use"]["output"] == before["use"]["output"]  # the reused output read again
    assert after["m"]["output"] == [
        {"got": {"i": 1}, "step": "m[0]"},
        {"got": {"i": 2}, "step": "m[1]"},
    ]
    evs = events(db_url, run_id)
    replayed = [e for e in evs if e["event"] == "step_replayed"]
    assert {e["step_name"] for e in replayed} == {"post", "use", "m"}
    assert all(e["detail"]["reason"] == "downstream API fixed" for e in replayed)
    run_ev = [e for e in evs if e["event"] == "run_replayed"]
    assert len(run_ev) == 1 and run_ev[0]["detail"] == {
        "reason": "downstream API fixed",
        "from": "post",
    }
    assert sum(1 for e in evs if e["event"] == "step_map_expanded") == 2


def test_replay_refuses_running_steps_and_cancelled_runs(db_url: str, tmp_path: Path) -> None:
    run_id = submit(
        db_url,
        {
            "steps": [
                {"name": "slow", "tool": "DELAY", "input": {"ms": 20_000}},
                emit("b", 1, "slow"),
            ]
        },
    )
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        wait_for(lambda: steps_by_name(db_url, run_id)["slow"]["status"] == "running")
        r = httpx.post(f"{base}/runs/{run_id}/replay", json={"from": "slow"}, timeout=10)
        assert r.status_code == 409 and "'slow'" in r.json()["message"]
        assert steps_by_name(db_url, run_id)["slow"]["status"] == "running"  # untouched
        httpx.post(f"{base}/runs/{run_id}/cancel", json={}, timeout=10).raise_for_status()
        r = httpx.post(f"{base}/runs/{run_id}/replay", json={"from": "b"}, timeout=10)
        assert r.status_code == 409 and "cancelled" in r.json()["message"]


def test_bulk_retry_of_dead_letters_by_filter(db_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "fixed"
    flaky = {"tool": "TEST_FAIL_UNTIL_FILE", "input": {"path": str(marker)}, "maxAttempts": 1}
    runs = [
        submit(db_url, {"steps": [{"name": "f", **flaky}, emit("g", 1, "f")]}) for _ in range(3)
    ]
    other = submit(
        db_url,
        {
            "steps": [
                {
                    "name": "x",
                    "tool": "TEST_FAIL_TIMES",
                    "input": {"failTimes": 1},
                    "maxAttempts": 1,
                }
            ]
        },
    )
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        for run_id in [*runs, other]:
            assert wait_run_finished(db_url, run_id) == "failed"
        r = httpx.post(f"{base}/runs/retry-dead-letters", json={"since": "yesterday"}, timeout=10)
        assert r.status_code == 422 and r.json()["problems"][0]["field"] == "since"
        dry = httpx.post(
            f"{base}/runs/retry-dead-letters",
            json={"tool": "TEST_FAIL_UNTIL_FILE", "dryRun": True},
            timeout=10,
        ).json()
        assert dry["matched"] == 3 and {d["runId"] for d in dry["retried"]} == set(runs)
        assert all(
            s["f"]["status"] == "dead_letter" for s in map(lambda i: steps_by_name(db_url, i), runs)
        )
        marker.touch()
        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        done = httpx.post(
            f"{base}/runs/retry-dead-letters",
            json={
                "tool": "TEST_FAIL_UNTIL_FILE",
                "runStatus": "failed",
                "since": since,
                "reason": "config fixed",
            },
            timeout=10,
        ).json()
        assert done["matched"] == 3 and len(done["retried"]) == 3 and done["refused"] == []
        for run_id in runs:
            assert wait_run_finished(db_url, run_id) == "completed"
        assert (
            query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": other})[0]["status"]
            == "failed"
        )
    retried = [e for e in events(db_url, runs[0]) if e["event"] == "step_retried"]
    assert retried[0]["detail"]["reason"] == "config fixed"


# --- scheduling controls -----------------------------------------------------------------


def test_concurrency_key_never_exceeded(db_url: str, tmp_path: Path) -> None:
    """200 steps with maxConcurrency 2 on 4 workers: sampled from the steps table, never more
    than 2 of the key run at once (and 2 do: the limit is reached, not just respected)."""
    keyed = {
        "tool": "DELAY",
        "input": {"ms": 15},
        "concurrencyKey": "api.example.org",
        "maxConcurrency": 2,
    }
    run_ids = [
        submit(db_url, {"steps": [{"name": f"k{i}", **keyed} for i in range(50)]}) for _ in range(4)
    ]
    free = submit(
        db_url,
        {"steps": [{"name": f"f{i}", "tool": "DELAY", "input": {"ms": 15}} for i in range(40)]},
    )
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            row = query(
                db_url,
                "SELECT count(*) AS n FROM steps WHERE status = 'running' "
                "AND concurrency_key = 'api.example.org'",
            )
            samples.append(int(row[0]["n"]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with workers(db_url, tmp_path, 4, concurrency=8, **TOOLS):
            for run_id in [*run_ids, free]:
                assert wait_run_finished(db_url, run_id, timeout_s=120) == "completed"
    finally:
        stop.set()
        sampler.join()
    assert len(samples) > 50
    assert max(samples) == 2, sorted(set(samples))
    slot = query(db_url, "SELECT * FROM concurrency_slots WHERE key = 'api.example.org'")[0]
    assert (slot["running"], slot["max_running"]) == (0, 2)  # every slot given back


def test_priority_order_and_fifo_within_a_priority(db_url: str, tmp_path: Path) -> None:
    plan = [("low", -5), ("first0", 0), ("high", 10), ("second0", 0), ("higher", 20)]
    ids = {}
    for name, priority in plan:
        ids[name] = submit(
            db_url,
            {"priority": priority, "steps": [{"name": "s", "tool": "DELAY", "input": {"ms": 1}}]},
        )
    with workers(db_url, tmp_path, 1, concurrency=1, **TOOLS):
        for run_id in ids.values():
            assert wait_run_finished(db_url, run_id) == "completed"
    started = {
        name: query(db_url, "SELECT started_at FROM steps WHERE run_id = %(id)s", {"id": rid})[0][
            "started_at"
        ]
        for name, rid in ids.items()
    }
    assert sorted(started, key=started.__getitem__) == [
        "higher",
        "high",
        "first0",
        "second0",
        "low",
    ]


def test_start_at_delays_a_run(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, 1, **TOOLS):
        start_at = datetime.now(UTC) + timedelta(seconds=2)
        r = httpx.post(
            f"{base}/runs",
            json={"startAt": start_at.isoformat(), "steps": [emit("a", 1), emit("b", 1, "a")]},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        run = r.json()
        assert run["startAt"] is not None and run["status"] == "pending"
        steps = {s["name"]: s for s in run["steps"]}
        assert steps["a"]["status"] == "pending"
        assert steps["a"]["waitingFor"]["reason"] == "startAt"
        assert steps["b"]["waitingFor"] == {"reason": "dependencies", "steps": ["a"]}
        assert wait_run_finished(db_url, run["id"]) == "completed"
        bad = httpx.post(
            f"{base}/runs",
            json={"startAt": "2026-01-01T00:00:00", "steps": [emit("a", 1)]},
            timeout=10,
        )
        assert bad.status_code == 422 and bad.json()["problems"][0]["field"] == "startAt"
    a = steps_by_name(db_url, run["id"])["a"]
    assert a["started_at"] >= start_at


def test_waiting_for_names_the_reason(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, **TOOLS) as base:
        run_id = submit(
            db_url,
            {
                "steps": [
                    emit("a", 1),
                    emit("b", 1, "a"),
                    {
                        "name": "k",
                        "tool": "DELAY",
                        "input": {"ms": 1},
                        "concurrencyKey": "q",
                        "maxConcurrency": 1,
                    },
                ]
            },
        )
        steps = api_steps(base, run_id)
        assert steps["a"]["waitingFor"] == {"reason": "noLiveWorker", "tool": "TEST_EMIT"}
        assert steps["b"]["waitingFor"] == {"reason": "dependencies", "steps": ["a"]}
        query(db_url, "UPDATE concurrency_slots SET running = 1 WHERE key = 'q'")
        assert api_steps(base, run_id)["k"]["waitingFor"] == {
            "reason": "concurrencyKey",
            "key": "q",
            "running": 1,
            "maxConcurrency": 1,
        }
        query(db_url, "UPDATE concurrency_slots SET running = 0 WHERE key = 'q'")
        query(
            db_url,
            "UPDATE steps SET available_at = now() + interval '1 hour', attempt = 1 "
            "WHERE run_id = %(id)s AND name = 'k'",
            {"id": run_id},
        )
        waiting = api_steps(base, run_id)["k"]["waitingFor"]
        assert waiting["reason"] == "backoff" and waiting["attempt"] == 1
        with workers(db_url, tmp_path, 1, **TOOLS):
            wait_for(lambda: steps_by_name(db_url, run_id)["b"]["status"] == "succeeded")
            assert api_steps(base, run_id)["b"]["waitingFor"] is None
        # with the worker stopped, nothing claims: a fresh ready step says so
        run2 = submit(db_url, {"steps": [emit("z", 1)]})
        assert api_steps(base, run2)["z"]["waitingFor"]["reason"] == "noLiveWorker"
