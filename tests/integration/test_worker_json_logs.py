"""A real worker process with PGDAG_LOG_FORMAT=json: every line it writes is one JSON object,
and each line logged during an attempt names its run, step, attempt, worker and lease token
(engine/logs.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import Proc, base_env, events, free_port, submit, wait_run_finished


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
