"""Postgres restarted mid-run: workers and the API reconnect by themselves, the run
completes with every step succeeded exactly once, and /health says 503 while it is down."""

from __future__ import annotations

import collections
from pathlib import Path

import httpx
import pytest

from engine.embedded import EmbeddedCluster
from engine.migrate import upgrade_head
from tests.pgfixtures import server_home
from tests.support import api_server, events, query, submit, wait_for, wait_run_finished, workers


@pytest.fixture
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedCluster:
    """A cluster of this test's own, since the test restarts it."""
    cluster = EmbeddedCluster(server_home(tmp_path_factory, "restart-pg"))
    yield cluster  # type: ignore[misc]
    cluster.stop()


def test_workers_and_api_survive_postgres_restart(
    own_cluster: EmbeddedCluster, tmp_path: Path
) -> None:
    url = own_cluster.start()
    upgrade_head(url)
    body = {
        "steps": [{"name": "root", "tool": "DELAY", "input": {"ms": 0}}]
        + [
            {"name": f"s{i}", "tool": "DELAY", "input": {"ms": 150}, "dependsOn": ["root"]}
            for i in range(40)
        ]
        + [
            {
                "name": "join",
                "tool": "DELAY",
                "input": {"ms": 0},
                "dependsOn": [f"s{i}" for i in range(40)],
            }
        ]
    }
    run_id = submit(url, body)
    with api_server(url, tmp_path) as base, workers(url, tmp_path, n=2, concurrency=4):
        wait_for(
            lambda: (
                query(url, "SELECT count(*) AS n FROM steps WHERE status = 'succeeded'")[0]["n"]
                >= 5
            ),
            what="some progress before the restart",
        )
        own_cluster.stop()
        r = httpx.get(f"{base}/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        own_cluster.start()
        wait_for(
            lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200,
            what="API health again",
        )
        assert wait_run_finished(url, run_id, timeout_s=90) == "completed"
    succeeded = collections.Counter(
        e["step_name"] for e in events(url, run_id) if e["event"] == "step_succeeded"
    )
    assert len(succeeded) == 42 and set(succeeded.values()) == {1}
