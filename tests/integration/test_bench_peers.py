"""The peer drivers of `python -m benchmarks` run end to end at a tiny size: each installs its
peer's schema in an empty database, drains jobs with real worker processes, and measures
pickup latency. No assertion on speed. Peers come from the ``.[bench]`` extra; a peer that
is not installed (CI installs only ``.[dev]``) is skipped with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from benchmarks.peers import PEERS
from tests.pgfixtures import create_database, drop_database, unique_name


@pytest.fixture
def empty_db(pg_server_url: str) -> Iterator[str]:
    """A new empty database (peers install their own schema), dropped afterwards."""
    db = create_database(pg_server_url, unique_name("peer_"))
    try:
        yield db.url
    finally:
        drop_database(pg_server_url, db.name)


@pytest.fixture(params=sorted(PEERS))
def peer(request: pytest.FixtureRequest) -> ModuleType:
    module = PEERS[request.param]
    reason = module.available()
    if reason is not None:
        pytest.skip(f"{request.param} not installed (pip install -e '.[bench]'): {reason}")
    return module


def test_w1_drains_every_job(peer: ModuleType, empty_db: str) -> None:
    if peer is PEERS["dbos"]:
        pytest.skip("dbos: w1 is w2's code path with one step per workflow; w2 is tested below")
    r = peer.w1(empty_db, 60, processes=2)
    assert r["jobs"] == 60
    assert r["drainS"] > 0 and r["jobsPerS"] > 0
    assert r["config"] == peer.CONFIG and peer.VERSION in r["config"]
    if "cost" in r:  # WAL and commits around the drain (PgQueuer's, for W1's cost rows)
        cost = r["cost"]
        assert cost["walBytes"] > 0 and cost["walBytesPerJob"] == round(cost["walBytes"] / 60, 1)
        # every job is claimed and completed in committed transactions of at most a batch
        assert cost["commits"] >= 2 * 60 / peer.BATCH_SIZE, cost
        assert cost["monitorCommits"] > 0


def test_w3_measures_pickup_of_every_job(peer: ModuleType, empty_db: str) -> None:
    r = peer.w3(empty_db, 5, 50.0)
    assert r["n"] == 5
    assert 0 < r["p50Ms"] <= r["p99Ms"] <= r["maxMs"]


def test_dbos_w2_runs_three_steps_per_workflow(empty_db: str) -> None:
    dbos = PEERS["dbos"]
    if (reason := dbos.available()) is not None:
        pytest.skip(f"dbos not installed (pip install -e '.[bench]'): {reason}")
    r = dbos.w2(empty_db, 20, processes=2)
    assert r["workflows"] == 20 and r["steps"] == 60
    assert r["workflowsPerS"] > 0 and r["stepsPerS"] == pytest.approx(3 * r["workflowsPerS"], 0.01)
