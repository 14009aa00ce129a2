"""The HTTP API against a real Postgres, through a real `python -m engine serve` process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import api_server, query, wait_for, wait_run_finished, workers

JSON = {"Content-Type": "application/json"}


def delay(name: str, *deps: str, ms: int = 0, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": ms}, "dependsOn": list(deps), **extra}


def counts(db_url: str) -> tuple[int, int, int]:
    row = query(
        db_url,
        "SELECT (SELECT count(*) FROM runs) r, (SELECT count(*) FROM steps) s,"
        " (SELECT count(*) FROM audit_log) a",
    )[0]
    return row["r"], row["s"], row["a"]


def test_health(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_submit_get_list_and_events(client: httpx.Client) -> None:
    r = client.post("/runs", json={"goal": "demo", "steps": [delay("a"), delay("b", "a")]})
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["status"] == "pending" and run["goal"] == "demo" and run["stepsTotal"] == 2
    assert [(s["name"], s["status"]) for s in run["steps"]] == [("a", "ready"), ("b", "pending")]
    assert run["steps"][1]["idempotencyKey"] == f"{run['id']}:b"
    assert client.get(f"/runs/{run['id']}").json()["id"] == run["id"]
    listed = client.get("/runs", params={"status": "pending"}).json()
    assert [x["id"] for x in listed["runs"]] == [run["id"]]
    assert client.get("/runs", params={"status": "completed"}).json()["runs"] == []
    evs = client.get(f"/runs/{run['id']}/events").json()["events"]
    assert [e["event"] for e in evs] == ["run_created"]


def test_list_runs_pages_newest_first(client: httpx.Client) -> None:
    ids = [client.post("/runs", json={"steps": [delay("a")]}).json()["id"] for _ in range(5)]
    page1 = client.get("/runs", params={"limit": 2}).json()
    page2 = client.get("/runs", params={"limit": 2, "cursor": page1["nextCursor"]}).json()
    page3 = client.get("/runs", params={"limit": 2, "cursor": page2["nextCursor"]}).json()
    got = [r["id"] for p in (page1, page2, page3) for r in p["runs"]]
    assert got == list(reversed(ids))
    assert page3["nextCursor"] is None


@pytest.mark.parametrize(
    ("body", "step", "field", "words"),
    [
        (
            {"steps": [delay("a", "c"), delay("b", "a"), delay("c", "b")]},
            None,
            "dependsOn",
            "cycle",
        ),
        ({"steps": [delay("a", "ghost")]}, "a", "dependsOn", "unknown dependency"),
        ({"steps": [delay("a"), delay("a")]}, "a", "name", "duplicate"),
        ({"steps": [{"name": "x", "tool": "NOPE", "input": {}}]}, "x", "tool", "unknown tool"),
        (
            {"steps": [{"name": "x", "tool": "DELAY", "input": {"ms": -1}}]},
            "x",
            "input.ms",
            "DELAY",
        ),
        ({"steps": [delay(f"s{i}") for i in range(10_001)]}, None, "steps", "too many steps"),
        ({"steps": []}, None, "steps", ""),
    ],
)
def test_bad_graph_is_422_and_writes_nothing(
    client: httpx.Client,
    db_url: str,
    body: dict[str, Any],
    step: str | None,
    field: str,
    words: str,
) -> None:
    before = counts(db_url)
    r = client.post("/runs", json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert payload["error"] == "invalid_request"
    p = payload["problems"][0]
    assert p["field"] == field and words in p["problem"]
    if step is not None:
        assert p["step"] == step
    assert counts(db_url) == before


def test_body_too_large_and_bad_json_are_422(db_url: str, tmp_path: Path) -> None:
    before = counts(db_url)
    big = {"goal": "x" * 70_000, "steps": [delay("a")]}
    with api_server(db_url, tmp_path, PGDAG_MAX_BODY_BYTES=str(64 * 1024)) as base:
        r = httpx.post(f"{base}/runs", json=big)
        assert r.status_code == 422
        assert "body too large" in r.json()["problems"][0]["problem"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the streaming check must catch it
            yield b'{"goal": "'
            for _ in range(100):
                yield b"x" * 1024
            yield b'", "steps": []}'

        r = httpx.post(f"{base}/runs", content=chunks(), headers=JSON)
        assert r.status_code == 422
        assert "body too large" in r.json()["problems"][0]["problem"]
        r = httpx.post(f"{base}/runs", content=b"{not json", headers=JSON)
        assert r.status_code == 422 and "not valid JSON" in r.json()["problems"][0]["problem"]
    assert counts(db_url) == before


def test_bad_query_parameters_name_the_field(client: httpx.Client) -> None:
    r = client.get("/runs", params={"limit": "lots"})
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "limit"
    r = client.get("/runs", params={"status": "sleeping"})
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "status"


def test_unknown_run_is_404(client: httpx.Client) -> None:
    assert client.get("/runs/not-a-uuid").status_code == 404
    r = client.get("/runs/00000000-0000-0000-0000-000000000000")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.post("/runs/00000000-0000-0000-0000-000000000000/cancel", json={})
    assert r.status_code == 404


def test_cancel_then_cancel_again_is_409(client: httpx.Client) -> None:
    run = client.post("/runs", json={"steps": [delay("a"), delay("b", "a")]}).json()
    r = client.post(f"/runs/{run['id']}/cancel", json={})
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert {s["status"] for s in r.json()["steps"]} == {"cancelled"}
    r = client.post(f"/runs/{run['id']}/cancel", json={})
    assert r.status_code == 409 and "already cancelled" in r.json()["message"]


def test_retry_refuses_a_step_not_in_dead_letter(client: httpx.Client) -> None:
    run = client.post("/runs", json={"steps": [delay("a")]}).json()
    r = client.post(f"/runs/{run['id']}/steps/a/retry", json={})
    assert r.status_code == 409 and "not dead_letter" in r.json()["message"]
    r = client.post(f"/runs/{run['id']}/steps/zzz/retry", json={})
    assert r.status_code == 404


def test_5000_step_run_accepted_in_one_request(client: httpx.Client, db_url: str) -> None:
    steps = [delay("root")] + [delay(f"s{i}", "root") for i in range(4999)]
    t0 = time.perf_counter()
    r = client.post("/runs", json={"goal": "big", "steps": steps})
    took = time.perf_counter() - t0
    assert r.status_code == 201, r.text[:500]
    assert len(r.json()["steps"]) == 5000
    assert query(db_url, "SELECT count(*) AS n FROM step_edges")[0]["n"] == 4999
    print(f"\n5,000-step run accepted in {took * 1000:.0f} ms")


def test_workers_lists_live_worker_and_its_step(
    client: httpx.Client, db_url: str, tmp_path: Path
) -> None:
    run = client.post("/runs", json={"steps": [delay("long", ms=20_000)]}).json()
    with workers(db_url, tmp_path, n=1):
        found = wait_for(
            lambda: [w for w in client.get("/workers").json()["workers"] if w["currentSteps"]],
            what="a worker holding a step",
        )
        w = found[0]
        assert w["id"] == "w0" and w["alive"] is True and w["status"] == "running"
        assert w["currentSteps"][0]["stepName"] == "long"
        assert w["currentSteps"][0]["runId"] == run["id"]
        client.post(f"/runs/{run['id']}/cancel", json={})
    w = next(w for w in client.get("/workers").json()["workers"] if w["id"] == "w0")
    assert w["status"] == "stopped" and w["alive"] is False


def test_32_concurrent_submits_with_one_key_make_one_run(db_url: str, tmp_path: Path) -> None:
    body = {"idempotencyKey": "order-42", "steps": [delay("a"), delay("b", "a")]}

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            return await asyncio.gather(*(c.post("/runs", json=body) for _ in range(32)))

    with api_server(db_url, tmp_path) as base:
        responses = asyncio.run(burst(base))
    assert sorted(r.status_code for r in responses) == [200] * 31 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert counts(db_url)[:2] == (1, 2)


def test_api_token_required_when_configured(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, PGDAG_API_TOKEN="s3cret") as base:
        assert httpx.get(f"{base}/runs").status_code == 401
        assert (
            httpx.get(f"{base}/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        ok = httpx.get(f"{base}/runs", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(f"{base}/runs", params={"token": "s3cret"}).status_code == 200
        r = httpx.post(f"{base}/runs", json={"steps": [delay("a")]})
        assert r.status_code == 401 and "bearer" in r.json()["message"]
    assert counts(db_url)[0] == 0


def test_run_through_api_and_workers_completes(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path) as base, workers(db_url, tmp_path, n=2):
        run = httpx.post(
            f"{base}/runs", json={"steps": [delay("a", ms=10), delay("b", "a")]}
        ).json()
        assert wait_run_finished(db_url, run["id"]) == "completed"
        got = httpx.get(f"{base}/runs/{run['id']}").json()
    assert got["status"] == "completed"
    assert [s["output"]["ok"] for s in got["steps"]] == [True, True]
    assert got["stepCounts"] == {"succeeded": 2}
