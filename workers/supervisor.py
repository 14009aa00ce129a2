"""``python -m workers --processes N ...``: N worker processes under a `Supervisor`
(engine/supervisor.py has the restart policy, the logging and the shutdown).

Each of the N slots runs ``sys.executable -m workers <the same flags minus --processes>``:
``--worker-id BASE`` becomes ``--worker-id BASE-<slot>`` (slots counted from 1); without
it each child takes its default id; ``--metrics-port PORT`` becomes ``PORT + slot - 1``
(the first child serves on PORT; 0 stays 0, off). Every other flag passes through
unchanged, so flags added to the worker later need nothing here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from engine.config import Settings
from engine.errors import PgdagError
from engine.supervisor import CONFIG_ERROR_EXIT, SUPERVISOR_ENV, Supervisor

logger = logging.getLogger(__name__)


def _is_flag(name: str, flag: str) -> bool:
    """Whether `name` spells `flag` or an abbreviation argparse would accept for it."""
    return name.startswith("--") and len(name) > 2 and flag.startswith(name)


def child_argv(argv: Sequence[str], slot: int) -> list[str]:
    """The flags of slot `slot`'s child: `argv` (the supervisor's own flags, without the
    program) minus ``--processes``, with ``--worker-id BASE`` made ``--worker-id
    BASE-<slot>`` and ``--metrics-port PORT`` made ``PORT + slot - 1`` (unless 0, or not a
    number: the child refuses it); every other flag passes through unchanged."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token.partition("=")
        if _is_flag(name, "--processes"):
            i += 1 if eq else 2
            continue
        if _is_flag(name, "--worker-id"):
            base = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            out += ["--worker-id", f"{base}-{slot}"]
            i += 1 if eq else 2
            continue
        if _is_flag(name, "--metrics-port") and len(name) > len("--metrics-"):
            port = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            out += ["--metrics-port", metrics_port(port, slot)]
            i += 1 if eq else 2
            continue
        out.append(token)
        i += 1
    return out


def metrics_port(port: str, slot: int) -> str:
    """Slot `slot`'s ``--metrics-port`` (slots from 1): `port` + slot - 1; "0" (off) and
    text that is not a number pass through unchanged (the child's parser refuses it)."""
    try:
        first = int(port)
    except ValueError:
        return port
    return str(first + slot - 1) if first else port


def supervise(argv: Sequence[str], processes: int) -> int:
    """``python -m workers --processes N`` (`argv`: the flags as given, without the
    program): run `processes` supervised workers until SIGTERM/SIGINT. Returns the exit
    code: 0 after a signal, 2 on a configuration error (bad PGDAG_RESTART_* settings, a
    supervisor inside a supervised worker, a slot that kept exiting with code 2)."""
    if processes < 1:
        sys.stderr.write("pgdag: error: --processes must be >= 1\n")
        return CONFIG_ERROR_EXIT
    if os.environ.get(SUPERVISOR_ENV):
        sys.stderr.write(
            f"pgdag: error: --processes given to a worker that is itself supervised "
            f"({SUPERVISOR_ENV} is set); a supervisor does not start supervisors\n"
        )
        return CONFIG_ERROR_EXIT
    try:
        settings = Settings.from_env()
    except PgdagError as exc:
        sys.stderr.write(f"pgdag: error: {exc}\n")
        return CONFIG_ERROR_EXIT
    supervisor = Supervisor(
        [["-m", "workers", *child_argv(argv, i)] for i in range(1, processes + 1)], settings
    )

    async def main() -> int:
        supervisor.install_signal_handlers()
        logger.info(
            "supervisor %d: %d worker process(es); restart backoff %gs doubling to %gs, "
            "reset after %gs up",
            os.getpid(),
            processes,
            settings.restart_backoff_first_s,
            settings.restart_backoff_max_s,
            settings.restart_reset_s,
        )
        return await supervisor.run()

    code = asyncio.run(main())
    if supervisor.gave_up is not None:
        sys.stderr.write(f"pgdag: error: {supervisor.gave_up}\n")
    return code
