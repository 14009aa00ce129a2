"""Helpers for integration tests: real worker and API processes, and waiting on conditions.

Nothing here sleeps to hide a race: `wait_for` polls a condition until a deadline and
fails with the last value seen.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], *, timeout_s: float = 30, interval_s: float = 0.05, what: str = ""
) -> T:
    """Poll `condition` until it returns a truthy value; return it. Fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(
        f"timed out after {timeout_s}s waiting for {what or condition}: last={last!r}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def base_env(db_url: str, **extra: str) -> dict[str, str]:
    """Environment for a child process on `db_url` with fast test timings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGDAG_")}
    env.update(
        {
            "DATABASE_URL": db_url,
            "PGDAG_LEASE_TTL": "2",
            "PGDAG_REAPER_INTERVAL": "0.2",
            "PGDAG_POLL_INTERVAL": "0.5",
            "PGDAG_BACKOFF_BASE_MS": "50",
            "PGDAG_BACKOFF_CAP_MS": "1000",
            "PGDAG_SHUTDOWN_GRACE": "2",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
    )
    env.update(extra)
    return env


class Proc:
    """A child process whose combined output goes to a log file we can show on failure.

    `argv` runs under this interpreter (``program``, default `sys.executable`); with
    ``program=None`` its first word is the program, looked up on the PATH of `env`.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        *,
        cwd: Path = ROOT,
        program: str | None = sys.executable,
    ) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.popen = subprocess.Popen(
            [program, *argv] if program else argv,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._fh.close()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


@contextmanager
def workers(
    db_url: str,
    tmp_path: Path,
    n: int = 1,
    *,
    concurrency: int = 4,
    id_prefix: str = "w",
    **env_extra: str,
) -> Iterator[list[Proc]]:
    """Run `n` worker processes (ids ``<id_prefix>0..``) on `db_url` during the block."""
    procs = [
        Proc(
            ["-m", "workers", "--concurrency", str(concurrency), "--worker-id", f"{id_prefix}{i}"],
            base_env(db_url, **env_extra),
            tmp_path / f"worker-{id_prefix}{i}.log",
        )
        for i in range(n)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


@contextmanager
def api_server(db_url: str, tmp_path: Path, **env_extra: str) -> Iterator[str]:
    """Run `python -m engine serve` on a free port; yields its base URL once healthy."""
    port = free_port()
    proc = Proc(
        ["-m", "engine", "serve", "--port", str(port)],
        base_env(db_url, **env_extra),
        tmp_path / "api.log",
    )
    base = f"http://127.0.0.1:{port}"
    headers = (
        {"Authorization": f"Bearer {env_extra['PGDAG_API_TOKEN']}"}
        if "PGDAG_API_TOKEN" in env_extra
        else {}
    )

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError("API exited:\n" + proc.output())
        try:
            return httpx.get(f"{base}/health", headers=headers, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, timeout_s=30, what="API health")
        yield base
    finally:
        proc.stop()


def query(db_url: str, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run one query on a fresh connection; returns rows as dicts."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params or {})  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def submit(db_url: str, body: dict[str, Any]) -> str:
    """Submit a run straight through the engine (no API process); returns its id."""
    import asyncio

    from engine.dag import parse_run
    from engine.db import open_pool
    from engine.store import Store
    from engine.tools import load_tool_modules

    load_tool_modules(["workers.tools.builtin"])
    spec = parse_run(body, max_steps=100_000)

    async def go() -> str:
        pool = await open_pool(db_url, min_size=1, max_size=1)
        try:
            run_id, _ = await Store(pool, lease_ttl_s=30).create_run(spec)
            return run_id
        finally:
            await pool.close()

    return asyncio.run(go())


def random_delay_dag(
    n: int, lo_ms: int, hi_ms: int, *, seed: int, dep_share: float = 0.5
) -> dict[str, Any]:
    """A run of `n` DELAY steps of `lo_ms`..`hi_ms`; about `dep_share` of them depend on one
    earlier step. Seeded, so a test sees the same graph every time."""
    rng = random.Random(seed)
    steps = []
    for i in range(n):
        deps = [f"s{rng.randrange(i)}"] if i and rng.random() < dep_share else []
        steps.append(
            {
                "name": f"s{i}",
                "tool": "DELAY",
                "input": {"ms": rng.randint(lo_ms, hi_ms)},
                "dependsOn": deps,
                "maxAttempts": 20,
            }
        )
    return {"steps": steps}


def run_status(db_url: str, run_id: str) -> str:
    rows = query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})
    return str(rows[0]["status"])


def wait_run_finished(db_url: str, run_id: str, timeout_s: float = 60) -> str:
    """Wait until the run is completed, failed or cancelled; return that status."""
    return wait_for(
        lambda: (s := run_status(db_url, run_id)) in ("completed", "failed", "cancelled") and s,
        timeout_s=timeout_s,
        what=f"run {run_id} to finish",
    )


def steps_by_name(db_url: str, run_id: str) -> dict[str, dict[str, Any]]:
    rows = query(db_url, "SELECT * FROM steps WHERE run_id = %(id)s ORDER BY id", {"id": run_id})
    return {r["name"]: r for r in rows}


def events(db_url: str, run_id: str) -> list[dict[str, Any]]:
    return query(
        db_url, "SELECT * FROM audit_log WHERE run_id = %(id)s ORDER BY id", {"id": run_id}
    )
