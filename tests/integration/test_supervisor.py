"""``python -m workers --processes N`` with real processes on a real Postgres: a child killed
with SIGKILL is restarted and its workers row (GET /workers) says so; SIGTERM to the
supervisor stops every child and exits 0; a child that keeps failing on its configuration
makes the supervisor give up with exit code 2."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.config import Settings
from engine.supervisor import KILL_MARGIN_S, Supervisor
from tests.support import Proc, base_env, query, wait_for

FAST_RESTARTS = {
    "PGDAG_RESTART_BACKOFF_FIRST": "0.2",
    "PGDAG_RESTART_BACKOFF_MAX": "1",
    "PGDAG_RESTART_RESET": "30",
}


def supervisor(db_url: str, tmp_path: Path, *flags: str, **env: str) -> Proc:
    return Proc(
        ["-m", "workers", "--processes", "2", "--worker-id", "sup", *flags],
        base_env(db_url, **{**FAST_RESTARTS, **env}),
        tmp_path / "supervisor.log",
    )


def running_rows(db_url: str) -> dict[str, dict[str, Any]]:
    rows = query(
        db_url,
        "SELECT id, pid, status, restarts, last_exit_code FROM workers WHERE status = 'running'",
    )
    return {r["id"]: r for r in rows}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_killed_child_is_restarted_and_reported(
    db_url: str, tmp_path: Path, client: httpx.Client
) -> None:
    sup = supervisor(db_url, tmp_path)
    try:
        first = wait_for(
            lambda: (rows := running_rows(db_url)).keys() == {"sup-1", "sup-2"} and rows,
            what="both supervised workers registered",
        )
        assert {r["restarts"] for r in first.values()} == {0}
        assert {r["last_exit_code"] for r in first.values()} == {None}
        victim = first["sup-1"]["pid"]
        os.kill(victim, signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            workers = {w["id"]: w for w in client.get("/workers").json()["workers"]}
            w = workers.get("sup-1")
            ok = w and w["pid"] != victim and w["restarts"] == 1 and w["alive"]
            return w if ok else None

        w = wait_for(restarted, what="sup-1 restarted with restarts=1", timeout_s=30)
        assert w["lastExitCode"] == -9
        other = {x["id"]: x for x in client.get("/workers").json()["workers"]}["sup-2"]
        assert (other["restarts"], other["lastExitCode"], other["pid"]) == (
            0,
            None,
            first["sup-2"]["pid"],
        )
        log = sup.output()
        assert f"worker slot 1 (pid {victim}) killed by SIGKILL (exit code -9)" in log, log
        assert "restart 1 in 0.2s" in log, log
        assert f"worker slot 1 restarted as pid {w['pid']} (restart 1)" in log, log

        children = [w["pid"], first["sup-2"]["pid"]]
        sup.popen.send_signal(signal.SIGTERM)
        assert sup.popen.wait(timeout=30) == 0, sup.output()
        assert all(gone(pid) for pid in children), sup.output()
        rows = query(db_url, "SELECT id, status FROM workers WHERE starts_with(id, 'sup-')")
        assert {r["status"] for r in rows} == {"stopped"}, rows
    finally:
        sup.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_while_a_slot_waits_to_restart_exits_zero(
    db_url: str, tmp_path: Path, sig: signal.Signals
) -> None:
    """A slot in its restart pause is not restarted once the supervisor is told to stop
    (SIGTERM or SIGINT, the same)."""
    sup = supervisor(
        db_url, tmp_path, PGDAG_RESTART_BACKOFF_FIRST="30", PGDAG_RESTART_BACKOFF_MAX="60"
    )
    try:
        first = wait_for(
            lambda: (rows := running_rows(db_url)).keys() == {"sup-1", "sup-2"} and rows,
            what="both supervised workers registered",
        )
        os.kill(first["sup-2"]["pid"], signal.SIGKILL)
        wait_for(lambda: "restart 1 in 30s" in sup.output(), what="the restart pause logged")
        started = time.monotonic()
        sup.popen.send_signal(sig)
        assert sup.popen.wait(timeout=30) == 0, sup.output()
        assert time.monotonic() - started < 20  # did not sit out the 30 s pause
        assert gone(first["sup-1"]["pid"])
        assert "restarted as" not in sup.output()
    finally:
        sup.stop()


def test_repeated_config_error_gives_up_with_exit_2(db_url: str, tmp_path: Path) -> None:
    sup = supervisor(db_url, tmp_path, PGDAG_TOOLS="no_such_tool_module_for_the_test")
    try:
        code = sup.popen.wait(timeout=60)
        log = sup.output()
        assert code == 2, log
        assert "cannot import tool module 'no_such_tool_module_for_the_test'" in log
        assert "exited with code 2 (a configuration error) 3 times" in log, log
        assert "giving up" in log
        assert not query(db_url, "SELECT id FROM workers WHERE starts_with(id, 'sup-')")
    finally:
        sup.stop()


def test_nested_supervisor_is_refused(db_url: str, tmp_path: Path) -> None:
    proc = Proc(
        ["-m", "workers", "--processes", "2"],
        base_env(db_url, PGDAG_SUPERVISOR_PID="1"),
        tmp_path / "nested.log",
    )
    assert proc.popen.wait(timeout=30) == 2
    assert "a supervisor does not start supervisors" in proc.output()
    proc.stop()


STUBBORN_CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").close()
while True:
    time.sleep(1)
"""


def test_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    """The supervisor waits the shutdown grace plus KILL_MARGIN_S for its children after
    SIGTERM, then SIGKILLs them (a child here that ignores SIGTERM; no worker needed)."""
    ready = tmp_path / "ready"
    sup = Supervisor(
        [["-c", STUBBORN_CHILD, str(ready)]],
        Settings(shutdown_grace_s=0),
        output=lambda _: (tmp_path / "child.log").open("ab"),
    )
    pids: list[int] = []

    async def scenario() -> int:
        task = asyncio.create_task(sup.run())
        await asyncio.to_thread(wait_for, ready.exists, what="the child ignoring SIGTERM")
        proc = sup.slots[0].proc
        assert proc is not None
        pids.append(proc.pid)
        started = time.monotonic()
        sup.stop()
        code = await asyncio.wait_for(task, KILL_MARGIN_S + 20)
        assert time.monotonic() - started >= KILL_MARGIN_S - 0.5
        assert proc.returncode == -signal.SIGKILL
        return code

    assert asyncio.run(scenario()) == 0
    assert gone(pids[0])
