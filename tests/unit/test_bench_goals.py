"""`python -m benchmarks`' goal lines (issue 14) and summary rows, on made-up figures."""

from __future__ import annotations

from typing import Any

from benchmarks.__main__ import goals, rows


def _ws(mode: str, p99: float, lost: int = 0, resyncs: int = 0) -> dict[str, Any]:
    return {
        "clients": 1000,
        "mode": mode,
        "producedEventsPerSecond": 200.0,
        "p50Ms": 5.0,
        "p99Ms": p99,
        "lostEvents": lost,
        "resyncs": resyncs,
    }


def _results(**over: Any) -> dict[str, Any]:
    cost = {"walBytesPerJob": 1500.0, "commitsPerJob": 0.12}
    results: dict[str, Any] = {
        "w1": {
            "steps": {
                "jobs": 20_000,
                "jobsPerSDb": 3000,
                "jobsPerS": 2000,
                "cost": cost,
                "rss": {"workerMb": [80.0, 80.0], "apiMb": 90.0},
            }
        },
        "w2": {"runs": 1000, "runsPerSDb": 200, "stepsPerSDb": 2000},
        "w3": {"n": 300, "ratePerS": 100.0, "p50Ms": 2.5, "p99Ms": 12.0},
        "w4": {"rates": {"10000": 3000, "1000000": 2900}, "ratio": 0.95},
        "w5": {"steps": 10_000, "medianMs": 600.0},
        "w9": {"agents": 2, "jobsPerSDb": 1600},
        "ws": [_ws("event", 150.0), _ws("batch", 80.0)],
        "ceiling": {
            "jobs": 20_000,
            "batches": {
                "25": {
                    "jobs": 20_000,
                    "processes": 2,
                    "connectionsPerProcess": 2,
                    "jobsPerSDb": 10_000,
                    "cost": {"walBytesPerJob": 400.0, "commitsPerJob": 0.08},
                }
            },
            "best": 10_000,
        },
        "peers": {
            "pgqueuer": {"w1": {"jobs": 20_000, "jobsPerS": 2500.0, "cost": cost}},
            "dbos": {"w2": {"workflowsPerS": 10.0, "stepsPerS": 30.0}},
        },
    }
    results.update(over)
    return results


def _verdicts(results: dict[str, Any]) -> dict[str, tuple[str, bool | None]]:
    return {goal: (measured, met) for goal, measured, met in goals(results)}


def test_goals_of_issue_14() -> None:
    v = _verdicts(_results())
    assert v["W1 >= 1.5x PgQueuer"] == ("1.20x", False)
    assert v["W2 runs/s >= 10x DBOS workflows/s"] == ("20.00x", True)
    assert v["W2 steps/s >= PgQueuer W1 jobs/s"] == ("0.80x", False)
    assert v["W3 p50 <= 3 ms"][1] is True and v["W3 p99 <= 10 ms"][1] is False
    assert v["W4 largest >= 90 % of smallest"] == ("95%", True)
    assert v["W5 POST 10,000 steps: median <= 0.5 s"] == ("600.0 ms", False)
    assert v["W9 agents >= 0.5x W1"] == ("0.53x", True)
    # the better mode's p99 decides, and nothing was lost
    assert v["WS 1,000 clients: p99 <= 100 ms, nothing lost"] == (
        "80.0 ms (batch), 0 lost, 0 resyncs",
        True,
    )
    assert not any("Procrastinate" in goal for goal in v)  # issue 5's goal is gone


def test_goals_fail_on_lost_events_and_missing_figures() -> None:
    lost = _verdicts(_results(ws=[_ws("event", 50.0, lost=3)]))
    assert lost["WS 1,000 clients: p99 <= 100 ms, nothing lost"][1] is False
    resynced = _verdicts(_results(ws=[_ws("event", 50.0), _ws("batch", 40.0, resyncs=1)]))
    assert resynced["WS 1,000 clients: p99 <= 100 ms, nothing lost"][1] is False
    w5 = _verdicts(_results(w5={"steps": 10_000, "medianMs": 500.0}))
    assert w5["W5 POST 10,000 steps: median <= 0.5 s"][1] is True
    no_peers = _verdicts(_results(peers={"pgqueuer": {"skipped": "not installed"}}))
    assert no_peers["W1 >= 1.5x PgQueuer"] == ("-", None)


def test_rows_show_cost_ceiling_and_ws() -> None:
    table = {r[1].strip(): r[2:] for r in rows(_results())}
    wal = next(k for k in table if k.startswith("WAL bytes / job"))
    assert table[wal] == ["1,500", "1,500"]
    commits = next(k for k in table if k.startswith("commits / job"))
    assert table[commits] == ["0.12", "0.12"]
    bare = next(k for k in table if k.startswith("bare SKIP LOCKED claim+complete, batch 25"))
    assert table[bare] == ["10,000"]
    assert table["W1 as a fraction of the ceiling (best batch)"] == ["0.30"]
    ws = [k for k in table if "clients on /ws" in k]
    assert len(ws) == 2 and table[ws[1]] == ["5.0 / 80.0, 0 (0)"]
