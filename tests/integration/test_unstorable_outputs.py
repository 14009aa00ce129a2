"""Outputs Postgres jsonb refuses cost only their own step (issue 10, part 2).

A refused output fails its step for good with the reason and where it is; its batch-mates
in the same group commit succeed exactly once; the worker lives. Real workers, the real
`SuccessBatcher`, a real Postgres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import events, steps_by_name, submit, wait_run_finished, workers

TEST_TOOLS = {"PGDAG_TOOLS": "tests.testtools"}
LONE_SURROGATE_ERROR = (
    "output.body.items[3].name: lone surrogate \\ud800 cannot be stored in Postgres jsonb"
)


def _load_test_tools() -> None:
    from engine.tools import load_tool_modules

    load_tool_modules(["tests.testtools"])


def _step_events(db_url: str, run_id: str) -> dict[str, list[dict[str, Any]]]:
    by_step: dict[str, list[dict[str, Any]]] = {}
    for e in events(db_url, run_id):
        if e["step_name"] is not None:
            by_step.setdefault(e["step_name"], []).append(e)
    return by_step


def test_a_refused_output_fails_only_its_step_and_the_worker_lives(
    db_url: str, tmp_path: Path
) -> None:
    """Five steps meet at a barrier and finish together on one worker, so their successes
    share group commits; one returns a lone surrogate. It is dead-lettered on attempt 1 with
    the reason and the path; the four others succeed once, on attempt 1."""
    _load_test_tools()
    gate = {"dir": str(tmp_path / "barrier"), "parties": 5}
    (tmp_path / "barrier").mkdir()
    mates = [
        {"name": f"mate{i}", "tool": "TEST_BARRIER", "input": gate, "maxAttempts": 3}
        for i in range(4)
    ]
    poison = {
        "name": "poison",
        "tool": "TEST_UNSTORABLE_OUTPUT",
        "input": {"kind": "lone_surrogate", "barrier": gate},
        "maxAttempts": 3,
    }
    others = [
        {"name": kind, "tool": "TEST_UNSTORABLE_OUTPUT", "input": {"kind": kind}}
        for kind in ("nan", "cycle", "set")
    ]
    run_id = submit(db_url, {"steps": [*mates, poison, *others]})
    with workers(db_url, tmp_path, n=1, concurrency=8, **TEST_TOOLS) as [w]:
        assert wait_run_finished(db_url, run_id) == "failed"
        assert w.popen.poll() is None, w.output()  # the worker lives
    steps = steps_by_name(db_url, run_id)
    by_step = _step_events(db_url, run_id)
    for i in range(4):
        mate = steps[f"mate{i}"]
        assert mate["status"] == "succeeded" and mate["attempt"] == 1, mate
        kinds = [e["event"] for e in by_step[f"mate{i}"]]
        assert kinds == ["step_claimed", "step_succeeded"], kinds
    bad = steps["poison"]
    assert bad["status"] == "dead_letter" and bad["attempt"] == 1
    assert bad["error"] == LONE_SURROGATE_ERROR
    dead = [e for e in by_step["poison"] if e["event"] == "step_dead_lettered"]
    assert len(dead) == 1 and dead[0]["detail"]["error"] == LONE_SURROGATE_ERROR
    assert dead[0]["detail"]["retryable"] is False
    assert steps["nan"]["error"] == "output.score: NaN cannot be stored in Postgres jsonb"
    assert steps["cycle"]["error"].startswith("output.self: a cycle")
    assert steps["set"]["error"].startswith("output.tags: set is not JSON")
    for kind in ("nan", "cycle", "set"):
        assert steps[kind]["status"] == "dead_letter" and steps[kind]["attempt"] == 1
