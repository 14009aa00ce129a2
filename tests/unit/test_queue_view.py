"""``GET /queue``'s pieces without a server: who may read it (engine/tokens.py), the
per-minute completion counts (`engine.metrics.MinuteCounts`) and the body built from a
gauge snapshot (`QueueCollector.queue_json`, checked against `responses.QueueView`)."""

from __future__ import annotations

import time

from engine import metrics, responses
from engine.tokens import allows


def test_admin_and_submit_may_read_the_queue_an_agent_may_not() -> None:
    assert allows("admin", "GET", "/queue")
    assert allows("submit", "GET", "/queue")
    assert not allows("agent", "GET", "/queue")
    assert not allows("submit", "POST", "/queue")


def test_minute_counts_keep_the_last_minutes_oldest_first() -> None:
    counts = metrics.MinuteCounts(keep=3)
    t0 = 1_800_000_000.0  # a minute boundary (divisible by 60)
    counts.add(t0 + 1)
    counts.add(t0 + 59, n=2)
    counts.add(t0 + 60)
    assert counts.last(t0 + 61) == [(int(t0) - 60, 0), (int(t0), 3), (int(t0) + 60, 1)]
    counts.add(t0 + 3 * 60)  # minute t0 falls out of the three kept
    assert set(counts.counts) == {int(t0) // 60 + 1, int(t0) // 60 + 3}
    counts.add(t0 + 5)  # too late for the kept minutes: not counted
    assert counts.last(t0 + 3 * 60) == [(int(t0) + 60, 1), (int(t0) + 120, 0), (int(t0) + 180, 1)]


def test_queue_json_matches_the_documented_shape() -> None:
    collector = metrics.QueueCollector(None, lease_ttl_s=30, tools=["idle"])  # type: ignore[arg-type]
    snap = metrics.Snapshot(
        read_at=time.monotonic(),
        ready={"busy": 3.0},
        oldest_ready_s={"busy": 1.5},
        running={"busy": 1.0},
        dead_letter={"broken": 2.0},
        runs={"running": 1.0},
        workers={"busy": 1.0},
    )
    body = collector.queue_json(snap, now_s=time.time())
    view = responses.QueueView.model_validate(body)
    by_tool = {t.tool: t for t in view.tools}
    assert sorted(by_tool) == ["broken", "busy", "idle"]
    assert (by_tool["busy"].ready, by_tool["busy"].running) == (3, 1)
    assert by_tool["busy"].oldest_ready_age_seconds == 1.5
    assert by_tool["broken"].dead_letter == 2 and by_tool["broken"].workers_live == 0
    assert (view.runs.pending, view.runs.running) == (0, 1)
    assert len(view.completions_per_minute) == metrics.THROUGHPUT_MINUTES
    minutes = [m.minute for m in view.completions_per_minute]
    assert minutes == sorted(minutes) and all(m.second == 0 for m in minutes)
