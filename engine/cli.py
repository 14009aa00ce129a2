"""``pgdag`` and ``python -m engine``: dev, serve, migrate, db start|stop|status|url, token
create|list|revoke, submit and watch.

This module is the engine's half of the program: it knows the engine alone. What `serve`
serves is handed in by the program that runs it (`main`'s `app_factory`): ``engine.__main__``
composes the API with the dashboard and the built-in tools.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from engine.config import API_HOST_DEFAULT, API_PORT_DEFAULT, Settings, parse_list
from engine.errors import PgdagError
from engine.logs import LOG_FORMATS, configure_logging
from engine.supervisor import KILL_MARGIN_S, Supervisor
from engine.tokens import generate_token
from engine.transitions import TERMINAL_RUN_STATES

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from engine.embedded import EmbeddedCluster

WS_MAX_MESSAGE_BYTES = 64 * 1024  # the largest frame a WebSocket client may send the API


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        database_url=getattr(args, "database_url", None),
        lease_ttl_s=getattr(args, "lease_ttl", None),
        api_token=getattr(args, "api_token", None),
        live_queue_max_events=getattr(args, "live_queue", None),
        live_stall_s=getattr(args, "live_stall", None),
        allowed_hosts=_list_flag(getattr(args, "allowed_hosts", None)),
        cors_origins=_list_flag(getattr(args, "cors_origins", None)),
        db_wait_s=getattr(args, "db_wait", None),
        agent_max_wait_s=getattr(args, "agent_max_wait", None),
        log_format=getattr(args, "log_format", None),
    )


def _list_flag(raw: str | None) -> tuple[str, ...] | None:
    """A comma-separated flag as a tuple; None (not given) leaves the environment's value."""
    return None if raw is None else parse_list(raw)


def _database_url(settings: Settings) -> str:
    """`resolve_database_url`, then proof that Postgres answers and takes our credentials
    (waiting up to `settings.db_wait_s`). Raises `DatabaseUnavailable` in words."""
    from engine.db import resolve_database_url
    from engine.startup import wait_for_postgres

    url = resolve_database_url(settings)
    asyncio.run(wait_for_postgres(url, wait_s=settings.db_wait_s))
    return url


# --- serve / migrate / db ---------------------------------------------------------------


class AppFactory(Protocol):
    """Builds the ASGI app `serve` runs: `settings` as read from the environment and flags,
    `database_url` already known to answer, `bound` the (host, port) listened on.
    `engine.api.create_app` has this shape (the engine's API alone)."""

    def __call__(
        self, settings: Settings, *, database_url: str, bound: tuple[str, int]
    ) -> ASGIApp: ...


def engine_app(settings: Settings, *, database_url: str, bound: tuple[str, int]) -> ASGIApp:
    """The engine's API alone (no dashboard, only the tools ``PGDAG_TOOLS`` names): the
    `AppFactory` of `main` when its caller composes nothing more."""
    from engine.api import create_app

    return create_app(settings, database_url=database_url, bound=bound)


def cmd_serve(args: argparse.Namespace, *, app_factory: AppFactory) -> int:
    """Run the app `app_factory` builds (the API and its reaper, plus what the program
    composed into it) with uvicorn until interrupted."""
    import uvicorn

    settings = _settings(args)
    url = _database_url(settings)  # bad configuration ends here, in one line
    uvicorn.run(
        app_factory(settings, database_url=url, bound=(args.host, args.port)),
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        # uvicorn's lines go through the process's logging (engine.logs), in its format.
        log_config=None,
        access_log=args.access_log,
        # Every event frame goes to many clients: compressing it per connection would cost
        # more CPU than sending it. Clients send nothing worth more than a few bytes.
        ws_per_message_deflate=False,
        ws_max_size=WS_MAX_MESSAGE_BYTES,
        # On SIGTERM, requests still running after PGDAG_SHUTDOWN_GRACE seconds are
        # cancelled: an agent's long-poll (up to PGDAG_AGENT_MAX_WAIT) must not hold a
        # restart for its whole wait. The agent sees the connection close and claims again.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply migrations to DATABASE_URL (or the embedded cluster, which is started)."""
    from engine.migrate import upgrade_head

    settings = _settings(args)
    url = _database_url(settings)  # the embedded path migrates as it starts
    if settings.database_url:
        upgrade_head(url)
    print("migrations applied: schema is at head")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Manage the embedded cluster under PGDAG_HOME."""
    from engine.db import resolve_database_url
    from engine.embedded import EmbeddedCluster

    settings = _settings(args)
    cluster = EmbeddedCluster.from_settings(settings)
    embedded = replace(settings, database_url=None)  # db always means the embedded cluster
    if args.action == "start":
        url = resolve_database_url(embedded)
        print(f"embedded postgres running; data in {cluster.data_dir}")
        _say_if_relocated(cluster)
        print(url)
        return 0
    if args.action == "stop":
        print("stopped" if cluster.stop() else "not running")
        return 0
    if args.action == "status":
        status = cluster.status()
        print(json.dumps(status, indent=2, default=str))
        return 0 if status.get("running") else 3
    # url: start it if needed, so `export DATABASE_URL=$(python -m engine db url)` works
    print(resolve_database_url(embedded))
    return 0


def _say_if_relocated(cluster: EmbeddedCluster) -> None:
    """Tell the user when the data is not under PGDAG_HOME (root, and the server's OS user
    cannot reach it)."""
    if cluster.relocated:
        print(
            f"  note: the server's OS user cannot reach {cluster.home}, so the data lives in "
            f"{cluster.server_dir} (see cluster.json)"
        )


# --- dev ------------------------------------------------------------------------------------


def example_run(api: str) -> dict[str, Any]:
    """The example run `dev` submits: HTTP_GET_JSON against the local API, DELAYs, a join."""
    return {
        "goal": "Example: check the API, think in parallel, summarize",
        "steps": [
            {"name": "health", "tool": "HTTP_GET_JSON", "input": {"url": f"{api}/health"}},
            {
                "name": "list-workers",
                "tool": "HTTP_GET_JSON",
                "input": {"url": f"{api}/workers"},
                "dependsOn": ["health"],
            },
            {"name": "think-a", "tool": "DELAY", "input": {"ms": 700}, "dependsOn": ["health"]},
            {"name": "think-b", "tool": "DELAY", "input": {"ms": 1200}, "dependsOn": ["health"]},
            {
                "name": "summarize",
                "tool": "DELAY",
                "input": {"ms": 300},
                "dependsOn": ["list-workers", "think-a", "think-b"],
            },
        ],
    }


def _client_host(bind: str) -> str:
    """Where a local client reaches a server bound to `bind`: a wildcard bind (0.0.0.0,
    ::) is reached on loopback, a name the API always answers to (`engine.guards`)."""
    if bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind in ("::", "[::]"):
        return "[::1]"
    return f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, *argv],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_healthy(client: httpx.Client, api: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise PgdagError("the API exited during start-up:\n" + "\n".join(tail))
        try:
            if client.get(f"{api}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise PgdagError(f"the API did not become healthy within 60 s; see {log}")


def follow_run(
    client: httpx.Client, api: str, run_id: str, *, out: Any = sys.stdout
) -> dict[str, Any]:
    """Print each audit-log event of the run as it happens; return the finished run."""
    from engine.watch import describe  # the line format `watch` prints too

    started = time.monotonic()
    after = 0
    while True:
        events = client.get(f"{api}/runs/{run_id}/events", params={"after": after}).json()["events"]
        for event in events:
            after = event["id"]
            print(f"  +{time.monotonic() - started:5.2f}s  {describe(event)}", file=out, flush=True)
        if events and events[-1]["event"] in {f"run_{s}" for s in TERMINAL_RUN_STATES}:
            run: dict[str, Any] = client.get(f"{api}/runs/{run_id}").json()
            return run
        time.sleep(0.1)


def _start_dev_workers(
    settings: Settings, env: dict[str, str], logs: Path
) -> tuple[Supervisor, threading.Thread]:
    """Two workers, ``dev-worker-1`` and ``dev-worker-2`` (logs ``worker-<i>.log``), under
    a `Supervisor` run in a thread: one that dies is restarted with backoff, and its exit
    and restart are printed to the terminal (the log says why it died). When the
    supervisor gives up (a configuration error), dev stops itself with SIGTERM."""

    def say(line: str) -> None:
        print(f"  workers     {line} (logs {logs}/worker-*.log)", flush=True)

    supervisor = Supervisor(
        [["-m", "workers", "--concurrency", "4", "--worker-id", f"dev-worker-{i}"] for i in (1, 2)],
        settings,
        env=env,
        output=lambda i: (logs / f"worker-{i}.log").open("ab"),
        notify=say,
        labels=[f"dev-worker-{i}" for i in (1, 2)],
    )

    def run() -> None:
        asyncio.run(supervisor.run())
        if supervisor.gave_up is not None:  # no workers left: the example run would wait
            print("  workers     none left running; stopping dev", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="dev-workers", daemon=True)
    thread.start()
    return supervisor, thread


def _live_tokens(url: str) -> int:
    """How many live scoped tokens the database at `url` holds."""
    import asyncio

    from engine.db import open_pool
    from engine.tokens import TokenStore

    async def count() -> int:
        pool = await open_pool(url, min_size=1, max_size=1, name="dev")
        try:
            return await TokenStore(pool).count_live()
        finally:
            await pool.close()

    return asyncio.run(count())


def cmd_dev(args: argparse.Namespace) -> int:
    """Embedded Postgres + API + two workers, one example run followed live; then serve.

    When the database holds live scoped tokens and ``PGDAG_API_TOKEN`` is not set, the API
    it starts gets a random ``PGDAG_API_TOKEN`` for this session (an admin token that is
    never stored), which dev's own requests carry; it says so."""
    from engine.embedded import EmbeddedCluster

    settings = _settings(args)
    home = settings.home.resolve()
    cluster = None if settings.database_url else EmbeddedCluster.from_settings(settings)
    was_running = bool(cluster and cluster.status().get("running"))
    print("pgdag dev: starting")
    t0 = time.monotonic()
    url = _database_url(settings)
    where = "DATABASE_URL" if cluster is None else f"embedded, data in {cluster.data_dir}"
    print(f"  postgres    ready ({where}) in {time.monotonic() - t0:.1f}s; schema migrated")
    if cluster is not None:
        _say_if_relocated(cluster)

    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DATABASE_URL": url, "PGDAG_HTTP_ALLOW_PRIVATE": "1"}
    env["PGDAG_LOG_FORMAT"] = settings.log_format  # the children log as dev was told to
    # The flags reach `serve` through its environment (each flag has its variable).
    env["PGDAG_ALLOWED_HOSTS"] = ",".join(settings.allowed_hosts)
    env["PGDAG_CORS_ORIGINS"] = ",".join(settings.cors_origins)
    api = f"http://{_client_host(args.host)}:{args.port}"
    api_token = settings.api_token
    if api_token is None:
        live = _live_tokens(url)
        if live:
            # The API will want a token and dev has none of the database's (only their
            # hashes are kept): its API gets a PGDAG_API_TOKEN of this session, never stored.
            api_token = env["PGDAG_API_TOKEN"] = generate_token()
            print(
                f"  tokens      the database holds {live} live API token(s), so the API "
                "requires one;\n"
                "              dev's own requests use an admin token made for this session "
                "(never stored,\n"
                "              gone when dev stops); open the dashboard with one of yours: "
                f"{api}/?token=<token>"
            )
    procs: list[subprocess.Popen[bytes]] = []
    supervisor: tuple[Supervisor, threading.Thread] | None = None
    stop = threading.Event()

    def interrupt(*_: object) -> None:
        stop.set()
        raise KeyboardInterrupt  # unwinds whatever dev is doing into the cleanup below

    for sig in (signal.SIGTERM, signal.SIGINT):  # also when started with SIGINT ignored
        signal.signal(sig, interrupt)
    try:
        api_log = logs / "api.log"
        procs.append(
            _spawn(
                ["-m", "engine", "serve", "--host", args.host, "--port", str(args.port)],
                env,
                api_log,
            )
        )
        supervisor = _start_dev_workers(settings, env, logs)
        headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
        with httpx.Client(timeout=10, headers=headers) as client:
            _wait_healthy(client, api, procs[0], api_log)
            print(f"  api         {api} (log {api_log})")
            print(f"  workers     dev-worker-1, dev-worker-2 (logs {logs}/worker-*.log)")
            resp = client.post(f"{api}/runs", json=example_run(api))
            resp.raise_for_status()
            run = resp.json()
            print(f"\nsubmitted run {run['id']}: {run['goal']} ({run['stepsTotal']} steps)")
            run = follow_run(client, api, run["id"])
            took = datetime.fromisoformat(run["finishedAt"]) - datetime.fromisoformat(
                run["createdAt"]
            )
            print(f"\nrun {run['id']} {run['status']} in {took.total_seconds():.2f}s")
            for step in run["steps"]:
                out = json.dumps(step["output"]) if step["output"] is not None else step["error"]
                if out and len(out) > 90:
                    out = out[:87] + "..."
                print(f"  {step['name']:<14} {step['status']:<12} attempt {step['attempt']}  {out}")
            if args.once:
                return 0 if run["status"] == "completed" else 1
            print(f"\nAPI at {api}  try: curl -s {api}/runs/{run['id']} | python -m json.tool")
            print("Ctrl+C stops the API and the workers.")
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
            print("\nstopping")
            return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if supervisor is not None:
            supervisor[0].stop_threadsafe()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        if supervisor is not None:
            supervisor[1].join(timeout=settings.shutdown_grace_s + KILL_MARGIN_S + 5)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if cluster is not None and not was_running and not args.keep_db:
            cluster.stop()
            print("stopped the embedded postgres (it was started by dev; --keep-db keeps it)")


# --- token ----------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


def cmd_token(args: argparse.Namespace) -> int:
    """``token create NAME --scope S`` (the token alone on stdout, the rest on stderr),
    ``token list`` (never a secret), ``token revoke NAME``. Raises `TokenNameTaken`,
    `TokenNotFound` and `PgdagError` for a bad name (exit 2)."""
    import asyncio

    from engine.db import open_pool
    from engine.tokens import TokenStore, check_name, parse_scope

    if args.action in ("create", "revoke"):
        if args.name is None:
            raise PgdagError(f"token {args.action} needs a NAME")
        check_name(args.name)
    if args.action == "create" and args.scope is None:
        raise PgdagError("token create needs --scope admin|submit|agent")
    if args.action != "create" and args.scope is not None:
        raise PgdagError(f"--scope is for token create only, not token {args.action}")
    if args.action == "list" and args.name is not None:
        raise PgdagError("token list takes no NAME")
    url = _database_url(_settings(args))

    async def run() -> int:
        pool = await open_pool(url, min_size=1, max_size=1, name="token")
        try:
            store = TokenStore(pool)
            if args.action == "create":
                scope = parse_scope(args.scope)
                token = await store.create(args.name, scope)
                print(token, flush=True)
                print(
                    f"created token {args.name!r} (scope {scope}); it is shown this once, "
                    "keep it: only its sha256 is stored",
                    file=sys.stderr,
                )
                return 0
            if args.action == "revoke":
                await store.revoke(args.name)
                print(f"revoked token {args.name!r}", file=sys.stderr)
                return 0
            rows = await store.list()
            if args.json:
                print(
                    json.dumps(
                        [
                            {
                                "name": r.name,
                                "scope": r.scope,
                                "createdAt": r.created_at.isoformat(),
                                "lastUsedAt": r.last_used_at and r.last_used_at.isoformat(),
                                "revokedAt": r.revoked_at and r.revoked_at.isoformat(),
                            }
                            for r in rows
                        ],
                        indent=2,
                    )
                )
                return 0
            table = [("NAME", "SCOPE", "CREATED", "LAST USED", "REVOKED")]
            table += [
                (r.name, r.scope, _when(r.created_at), _when(r.last_used_at), _when(r.revoked_at))
                for r in rows
            ]
            widths = [max(len(row[i]) for row in table) for i in range(4)]
            for row in table:
                cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
                print("  ".join([*cells, row[4]]))
            if not rows:
                print("no tokens: the API is open unless PGDAG_API_TOKEN is set", file=sys.stderr)
            return 0
        finally:
            await pool.close()

    return asyncio.run(run())


# --- submit / watch -----------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    token: str | None = args.token or _settings(args).api_token
    return token


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow a run live over the WebSocket; 0 completed, 1 failed or cancelled."""
    from engine.client import Unauthorized
    from engine.watch import watch_run

    try:
        return watch_run(args.url, args.run_id, token=_token(args))
    except Unauthorized as exc:
        raise PgdagError(f"{exc}: pass --token or set PGDAG_API_TOKEN") from None
    except KeyboardInterrupt:
        print(f"\nstopped watching run {args.run_id} (it goes on)", file=sys.stderr)
        return 130


def _problems(problems: list[dict[str, Any]], message: str) -> list[str]:
    if not problems:
        return [f"  {message}"]
    lines = []
    for p in problems:
        where = f"step {p['step']!r}, " if p.get("step") else ""
        lines.append(f"  {where}{p.get('field') or 'body'}: {p.get('problem')}")
    return lines


def cmd_submit(args: argparse.Namespace) -> int:
    """POST a run from a JSON file (``-``: stdin) through `engine.client.Client`; prints its
    id; ``--watch`` follows it."""
    from engine.client import Client, InvalidRequest

    try:
        raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        raise PgdagError(f"cannot read {args.file}: {exc}") from None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise PgdagError(f"{args.file} is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise PgdagError(f"{args.file} must hold a JSON object (the POST /runs body)")
    with Client(args.url, _token(args), timeout_s=60) as client:
        try:
            submitted = client.submit(body)
        except InvalidRequest as exc:
            problems = _problems(exc.problems, exc.message)
            print(f"error: the API refused the run ({len(problems)} problem(s)):", file=sys.stderr)
            print("\n".join(problems), file=sys.stderr)
            return 2
    if not submitted.created:
        print(f"a run with this idempotencyKey exists already: {submitted.id}", file=sys.stderr)
    if not args.watch:
        print(submitted.id)
        return 0
    print(f"submitted run {submitted.id} ({submitted.run['stepsTotal']} steps)", flush=True)
    return cmd_watch(argparse.Namespace(**{**vars(args), "run_id": submitted.id}))


def cmd_signal(args: argparse.Namespace) -> int:
    """Send a signal to a run (``POST /runs/{runId}/signals/{signal}``) through
    `engine.client.Client`; prints the answer (the signal as recorded) as JSON. 0 when
    recorded; 2 when refused (unknown run, nothing waits for the signal, a bad payload)."""
    from engine.client import Client, Conflict, InvalidRequest, NotFound

    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise PgdagError(f"--payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise PgdagError("--payload must be a JSON object")
    with Client(args.url, _token(args), timeout_s=60) as client:
        try:
            answer = client.signal(args.run_id, args.signal, payload, signal_id=args.id)
        except InvalidRequest as exc:
            problems = _problems(exc.problems, exc.message)
            print("error: the API refused the signal:", file=sys.stderr)
            print("\n".join(problems), file=sys.stderr)
            return 2
        except (NotFound, Conflict) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(answer, indent=2))
    return 0


def _schedule_line(s: dict[str, Any]) -> str:
    last = s.get("lastFire") or {}
    run = last.get("runId") or (f"error: {last['error']}" if last.get("error") else "-")
    nxt = "paused" if s["paused"] else s["nextFireAt"]
    return f"{s['name']:<24} {s['cron']:<16} {s['timezone']:<20} {nxt:<32} {run}"


def cmd_schedules(args: argparse.Namespace) -> int:
    """``schedules list|show|add|pause|resume|delete`` through `engine.client.Client`:
    list prints one line per schedule (name, cron, zone, next fire or paused, last run); add
    takes the ``POST /schedules`` body from a JSON file (``-``: stdin) and prints the id;
    the others take a schedule's name or id. 2 when the API refuses (problems printed), 1
    for an unknown schedule or a pause/resume it is already in."""
    from engine.client import Client, Conflict, InvalidRequest, NotFound

    with Client(args.url, _token(args), timeout_s=60) as client:
        try:
            if args.action == "list":
                listed = client.schedules()
                if args.json:
                    print(json.dumps(listed, indent=1))
                    return 0
                print(f"{'NAME':<24} {'CRON':<16} {'ZONE':<20} {'NEXT FIRE (UTC)':<32} LAST RUN")
                for s in listed:
                    print(_schedule_line(s))
                return 0
            if args.target is None:
                what = "FILE.json" if args.action == "add" else "NAME or ID"
                raise PgdagError(f"schedules {args.action} needs {what}")
            if args.action == "add":
                try:
                    raw = sys.stdin.read() if args.target == "-" else Path(args.target).read_text()
                    body = json.loads(raw)
                except (OSError, ValueError) as exc:
                    raise PgdagError(f"cannot read {args.target}: {exc}") from None
                if not isinstance(body, dict):
                    raise PgdagError(f"{args.target} must hold a JSON object (POST /schedules)")
                schedule, created = client.create_schedule(body)
                if not created:
                    print(f"schedule {schedule['name']} exists already", file=sys.stderr)
                print(schedule["id"])
                return 0
            action = {
                "show": client.schedule,
                "pause": client.pause_schedule,
                "resume": client.resume_schedule,
                "delete": client.delete_schedule,
            }[args.action]
            print(json.dumps(action(args.target), indent=1))
            return 0
        except InvalidRequest as exc:
            problems = _problems(exc.problems, exc.message)
            print(f"error: the API refused it ({len(problems)} problem(s)):", file=sys.stderr)
            print("\n".join(problems), file=sys.stderr)
            return 2
        except (NotFound, Conflict) as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1


# --- parser ---------------------------------------------------------------------------------


def program_name(module: str) -> str:
    """How the running program was called, for usage lines: ``python -m <module>`` when
    started with ``-m``, else the console script's name (``pgdag``, ``pgdag-worker``)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return f"python -m {module}" if name in ("", "__main__.py", "-c") else name


def build_parser(
    app_factory: AppFactory = engine_app, prog: str = "python -m engine"
) -> argparse.ArgumentParser:
    """The argument parser of `main`; `serve` runs the app `app_factory` builds."""
    p = argparse.ArgumentParser(prog=prog, description="pgdag engine commands")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default WARNING)")
    p.add_argument(
        "--log-format",
        default=None,
        choices=LOG_FORMATS,
        help="console (default, for people) or json (one object per line); PGDAG_LOG_FORMAT",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--database-url", default=None, help="overrides DATABASE_URL")
        sp.add_argument(
            "--db-wait",
            type=float,
            default=None,
            metavar="S",
            help="seconds to wait at start-up for Postgres to answer (inf: for ever); "
            "PGDAG_DB_WAIT (default 30)",
        )

    def guards(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--allowed-hosts",
            default=None,
            help="comma-separated Host names (name or name:port) answered besides --host and "
            "localhost; * for any (behind a proxy that sets Host); PGDAG_ALLOWED_HOSTS",
        )
        sp.add_argument(
            "--cors-origins",
            default=None,
            help="comma-separated browser origins (https://host[:port]) allowed cross-origin; "
            "none by default; PGDAG_CORS_ORIGINS",
        )

    dev = sub.add_parser("dev", help="embedded Postgres + API + 2 workers + an example run")
    common(dev)
    dev.add_argument("--host", default=API_HOST_DEFAULT)
    dev.add_argument("--port", type=int, default=API_PORT_DEFAULT)
    dev.add_argument("--once", action="store_true", help="exit after the example run")
    dev.add_argument("--keep-db", action="store_true", help="leave the embedded Postgres running")
    guards(dev)
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser("serve", help="run the HTTP API")
    common(serve)
    serve.add_argument("--host", default=API_HOST_DEFAULT)
    serve.add_argument("--port", type=int, default=API_PORT_DEFAULT)
    serve.add_argument("--lease-ttl", type=float, default=None, help="seconds; PGDAG_LEASE_TTL")
    serve.add_argument("--api-token", default=None, help="PGDAG_API_TOKEN")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--live-queue",
        type=int,
        default=None,
        help="events a WebSocket client may lag; PGDAG_LIVE_QUEUE",
    )
    serve.add_argument("--live-stall", type=float, default=None, help="seconds; PGDAG_LIVE_STALL")
    serve.add_argument(
        "--agent-max-wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds an agent's claim may long-poll at most; PGDAG_AGENT_MAX_WAIT (default 30)",
    )
    guards(serve)
    serve.set_defaults(func=functools.partial(cmd_serve, app_factory=app_factory))

    migrate = sub.add_parser("migrate", help="apply migrations (alembic upgrade head)")
    common(migrate)
    migrate.set_defaults(func=cmd_migrate)

    def client(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--url",
            default=f"http://{API_HOST_DEFAULT}:{API_PORT_DEFAULT}",
            help="the API (default %(default)s)",
        )
        sp.add_argument("--token", default=None, help="bearer token; default PGDAG_API_TOKEN")

    watch = sub.add_parser("watch", help="follow a run live in the terminal")
    watch.add_argument("run_id", metavar="RUN_ID")
    client(watch)
    watch.set_defaults(func=cmd_watch)

    submit = sub.add_parser("submit", help="submit a run from a JSON file; prints its id")
    submit.add_argument("file", metavar="FILE.json", help="the POST /runs body; - for stdin")
    submit.add_argument("--watch", action="store_true", help="then follow it live")
    client(submit)
    submit.set_defaults(func=cmd_submit)

    signal = sub.add_parser(
        "signal",
        help="send a signal to a run (completes the wait step that waits for it)",
    )
    signal.add_argument("run_id", metavar="RUN_ID")
    signal.add_argument("signal", metavar="SIGNAL", help="the signal a wait step waits for")
    signal.add_argument(
        "--payload", default="{}", help="a JSON object: the wait step's output (default {})"
    )
    signal.add_argument(
        "--id", default=None, help="the signal's id (Idempotency-Key): sent twice, kept once"
    )
    client(signal)
    signal.set_defaults(func=cmd_signal)

    schedules = sub.add_parser(
        "schedules",
        help="list, show, add, pause, resume and delete schedules (docs/schedules.md)",
    )
    schedules.add_argument("action", choices=["list", "show", "add", "pause", "resume", "delete"])
    schedules.add_argument(
        "target",
        nargs="?",
        metavar="NAME|ID|FILE.json",
        help="add: the POST /schedules body (- for stdin); else the schedule's name or id",
    )
    schedules.add_argument("--json", action="store_true", help="list as JSON")
    client(schedules)
    schedules.set_defaults(func=cmd_schedules)

    token = sub.add_parser(
        "token",
        help="make, list and revoke scoped API tokens",
        description="Scoped API tokens, kept hashed in Postgres. create prints the token "
        "alone on stdout, once. Scopes: admin (everything), submit (runs, workers, the "
        "WebSockets, the dashboard), agent (only /agent/*).",
    )
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("name", nargs="?", metavar="NAME", help="the token's name")
    token.add_argument(
        "--scope", default=None, choices=["admin", "submit", "agent"], help="for create"
    )
    token.add_argument("--json", action="store_true", help="list as JSON")
    common(token)
    token.set_defaults(func=cmd_token)

    db = sub.add_parser("db", help="manage the embedded Postgres under PGDAG_HOME")
    db.add_argument("action", choices=["start", "stop", "status", "url"])
    db.set_defaults(func=cmd_db)
    return p


def main(
    argv: list[str] | None = None,
    *,
    app_factory: AppFactory = engine_app,
    prog: str = "python -m engine",
) -> int:
    """Run the command `argv` (default ``sys.argv[1:]``); returns the exit code (2 for bad
    configuration, printed in one line). `serve` runs the app `app_factory` builds; `prog`
    names the program in usage lines."""
    args = build_parser(app_factory, prog).parse_args(argv)
    try:
        configure_logging(args.log_level, Settings.from_env(log_format=args.log_format).log_format)
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.root.level))
        code: int = args.func(args)
    except PgdagError as exc:
        print(f"pgdag: error: {exc}", file=sys.stderr)
        return 2
    return code
