"""``python -m benchmarks.peers.worker <peer> --dsn URL ...``: one worker process of a peer
driver (the driver starts these; see `_common` for the start barrier).

A module of its own, so that the driver module is imported once, under its own name, and
never as ``__main__`` (which would import it twice, and which Procrastinate warns about for
an app).
"""

from __future__ import annotations

import importlib
import sys

PEER_MODULES = {
    "pgqueuer": "benchmarks.peers.pgqueuer_bench",
    "procrastinate": "benchmarks.peers.procrastinate_bench",
    "dbos": "benchmarks.peers.dbos_bench",
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in PEER_MODULES:
        raise SystemExit(
            f"usage: python -m benchmarks.peers.worker {{{','.join(PEER_MODULES)}}} ..."
        )
    importlib.import_module(PEER_MODULES[args[0]]).worker_main(args[1:])


if __name__ == "__main__":
    main()
