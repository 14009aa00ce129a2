"""Process supervision: keep N child processes (pgdag workers) up, restarting any that exits.

`workers.supervisor` (``python -m workers --processes N``) and ``python -m engine dev`` run
their workers under `Supervisor`; it lives in `engine` because it knows nothing of what a
worker does (only how to start it, ``sys.executable <argv>``) and ``engine dev`` may not
import `workers`.

A child that exits, whatever the reason, is restarted after a pause (`RestartBackoff`):
``PGDAG_RESTART_BACKOFF_FIRST`` seconds (default 1),
doubling per restart up to ``PGDAG_RESTART_BACKOFF_MAX`` (default 60), and back to the
first pause once a child stayed up ``PGDAG_RESTART_RESET`` seconds (default 60)::

    start -> running --exit--> log "exited/killed ...; restart k in d s" --d s--> start
                                  |
                                  +-- code 2 within 5 s of start, 3 times in a row:
                                      configuration error, give up: exit 2

The child learns its slot's history from its environment, ``PGDAG_RESTARTS`` (restarts so
far) and ``PGDAG_LAST_EXIT_CODE`` (how the previous process ended; negative: the signal
that killed it), and puts both in its workers row (GET /workers ``restarts``,
``lastExitCode``).

SIGTERM or SIGINT to the supervisor: SIGTERM to every child, wait up to the shutdown
grace (``PGDAG_SHUTDOWN_GRACE``) plus `KILL_MARGIN_S`, SIGKILL whatever is left, exit 0.

``engine dev`` runs its `Supervisor` in a thread (`Supervisor.stop_threadsafe`) and prints
each exit and restart to the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

from engine.config import Settings

logger = logging.getLogger(__name__)

CONFIG_ERROR_EXIT = 2  # what `python -m workers` exits with on a configuration error
CONFIG_ERROR_WINDOW_S = 5.0  # an exit 2 this soon after start counts as a config error
CONFIG_ERROR_LIMIT = 3  # consecutive config errors of one slot before giving up
KILL_MARGIN_S = 5.0  # waited beyond the shutdown grace before SIGKILL
# Set in every child's environment: a child that sees it refuses to supervise (no nesting).
SUPERVISOR_ENV = "PGDAG_SUPERVISOR_PID"
RESTARTS_ENV = "PGDAG_RESTARTS"
LAST_EXIT_CODE_ENV = "PGDAG_LAST_EXIT_CODE"


@dataclass
class RestartBackoff:
    """The restart schedule of one slot: `next_delay` returns the pause (seconds) before
    the next start; `first_s`, then doubling after every call up to `max_s`. A child that
    stayed up at least `reset_s` seconds resets the schedule: its pause is `first_s` again.
    No jitter: the schedule is what the operator reads in the log."""

    first_s: float
    max_s: float
    reset_s: float
    _next_s: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next_s = self.first_s

    def next_delay(self, uptime_s: float) -> float:
        """The pause before restarting a child that ran `uptime_s` seconds."""
        if uptime_s >= self.reset_s:
            self._next_s = self.first_s
        delay = self._next_s
        self._next_s = min(self.max_s, self._next_s * 2)
        return delay


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``killed by SIGKILL (exit code -9)`` for a
    `subprocess` return code (negative: the signal number)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name} (exit code {code})"
    return f"exited with code {code}"


@dataclass
class _Slot:
    index: int  # from 1
    label: str  # in the log lines
    argv: list[str]  # after sys.executable
    backoff: RestartBackoff
    restarts: int = 0
    last_exit_code: int | None = None
    quick_config_errors: int = 0
    proc: asyncio.subprocess.Process | None = None


class Supervisor:
    """Keeps one child process per entry of `argvs` running (each entry is the argv after
    ``sys.executable``, e.g. ``["-m", "workers", "--worker-id", "w-1"]``).

    `env` is the children's base environment (default `os.environ`); `output(slot)` gives
    the file a slot's child writes its stdout and stderr to (default: inherited), opened
    once per slot. `notify(line)`, when given, receives each exit, restart and giving-up
    line instead of the log (``engine dev`` prints them). `labels` name the slots in those
    lines (default ``worker slot <i>``). `settings` gives the restart schedule and the shutdown
    grace. `run()` returns the exit code: 0 after `stop()`, 2 after giving up on a slot.
    """

    def __init__(
        self,
        argvs: Sequence[Sequence[str]],
        settings: Settings,
        *,
        env: dict[str, str] | None = None,
        output: Callable[[int], IO[bytes]] | None = None,
        notify: Callable[[str], None] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        if not argvs:
            raise ValueError("a supervisor needs at least one child")
        if labels is not None and len(labels) != len(argvs):
            raise ValueError("one label per child")
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        self.slots = [
            _Slot(
                index=i,
                label=labels[i - 1] if labels is not None else f"worker slot {i}",
                argv=list(argv),
                backoff=RestartBackoff(
                    settings.restart_backoff_first_s,
                    settings.restart_backoff_max_s,
                    settings.restart_reset_s,
                ),
            )
            for i, argv in enumerate(argvs, start=1)
        ]
        self._output = output
        self._notify = notify
        self._files: dict[int, IO[bytes]] = {}
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = threading.Event()
        self._exit_code = 0
        self.gave_up: str | None = None  # the reason, after giving up

    # --- control ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every child (SIGTERM) and end `run()`; call it in the supervisor's loop."""
        self._stop_requested.set()
        if self._stopping is not None and not self._stopping.is_set():
            logger.info("supervisor stopping: SIGTERM to %d child(ren)", self._live())
            self._stopping.set()
            self._signal_children(signal.SIGTERM)

    def stop_threadsafe(self) -> None:
        """`stop()` from another thread (``engine dev`` runs the supervisor in one)."""
        self._stop_requested.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(self.stop)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT call `stop()` (main thread only)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    # --- running ------------------------------------------------------------------------

    async def run(self) -> int:
        """Start every slot and keep it running until `stop()` or a slot is given up on;
        then SIGTERM the children, wait up to the shutdown grace plus `KILL_MARGIN_S`,
        SIGKILL the rest. Returns 0, or 2 when a slot kept failing on its configuration."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested.is_set():
            self._stopping.set()
        tasks = [asyncio.create_task(self._run_slot(s), name=f"slot-{s.index}") for s in self.slots]
        try:
            await self._stopping.wait()
            self._signal_children(signal.SIGTERM)
            wait_s = self.settings.shutdown_grace_s + KILL_MARGIN_S
            _, pending = await asyncio.wait(tasks, timeout=wait_s)
            if pending:
                logger.warning(
                    "%d child(ren) still running %.1fs after SIGTERM: SIGKILL",
                    self._live(),
                    wait_s,
                )
                self._signal_children(signal.SIGKILL)
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for fh in self._files.values():
                fh.close()
        logger.info("supervisor stopped")
        return self._exit_code

    def _live(self) -> int:
        return sum(1 for s in self.slots if s.proc is not None and s.proc.returncode is None)

    def _signal_children(self, sig: int) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def _say(self, level: int, line: str) -> None:
        """An exit, restart or giving-up line: to `notify` when given, else to the log."""
        if self._notify is not None:
            self._notify(line)
        else:
            logger.log(level, "%s", line)

    def _child_env(self, slot: _Slot) -> dict[str, str]:
        env = dict(self.env)
        env[SUPERVISOR_ENV] = str(os.getpid())
        env[RESTARTS_ENV] = str(slot.restarts)
        if slot.last_exit_code is None:
            env.pop(LAST_EXIT_CODE_ENV, None)
        else:
            env[LAST_EXIT_CODE_ENV] = str(slot.last_exit_code)
        return env

    def _stdout(self, slot: _Slot) -> IO[bytes] | None:
        if self._output is None:
            return None
        if slot.index not in self._files:
            self._files[slot.index] = self._output(slot.index)
        return self._files[slot.index]

    async def _run_slot(self, slot: _Slot) -> None:
        stopping = self._stopping
        assert stopping is not None
        while not stopping.is_set():
            out = self._stdout(slot)
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *slot.argv,
                    env=self._child_env(slot),
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT if out is not None else None,
                    # Its own session: a Ctrl+C in the terminal reaches the supervisor only,
                    # which stops the children with SIGTERM, once.
                    start_new_session=True,
                )
            except OSError as exc:  # cannot start at all: retrying will not help
                self._give_up(f"{slot.label} cannot start: {exc}")
                return
            slot.proc = proc
            started = time.monotonic()
            if stopping.is_set():  # stop() ran while this child was being started
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            if slot.restarts:
                self._say(
                    logging.INFO,
                    f"{slot.label} restarted as pid {proc.pid} (restart {slot.restarts})",
                )
            else:
                logger.info("%s started as pid %d", slot.label, proc.pid)
            code = await proc.wait()
            uptime_s = time.monotonic() - started
            if stopping.is_set():
                logger.info(
                    "%s (pid %d) %s on shutdown",
                    slot.label,
                    proc.pid,
                    describe_exit(code),
                )
                return
            slot.last_exit_code = code
            if code == CONFIG_ERROR_EXIT and uptime_s < CONFIG_ERROR_WINDOW_S:
                slot.quick_config_errors += 1
            else:
                slot.quick_config_errors = 0
            if slot.quick_config_errors >= CONFIG_ERROR_LIMIT:
                self._give_up(
                    f"{slot.label} exited with code {CONFIG_ERROR_EXIT} (a "
                    f"configuration error) {CONFIG_ERROR_LIMIT} times, each within "
                    f"{CONFIG_ERROR_WINDOW_S:g} s of its start; giving up (see its output above)"
                )
                return
            delay_s = slot.backoff.next_delay(uptime_s)
            slot.restarts += 1
            self._say(
                logging.WARNING,
                f"{slot.label} (pid {proc.pid}) {describe_exit(code)} after "
                f"{uptime_s:.1f}s; restart {slot.restarts} in {delay_s:g}s",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay_s)

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        self._exit_code = CONFIG_ERROR_EXIT
        self._say(logging.ERROR, reason)
        assert self._stopping is not None
        self._stopping.set()
        self._signal_children(signal.SIGTERM)
