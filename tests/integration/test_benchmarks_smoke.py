"""`python -m benchmarks --quick` runs end to end (a smoke check; no assertion on speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, base_env


def test_benchmarks_quick_smoke(db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        env=base_env(db_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["drain"]["status"] == "completed"
    assert results["accept"]["steps"] == 500
    plan = "\n".join(results["explain"]["plans"]["claim_steps"])
    assert "steps_ready_idx" in plan  # the claim reads the partial index, not the table
    assert "drain" in proc.stdout and "accept" in proc.stdout
