"""Small fault injectors for the chaos demo and tests: signals to processes, a Postgres
restart, and database latency through a `chaos.proxy.TcpProxy`.

Each returns once the fault is in force. Durations are float seconds unless the name says
otherwise (``ms``).
"""

from __future__ import annotations

import logging
import os
import signal
import time

from chaos.proxy import TcpProxy
from engine.embedded import EmbeddedCluster

logger = logging.getLogger(__name__)


def kill(pid: int) -> None:
    """SIGKILL process `pid`: it dies at once, without running any cleanup.

    Raises `ProcessLookupError` when there is no such process.
    """
    os.kill(pid, signal.SIGKILL)
    logger.info("sent SIGKILL to pid %d", pid)


def stop(pid: int) -> None:
    """SIGSTOP process `pid`: it freezes (no heartbeats, no I/O) until `cont`; its sockets
    stay open. Raises `ProcessLookupError` when there is no such process."""
    os.kill(pid, signal.SIGSTOP)
    logger.info("sent SIGSTOP to pid %d", pid)


def cont(pid: int) -> None:
    """SIGCONT process `pid`: a process frozen by `stop` resumes where it was.
    Raises `ProcessLookupError` when there is no such process."""
    os.kill(pid, signal.SIGCONT)
    logger.info("sent SIGCONT to pid %d", pid)


def restart_postgres(cluster: EmbeddedCluster, down_s: float = 0) -> float:
    """Restart the embedded Postgres of `cluster`: ``pg_ctl stop -m fast`` (every session
    is disconnected, open transactions roll back), stay down `down_s` more seconds, then
    start it again and wait until it accepts connections.

    Returns the seconds from the start of the stop to the server accepting connections
    again: an upper bound of the outage clients saw. Raises `ValueError` for a negative
    `down_s` and `engine.errors.EmbeddedPostgresError` when it cannot stop or start.
    """
    if down_s < 0:
        raise ValueError(f"down_s must be >= 0, got {down_s}")
    began = time.monotonic()
    was_running = cluster.stop()
    if down_s:
        time.sleep(down_s)  # the outage itself: the fault being injected, not a wait
    cluster.start()
    down_for_s = time.monotonic() - began
    logger.info(
        "restarted embedded postgres in %s (was %s): down %.2fs",
        cluster.home,
        "running" if was_running else "not running",
        down_for_s,
    )
    return down_for_s


def delay_database(proxy: TcpProxy, ms: float) -> None:
    """Make every chunk between the clients of `proxy` and Postgres arrive `ms` milliseconds
    late, each way (so a query's round trip gains at least 2 x `ms`); 0 removes the delay.
    Raises `ValueError` for a negative `ms`."""
    proxy.set_latency(ms)
