"""``python -m workers`` and the ``pgdag-worker`` console script: run one worker process
until SIGTERM/SIGINT, on Postgres (`workers.database.DatabaseBackend`) or, with ``--server
URL``, as an agent of the API (`workers.agent.AgentBackend`, no ``DATABASE_URL``); with
``--processes N``, N of them under a supervisor."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import sys

from engine import metrics
from engine.cli import program_name
from engine.config import Settings
from engine.db import open_pool, resolve_database_url
from engine.errors import ConfigError, PgdagError, SchemaNotCurrent
from engine.gcpause import freeze_startup_heap
from engine.logs import LOG_FORMATS, configure_logging
from engine.schema import schema_problem
from engine.startup import wait_for_postgres
from engine.store import Pool, Store
from engine.tools import load_tool_modules
from workers.agent import AgentBackend, AgentSettings
from workers.agent_log import AgentLog
from workers.database import DatabaseBackend
from workers.tools import BUILTIN_TOOL_MODULES
from workers.worker import CrashPlan, Worker, default_worker_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; each setting flag overrides its environment variable."""
    p = argparse.ArgumentParser(prog=program_name("workers"), description="Run a pgdag worker.")
    p.add_argument("--concurrency", type=int, default=4, help="steps run at once (default 4)")
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="run N worker processes under a supervisor that restarts any that exits "
        "(each with these flags; --worker-id BASE becomes BASE-1..BASE-N)",
    )
    p.add_argument("--worker-id", default=None, help="worker id (default <hostname>-<pid>)")
    p.add_argument("--database-url", default=None, help="overrides DATABASE_URL")
    agent = p.add_argument_group(
        "agent (reach only the API, no DATABASE_URL: docs/agents.md)",
    )
    agent.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="run as an agent of the API at URL (PGDAG_SERVER) instead of on Postgres",
    )
    agent.add_argument(
        "--token",
        default=None,
        help="the agent's API token, scope agent (PGDAG_AGENT_TOKEN); visible in ps: "
        "prefer the variable",
    )
    agent.add_argument(
        "--agent-log",
        default=None,
        metavar="PATH",
        help="the agent's idempotency log, a SQLite file (default "
        "~/.pgdag/agent-<worker id>.sqlite3); {agentId} in PATH is replaced by the worker id",
    )
    p.add_argument("--lease-ttl", type=float, default=None, help="seconds; PGDAG_LEASE_TTL")
    p.add_argument(
        "--http-allow-private",
        action="store_const",
        const=True,
        default=None,
        help="let HTTP_GET_JSON reach private addresses; PGDAG_HTTP_ALLOW_PRIVATE=1",
    )
    p.add_argument(
        "--db-wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds to wait at start-up for Postgres to answer (inf: for ever); "
        "PGDAG_DB_WAIT (default 30)",
    )
    p.add_argument(
        "--max-output-bytes",
        type=int,
        default=None,
        help="cap on a step's output as JSON text, in bytes; PGDAG_MAX_OUTPUT_BYTES "
        "(default 8 MiB)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (default 0: off); with --processes N "
        "the children take PORT..PORT+N-1",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address /metrics listens on (default 127.0.0.1)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    p.add_argument(
        "--log-format",
        default=None,
        choices=LOG_FORMATS,
        help="console (default, for people) or json (one object per line); PGDAG_LOG_FORMAT",
    )
    test_only = p.add_argument_group(
        "fault injection (TEST ONLY: these flags crash the worker on purpose)"
    )
    test_only.add_argument(
        "--kill-after",
        type=float,
        default=None,
        metavar="S",
        help="SIGKILL this process S seconds after start",
    )
    test_only.add_argument(
        "--random-failures",
        type=float,
        default=None,
        metavar="P",
        help="each attempt SIGKILLs the process with probability P, before, during or after "
        "its tool runs (after: before the result is recorded)",
    )
    test_only.add_argument("--crash-seed", type=int, default=None, help="seed for the draws")
    args = p.parse_args(argv)
    if args.random_failures is not None and not 0 <= args.random_failures <= 1:
        p.error("--random-failures must be between 0 and 1")
    if args.processes is not None and args.processes < 1:
        p.error("--processes must be >= 1")
    if args.kill_after is not None and args.kill_after < 0:
        p.error("--kill-after must be >= 0 seconds")
    if not 0 <= args.metrics_port <= 65535:
        p.error("--metrics-port must be between 0 and 65535")
    return args


def serve_metrics(args: argparse.Namespace) -> None:
    """Serve ``/metrics`` on ``--metrics-host``:``--metrics-port`` when the port is not 0
    (`engine.metrics.serve`). Raises `ConfigError` when the address cannot be bound."""
    if not args.metrics_port:
        return
    try:
        port = metrics.serve(args.metrics_port, args.metrics_host)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc} "
            "(--metrics-port, --metrics-host)"
        ) from None
    logging.getLogger("workers").info("metrics on http://%s:%d/metrics", args.metrics_host, port)


async def open_worker_pool(url: str, *, max_size: int) -> Pool:
    """Open the worker's pool on a database already known to answer (`wait_for_postgres`)
    and refuse one whose schema is not at this package's head: `SchemaNotCurrent`, with the
    advice to run ``python -m engine migrate`` (the worker does not wait for a migration:
    the migrating step belongs before it, as in docker-compose.yml)."""
    pool = await open_pool(url, min_size=2, max_size=max_size, name="worker")
    try:
        async with pool.connection() as conn:
            problem = await schema_problem(conn)
    except BaseException:
        await pool.close()
        raise
    if problem is not None:
        await pool.close()
        raise SchemaNotCurrent(problem)
    return pool


async def amain(args: argparse.Namespace) -> None:
    """Resolve settings and the database, then run the worker to completion."""
    settings = Settings.from_env(
        database_url=args.database_url,
        lease_ttl_s=args.lease_ttl,
        http_allow_private=args.http_allow_private,
        db_wait_s=args.db_wait,
        max_output_bytes=args.max_output_bytes,
    )
    load_tool_modules((*BUILTIN_TOOL_MODULES, *settings.tool_modules))
    serve_metrics(args)
    agent = AgentSettings.from_env(server=args.server, token=args.token, agent_log=args.agent_log)
    if agent.server is not None:
        await run_agent(args, settings, agent)
        return
    url = await asyncio.to_thread(resolve_database_url, settings)
    await wait_for_postgres(url, wait_s=settings.db_wait_s)
    # Successes share one writer (SuccessBatcher); failures and "idempotent": false results
    # take a connection each, so a few more than the concurrency rarely helps.
    pool = await open_worker_pool(url, max_size=min(args.concurrency, 16) + 4)
    try:
        backend = DatabaseBackend(
            Store(pool, lease_ttl_s=settings.lease_ttl_s),
            settings,
            database_url=url,
            worker_id=args.worker_id or default_worker_id(),
            restarts=settings.restarts,
            last_exit_code=settings.last_exit_code,
        )
        worker = Worker(
            backend,
            settings,
            concurrency=args.concurrency,
            crash_plan=(
                CrashPlan(args.random_failures, args.crash_seed) if args.random_failures else None
            ),
        )
        await _run(worker, args)
    finally:
        await pool.close()


async def _run(worker: Worker, args: argparse.Namespace) -> None:
    worker.install_signal_handlers()
    freeze_startup_heap()  # what start-up built is never walked by the collector again
    if args.kill_after is not None:
        asyncio.get_running_loop().call_later(args.kill_after, os.kill, os.getpid(), signal.SIGKILL)
    await worker.run()


async def run_agent(args: argparse.Namespace, settings: Settings, agent: AgentSettings) -> None:
    """Run the worker as an agent of the API at ``agent.server`` (no database). Raises
    `ConfigError` when the idempotency log cannot be opened, `AgentRefused` when the API
    refuses the token."""
    assert agent.server is not None
    worker_id = args.worker_id or default_worker_id()
    path = agent.log_path(worker_id)
    try:
        log = await asyncio.to_thread(AgentLog, path)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open the agent log {path}: {exc}") from None
    if args.worker_id is None:
        logging.getLogger("workers").warning(
            "agent id %s includes the pid: after a restart its log %s is not found again; "
            "pass --worker-id (or --agent-log) to keep one",
            worker_id,
            path,
        )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    backend = AgentBackend(
        agent.server,
        worker_id=worker_id,
        log=log,
        token=agent.token,
        restarts=settings.restarts,
        last_exit_code=settings.last_exit_code,
        max_body_bytes=settings.max_body_bytes,
    )
    logging.getLogger("workers").info("agent %s: API %s, log %s", worker_id, agent.server, log.path)
    try:
        worker = Worker(
            backend,
            settings,
            concurrency=args.concurrency,
            crash_plan=(
                CrashPlan(args.random_failures, args.crash_seed) if args.random_failures else None
            ),
        )
        await _run(worker, args)
    finally:
        await backend.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        configure_logging(args.log_level, Settings.from_env(log_format=args.log_format).log_format)
    except PgdagError as exc:
        sys.stderr.write(f"pgdag: error: {exc}\n")
        return 2
    if args.processes is not None:
        from workers.supervisor import supervise

        return supervise(sys.argv[1:] if argv is None else argv, args.processes)
    try:
        asyncio.run(amain(args))
    except PgdagError as exc:  # bad configuration: one line, no traceback, never a password
        sys.stderr.write(f"pgdag: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
