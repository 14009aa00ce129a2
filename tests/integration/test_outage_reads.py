"""During a Postgres outage the API's reads answer 503 within a bound instead of hanging,
and answer 200 again once Postgres is back, without restarting the API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.embedded import EmbeddedCluster
from engine.migrate import upgrade_head
from tests.pgfixtures import server_home
from tests.support import api_server, submit, wait_for

# The API waits POOL_TIMEOUT_S (5 s) for a pooled connection; allow scheduling slack on a
# shared machine, far below the 30 s the pool waited before.
READ_BOUND_S = 9.0


@pytest.fixture
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """A cluster of this test's own, since the test stops it."""
    cluster = EmbeddedCluster(server_home(tmp_path_factory, "outage-pg"))
    yield cluster
    cluster.stop()


def test_reads_answer_503_within_a_bound_then_200_when_postgres_is_back(
    own_cluster: EmbeddedCluster, tmp_path: Path
) -> None:
    url = own_cluster.start()
    upgrade_head(url)
    run_id = submit(url, {"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0}}]})
    reads = ["/runs", f"/runs/{run_id}", f"/runs/{run_id}/events", "/workers"]
    with api_server(url, tmp_path) as base:
        for path in reads:
            assert httpx.get(f"{base}{path}", timeout=10).status_code == 200, path
        own_cluster.stop()
        # The first reads meet the pool's dead connections, the later ones an empty pool.
        for path in reads:
            started = time.monotonic()
            r = httpx.get(f"{base}{path}", timeout=60)
            took = time.monotonic() - started
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.json()["error"] == "database_unavailable", r.text
            assert took < READ_BOUND_S, (path, took)
        own_cluster.start()
        for path in reads:
            wait_for(
                lambda p=path: httpx.get(f"{base}{p}", timeout=60).status_code == 200,
                timeout_s=60,
                what=f"GET {path} 200 again without an API restart",
            )
