"""What every workload of ``python -m benchmarks`` shares: scratch databases, child
processes, the machine's description, percentiles."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from engine.migrate import upgrade_head

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def db_url(base: str, name: str) -> str:
    """`base` (any libpq conninfo or URL) with its database replaced by `name`."""
    info = psycopg.conninfo.conninfo_to_dict(base)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def _drop(base: str, name: str) -> None:
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextmanager
def scratch_db(base: str, name: str, *, migrate: bool = True) -> Iterator[str]:
    """A freshly created database `name` (pgdag's migrations applied when `migrate`),
    dropped on exit. Yields its URL."""
    _drop(base, name)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = db_url(base, name)
    if migrate:
        upgrade_head(url)
    try:
        yield url
    finally:
        _drop(base, name)


def child_env(url: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's child process: `url` as DATABASE_URL."""
    return {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT), **extra}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def processes(
    argvs: list[list[str]], env: dict[str, str], *, log_dir: Path | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``python <argv>`` for each argv, SIGTERMed (then killed after 20 s) on exit. Their
    output is discarded, or with `log_dir` written to ``<log_dir>/<i>.log`` (stdout and
    stderr together; see `log_tail`)."""
    logs = []
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        logs = [(log_dir / f"{i}.log").open("wb") for i in range(len(argvs))]
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=env,
            cwd=ROOT,
            stdout=logs[i] if logs else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if logs else subprocess.DEVNULL,
        )
        for i, argv in enumerate(argvs)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


def log_tail(log_dir: Path, lines: int = 20) -> str:
    """The last `lines` lines of each ``<log_dir>/*.log`` that `processes` wrote."""
    parts = []
    for path in sorted(log_dir.glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {path.name}\n" + "\n".join(tail))
    return "\n".join(parts)


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid` in MiB (Linux /proc), 0.0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc), 0.0 if it is
    gone: how much of the 2 cores a drain cost each process, steadier than its rate."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def parent_pid(pid: int) -> int:
    """The parent of process `pid` (Linux /proc), 0 if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def postgres_cpu_s(postmaster: int) -> float:
    """CPU seconds used so far by the postmaster `postmaster` and every process it started
    that is still alive (backends, WAL writer, checkpointer, autovacuum): a server on this
    machine only. Backends that exited took their CPU time with them."""
    total = cpu_s(postmaster)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_pid(int(entry.name)) == postmaster:
            total += cpu_s(int(entry.name))
    return total


def wait_until(
    check: Callable[[], T | None], *, timeout_s: float, what: str, interval_s: float = 0.02
) -> T:
    """Call `check` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark: gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def percentile(values: list[float], q: float) -> float:
    """The `q`-quantile (0..1) of `values` by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def machine(base: str) -> dict[str, Any]:
    """Cores, Python, the Postgres version and the settings that decide commit speed."""
    names = (
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "shared_buffers",
        "max_connections",
        "autovacuum",
    )
    with psycopg.connect(base) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        settings = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # type: ignore[index]
            for name in names
        }
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "postgres": version,
        "settings": settings,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cost_counters(stats: psycopg.Connection[Any], dbname: str) -> tuple[int, int]:
    """``(pg_stat_wal.wal_bytes, pg_stat_database.xact_commit of dbname)`` as now read."""
    row = stats.execute(
        "SELECT (SELECT wal_bytes FROM pg_stat_wal)::bigint,"
        " (SELECT xact_commit FROM pg_stat_database WHERE datname = %s)",
        (dbname,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1] or 0)


class CostMeter:
    """WAL bytes and commits a drain cost: `before()` after the enqueue, `after()` once the
    drain's processes have exited; `per_job` divides the deltas.

    ``wal_bytes`` is `pg_stat_wal`'s (cluster-wide: it includes whatever else wrote WAL
    meanwhile: the drain's API and maintenance, autovacuum, and any other database of the
    cluster); ``commits`` is `pg_stat_database.xact_commit` of the drain's database only
    (read-only transactions count too). Backends report their counters lazily (PG 15+: at
    most once a second while busy, and when they exit, before they leave
    `pg_stat_activity`), so each reading first waits until no client backend is connected
    to the database: what every exited backend did is then counted. The readings are made
    over a connection to `base`'s database, so they add nothing to `dbname`'s commits; the
    caller passes how many transactions its own monitoring connection to `dbname` ran in
    between (`monitor_commits`: one per autocommit query, plus one for the connection's
    start-up), which are subtracted. `url` is the drain's database;
    the readings connect to the same server's ``postgres`` database, or to `stats_url`."""

    def __init__(self, url: str, stats_url: str | None = None) -> None:
        self.dbname = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
        self.base = stats_url or db_url(url, "postgres")
        self._before: tuple[int, int] | None = None

    def _read(self, timeout_s: float) -> tuple[int, int]:
        with psycopg.connect(self.base, autocommit=True) as stats:
            wait_until(
                lambda: stats.execute(
                    "SELECT count(*) = 0 FROM pg_stat_activity"
                    " WHERE datname = %s AND backend_type = 'client backend'",
                    (self.dbname,),
                ).fetchone()[0],  # type: ignore[index]
                timeout_s=timeout_s,
                what=f"every connection to {self.dbname} to close (its stats flushed)",
            )
            return _cost_counters(stats, self.dbname)

    def before(self, timeout_s: float = 30) -> None:
        """Take the first reading; raise TimeoutError if connections stay open `timeout_s`."""
        self._before = self._read(timeout_s)

    def after(self, jobs: int, monitor_commits: int = 0, timeout_s: float = 30) -> dict[str, Any]:
        """The second reading: ``walBytes`` and ``commits`` deltas (commits less
        `monitor_commits`), and both per job (``walBytesPerJob``, ``commitsPerJob``)."""
        assert self._before is not None, "CostMeter.before() first"
        wal, commits = self._read(timeout_s)
        d_wal = wal - self._before[0]
        d_commits = commits - self._before[1] - monitor_commits
        return {
            "walBytes": d_wal,
            "commits": d_commits,
            "monitorCommits": monitor_commits,
            "walBytesPerJob": round(d_wal / jobs, 1) if jobs else None,
            "commitsPerJob": round(d_commits / jobs, 3) if jobs else None,
        }
