"""`python -m chaos --agents K`: remote agents killed, their link to the API cut and the API
itself killed and restarted, judged by the checker and by the agents' own logs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, base_env


@pytest.mark.timeout(300)
def test_chaos_with_agents_passes(db_url: str, tmp_path: Path) -> None:
    env = {**base_env(db_url), "PGDAG_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chaos",
            "--agents",
            "3",
            "--seed",
            "11",
            "--steps",
            "30",
            "--kill-every",
            "2",
            "--link-cut-every",
            "3",
            "--api-restarts",
            "1",
            "--timeout",
            "200",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "PASS" in out
    assert "killed and restarted the API" in out and "cut the agent-API link" in out
    # Agents did the work: their logs hold outcomes, each recorded or refused.
    logged = re.search(
        r"agent outcomes logged: recorded / refused by token[\s│]+(\d+): (\d+) / (\d+)", out
    )
    assert logged is not None, out[-3000:]
    total, recorded, refused = map(int, logged.groups())
    assert total > 0 and recorded + refused == total
