"""A real worker process with PGDAG_LOG_FORMAT=json: every line it writes is one JSON object,
and each line logged during an attempt names its run, step, attempt, worker and lease token
(engine/logs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.support import Proc, base_env, events, free_port, submit, wait_for, wait_run_finished


def test_attempt_lines_carry_run_step_attempt_worker_and_lease_token(
    db_url: str, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/nothing"  # nobody listens: a retryable failure
    run_id = submit(
        db_url,
        {
            "steps": [
                {"name": "wait", "tool": "DELAY", "input": {"ms": 1}},
                {
                    "name": "fetch",
                    "tool": "HTTP_GET_JSON",
                    "input": {"url": closed},
                    "maxAttempts": 2,
                },
            ]
        },
    )
    worker = Proc(
        ["-m", "workers", "--worker-id", "w-json", "--log-level", "DEBUG"],
        base_env(db_url, PGDAG_LOG_FORMAT="json", PGDAG_HTTP_ALLOW_PRIVATE="1"),
        tmp_path / "worker.log",
    )
    try:
        assert wait_run_finished(db_url, run_id) == "failed"
    finally:
        assert worker.stop() == 0, worker.output()
    records = [json.loads(line) for line in worker.output().splitlines()]  # all JSON
    for record in records:
        assert {"timestamp", "level", "logger", "event"} <= record.keys(), record
    tokens = {
        (e["step_name"], e["attempt"]): e["lease_token"]
        for e in events(db_url, run_id)
        if e["event"] == "step_claimed"
    }
    assert set(tokens) == {("wait", 1), ("fetch", 1), ("fetch", 2)}
    in_attempts = [r for r in records if "lease_token" in r]
    seen = set()
    for record in in_attempts:
        key = (record["step"], record["attempt"])
        assert record["run_id"] == run_id and record["worker"] == "w-json", record
        assert record["lease_token"] == tokens[key], record
        seen.add((key, record["event"].split(" (")[0].split(":")[0]))
    assert ((("wait", 1), "attempt started")) in seen
    assert ((("fetch", 1), "attempt started")) in seen
    assert ((("fetch", 1), "attempt failed")) in seen  # "...; retry in N ms"
    assert ((("fetch", 2), "attempt failed")) in seen  # "...; dead letter"
    retry = next(r for r in in_attempts if r["attempt"] == 1 and "retry in" in r["event"])
    assert retry["level"] == "info" and retry["logger"] == "workers.worker"
    dead = next(r for r in in_attempts if r["attempt"] == 2 and "dead letter" in r["event"])
    assert dead["level"] == "warning" and dead["step"] == "fetch"
    started = [r for r in records if r["event"].startswith("worker w-json started")]
    assert len(started) == 1 and "run_id" not in started[0]  # no attempt context outside


def test_api_lines_of_agent_routes_carry_the_agent_id(db_url: str, tmp_path: Path) -> None:
    """An API and an agent, both with PGDAG_LOG_FORMAT=json: the API's lines logged by an
    agent route name the agent (``agent``); lines of other requests do not."""
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    api = Proc(
        ["-m", "engine", "--log-level", "INFO", "serve", "--port", str(port)],
        base_env(db_url, PGDAG_LOG_FORMAT="json"),
        tmp_path / "api.log",
    )
    env = base_env(db_url, PGDAG_LOG_FORMAT="json")
    del env["DATABASE_URL"]
    agent = Proc(
        [
            *("-m", "workers", "--server", server, "--worker-id", "a-json"),
            *("--agent-log", str(tmp_path / "a.sqlite3"), "--log-level", "DEBUG"),
        ],
        env,
        tmp_path / "agent.log",
    )
    try:
        run_id = wait_for(
            lambda: _post(server, {"steps": [{"name": "d", "tool": "DELAY", "input": {"ms": 1}}]}),
            what="the API to take a run",
        )
        assert wait_run_finished(db_url, run_id) == "completed"
    finally:
        assert agent.stop() == 0, agent.output()
        api.stop()
    api_lines = [json.loads(line) for line in api.output().splitlines()]
    registered = [r for r in api_lines if r["event"].startswith("agent a-json registered")]
    assert len(registered) == 1 and registered[0]["agent"] == "a-json", api_lines
    stopped = [r for r in api_lines if r["event"] == "agent a-json stopped"]
    assert len(stopped) == 1 and stopped[0]["agent"] == "a-json"
    assert all(r.get("agent") in (None, "a-json") for r in api_lines)
    assert any("agent" not in r for r in api_lines)  # start-up lines: no request, no agent
    agent_lines = [json.loads(line) for line in agent.output().splitlines()]
    started = [r for r in agent_lines if r["event"] == "attempt started: DELAY"]
    assert len(started) == 1, agent_lines
    assert started[0]["run_id"] == run_id and started[0]["worker"] == "a-json"
    assert started[0]["step"] == "d" and started[0]["attempt"] == 1
    assert isinstance(started[0]["lease_token"], int)


def _post(server: str, body: dict[str, object]) -> str | None:
    try:
        resp = httpx.post(f"{server}/runs", json=body, timeout=5)
    except httpx.TransportError:
        return None
    if resp.status_code != 201:
        return None
    run_id: str = resp.json()["id"]
    return run_id
