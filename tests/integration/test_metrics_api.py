"""``GET /metrics`` on a real `engine serve` and Postgres (docs/operations.md, "Metrics").

A run goes by whose steps are claimed by this test acting as an agent (raw HTTP, like
tests/integration/test_agent_protocol.py): one fails and is retried, one reports under a
stale token, one is dead-lettered, one's lease expires and the reaper requeues it, one
succeeds; another run is cancelled. A database worker subprocess runs a DELAY step and a
failing step meanwhile, so the queue gauges see running and dead-lettered steps of its
tools. Every scrape's text is parsed with ``prometheus_client.parser``; the counters and
histograms are compared with the scrape before, the gauges waited for with a deadline
(they are cached up to 1 s).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from engine.db import open_pool
from engine.metrics import QueueCollector
from tests.support import api_server, query, wait_for, workers

ECHO = "agent.echo"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx.Client) -> Samples:
    """Every sample of ``/metrics``, keyed by (sample name, labels)."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"sample {key} exported twice"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when absent (a labelled counter appears at its first inc)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


class Agent:
    """This test as an agent of the tool `ECHO`."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(path, json={"agentId": "metrics-agent", **body})
        assert r.status_code == 200, (path, r.text)
        answer: dict[str, Any] = r.json()
        return answer

    def claim(self, n: int) -> list[dict[str, Any]]:
        """Claim until `n` steps are in hand (each claim long-polls up to 1 s)."""
        got: list[dict[str, Any]] = []

        def more() -> bool:
            got.extend(
                self.post("/agent/claim", {"tools": [ECHO], "max": n - len(got), "waitMs": 1000})[
                    "steps"
                ]
            )
            return len(got) >= n

        wait_for(more, timeout_s=20, interval_s=0, what=f"{n} claimed step(s)")
        return got

    def report(self, step: dict[str, Any], **outcome: Any) -> dict[str, Any]:
        body = {"stepId": step["stepId"], "leaseToken": step["leaseToken"], **outcome}
        result: dict[str, Any] = self.post("/agent/report", {"outcomes": [body]})["results"][0]
        return result


def test_metrics_move_with_what_happens(db_url: str, tmp_path: Path) -> None:
    env = {"PGDAG_TOOLS": "tests.testtools"}
    with (
        api_server(db_url, tmp_path, **env) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        before = scrape(client)
        # Postgres health: every table, sizes in bytes, connections by state.
        for table in ("steps", "audit_log", "runs", "step_edges"):
            assert value(before, "pgdag_pg_table_size_bytes", table=table) > 0, table
            assert ("pgdag_pg_table_live_tuples", frozenset({("table", table)})) in before
            assert ("pgdag_pg_table_dead_tuples", frozenset({("table", table)})) in before
        assert sum(v for (n, _), v in before.items() if n == "pgdag_pg_connections") >= 1
        assert value(before, "pgdag_pg_oldest_transaction_age_seconds") >= 0
        assert ("pgdag_pg_oldest_transaction_age_seconds", frozenset()) in before
        assert value(before, "pgdag_steps_ready", tool="DELAY") == 0  # a loaded tool: 0
        assert value(before, "pgdag_runs", status="pending") == 0

        agent = Agent(client)
        agent.post("/agent/register", {"tools": [ECHO], "concurrency": 8})
        steps = [
            {"name": name, "tool": ECHO, "input": {}, "maxAttempts": 2}
            for name in ("retried", "dead", "expired")
        ]
        r = client.post("/runs", json={"steps": steps})
        assert r.status_code == 201, r.text

        def gauges(**want: float) -> Samples | None:
            now = scrape(client)
            ok = all(value(now, name, tool=ECHO) == v for name, v in want.items())
            return now if ok else None

        now = wait_for(
            lambda: gauges(pgdag_steps_ready=3, pgdag_workers_live=1), what="3 ready steps"
        )
        assert value(now, "pgdag_runs", status="pending") == 1
        wait_for(
            lambda: value(scrape(client), "pgdag_oldest_ready_age_seconds", tool=ECHO) > 0,
            what="an oldest ready age",
        )

        claimed = {s["name"]: s for s in agent.claim(3)}
        now = wait_for(lambda: gauges(pgdag_steps_running=3, pgdag_steps_ready=0), what="running")
        assert value(now, "pgdag_runs", status="running") == 1
        assert (
            value(now, "pgdag_ready_to_start_seconds_count", tool=ECHO)
            - value(before, "pgdag_ready_to_start_seconds_count", tool=ECHO)
            == 3
        )

        # A retryable failure: an attempt failed, a retry.
        first = claimed["retried"]
        assert agent.report(first, status="failed", error="boom", retryable=True)["result"] == (
            "recorded"
        )
        # The same attempt reports success under its now stale token: a fencing refusal.
        refused = agent.report(first, status="succeeded", output={})
        assert refused["result"] == "refused" and refused["code"] == "lease_lost", refused
        # Not retryable: a dead letter.
        dead = agent.report(claimed["dead"], status="failed", error="no", retryable=False)
        assert dead["deadLetter"] is True, dead
        after = scrape(client)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("pgdag_attempts_total", tool=ECHO, outcome="failed") == 2
        assert moved("pgdag_attempts_total", tool=ECHO, outcome="lease_lost") == 1
        assert moved("pgdag_fencing_refusals_total", tool=ECHO) == 1
        assert moved("pgdag_retries_total", tool=ECHO) == 1
        assert moved("pgdag_dead_letters_total", tool=ECHO) == 1
        assert moved("pgdag_attempt_duration_seconds_count", tool=ECHO) == 2
        wait_for(lambda: gauges(pgdag_steps_dead_letter=1), what="a dead letter gauge")

        # The retried step's second attempt succeeds.
        again = agent.claim(1)[0]
        assert again["name"] == "retried" and again["attempt"] == 2, again
        assert agent.report(again, status="succeeded", output={"ok": True})["result"] == (
            "recorded"
        )
        # "expired" gets no heartbeat: the API's reaper requeues it after the 2 s lease.
        wait_for(
            lambda: (
                value(scrape(client), "pgdag_lease_expiries_total")
                - value(before, "pgdag_lease_expiries_total")
                == 1
            ),
            timeout_s=20,
            what="a lease expiry",
        )
        after = scrape(client)
        assert moved("pgdag_attempts_total", tool=ECHO, outcome="succeeded") == 1
        assert moved("pgdag_attempt_duration_seconds_count", tool=ECHO) == 3
        wait_for(lambda: gauges(pgdag_steps_ready=1, pgdag_steps_running=0), what="requeued")

        # Cancel the run: a cancellation.
        run_id = r.json()["id"]
        assert client.post(f"/runs/{run_id}/cancel", json={}).status_code == 200
        after = scrape(client)
        assert moved("pgdag_cancellations_total") == 1
        wait_for(lambda: gauges(pgdag_steps_ready=0), what="no ready step after the cancel")


def test_gauges_see_a_database_worker_and_live_events(db_url: str, tmp_path: Path) -> None:
    env = {"PGDAG_TOOLS": "tests.testtools"}
    with (
        api_server(db_url, tmp_path, **env) as base,
        httpx.Client(base_url=base, timeout=30) as client,
        connect(base.replace("http", "ws") + "/ws", proxy=None) as ws,
    ):
        assert '"hello"' in str(ws.recv(timeout=10))
        before = scrape(client)
        assert value(before, "pgdag_websocket_clients") == 1
        body = {
            "steps": [
                {"name": "slow", "tool": "DELAY", "input": {"ms": 60_000}},
                {
                    "name": "bad",
                    "tool": "TEST_FAIL_TIMES",
                    "input": {"failTimes": 5, "retryable": False},
                },
            ]
        }
        r = client.post("/runs", json=body)
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        with workers(db_url, tmp_path, 1, **env):

            def seen() -> bool:
                now = scrape(client)
                return (
                    value(now, "pgdag_steps_running", tool="DELAY") == 1
                    and value(now, "pgdag_steps_dead_letter", tool="TEST_FAIL_TIMES") == 1
                    and value(now, "pgdag_workers_live", tool="DELAY") == 1
                    and value(now, "pgdag_oldest_ready_age_seconds", tool="DELAY") == 0
                )

            wait_for(seen, timeout_s=30, what="a running DELAY and a dead letter")
            assert client.post(f"/runs/{run_id}/cancel", json={}).status_code == 200
        wait_for(
            lambda: value(scrape(client), "pgdag_steps_running", tool="DELAY") == 0,
            what="nothing running",
        )
        # The audit events of the run reached this API's LISTEN: the lag was observed.
        wait_for(
            lambda: (
                value(scrape(client), "pgdag_live_listen_lag_seconds_count")
                - value(before, "pgdag_live_listen_lag_seconds_count")
                >= len(
                    query(db_url, "SELECT id FROM audit_log WHERE run_id = %(r)s", {"r": run_id})
                )
            ),
            what="every event of the run through LISTEN",
        )
        lag = scrape(client)
        assert value(lag, "pgdag_live_listen_lag_seconds_bucket", le="+Inf") == value(
            lag, "pgdag_live_listen_lag_seconds_count"
        )
        ws.close()
        wait_for(
            lambda: value(scrape(client), "pgdag_websocket_clients") == 0,
            what="the WebSocket client gone",
        )


def test_two_scrapes_in_a_row_cost_one_round_of_queries(db_url: str) -> None:
    async def main() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2, name="metrics-test")
        try:
            collector = QueueCollector(pool, lease_ttl_s=30, tools=["DELAY"], cache_s=60)
            first = await collector.refresh()
            second = await collector.refresh()
            both = await asyncio.gather(collector.refresh(), collector.refresh())
            assert collector.rounds == 1
            assert first is second and all(s is first for s in both)
            names = {f.name for f in collector.collect()}
            assert {"pgdag_steps_ready", "pgdag_pg_table_size_bytes", "pgdag_runs"} <= names
            collector.cache_s = 0
            await collector.refresh()
            assert collector.rounds == 2
        finally:
            await pool.close()

    asyncio.run(main())


def test_metrics_need_an_admin_token(db_url: str, tmp_path: Path) -> None:
    token = "metrics-admin-token-0123456789"
    with api_server(db_url, tmp_path, PGDAG_API_TOKEN=token) as base:
        assert httpx.get(f"{base}/metrics").status_code == 401
        r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "pgdag_steps_ready" in r.text


def test_a_replay_too_long_counts_a_resync(db_url: str, tmp_path: Path) -> None:
    with (
        api_server(db_url, tmp_path) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        r = client.post(
            "/runs", json={"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0}}]}
        )
        assert r.status_code == 201, r.text
        lag = "pgdag_live_listen_lag_seconds_count"
        seen = value(scrape(client), lag)
        # More events than a /ws replay sends (engine.ws.REPLAY_MAX_EVENTS), as setup.
        query(
            db_url,
            "INSERT INTO audit_log (run_id, event, detail)"
            " SELECT %(r)s, 'bench_filler', NULL FROM generate_series(1, 10001)",
            {"r": r.json()["id"]},
        )

        # Once this API's listener has read them all, /ws starts after them.
        def all_read() -> Samples | None:
            now = scrape(client)
            return now if value(now, lag) - seen >= 10_001 else None

        before = wait_for(all_read, what="the filler events through LISTEN")
        with connect(base.replace("http", "ws") + "/ws?after=0", proxy=None) as ws:
            assert '"hello"' in str(ws.recv(timeout=10))
            resync = str(ws.recv(timeout=30))
            assert '"resync"' in resync and "replay_too_long" in resync, resync[:200]
        after = scrape(client)
        name = "pgdag_websocket_resyncs_total"
        assert (
            value(after, name, reason="replay_too_long")
            - value(before, name, reason="replay_too_long")
            == 1
        )
