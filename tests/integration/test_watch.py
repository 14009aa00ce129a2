"""``python -m engine watch`` and ``submit``, driven in a real pseudo-terminal against a real
API, real workers and a real Postgres."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.support import ROOT, Proc, api_server, base_env, free_port, wait_for, workers

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
TOOLS = {"PGDAG_TOOLS": "tests.testtools"}


class PtyProcess:
    """A child process whose stdin, stdout and stderr are a pseudo-terminal of
    `cols` x `rows`; `output` is everything it wrote so far."""

    def __init__(self, argv: list[str], env: dict[str, str], *, cols: int = 110, rows: int = 32):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.master = master
        self.popen = subprocess.Popen(
            [sys.executable, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)},
            cwd=ROOT,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = bytearray()

    @property
    def output(self) -> str:
        """What was written, without the terminal's escape sequences."""
        return ANSI.sub(b"", bytes(self.raw)).decode(errors="replace")

    def _pump(self, timeout_s: float) -> bool:
        """Read what is there (waiting up to `timeout_s`); False once the pty is closed."""
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed its end
            return False
        self.raw += data
        return bool(data)

    def wait_for_output(self, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the output:\n{self.output}")
            if not self._pump(0.1) and text not in self.output:
                raise AssertionError(f"exited without printing {text!r}:\n{self.output}")

    def wait(self, timeout_s: float = 90) -> int:
        """Read until the child exits; its exit code."""
        deadline = time.monotonic() + timeout_s
        while self._pump(0.1):
            if time.monotonic() > deadline:
                self.popen.kill()
                raise AssertionError(f"still running after {timeout_s}s:\n{self.output}")
        return self.popen.wait(timeout=10)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        os.close(self.master)


@contextlib.contextmanager
def in_pty(argv: list[str], env: dict[str, str]) -> Iterator[PtyProcess]:
    proc = PtyProcess(argv, env)
    try:
        yield proc
    finally:
        proc.close()


def watch_argv(run_id: str, base: str, *extra: str) -> list[str]:
    return ["-m", "engine", "watch", run_id, "--url", base, *extra]


def post(base: str, body: dict[str, Any]) -> str:
    r = httpx.post(f"{base}/runs", json=body, timeout=30)
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def delay(name: str, ms: int, *deps: str) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": ms}, "dependsOn": list(deps)}


DIAMOND = {
    "goal": "watch me",
    "steps": [
        delay("fetch", 400),
        delay("think-a", 600, "fetch"),
        delay("think-b", 900, "fetch"),
        delay("summarize", 300, "think-a", "think-b"),
    ],
}


def last_frame_rows(output: str, names: list[str]) -> dict[str, str]:
    """Each step's status in the last table drawn (the last table row naming the step;
    the event lines under the table have an arrow)."""
    statuses: dict[str, str] = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in names and "->" not in line:
            statuses[words[0]] = words[1]
    return statuses


def test_watch_follows_a_run_live_and_exits_0_when_it_completes(
    db_url: str, tmp_path: Path
) -> None:
    with api_server(db_url, tmp_path) as base:
        run_id = post(base, DIAMOND)
        with (
            in_pty(watch_argv(run_id, base), base_env(db_url)) as watch,
            workers(db_url, tmp_path, n=1, concurrency=4),
        ):
            watch.wait_for_output("running")  # the view is up before the run ends
            code = watch.wait()
    out = watch.output
    assert code == 0, out
    names = ["fetch", "think-a", "think-b", "summarize"]
    assert last_frame_rows(out, names) == dict.fromkeys(names, "succeeded"), out
    assert re.search(rf"run {run_id} completed in \d+\.\d+s \(4 steps: 4 succeeded\)", out), out
    assert b"\x1b[" in watch.raw  # drawn in place, with the terminal's escape sequences
    assert "watch me" in out


def test_watch_exits_1_when_the_run_fails(db_url: str, tmp_path: Path) -> None:
    body = {
        "steps": [
            delay("ok", 0),
            {
                "name": "doomed",
                "tool": "TEST_FAIL_TIMES",
                "input": {"failTimes": 5, "retryable": False},
                "dependsOn": ["ok"],
            },
            delay("never", 0, "doomed"),
        ]
    }
    with api_server(db_url, tmp_path, **TOOLS) as base:
        run_id = post(base, body)
        with (
            in_pty(watch_argv(run_id, base), base_env(db_url)) as watch,
            workers(db_url, tmp_path, n=1, **TOOLS),
        ):
            code = watch.wait()
    out = watch.output
    assert code == 1, out
    assert last_frame_rows(out, ["ok", "doomed", "never"]) == {
        "ok": "succeeded",
        "doomed": "dead_letter",
        "never": "skipped",
    }, out
    assert f"run {run_id} failed" in out
    assert "planned failure 1/5" in out  # the error is on screen


def test_watch_rides_through_an_api_restart(db_url: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    body = {
        "steps": [
            delay("before", 0),
            {
                "name": "gate",
                "tool": "TEST_FAIL_UNTIL_FILE",
                "input": {"path": str(gate)},
                "dependsOn": ["before"],
                "maxAttempts": 100,
            },
            delay("after", 0, "gate"),
        ]
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def start_api(log: str) -> Proc:
        proc = Proc(
            ["-m", "engine", "serve", "--port", str(port)],
            base_env(db_url, **TOOLS),
            tmp_path / log,
        )
        wait_for(lambda: _healthy(base, proc), what="API health")
        return proc

    api = start_api("api-1.log")
    try:
        run_id = post(base, body)
        with (
            in_pty(watch_argv(run_id, base), base_env(db_url)) as watch,
            workers(db_url, tmp_path, n=1, **TOOLS),
        ):
            watch.wait_for_output("running -> ready")  # the gate failed, retries follow
            api.stop()
            watch.wait_for_output("reconnecting")
            gate.touch()
            api = start_api("api-2.log")
            code = watch.wait()
    finally:
        api.stop()
    out = watch.output
    assert code == 0, out
    assert last_frame_rows(out, ["before", "gate", "after"]) == dict.fromkeys(
        ["before", "gate", "after"], "succeeded"
    ), out


def _healthy(base: str, proc: Proc) -> bool:
    if proc.popen.poll() is not None:
        raise AssertionError("API exited:\n" + proc.output())
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_submit_with_watch_in_a_terminal(db_url: str, tmp_path: Path) -> None:
    spec = tmp_path / "run.json"
    spec.write_text(json.dumps(DIAMOND))
    with (
        api_server(db_url, tmp_path) as base,
        workers(db_url, tmp_path, n=1, concurrency=4),
        in_pty(
            ["-m", "engine", "submit", str(spec), "--watch", "--url", base], base_env(db_url)
        ) as submit,
    ):
        code = submit.wait()
        runs = httpx.get(f"{base}/runs").json()["runs"]
    out = submit.output
    assert code == 0, out
    assert len(runs) == 1 and runs[0]["status"] == "completed"
    assert f"submitted run {runs[0]['id']} (4 steps)" in out
    assert f"run {runs[0]['id']} completed" in out


def run_cli(
    argv: list[str], env: dict[str, str], stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def test_submit_prints_the_id_or_the_problems(db_url: str, tmp_path: Path) -> None:
    env = base_env(db_url)
    with api_server(db_url, tmp_path) as base:
        ok = run_cli(["submit", "-", "--url", base], env, json.dumps(DIAMOND))
        assert ok.returncode == 0, ok.stderr
        run_id = ok.stdout.strip()
        assert httpx.get(f"{base}/runs/{run_id}").json()["stepsTotal"] == 4
        bad = {"steps": [delay("a", 0, "ghost"), {"name": "b", "tool": "NOPE", "input": {}}]}
        refused = run_cli(["submit", "-", "--url", base], env, json.dumps(bad))
        assert refused.returncode == 2 and refused.stdout == ""
        assert "refused the run (2 problem(s))" in refused.stderr
        assert "step 'a', dependsOn: unknown dependency" in refused.stderr
        assert "step 'b', tool: unknown tool 'NOPE'" in refused.stderr
        not_json = run_cli(["submit", "-", "--url", base], env, "{nope")
        assert not_json.returncode == 2 and "not valid JSON" in not_json.stderr


def test_watch_unknown_run_unreachable_api_and_wrong_token_exit_2(
    db_url: str, tmp_path: Path
) -> None:
    env = base_env(db_url)
    with api_server(db_url, tmp_path, PGDAG_API_TOKEN="s3cret") as base:
        unknown = run_cli(
            watch_argv("00000000-0000-0000-0000-000000000000", base, "--token", "s3cret")[2:],
            env,
        )
        assert unknown.returncode == 2
        assert "error: no run 00000000-0000-0000-0000-000000000000" in unknown.stderr
        refused = run_cli(watch_argv("00000000-0000-0000-0000-000000000000", base)[2:], env)
        assert refused.returncode == 2 and "unauthorized" in refused.stderr
    gone = run_cli(watch_argv("00000000-0000-0000-0000-000000000000", base)[2:], env)
    assert gone.returncode == 2 and f"cannot reach the API at {base}" in gone.stderr
