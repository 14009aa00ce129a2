"""The engine under network faults: real worker processes reach Postgres only through a
`chaos.proxy.TcpProxy` that cuts or stalls every connection mid-run. Tests submit and
observe through the direct URL. A run must complete, the invariant checker must find
nothing, and every step must be recorded as succeeded exactly once."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from chaos.checker import check_database
from chaos.proxy import TcpProxy, proxied_url
from tests.support import (
    Proc,
    events,
    query,
    random_delay_dag,
    steps_by_name,
    submit,
    wait_for,
    workers,
)

LEASE_TTL_S = 2.0  # what tests/support.py gives worker processes (PGDAG_LEASE_TTL)
# Deadlines only bound a failing test; a passing one takes ~7 s. The first wait includes
# starting two worker processes, which is slow on a loaded machine.
STARTUP_TIMEOUT_S = 45.0
RUN_TIMEOUT_S = 30.0


def target(db_url: str) -> tuple[str, int]:
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    return str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)


def delay_run(n: int, lo_ms: int, hi_ms: int, seed: int) -> dict[str, Any]:
    """`n` DELAY steps of `lo_ms`..`hi_ms`, about a third depending on an earlier step."""
    return {
        "goal": "network faults",
        **random_delay_dag(n, lo_ms, hi_ms, seed=seed, dep_share=0.35),
    }


def succeeded(db_url: str, run_id: str) -> int:
    rows = query(
        db_url,
        "SELECT count(*) AS n FROM steps WHERE run_id = %(id)s AND status = 'succeeded'",
        {"id": run_id},
    )
    return int(rows[0]["n"])


def db_now(db_url: str) -> Any:
    return query(db_url, "SELECT now() AS t")[0]["t"]


def wait_workers_recovered(db_url: str, procs: list[Proc], ids: list[str], since: Any) -> None:
    """Every worker process is alive and has written a heartbeat after `since` (database
    clock), so its connection pool came back after the fault."""

    def recovered() -> bool:
        dead = [p.log.name for p in procs if p.popen.poll() is not None]
        assert not dead, f"worker(s) died under the fault: {dead}"
        rows = query(
            db_url,
            "SELECT count(*) AS n FROM workers"
            " WHERE id = ANY(%(ids)s) AND last_heartbeat_at > %(since)s",
            {"ids": ids, "since": since},
        )
        return int(rows[0]["n"]) == len(ids)

    wait_for(recovered, timeout_s=RUN_TIMEOUT_S, what=f"workers {ids} to heartbeat again")


def assert_clean_exit(procs: list[Proc]) -> None:
    codes = {p.log.name: p.popen.returncode for p in procs}
    assert all(c == 0 for c in codes.values()), codes


def run_status(db_url: str, run_id: str) -> str:
    rows = query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})
    return str(rows[0]["status"])


@contextmanager
def logs_on_failure(procs: list[Proc]) -> Iterator[None]:
    """Append the workers' output to an AssertionError raised in the block."""
    try:
        yield
    except AssertionError as exc:
        tails = "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in procs)
        raise AssertionError(f"{exc}\n{tails}") from None


def wait_completed(db_url: str, run_id: str) -> None:
    wait_for(
        lambda: run_status(db_url, run_id) in ("completed", "failed", "cancelled"),
        timeout_s=RUN_TIMEOUT_S,
        what=f"run {run_id} to finish",
    )
    assert run_status(db_url, run_id) == "completed"


def assert_invariants(db_url: str, run_id: str) -> None:
    """The checker finds no violation and every step succeeded exactly once."""
    with psycopg.connect(db_url) as conn:
        report = check_database(conn, [run_id])
    assert report.ok, "\n".join(f"{v.kind} {v.step}: {v.detail}" for v in report.violations)
    counts = collections.Counter(
        e["step_name"] for e in events(db_url, run_id) if e["event"] == "step_succeeded"
    )
    names = set(steps_by_name(db_url, run_id))
    assert set(counts) == names, names ^ set(counts)
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}


@pytest.fixture
def proxy(db_url: str) -> Iterator[TcpProxy]:
    with TcpProxy(*target(db_url)) as p:
        yield p


def test_run_completes_through_three_connection_drops(
    db_url: str, tmp_path: Path, proxy: TcpProxy
) -> None:
    run_id = submit(db_url, delay_run(60, 100, 300, seed=11))
    url = proxied_url(db_url, proxy.port)
    with workers(url, tmp_path, 2, id_prefix="drop") as procs, logs_on_failure(procs):
        for at_least in (10, 25, 40):
            wait_for(
                lambda n=at_least: succeeded(db_url, run_id) >= n,
                timeout_s=STARTUP_TIMEOUT_S if at_least == 10 else RUN_TIMEOUT_S,
                what=f"{at_least} steps to succeed",
            )
            assert proxy.drop_all() > 0, "no worker connection was open to drop"
        wait_workers_recovered(db_url, procs, ["drop0", "drop1"], since=db_now(db_url))
        wait_completed(db_url, run_id)
    assert_clean_exit(procs)
    assert proxy.dropped >= 3
    assert_invariants(db_url, run_id)


def test_run_completes_after_a_stall_longer_than_the_lease_ttl(
    db_url: str, tmp_path: Path, proxy: TcpProxy
) -> None:
    run_id = submit(db_url, delay_run(60, 100, 300, seed=12))
    url = proxied_url(db_url, proxy.port)
    with workers(url, tmp_path, 2, id_prefix="stall") as procs, logs_on_failure(procs):
        wait_for(
            lambda: succeeded(db_url, run_id) >= 15,
            timeout_s=STARTUP_TIMEOUT_S,
            what="15 steps to succeed",
        )
        proxy.stall(True)
        stalled_at = time.monotonic()
        try:
            running = query(
                db_url,
                "SELECT count(*) AS n FROM steps WHERE run_id = %(id)s AND status = 'running'",
                {"id": run_id},
            )[0]["n"]
            assert running > 0, "no step was running when the stall began"
            # The fault lasts longer than the lease TTL and until every lease the workers
            # hold has expired on the database clock: no heartbeat gets through, and no
            # reaper either, since every worker is behind the proxy.
            wait_for(
                lambda: (
                    time.monotonic() - stalled_at > LEASE_TTL_S
                    and query(
                        db_url,
                        "SELECT count(*) = 0 AS ok FROM steps WHERE run_id = %(id)s"
                        " AND status = 'running' AND lease_expires_at > now()",
                        {"id": run_id},
                    )[0]["ok"]
                ),
                timeout_s=LEASE_TTL_S + 5,
                what="the lease TTL to pass and every lease to expire during the stall",
            )
        finally:
            proxy.stall(False)
        wait_workers_recovered(db_url, procs, ["stall0", "stall1"], since=db_now(db_url))
        wait_completed(db_url, run_id)
    assert_clean_exit(procs)
    expired = [e for e in events(db_url, run_id) if e["event"] == "step_lease_expired"]
    assert expired, "no lease was reaped after the stall"
    assert_invariants(db_url, run_id)
