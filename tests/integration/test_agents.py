"""The agent worker (``python -m workers --server URL``) on a real API and Postgres: agent
processes with no DATABASE_URL in their environment complete DAGs, survive an agent
killed mid-step and an API restarted under them, and keep their idempotency log honest
(workers/agent_log.py): every outcome logged ends recorded or refused by its token.

The API (`engine serve`) and the agents are child processes; the test tools are loaded in
the agents only (the API accepts tools of live agents)."""

from __future__ import annotations

import sqlite3
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
