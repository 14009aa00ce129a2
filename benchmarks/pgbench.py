"""The raw ceiling: pgbench's single-row UPDATE rate on the same Postgres.

Every pgdag figure can then be read as a fraction of what this Postgres can commit: a
step's claim and its completion are each at least one such committed UPDATE.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import scratch_db

SCRIPT = r"""\set aid random(1, 100000 * :scale)
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
"""


def find_pgbench() -> str | None:
    """pgbench on PATH, or beside the server binaries Debian keeps off PATH."""
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))
    return str(candidates[-1]) if candidates else None


def run(base: str, clients: tuple[int, ...], seconds: int) -> dict[str, Any]:
    """Committed single-row UPDATEs per second at each client count (scale 1: 100,000
    rows, random keys), `seconds` per point. Raises RuntimeError if pgbench is missing."""
    pgbench = find_pgbench()
    if pgbench is None:
        raise RuntimeError("pgbench not found (Debian: postgresql-client or postgresql)")
    out: dict[str, Any] = {"seconds": seconds, "tps": {}}
    with scratch_db(base, "pgdag_bench_pgbench", migrate=False) as url:
        subprocess.run([pgbench, "-i", "-q", "-s", "1", url], check=True, capture_output=True)
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write(SCRIPT)
            script.flush()
            for c in clients:
                proc = subprocess.run(
                    [
                        pgbench,
                        "-n",
                        "-f",
                        script.name,
                        "-c",
                        str(c),
                        "-j",
                        "2",
                        "-T",
                        str(seconds),
                        url,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", proc.stdout)
                if m is None:
                    raise RuntimeError(f"cannot read pgbench's output:\n{proc.stdout}")
                out["tps"][str(c)] = round(float(m.group(1)))
    return out
