"""Schemathesis against the live API: a real `python -m engine serve` on a real migrated
Postgres, fuzzed from the API's own ``GET /openapi.json``.

Checks: no 5xx (``not_a_server_error``), every status code documented
(``status_code_conformance``), the documented content type (``content_type_conformance``), and
every body valid against the documented schema (``response_schema_conformance``). Any finding
fails the test, and schemathesis's report of every finding (with a curl line reproducing it)
is printed.

The budget fits CI: ``PGDAG_FUZZ_EXAMPLES`` test cases per operation (default 25) with a fixed
seed (``PGDAG_FUZZ_SEED``, default 10) and no example database, so a CI failure
reproduces on a laptop. A longer fuzz: ``PGDAG_FUZZ_EXAMPLES=500 PGDAG_FUZZ_TIMEOUT=900
python -m pytest tests/integration/test_fuzz_api.py`` (another seed finds other cases),
or the CLI against any running API (docs/api.md, "OpenAPI and fuzzing"). No worker runs here, so no
generated HTTP_GET_JSON step fetches anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import api_server, submit

FUZZ_EXAMPLES = int(os.environ.get("PGDAG_FUZZ_EXAMPLES", "25"))
FUZZ_SEED = int(os.environ.get("PGDAG_FUZZ_SEED", "10"))
# Seconds schemathesis may take; the default fits CI's per-test budget (pytest's 180 s).
FUZZ_TIMEOUT_S = float(os.environ.get("PGDAG_FUZZ_TIMEOUT", "140"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


def schemathesis_argv(base: str) -> list[str]:
    """The `schemathesis run` command line this test runs against the API at `base`."""
    return [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{base}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(FUZZ_EXAMPLES),
        "--seed",
        str(FUZZ_SEED),
        "--generation-database",
        "none",  # the seed alone decides what is generated: CI and a laptop agree
        "--continue-on-failure",
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--no-color",
    ]


@pytest.mark.timeout(FUZZ_TIMEOUT_S + 40)
def test_fuzz_the_whole_api(db_url: str, tmp_path: Path) -> None:
    # A run already there, so GET /runs has a page to describe before the fuzzer creates any.
    submit(
        db_url, {"goal": "fuzz seed", "steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0}}]}
    )
    # An agent's claim long-polls up to PGDAG_AGENT_MAX_WAIT: keep it below the request
    # timeout (a generated waitMs above it is a documented 422).
    with api_server(db_url, tmp_path, PGDAG_AGENT_MAX_WAIT="1") as base:
        document = httpx.get(f"{base}/openapi.json", timeout=10)
        assert document.status_code == 200, document.text
        proc = subprocess.run(
            schemathesis_argv(base),
            capture_output=True,
            text=True,
            timeout=FUZZ_TIMEOUT_S,
            cwd=tmp_path,  # schemathesis writes nothing into the work tree
            env={**os.environ, "NO_COLOR": "1"},
        )
    output = proc.stdout + proc.stderr
    print(output)  # the summary, also of a clean run (pytest -rP shows it)
    assert proc.returncode == 0, f"schemathesis found problems:\n{output}"
