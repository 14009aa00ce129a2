"""``python -m chaos``: kill workers mid-step and prove that nothing is lost or run twice.

Starts the API and N worker processes on the embedded Postgres (or DATABASE_URL), a local
side-effect ledger, and submits a DAG mixing DELAY, HTTP_GET_JSON (against the ledger) and
CHAOS_FLAKY (fails a share of attempts transiently). Every few seconds it SIGKILLs a worker
that holds a running step and starts a replacement; optionally it restarts Postgres too.
At the end the invariant checker reads the audit log and the ledger, and a verdict table
says whether every guarantee held. Exit code 0 only when they all did.

With ``--agents K`` it also runs K remote agents (``python -m workers --server``, no
DATABASE_URL) that reach the API through a TCP proxy, and adds their faults: an agent
holding a running step is killed and restarted with the same id and idempotency log, the
agent-API link is cut every few seconds (every connection reset, new ones refused for a
moment), and the API itself is killed and restarted mid-run. The verdict then also judges
every agent's log: each outcome it logged was recorded or refused by its fencing token.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from chaos.agent_log import AgentLogReport, check_agent_logs, unanswered
from chaos.checker import Report, check_database, ledger_duplicates
from chaos.faults import restart_postgres
from chaos.ledger import Ledger
from chaos.proxy import TcpProxy
from engine.config import Settings
from engine.db import resolve_database_url
from engine.embedded import EmbeddedCluster
from engine.migrate import upgrade_head
from engine.transitions import TERMINAL_RUN_STATES

ROOT = Path(__file__).resolve().parent.parent
CHAOS_DB = "pgdag_chaos"
MAX_KILLS_PER_STEP = 2
WAIT_SIGNAL = "go"  # the signal of the workload's wait step, sent by the driver
CHARGE_PATH = "/charge/"  # the ledger path of the workload's "idempotent": false steps
LINK_CUT_S = 1.5  # how long the agent-API link stays cut (new connections refused)
AGENT_LOG_SETTLE_S = 20.0  # at the end, how long agents get to answer what they logged
API_DOWN_S = 1.0  # how long the API stays dead before it is started again


@dataclass
class Kill:
    """One SIGKILL: which worker, when (UTC), and the step it held mid-run."""

    worker_id: str
    pid: int
    at: datetime
    run_id: str
    step: str
    attempt: int
    lease_token: int
    released_after_s: float | None = None


@dataclass
class Chaos:
    """The demo's state: processes, the schedule, and what happened."""

    args: argparse.Namespace
    url: str
    env: dict[str, str]
    log_dir: Path
    rng: random.Random
    console: Console
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    next_worker: int = 1
    kills: list[Kill] = field(default_factory=list)
    pg_restarts: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    api_port: int = 0
    api: subprocess.Popen[bytes] | None = None
    agents: set[str] = field(default_factory=set)
    next_agent: int = 1
    proxy: TcpProxy | None = None
    link_cuts: int = 0
    api_restarts: list[float] = field(default_factory=list)

    def start_worker(self) -> str:
        """Start a database worker process with the next id; returns the id."""
        worker_id = f"chaos-w{self.next_worker}"
        self.next_worker += 1
        self._spawn(worker_id, ["--worker-id", worker_id], self.env)
        return worker_id

    def agent_log(self, agent_id: str) -> Path:
        """Where agent `agent_id` keeps its idempotency log (the same across restarts)."""
        return self.log_dir / f"{agent_id}.sqlite3"

    def start_agent(self, agent_id: str | None = None) -> str:
        """Start a remote agent (no DATABASE_URL; the API through the proxy). With
        `agent_id`, a restart of that agent: same id, same idempotency log."""
        if agent_id is None:
            agent_id = f"chaos-a{self.next_agent}"
            self.next_agent += 1
        assert self.proxy is not None
        env = {k: v for k, v in self.env.items() if k != "DATABASE_URL"}
        argv = [
            "--server",
            f"http://127.0.0.1:{self.proxy.port}",
            "--worker-id",
            agent_id,
            "--agent-log",
            str(self.agent_log(agent_id)),
        ]
        self._spawn(agent_id, argv, env)
        self.agents.add(agent_id)
        return agent_id

    def _spawn(self, worker_id: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.log_dir / f"{worker_id}.log").open("ab")
        self.workers[worker_id] = subprocess.Popen(
            [sys.executable, "-m", "workers", "--concurrency", "4", *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def start_api(self) -> None:
        """Start the API on `api_port` (chosen on the first start, kept after)."""
        if not self.api_port:
            self.api_port = _free_port()
        api_log = (self.log_dir / "api.log").open("ab")
        self.api = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--port", str(self.api_port)],
            env=self.env,
            stdout=api_log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def restart_api(self) -> float:
        """kill -9 the API, wait `API_DOWN_S`, start it again and wait until it answers;
        returns the seconds it did not answer."""
        assert self.api is not None
        began = time.monotonic()
        self.api.kill()
        self.api.wait()
        time.sleep(API_DOWN_S)
        self.start_api()
        _wait_healthy(self, deadline_s=60)
        return time.monotonic() - began

    def cut_link(self) -> int:
        """Cut the agent-API link: reset every open connection and refuse new ones for
        `LINK_CUT_S`; returns how many were open."""
        assert self.proxy is not None
        self.proxy.refuse(True)
        n = self.proxy.drop_all()
        time.sleep(LINK_CUT_S)
        self.proxy.refuse(False)
        self.link_cuts += 1
        return n


def _wait_healthy(chaos: Chaos, *, deadline_s: float) -> None:
    """Poll /health until 200; SystemExit when the API died or `deadline_s` passed."""
    deadline = time.monotonic() + deadline_s
    url = f"http://127.0.0.1:{chaos.api_port}/health"
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or (chaos.api is not None and chaos.api.poll() is not None):
            raise SystemExit(f"the API did not start; see {chaos.log_dir / 'api.log'}")
        time.sleep(0.1)


def build_run(n_steps: int, *, ledger: str, failure_rate: float, seed: int) -> dict[str, Any]:
    """A DAG of at least `n_steps` steps: a seed step fans out to branches of
    fetch (HTTP) -> work (flaky) -> wait (DELAY) -> notify (HTTP), which join in two groups,
    each recorded to the ledger, then a final step; beside them, a step that sleeps 200 ms
    parked (``delayMs``) after the seed, then a child run (a step of kind run) of a flaky
    step and a nap, a wait step (``wait``) the driver signals, which the final step waits
    for too, and a planning step that adds four steps to the run when it succeeds
    (CHAOS_PLAN)."""
    rng = random.Random(seed)
    branches = max(2, (n_steps - 6 + 3) // 4)
    attempts = {"maxAttempts": 15}
    steps: list[dict[str, Any]] = [
        {"name": "seed", "tool": "DELAY", "input": {"ms": 200}, **attempts}
    ]
    waits = []
    for i in range(branches):
        steps += [
            {
                "name": f"fetch-{i}",
                "tool": "HTTP_GET_JSON",
                "input": {"url": f"{ledger}/fetch/{i}"},
                "dependsOn": ["seed"],
                **attempts,
            },
            {
                "name": f"work-{i}",
                "tool": "CHAOS_FLAKY",
                "input": {"failureRate": failure_rate, "ms": rng.randint(300, 1500), "seed": seed},
                "dependsOn": [f"fetch-{i}"],
                **attempts,
            },
            {
                "name": f"wait-{i}",
                "tool": "DELAY",
                "input": {"ms": rng.randint(500, 2000)},
                "dependsOn": [f"work-{i}"],
                **attempts,
            },
            {
                "name": f"notify-{i}",
                "tool": "HTTP_GET_JSON",
                "input": {"url": f"{ledger}/notify/{i}"},
                "dependsOn": [f"wait-{i}"],
                **attempts,
            },
        ]
        waits.append(f"notify-{i}")
    half = len(waits) // 2
    for group, members in (("a", waits[:half]), ("b", waits[half:])):
        steps += [
            {
                "name": f"join-{group}",
                "tool": "CHAOS_FLAKY",
                "input": {"failureRate": failure_rate, "ms": 400, "seed": seed},
                "dependsOn": members,
                **attempts,
            },
            {
                "name": f"record-{group}",
                "tool": "HTTP_GET_JSON",
                "input": {"url": f"{ledger}/record/{group}"},
                "dependsOn": [f"join-{group}"],
                **attempts,
            },
        ]
    # A sleep that frees the worker (delayMs): parked in Postgres for 200 ms after the seed,
    # then woken by whichever process leads maintenance (step_delayed, then step_ready with
    # reason delay); the checker's delay_not_met judges it.
    steps.append(
        {
            "name": "sleep",
            "tool": "DELAY",
            "input": {"ms": 10},
            "dependsOn": ["seed"],
            "delayMs": 200,
            **attempts,
        }
    )
    # A planning step (issue 15 part 5): its success adds a fan of flaky steps and their
    # join to the run, in one transaction under its token; kills land on it too, and the
    # checker's added_steps judges that the steps came all or none, once.
    steps.append(
        {
            "name": "plan",
            "tool": "CHAOS_PLAN",
            "input": {"width": 3, "failureRate": failure_rate, "ms": 300, "seed": seed},
            "dependsOn": ["seed"],
            **attempts,
        }
    )
    # A child run (a step of kind run): started by the maintenance leader once the sleep is
    # done, from a template whose flaky step runs on the same (killed) workers and whose nap
    # reads the parent step's input through $param, itself a $ref; the step ends with the
    # child. The checker's child_run_mismatch judges the pair.
    steps.append(
        {
            "name": "delegate",
            "dependsOn": ["sleep"],
            "input": {"ms": {"$ref": "steps.sleep.output.tookMs"}},
            "run": {
                "goal": f"chaos child (seed {seed})",
                "steps": [
                    {
                        "name": "flaky",
                        "tool": "CHAOS_FLAKY",
                        "input": {"failureRate": failure_rate, "ms": 300, "seed": seed},
                        **attempts,
                    },
                    {
                        "name": "nap",
                        "tool": "DELAY",
                        "input": {"ms": {"$param": "ms"}},
                        "dependsOn": ["flaky"],
                        **attempts,
                    },
                ],
            },
            **attempts,
        }
    )
    # A wait step (issue 15, part 1): no worker runs it; the driver sends its signal right
    # after submitting (twice, with one Idempotency-Key: recorded once), before the seed is
    # done, so the signal is kept and the maintenance leader delivers it when the step parks
    # (step_signalled, then step_succeeded with the payload); the checker's wait_broken
    # judges it. Its timeout is far beyond the demo's.
    steps.append(
        {
            "name": "approve",
            "wait": {"signal": WAIT_SIGNAL, "timeoutS": 3600},
            "dependsOn": ["seed"],
            **attempts,
        }
    )
    steps.append(
        {
            "name": "final",
            "tool": "DELAY",
            "input": {"ms": 100},
            "dependsOn": ["record-a", "record-b", "delegate", "approve"],
            **attempts,
        }
    )
    # At-most-once: a charge must never reach the ledger twice. A kill that interrupts one
    # sends it to review (dead_letter, never re-run), which fails the run: expected, and
    # counted apart in the verdict. Leaves, so that nothing else is skipped with them.
    steps += [
        {
            "name": f"charge-{group}",
            "tool": "HTTP_GET_JSON",
            "input": {"url": f"{ledger}{CHARGE_PATH}{group}"},
            "dependsOn": [f"record-{group}"],
            "idempotent": False,
        }
        for group in ("a", "b")
    ]
    return {"goal": f"chaos demo (seed {seed})", "steps": steps}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _prepare_database(args: argparse.Namespace) -> tuple[str, EmbeddedCluster | None]:
    settings = Settings.from_env()
    if settings.database_url:
        if args.postgres_restarts:
            raise SystemExit("--postgres-restarts needs the embedded Postgres: unset DATABASE_URL")
        upgrade_head(settings.database_url)
        return settings.database_url, None
    base = resolve_database_url(settings)
    with psycopg.connect(base, autocommit=True) as conn:
        ident = sql.Identifier(CHAOS_DB)
        busy = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (CHAOS_DB,)
        ).fetchone()
        if busy and busy[0]:
            raise SystemExit(
                f"another `python -m chaos` is using the {CHAOS_DB} database ({busy[0]} "
                "connections); wait for it to finish or stop it first"
            )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    info = psycopg.conninfo.conninfo_to_dict(base)
    info["dbname"] = CHAOS_DB
    url = psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]
    upgrade_head(url)
    return url, EmbeddedCluster.from_settings(settings)


def _pick_victim(chaos: Chaos) -> tuple[str, dict[str, Any]] | None:
    """A live worker of ours holding a running step, and that step."""
    try:
        with psycopg.connect(
            chaos.url, autocommit=True, row_factory=dict_row, connect_timeout=2
        ) as conn:
            rows = conn.execute(
                "SELECT run_id, name, attempt, lease_owner, lease_token FROM steps"
                " WHERE status = 'running' AND lease_owner = ANY(%s) ORDER BY id",
                ([w for w, p in chaos.workers.items() if p.poll() is None],),
            ).fetchall()
    except psycopg.OperationalError:
        return None
    # A kill spends the attempt it interrupts; spread kills so that no step's maxAttempts is
    # burned by the killer alone (the point is recovery, not exhausting one step).
    killed = collections.Counter((k.run_id, k.step) for k in chaos.kills)
    rows = [r for r in rows if killed[(str(r["run_id"]), r["name"])] < MAX_KILLS_PER_STEP]
    if not rows:
        return None
    row = chaos.rng.choice(rows)
    return row["lease_owner"], row


def _kill(chaos: Chaos) -> Kill | None:
    victim = _pick_victim(chaos)
    if victim is None:
        return None
    worker_id, step = victim
    proc = chaos.workers[worker_id]
    kill = Kill(
        worker_id,
        proc.pid,
        datetime.now(UTC),
        str(step["run_id"]),
        step["name"],
        step["attempt"],
        step["lease_token"],
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    del chaos.workers[worker_id]
    if worker_id in chaos.agents:  # restarted with its log, as a supervisor would
        replacement = chaos.start_agent(worker_id)
    else:
        replacement = chaos.start_worker()
    chaos.kills.append(kill)
    chaos.console.print(
        f"[red]kill -9[/] {worker_id} (pid {kill.pid}) during step [bold]{kill.step}[/] "
        f"attempt {kill.attempt}; "
        + ("restarted it with its log" if replacement == worker_id else f"started {replacement}")
    )
    return kill


def _progress(chaos: Chaos, client: httpx.Client, started: float) -> tuple[Text, bool]:
    counts: dict[str, int] = {}
    statuses = []
    for run_id in chaos.run_ids:
        run = client.get(f"/runs/{run_id}", params={}).json()
        statuses.append(run["status"])
        for k, v in run["stepCounts"].items():
            counts[k] = counts.get(k, 0) + v
    total = sum(counts.values())
    done = counts.get("succeeded", 0)
    width = 30
    bar = "#" * (width * done // max(total, 1))
    text = Text.assemble(
        (f"{time.monotonic() - started:6.1f}s ", "dim"),
        f"[{bar:<{width}}] {done}/{total} succeeded  ",
        "  ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "succeeded"),
        (f"  kills {len(chaos.kills)}", "red"),
        (f"  pg restarts {len(chaos.pg_restarts)}", "yellow")
        if chaos.args.postgres_restarts
        else "",
        f"  runs {len(chaos.run_ids)}",
    )
    return text, all(s in TERMINAL_RUN_STATES for s in statuses)


def _verdict(
    chaos: Chaos,
    report: Report,
    ledger: Ledger,
    elapsed_s: float,
    agent_report: AgentLogReport | None = None,
) -> int:
    with psycopg.connect(chaos.url, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT r.id, r.status, count(*) FILTER (WHERE s.status = 'succeeded') AS ok,"
            " count(*) FILTER (WHERE s.status = 'dead_letter') AS dead,"
            " count(*) AS n FROM runs r JOIN steps s ON s.run_id = r.id"
            " WHERE r.id = ANY(%s::uuid[]) GROUP BY r.id, r.status",
            (chaos.run_ids,),
        ).fetchall()
        succeeded_at = {
            f"{e['run_id']}:{e['step_name']}": e["created_at"]
            for e in conn.execute(
                "SELECT run_id, step_name, created_at FROM audit_log"
                " WHERE event = 'step_succeeded' AND run_id = ANY(%s::uuid[])",
                (chaos.run_ids,),
            ).fetchall()
        }
        # kill -> the killed step claimed again (by another worker, after the lease expired)
        for kill in chaos.kills:
            nxt = conn.execute(
                "SELECT created_at FROM audit_log WHERE run_id = %s AND step_name = %s"
                " AND event = 'step_claimed' AND lease_token > %s ORDER BY id LIMIT 1",
                (kill.run_id, kill.step, kill.lease_token),
            ).fetchone()
            if nxt:
                kill.released_after_s = (nxt["created_at"] - kill.at).total_seconds()
        story_kill = next((k for k in chaos.kills if k.released_after_s is not None), None)
        story = []
        if story_kill:
            story = conn.execute(
                "SELECT id, event, from_status, to_status, attempt, lease_token, worker_id,"
                " created_at FROM audit_log WHERE run_id = %s AND step_name = %s ORDER BY id",
                (story_kill.run_id, story_kill.step),
            ).fetchall()
    duplicates, reruns = ledger_duplicates(ledger.requests(), succeeded_at)
    charges = collections.Counter(
        path for _, _, path in ledger.requests_with_paths() if path.startswith(CHARGE_PATH)
    )
    charged_twice = sum(1 for n in charges.values() if n > 1)
    outcomes = {r["status"] for r in rows}
    steps_ok = sum(r["ok"] for r in rows)
    steps_all = sum(r["n"] for r in rows)
    review = report.non_idempotent_for_review
    releases = [k.released_after_s for k in chaos.kills if k.released_after_s is not None]
    # A run fails only as the rules say it must: each of its dead letters an "idempotent":
    # false step whose lease ended mid-attempt (sent to review, not re-run).
    all_completed = (
        len(rows) == len(chaos.run_ids)
        and outcomes <= {"completed", "failed"}
        and (outcomes == {"completed"} or sum(r["dead"] for r in rows) == review)
        and steps_ok + review == steps_all
    )
    agents_ok = agent_report is None or agent_report.ok
    passed = all_completed and report.ok and duplicates == 0 and agents_ok and charged_twice == 0

    def mark(ok: bool) -> str:
        return "[green]ok[/]" if ok else "[red]FAIL[/]"

    table = Table(title="chaos verdict", show_lines=False)
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("", justify="center")
    table.add_row(
        "run outcome", ", ".join(sorted(outcomes)) + f" ({len(rows)} run(s))", mark(all_completed)
    )
    table.add_row(
        "steps succeeded (+ sent to review)",
        f"{steps_ok}/{steps_all}" + (f" (+{review})" if review else ""),
        mark(steps_ok + review == steps_all),
    )
    table.add_row("attempts (claims)", str(report.attempts), "")
    table.add_row("retries after transient failures", str(report.retries), "")
    table.add_row("leases expired and recovered", str(report.leases_expired), "")
    table.add_row("workers killed (kill -9 mid-step)", str(len(chaos.kills)), "")
    if agent_report is not None:
        agent_kills = sum(1 for k in chaos.kills if k.worker_id in chaos.agents)
        table.add_row("  of them agents (restarted with their log)", str(agent_kills), "")
        table.add_row("agent-API link cuts", str(chaos.link_cuts), "")
        downs = ", ".join(f"{d:.1f}s" for d in chaos.api_restarts)
        table.add_row(
            "API kill -9 and restarts (down for)",
            f"{len(chaos.api_restarts)}" + (f" ({downs})" if downs else ""),
            "",
        )
        table.add_row(
            "agent outcomes logged: recorded / refused by token",
            f"{agent_report.logged}: {agent_report.recorded} / {agent_report.refused}",
            mark(agent_report.ok),
        )
    if chaos.args.postgres_restarts:
        table.add_row("postgres restarts", str(len(chaos.pg_restarts)), "")
    table.add_row(
        "kill -> step re-leased (median / max)",
        f"{statistics.median(releases):.1f}s / {max(releases):.1f}s" if releases else "-",
        "",
    )
    table.add_row("steps/s (succeeded / wall time)", f"{steps_ok / elapsed_s:.1f}", "")
    table.add_row(
        "duplicate side effects after a recorded success", str(duplicates), mark(duplicates == 0)
    )
    table.add_row("at-least-once re-sends before the success was recorded", str(reruns), "")
    table.add_row(
        '"idempotent": false steps sent to review', str(report.non_idempotent_for_review), ""
    )
    table.add_row(
        '"idempotent": false side effects sent twice (ledger)',
        f"{charged_twice} of {len(charges)}",
        mark(charged_twice == 0),
    )
    table.add_row("invariant violations", str(len(report.violations)), mark(report.ok))
    chaos.console.print()
    chaos.console.print(table)
    for v in report.violations[:20]:
        chaos.console.print(f"[red]violation[/] {v.kind} run {v.run_id} step {v.step}: {v.detail}")
    for lv in agent_report.violations[:20] if agent_report is not None else []:
        o = lv.outcome
        chaos.console.print(
            f"[red]agent log violation[/] {lv.kind} in {o.log}: step {o.step_id} token "
            f"{o.lease_token} ({o.status}): {lv.detail}"
        )
    if story_kill and story:
        chaos.console.print(
            f"\naudit log of [bold]{story_kill.step}[/], whose worker {story_kill.worker_id} "
            f"was killed at {story_kill.at:%H:%M:%S.%f}"[:-3]
            + ":"
        )
        for e in story:
            chaos.console.print(
                f"  {e['id']:>6} {e['created_at']:%H:%M:%S.%f}"[:-3]
                + f"  {e['event']:<22} {e['from_status'] or '-':>8} -> {e['to_status']:<11}"
                f" attempt {e['attempt'] or '-':<3} token {e['lease_token'] or '-':<5}"
                f" {e['worker_id'] or ''}"
            )
    chaos.console.print(
        "\n[bold green]PASS[/]: every invariant held" if passed else "\n[bold red]FAIL[/]"
    )
    return 0 if passed else 1


def run(args: argparse.Namespace) -> int:
    """The demo; returns the exit code."""
    console = Console() if sys.stdout.isatty() else Console(width=110)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    url, cluster = _prepare_database(args)
    home = Settings.from_env().home.resolve()
    log_dir = home / "chaos-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger()
    ledger_url = ledger.start()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "PGDAG_TOOLS": "chaos.tools",
        "PGDAG_HTTP_ALLOW_PRIVATE": "1",
        "PGDAG_LEASE_TTL": str(args.lease_ttl),
        "PGDAG_REAPER_INTERVAL": "0.5",
        "PGDAG_POLL_INTERVAL": "0.5",
        "PGDAG_BACKOFF_BASE_MS": "100",
        "PGDAG_BACKOFF_CAP_MS": "2000",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    chaos = Chaos(args, url, env, log_dir, random.Random(seed), console)
    chaos.start_api()
    agents_text = ""
    if args.agents:
        agents_text = (
            f", {args.agents} agents via a proxy (link cut every ~{args.link_cut_every}s,"
            f" {args.api_restarts} API restart(s))"
        )
    console.print(
        f"[bold]pgdag chaos[/]: seed {seed}, {args.workers} workers{agents_text}, kill every "
        f"~{args.kill_every}s, failure rate {args.failure_rate}, lease TTL {args.lease_ttl}s"
        + (f", {args.postgres_restarts} postgres restart(s)" if args.postgres_restarts else "")
    )
    console.print(f"logs in {log_dir}; ledger at {ledger_url}")
    started = time.monotonic()
    try:
        if args.agents:
            for stale in log_dir.glob("chaos-a*.sqlite3*"):
                stale.unlink()  # a previous demo's logs would be judged with this one's
            chaos.proxy = TcpProxy("127.0.0.1", chaos.api_port)
            chaos.proxy.start()
        for _ in range(args.workers):
            chaos.start_worker()
        for _ in range(args.agents):
            chaos.start_agent()
        with httpx.Client(base_url=f"http://127.0.0.1:{chaos.api_port}", timeout=30) as client:
            _wait_healthy(chaos, deadline_s=60)

            def submit() -> None:
                body = build_run(
                    args.steps,
                    ledger=ledger_url,
                    failure_rate=args.failure_rate,
                    seed=seed + len(chaos.run_ids),
                )
                resp = client.post("/runs", json=body)
                resp.raise_for_status()
                chaos.run_ids.append(resp.json()["id"])
                for _ in range(2):  # the same signal id twice: recorded once
                    sent = client.post(
                        f"/runs/{chaos.run_ids[-1]}/signals/{WAIT_SIGNAL}",
                        json={"approved": True, "by": "chaos"},
                        headers={"Idempotency-Key": f"chaos-{chaos.run_ids[-1]}"},
                    )
                    sent.raise_for_status()
                console.print(f"submitted run {chaos.run_ids[-1]} ({len(body['steps'])} steps)")

            submit()
            started = time.monotonic()
            next_kill = started + args.kill_every * (0.5 + chaos.rng.random())
            restart_times = [started + (i + 1) * 6.0 for i in range(args.postgres_restarts)]
            api_restart_times = [started + 4.0 + i * 7.0 for i in range(args.api_restarts)]
            next_cut = (
                started + args.link_cut_every * (0.5 + chaos.rng.random())
                if args.agents and args.link_cut_every > 0
                else float("inf")
            )
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while True:
                    now = time.monotonic()
                    if now - started > args.timeout:
                        console.print(f"[red]timed out after {args.timeout}s[/]")
                        break
                    if args.kill_every > 0 and now >= next_kill:
                        _kill(chaos)
                        next_kill = now + args.kill_every * (0.5 + chaos.rng.random())
                    if restart_times and now >= restart_times[0] and cluster is not None:
                        restart_times.pop(0)
                        chaos.pg_restarts.append(restart_postgres(cluster))
                        console.print(
                            f"[yellow]restarted postgres[/] (down {chaos.pg_restarts[-1]:.1f}s)"
                        )
                    if now >= next_cut:
                        n = chaos.cut_link()
                        console.print(
                            f"[magenta]cut the agent-API link[/] ({n} connection(s) reset,"
                            f" new ones refused for {LINK_CUT_S}s)"
                        )
                        next_cut = time.monotonic() + args.link_cut_every * (
                            0.5 + chaos.rng.random()
                        )
                    if api_restart_times and now >= api_restart_times[0]:
                        api_restart_times.pop(0)
                        chaos.api_restarts.append(chaos.restart_api())
                        console.print(
                            f"[yellow]killed and restarted the API[/] (down "
                            f"{chaos.api_restarts[-1]:.1f}s)"
                        )
                    try:
                        text, finished = _progress(chaos, client, started)
                    except (httpx.HTTPError, KeyError):
                        time.sleep(0.25)
                        continue  # the API is reconnecting (postgres restart)
                    live.update(text)
                    if finished:
                        if now - started < args.duration:
                            submit()  # soak: keep the engine busy until --duration
                        elif not restart_times and not api_restart_times:
                            break
                    time.sleep(0.25)
            elapsed = time.monotonic() - started
    finally:
        # A run can finish while an agent killed near its end is still starting again with
        # an outcome it logged and never sent: its restart re-reports it, but only if it is
        # given the time. Wait (bounded) until every logged outcome is answered, so that the
        # verdict judges the re-sending, not how soon the driver stopped.
        if chaos.agents:
            logs = [chaos.agent_log(a) for a in sorted(chaos.agents)]
            deadline = time.monotonic() + AGENT_LOG_SETTLE_S
            while time.monotonic() < deadline:
                try:
                    if not unanswered(logs):
                        break
                except sqlite3.OperationalError:  # a log being written: look again
                    pass
                time.sleep(0.2)
        # Workers and agents first (agents report what they hold while the API still
        # answers), then the API.
        procs = list(chaos.workers.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if chaos.api is not None:
            chaos.api.send_signal(signal.SIGTERM)
            try:
                chaos.api.wait(timeout=20)
            except subprocess.TimeoutExpired:
                chaos.api.kill()
        if chaos.proxy is not None:
            chaos.proxy.stop()
        ledger.stop()
    with psycopg.connect(url) as conn:
        report = check_database(conn, chaos.run_ids)
        agent_report = (
            check_agent_logs(conn, [chaos.agent_log(a) for a in sorted(chaos.agents)])
            if chaos.agents
            else None
        )
    return _verdict(chaos, report, ledger, elapsed, agent_report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    p = argparse.ArgumentParser(
        prog="python -m chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="database worker processes (default 3, or 0 with --agents)",
    )
    p.add_argument(
        "--agents",
        type=int,
        default=0,
        metavar="K",
        help="remote agents through the API (python -m workers --server), behind a proxy",
    )
    p.add_argument(
        "--link-cut-every",
        type=float,
        default=5.0,
        metavar="S",
        help="with --agents: mean seconds between cuts of the agent-API link; 0 disables",
    )
    p.add_argument(
        "--api-restarts",
        type=int,
        default=None,
        metavar="N",
        help="kill -9 and restart the API N times, 7 s apart (default 1 with --agents, else 0)",
    )
    p.add_argument("--steps", type=int, default=30, help="steps per run, at least 10 (default 30)")
    p.add_argument(
        "--kill-every",
        type=float,
        default=2.0,
        metavar="S",
        help="mean seconds between kill -9s; 0 disables (default 2)",
    )
    p.add_argument(
        "--failure-rate",
        type=float,
        default=0.4,
        metavar="P",
        help="share of CHAOS_FLAKY attempts that fail transiently (default 0.4)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0,
        metavar="S",
        help="soak: keep submitting runs for S seconds (default: one run)",
    )
    p.add_argument(
        "--postgres-restarts",
        type=int,
        default=0,
        metavar="N",
        help="also restart the embedded Postgres N times, 6 s apart",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for a reproducible schedule")
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=3.0,
        metavar="S",
        help="lease TTL for this demo (default 3 s so recovery shows quickly)",
    )
    p.add_argument("--timeout", type=float, default=300, metavar="S", help="give up after S s")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be at least 10")
    if not 0 <= args.failure_rate < 1:
        p.error("--failure-rate must be in [0, 1)")
    if args.agents < 0:
        p.error("--agents must be at least 0")
    if args.workers is None:
        args.workers = 0 if args.agents else 3
    if args.api_restarts is None:
        args.api_restarts = 1 if args.agents else 0
    if args.workers < 0 or args.api_restarts < 0:
        p.error("--workers and --api-restarts must be at least 0")
    if args.workers + args.agents < 1:
        p.error("needs at least one worker or agent (--workers, --agents)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
