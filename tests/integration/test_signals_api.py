"""Signals over HTTP against a real ``python -m engine serve`` (one server for the whole
file): POST /runs with wait steps and its 422s, POST /runs/{runId}/signals/{signal} with
its answers (201, 200 for a repeated Idempotency-Key, 404, 409, 422), waitingFor in GET
/runs/{runId}, and the CLI's ``python -m engine signal``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.pgfixtures import Database, cloned_database
from tests.support import ROOT, api_server, base_env

MISSING_RUN = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def api(
    pg_server_url: str, template_db: Database, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """One API server for the module, on a database of its own; yields (base URL, db URL)."""
    with (
        cloned_database(pg_server_url, template_db.name) as db,
        api_server(db.url, tmp_path_factory.mktemp("signals-api")) as base,
    ):
        yield base, db.url


def post_run(base: str, steps: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{base}/runs", json={"steps": steps}, timeout=10)


def by_name(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in run["steps"]}


def test_wait_steps_are_refused_with_a_tool_an_input_or_a_shared_signal(
    api: tuple[str, str],
) -> None:
    base, _ = api
    w = {"signal": "go", "timeoutS": 60}
    r = post_run(
        base,
        [
            {"name": "a", "wait": w, "tool": "DELAY", "input": {"ms": 1}, "delayMs": 5},
            {"name": "b", "wait": w},
            {"name": "e"},
        ],
    )
    assert r.status_code == 422, r.text
    got = {(p["step"], p["field"]) for p in r.json()["problems"]}
    assert got == {
        ("a", "tool"),
        ("a", "input"),
        ("a", "delayMs"),
        ("b", "wait.signal"),
        ("e", "tool"),
    }
    r = post_run(
        base,
        [
            {"name": "c", "wait": {"signal": "x", "timeoutS": 0}},
            {"name": "d", "wait": {"signal": "bad/name", "timeoutS": 5, "extra": 1}},
            {"name": "f", "wait": {"signal": "y", "timeoutS": 2_592_001}},
        ],
    )
    assert r.status_code == 422, r.text
    got = {(p["step"], p["field"]) for p in r.json()["problems"]}
    assert got == {
        ("c", "wait.timeoutS"),
        ("d", "wait.signal"),
        ("d", "wait.extra"),
        ("f", "wait.timeoutS"),
    }
    assert httpx.get(f"{base}/runs", timeout=10).json()["runs"] == []  # nothing written


def test_signal_over_http_and_the_cli(api: tuple[str, str]) -> None:
    base, db_url = api
    r = post_run(
        base,
        [
            {"name": "approve", "wait": {"signal": "approval", "timeoutS": 600, "approval": True}},
            {"name": "hook", "wait": {"signal": "webhook", "timeoutS": 600}},
        ],
    )
    assert r.status_code == 201, r.text
    run = r.json()
    run_id = run["id"]
    approve = by_name(run)["approve"]
    assert approve["status"] == "pending"
    assert approve["waitingFor"]["reason"] == "signal"
    assert approve["waitingFor"]["approval"] is True
    assert approve["waitingFor"]["deadline"] == approve["availableAt"]

    url = f"{base}/runs/{run_id}/signals/approval"
    first = httpx.post(url, json={"approved": True, "by": "ada"}, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["id"] == "k1" and body["consumedBy"] == "approve"
    assert (body["stepStatus"], body["repeated"], body["runId"]) == ("succeeded", False, run_id)
    again = httpx.post(url, json={"approved": False}, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200, again.text
    assert again.json()["repeated"] is True
    assert again.json()["payload"] == {"approved": True, "by": "ada"}
    step = by_name(httpx.get(f"{base}/runs/{run_id}").json())["approve"]
    assert (step["status"], step["output"], step["waitingFor"]) == (
        "succeeded",
        {"approved": True, "by": "ada"},
        None,
    )

    refused = {
        "unknown run": (
            httpx.post(f"{base}/runs/{MISSING_RUN}/signals/approval", json={}),
            404,
        ),
        "nothing waits": (httpx.post(f"{base}/runs/{run_id}/signals/nothing", json={}), 409),
        "step done": (httpx.post(url, json={}, headers={"Idempotency-Key": "k2"}), 409),
        "bad name": (httpx.post(f"{base}/runs/{run_id}/signals/-x", json={}), 422),
        "not an object": (httpx.post(f"{base}/runs/{run_id}/signals/webhook", json=[1]), 422),
        "long key": (
            httpx.post(
                f"{base}/runs/{run_id}/signals/webhook",
                json={},
                headers={"Idempotency-Key": "k" * 256},
            ),
            422,
        ),
    }
    for what, (resp, code) in refused.items():
        assert resp.status_code == code, (what, resp.text)
    assert "already succeeded" in refused["step done"][0].json()["message"]
    assert "waits for signal 'nothing'" in refused["nothing waits"][0].json()["message"]

    # the CLI sends one through the client
    cli = subprocess.run(
        [
            *(sys.executable, "-m", "engine", "signal", run_id, "webhook"),
            *("--payload", '{"n": 1}', "--id", "cli-1", "--url", base),
        ],
        env=base_env(db_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    answer = json.loads(cli.stdout)
    assert (answer["id"], answer["consumedBy"], answer["stepStatus"]) == (
        "cli-1",
        "hook",
        "succeeded",
    )
    assert httpx.get(f"{base}/runs/{run_id}").json()["status"] == "completed"
    late = subprocess.run(
        [sys.executable, "-m", "engine", "signal", run_id, "webhook", "--url", base],
        env=base_env(db_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert late.returncode == 2 and "already completed" in late.stderr, late.stderr


def test_cli_refuses_a_payload_that_is_not_an_object(tmp_path: Path) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "engine", "signal", MISSING_RUN, "go", "--payload", "[1]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base_env("postgresql://unused"), "HOME": str(tmp_path)},
    )
    assert cli.returncode == 2 and "--payload must be a JSON object" in cli.stderr
