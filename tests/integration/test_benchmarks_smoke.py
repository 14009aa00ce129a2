"""`python -m benchmarks --quick` runs end to end (a smoke check; no assertion on speed).

Peers are measured only where `.[bench]` is installed; CI installs `.[dev]`, so there they
are reported as skipped, and the test checks that too.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, base_env


@pytest.mark.timeout(600)
def test_benchmarks_quick_smoke(db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        env=base_env(db_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["settings"]["fsync"] == "on"
    for shape in ("runs", "steps"):
        w1 = results["w1"][shape]
        assert w1["notCompleted"] == 0 and w1["jobs"] == 1000 and w1["jobsPerS"] > 0
    assert results["w1"]["steps"]["rss"]["apiMb"] > 0
    w9 = results["w9"]
    assert w9["notCompleted"] == 0 and w9["jobs"] == 1000 and w9["agents"] == 2, w9
    assert w9["jobsPerSDb"] > 0 and all(mb > 0 for mb in w9["rss"]["agentMb"]), w9
    assert any(g["goal"].startswith("W9 agents") for g in results["goals"])
    assert results["w2"]["notCompleted"] == 0 and results["w2"]["steps"] == 500
    assert results["w3"]["n"] == 30 and results["w3"]["p50Ms"] > 0
    assert set(results["w4"]["rates"]) == {"2000", "20000"}
    assert results["w5"]["steps"] == 1000
    assert results["w6"]["tables"]["steps"]["live"] >= 0
    pruned = results["w6"]["retention"]
    assert pruned["events"] > 0 and pruned["partitions"]["dropped"], pruned
    assert pruned["partitions"]["after"]["dead"] == 0 and pruned["delete"]["after"]["dead"] > 0
    w8 = results["w8"]
    assert w8["children"] == 500 and w8["repeats"] == 3
    assert w8["outputOk"] is True and w8["outputLength"] == 500, w8["runs"]
    for key in ("joinStartS", "expandS", "childrenPerS"):
        assert isinstance(w8[key], int | float) and w8[key] > 0, (key, w8)
    for key in ("joinStartAllS", "expandAllS", "childrenPerSAll"):
        assert len(w8[key]) == 3 and all(isinstance(v, int | float) and v > 0 for v in w8[key])
    assert all(r["expandS"] < r["joinStartS"] for r in w8["runs"]), w8["runs"]
    assert any(g["goal"].startswith("W8 map") for g in results["goals"])
    assert set(results["pgbench"]["tps"]) == {"8", "16"}
    plan = "\n".join(results["explain"]["plans"]["pgdag_pick_ready"])
    assert "steps_ready_idx" in plan  # the claim's walks read the partial index, not the table
    for peer in ("pgqueuer", "procrastinate", "dbos"):
        entry = results["peers"][peer]
        if importlib.util.find_spec(peer) is None:
            assert "skipped" in entry
        else:
            assert "error" not in entry.get("w1", {}), entry
    assert "W1 flat" in proc.stdout and "W8 map" in proc.stdout and "pgbench" in proc.stdout
