"""The agent worker (``python -m workers --server URL``) on a real API and Postgres: agent
processes with no DATABASE_URL in their environment complete DAGs, survive an agent
killed mid-step and an API restarted under them, and keep their idempotency log honest
(workers/agent_log.py): every outcome logged ends recorded or refused by its token.

The API (`engine serve`) and the agents are child processes; the test tools are loaded in
the agents only (the API accepts tools of live agents)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.support import (
    Proc,
    base_env,
    free_port,
    query,
    steps_by_name,
    wait_for,
    wait_run_finished,
)
from tests.testtools import echo, emit
from workers.agent_log import AgentLog, LoggedOutcome, success_body

TOOLS = {"PGDAG_TOOLS": "tests.testtools"}


def agent_env(db_url: str, **extra: str) -> dict[str, str]:
    """The environment of an agent: the test timings, and no database at all."""
    env = base_env(db_url, **TOOLS, **extra)
    del env["DATABASE_URL"]
    return env


def start_api(db_url: str, tmp_path: Path, port: int, tag: str = "", **env: str) -> Proc:
    """`engine serve` on `port`; returns once /health answers 200."""
    proc = Proc(
        ["-m", "engine", "serve", "--port", str(port)],
        base_env(db_url, **env),
        tmp_path / f"api{tag}.log",
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError("API exited:\n" + proc.output())
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout_s=30, what="API health")
    return proc


@contextmanager
def api(db_url: str, tmp_path: Path, **env: str) -> Iterator[str]:
    port = free_port()
    proc = start_api(db_url, tmp_path, port, **env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def start_agent(
    db_url: str, tmp_path: Path, server: str, agent_id: str, *extra: str, **env: str
) -> Proc:
    """`python -m workers --server` with id `agent_id` and its log in tmp_path."""
    return Proc(
        [
            "-m",
            "workers",
            "--server",
            server,
            "--worker-id",
            agent_id,
            "--agent-log",
            str(tmp_path / f"{agent_id}.sqlite3"),
            *extra,
        ],
        agent_env(db_url, **env),
        tmp_path / f"agent-{agent_id}.log",
    )


def log_rows(tmp_path: Path, agent_id: str) -> list[dict[str, Any]]:
    """The agent's log as dicts (read beside the running agent: WAL mode)."""
    with sqlite3.connect(tmp_path / f"{agent_id}.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM outcomes ORDER BY logged_at")]


def post_run(server: str, body: dict[str, Any]) -> str:
    r = httpx.post(f"{server}/runs", json=body, timeout=10)
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def delay(name: str, ms: int, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": ms}, "dependsOn": list(deps), **extra}


def test_agent_only_pool_completes_a_dag_with_data_flow(db_url: str, tmp_path: Path) -> None:
    with api(db_url, tmp_path) as server:
        agents = [start_agent(db_url, tmp_path, server, f"a{i}") for i in range(2)]
        try:
            wait_for(
                lambda: len(query(db_url, "SELECT 1 FROM workers WHERE kind = 'agent'")) == 2,
                timeout_s=30,
                what="two agents registered",
            )
            run_id = post_run(
                server,
                {
                    "steps": [
                        emit("a", {"x": 21, "items": [{"n": 1}, {"n": 2}, {"n": 3}]}),
                        *(delay(f"d{i}", 50, "a") for i in range(8)),
                        echo("b", {"v": {"$ref": "steps.a.output.x"}}, "a"),
                        {
                            "name": "each",
                            "tool": "TEST_MAP_ITEM",
                            "input": {"n": {"$ref": "item.n"}},
                            "map": {"$ref": "steps.a.output.items"},
                            "dependsOn": ["a"],
                        },
                        echo(
                            "c",
                            {
                                "b": {"$ref": "steps.b.output.got.v"},
                                "all": {"$ref": "steps.each.output"},
                            },
                            "b",
                            "each",
                            *(f"d{i}" for i in range(8)),
                        ),
                    ]
                },
            )
            assert wait_run_finished(db_url, run_id, timeout_s=60) == "completed"
            steps = steps_by_name(db_url, run_id)
            got = steps["c"]["output"]["got"]
            assert got["b"] == 21
            assert [e["double"] for e in got["all"]] == [2, 4, 6]
            owners = {
                r["worker_id"]
                for r in query(
                    db_url,
                    "SELECT DISTINCT worker_id FROM audit_log WHERE run_id = %(id)s "
                    "AND event = 'step_claimed'",
                    {"id": run_id},
                )
            }
            assert owners <= {"a0", "a1"} and owners, owners
            workers_rows = httpx.get(f"{server}/workers", timeout=10).json()
            kinds = {w["id"]: w["kind"] for w in workers_rows["workers"]}
            assert kinds == {"a0": "agent", "a1": "agent"}
            # every outcome an agent logged was recorded, none is pending
            for agent_id in ("a0", "a1"):
                assert all(r["state"] == "recorded" for r in log_rows(tmp_path, agent_id))
            total = sum(len(log_rows(tmp_path, a)) for a in ("a0", "a1"))
            assert total == 14  # a, d0..d7, b, c, three map items (the API runs "each")
        finally:
            codes = [a.stop() for a in agents]
        assert codes == [0, 0], [a.output() for a in agents]
        for a in agents:
            assert "DATABASE_URL" not in a.output()
        rows = query(db_url, "SELECT id, status FROM workers ORDER BY id")
        assert [(r["id"], r["status"]) for r in rows] == [("a0", "stopped"), ("a1", "stopped")]


def running_on(db_url: str, run_id: str, owner: str, n: int = 1) -> bool:
    rows = query(
        db_url,
        "SELECT 1 FROM steps WHERE run_id = %(id)s AND status = 'running' "
        "AND lease_owner = %(owner)s",
        {"id": run_id, "owner": owner},
    )
    return len(rows) >= n


def test_agent_killed_mid_step_lease_expires_and_another_agent_takes_it(
    db_url: str, tmp_path: Path
) -> None:
    with api(db_url, tmp_path) as server:
        a0 = start_agent(db_url, tmp_path, server, "a0")
        a1 = None
        try:
            run_id = post_run(server, {"steps": [delay("slow", 1500), delay("after", 0, "slow")]})
            wait_for(lambda: running_on(db_url, run_id, "a0"), timeout_s=30, what="a0 runs it")
            a0.kill()  # SIGKILL mid-step: no report, no release
            a1 = start_agent(db_url, tmp_path, server, "a1")
            assert wait_run_finished(db_url, run_id, timeout_s=60) == "completed"
        finally:
            a0.kill()
            a0.stop()  # closes its log file
            code = a1.stop() if a1 else None
        assert code == 0
        slow = steps_by_name(db_url, run_id)["slow"]
        assert slow["attempt"] == 2 and slow["status"] == "succeeded"
        claims = query(
            db_url,
            "SELECT worker_id, event FROM audit_log WHERE run_id = %(id)s AND step_name = 'slow' "
            "AND event IN ('step_claimed', 'step_lease_expired', 'step_succeeded') ORDER BY id",
            {"id": run_id},
        )
        assert [c["event"] for c in claims][:2] == ["step_claimed", "step_lease_expired"]
        assert claims[0]["worker_id"] == "a0"
        assert [(c["event"], c["worker_id"]) for c in claims][-2:] == [
            ("step_claimed", "a1"),
            ("step_succeeded", "a1"),
        ]
        assert log_rows(tmp_path, "a0") == []  # it never finished the attempt
        assert [r["state"] for r in log_rows(tmp_path, "a1")] == ["recorded", "recorded"]


def test_api_restarted_while_agents_hold_leases_they_report_after(
    db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    timing = {"PGDAG_LEASE_TTL": "15"}
    # The agent starts before the API: it retries registering, with a log line.
    a0 = start_agent(db_url, tmp_path, server, "a0")
    api1 = api2 = None
    try:
        wait_for(lambda: "cannot register yet" in a0.output(), timeout_s=30, what="retry line")
        api1 = start_api(db_url, tmp_path, port, "1", **timing)
        run_id = post_run(server, {"steps": [delay(f"s{i}", 1500) for i in range(3)]})
        wait_for(lambda: running_on(db_url, run_id, "a0", 3), timeout_s=30, what="3 running")
        tokens = {
            r["name"]: r["lease_token"]
            for r in query(
                db_url, "SELECT name, lease_token FROM steps WHERE run_id = %(id)s", {"id": run_id}
            )
        }
        api1.kill()  # the API crashes while the agent holds three leases
        # the attempts end meanwhile: their outcomes wait in the log
        wait_for(
            lambda: [r["state"] for r in log_rows(tmp_path, "a0")] == ["pending"] * 3,
            timeout_s=30,
            what="three pending outcomes in the log",
        )
        api2 = start_api(db_url, tmp_path, port, "2", **timing)
        assert wait_run_finished(db_url, run_id, timeout_s=60) == "completed"
        wait_for(
            lambda: [r["state"] for r in log_rows(tmp_path, "a0")] == ["recorded"] * 3,
            timeout_s=30,
            what="the log says recorded",
        )
    finally:
        code = a0.stop()
        for p in (api1, api2):
            if p is not None:
                p.stop()
    assert code == 0, a0.output()
    steps = steps_by_name(db_url, run_id)
    # each outcome was recorded under the token of its first and only attempt
    assert {n: (s["attempt"], s["lease_token"]) for n, s in steps.items()} == {
        n: (1, t) for n, t in tokens.items()
    }
    assert {(r["step_id"], r["lease_token"]) for r in log_rows(tmp_path, "a0")} == {
        (s["id"], s["lease_token"]) for s in steps.values()
    }
    assert "not answered" in a0.output()


def register_raw(server: str, agent_id: str) -> None:
    r = httpx.post(
        f"{server}/agent/register",
        json={"agentId": agent_id, "tools": ["DELAY"], "concurrency": 1},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def claim_raw(server: str, agent_id: str) -> dict[str, Any]:
    r = httpx.post(
        f"{server}/agent/claim",
        json={"agentId": agent_id, "tools": ["DELAY"], "max": 1, "waitMs": 5000},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    [step] = r.json()["steps"]
    return dict(step)


def log_before_crash(tmp_path: Path, agent_id: str, step: dict[str, Any], output: str) -> None:
    """What an agent killed between logging an outcome and reporting it leaves behind."""
    log = AgentLog(tmp_path / f"{agent_id}.sqlite3")
    log.write(
        [
            LoggedOutcome(
                step_id=step["stepId"],
                lease_token=step["leaseToken"],
                run_id=step["runId"],
                name=step["name"],
                attempt=step["attempt"],
                status="succeeded",
                body=success_body(step["stepId"], step["leaseToken"], output),
                lease_expires_at=step["leaseExpiresAt"],
            )
        ]
    )
    log.close()


def test_outcome_logged_before_a_crash_is_reported_at_restart_not_run_again(
    db_url: str, tmp_path: Path
) -> None:
    with api(db_url, tmp_path, PGDAG_LEASE_TTL="60") as server:
        register_raw(server, "a0")
        run_id = post_run(server, {"steps": [delay("x", 60_000)]})  # would take a minute
        step = claim_raw(server, "a0")
        log_before_crash(tmp_path, "a0", step, '{"from":"the log"}')
        a0 = start_agent(db_url, tmp_path, server, "a0")  # the restarted agent
        try:
            assert wait_run_finished(db_url, run_id, timeout_s=30) == "completed"
        finally:
            code = a0.stop()
        assert code == 0, a0.output()
    x = steps_by_name(db_url, run_id)["x"]
    assert x["output"] == {"from": "the log"} and x["attempt"] == 1
    [row] = log_rows(tmp_path, "a0")
    assert (row["state"], row["reason"], row["sends"]) == ("recorded", None, 1)
    assert "re-reporting 1 outcome(s)" in a0.output()
    assert "claimed 0" in a0.output()  # it never ran the attempt it held


def test_outcome_whose_lease_expired_is_refused_and_the_log_says_lease_lost(
    db_url: str, tmp_path: Path
) -> None:
    with api(db_url, tmp_path) as server:  # lease TTL 2 s, reaper every 0.2 s
        register_raw(server, "a0")
        run_id = post_run(server, {"steps": [delay("x", 0)]})
        step = claim_raw(server, "a0")
        wait_for(  # no heartbeat: the lease expires, the reaper makes the step ready again
            lambda: steps_by_name(db_url, run_id)["x"]["status"] == "ready",
            timeout_s=30,
            what="lease expired and reaped",
        )
        log_before_crash(tmp_path, "a0", step, '{"from":"too late"}')
        a0 = start_agent(db_url, tmp_path, server, "a0")
        try:
            assert wait_run_finished(db_url, run_id, timeout_s=30) == "completed"
        finally:
            code = a0.stop()
        assert code == 0, a0.output()
    x = steps_by_name(db_url, run_id)["x"]
    assert x["output"] != {"from": "too late"} and x["attempt"] == 2
    rows = {r["lease_token"]: r for r in log_rows(tmp_path, "a0")}
    late = rows.pop(step["leaseToken"])
    assert (late["state"], late["reason"]) == ("refused", "lease_lost")
    assert late["message"]
    [fresh] = rows.values()  # the new attempt, run by the agent, recorded
    assert (fresh["state"], fresh["lease_token"]) == ("recorded", x["lease_token"])


def create_token(db_url: str, name: str, scope: str) -> str:
    """``python -m engine token create NAME --scope SCOPE``: the token it prints."""
    done = subprocess.run(
        [sys.executable, "-m", "engine", "token", "create", name, "--scope", scope],
        env=base_env(db_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_tokens_an_agent_token_works_others_exit_2_with_the_message(
    db_url: str, tmp_path: Path
) -> None:
    agent_token = create_token(db_url, "laptops", "agent")
    submit_token = create_token(db_url, "ci", "submit")
    with api(db_url, tmp_path) as server:
        unknown = start_agent(db_url, tmp_path, server, "unknown", "--token", "pgdag_wrong")
        assert unknown.popen.wait(timeout=30) == 2
        assert "refused agent unknown (401)" in unknown.output(), unknown.output()
        unknown.stop()
        wrong_scope = start_agent(
            db_url, tmp_path, server, "submitter", PGDAG_AGENT_TOKEN=submit_token
        )
        assert wrong_scope.popen.wait(timeout=30) == 2
        assert "refused agent submitter (403)" in wrong_scope.output(), wrong_scope.output()
        assert "scope submit" in wrong_scope.output()
        wrong_scope.stop()
        good = start_agent(db_url, tmp_path, server, "good", PGDAG_AGENT_TOKEN=agent_token)
        try:
            r = httpx.post(
                f"{server}/runs",
                json={"steps": [delay("a", 0)]},
                headers={"Authorization": f"Bearer {submit_token}"},
                timeout=10,
            )
            assert r.status_code == 201, r.text
            assert wait_run_finished(db_url, r.json()["id"], timeout_s=30) == "completed"
        finally:
            assert good.stop() == 0, good.output()


def test_sigterm_releases_the_running_step_and_marks_the_agent_stopped(
    db_url: str, tmp_path: Path
) -> None:
    with api(db_url, tmp_path, PGDAG_LEASE_TTL="60") as server:
        a0 = start_agent(db_url, tmp_path, server, "a0", "--log-level", "DEBUG")
        try:
            run_id = post_run(server, {"steps": [delay("long", 60_000)]})
            wait_for(lambda: running_on(db_url, run_id, "a0"), timeout_s=30, what="a0 runs it")
            # The claim committed; wait until a0 has its answer too (a SIGTERM before that
            # leaves the step to the lease's expiry).
            wait_for(lambda: "attempt started" in a0.output(), timeout_s=30, what="a0 to start it")
            started = time.monotonic()
            code = a0.stop()  # SIGTERM: grace 2 s, then release
            assert time.monotonic() - started < 15
        finally:
            a0.stop()
        assert code == 0, a0.output()
        long = steps_by_name(db_url, run_id)["long"]
        assert long["status"] == "ready", long  # released at once, not after the 60 s lease
        assert "released 1 unfinished step(s)" in a0.output()
        [row] = query(db_url, "SELECT status FROM workers WHERE id = 'a0'")
        assert row["status"] == "stopped"


def test_failures_retry_and_nasty_error_text_reach_the_api(db_url: str, tmp_path: Path) -> None:
    """A retryable failure is retried (backoff from the API), a tool error holding a NUL
    and a lone surrogate is stored escaped, as a database worker stores it."""
    with api(db_url, tmp_path) as server:
        a0 = start_agent(db_url, tmp_path, server, "a0")
        try:
            wait_for(
                lambda: query(db_url, "SELECT 1 FROM workers WHERE id = 'a0'"),
                timeout_s=30,
                what="a0 registered",
            )
            run_id = post_run(
                server,
                {
                    "steps": [
                        {
                            "name": "flaky",
                            "tool": "TEST_FAIL_TIMES",
                            "input": {"failTimes": 2},
                            "maxAttempts": 5,
                        },
                        {"name": "nasty", "tool": "TEST_NASTY_ERROR", "input": {}},
                    ]
                },
            )
            assert wait_run_finished(db_url, run_id, timeout_s=60) == "failed"
        finally:
            code = a0.stop()
        assert code == 0, a0.output()
    steps = steps_by_name(db_url, run_id)
    assert steps["flaky"]["status"] == "succeeded" and steps["flaky"]["output"] == {"attempt": 3}
    assert steps["nasty"]["status"] == "dead_letter"
    assert "\\u0000" in steps["nasty"]["error"] and "\\udc01" in steps["nasty"]["error"]
    states = [(r["status"], r["state"]) for r in log_rows(tmp_path, "a0")]
    assert sorted(states) == sorted([("failed", "recorded")] * 3 + [("succeeded", "recorded")]), (
        states
    )


def test_supervised_agents_restart_with_their_own_logs(db_url: str, tmp_path: Path) -> None:
    """``--processes 2`` with ``--server``: two agents sup-1 and sup-2, each with a log of
    its own although they share ``--agent-log``; one killed is restarted, and its restarts
    and exit show in GET /workers."""
    with api(db_url, tmp_path) as server:
        sup = Proc(
            [
                "-m",
                "workers",
                "--processes",
                "2",
                "--server",
                server,
                "--worker-id",
                "sup",
                "--agent-log",
                str(tmp_path / "agent.sqlite3"),
            ],
            agent_env(
                db_url,
                PGDAG_RESTART_BACKOFF_FIRST="0.2",
                PGDAG_RESTART_BACKOFF_MAX="1",
            ),
            tmp_path / "supervisor.log",
        )
        try:

            def agents() -> dict[str, dict[str, Any]]:
                body = httpx.get(f"{server}/workers", timeout=10).json()
                return {w["id"]: w for w in body["workers"] if w["status"] == "running"}

            first = wait_for(
                lambda: a if set(a := agents()) == {"sup-1", "sup-2"} else None,
                timeout_s=30,
                what="two supervised agents",
            )
            assert {w["kind"] for w in first.values()} == {"agent"}
            run_id = post_run(server, {"steps": [delay(f"s{i}", 0) for i in range(6)]})
            assert wait_run_finished(db_url, run_id, timeout_s=30) == "completed"
            os.kill(first["sup-1"]["pid"], signal.SIGKILL)
            again = wait_for(
                lambda: (w := agents().get("sup-1")) and w["restarts"] == 1 and w,
                timeout_s=30,
                what="sup-1 restarted",
            )
            assert again["lastExitCode"] == -signal.SIGKILL
            assert again["pid"] != first["sup-1"]["pid"]
        finally:
            code = sup.stop()
        assert code == 0, sup.output()
        assert (tmp_path / "agent-sup-1.sqlite3").exists()
        assert (tmp_path / "agent-sup-2.sqlite3").exists()
        assert not (tmp_path / "agent.sqlite3").exists()


def test_cancelled_run_stops_the_agents_attempt_by_heartbeat(db_url: str, tmp_path: Path) -> None:
    """A lease the heartbeat answer lists as lost (the run was cancelled) ends the attempt
    at once: the agent does not run the minute-long step to its end."""
    with api(db_url, tmp_path) as server:
        a0 = start_agent(db_url, tmp_path, server, "a0", "--log-level", "DEBUG")
        try:
            run_id = post_run(server, {"steps": [delay("long", 60_000)]})
            wait_for(lambda: running_on(db_url, run_id, "a0"), timeout_s=30, what="a0 runs it")
            # The claim committed; wait until a0 has its answer too (a SIGTERM before that
            # leaves the step to the lease's expiry).
            wait_for(lambda: "attempt started" in a0.output(), timeout_s=30, what="a0 to start it")
            r = httpx.post(f"{server}/runs/{run_id}/cancel", json={}, timeout=10)
            assert r.status_code == 200, r.text
            wait_for(
                lambda: "lease lost; abandoning the attempt" in a0.output(),
                timeout_s=10,
                what="the agent abandons the attempt",
            )
        finally:
            code = a0.stop()
        assert code == 0, a0.output()
        assert log_rows(tmp_path, "a0") == []  # nothing to report
