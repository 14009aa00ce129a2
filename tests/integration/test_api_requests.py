"""Requests that used to break the API (issue 10, part 4), against a real `engine serve` on a
real Postgres: timestamps outside what Python and Postgres both hold, NUL and lone surrogates,
an idempotency key reused with another payload, and the JSON shape of every error, a 500
included, on a keep-alive connection that survives it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_api import counts, delay
from tests.integration.test_ws import close_code, recv, ws_connect
from tests.support import api_server, query, submit

INTERNAL = {"error": "internal", "message": "internal error; see the server log"}


def post_raw(c: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST `text` as the body, as it is: JSON escapes such as ``\\u0000`` reach the server."""
    return c.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def assert_refused(
    c: httpx.Client, db_url: str, r: httpx.Response, field: str, step: str | None = None
) -> dict[str, Any]:
    """422 in the JSON error shape naming `field` (and `step`), nothing written, reads fine."""
    assert r.status_code == 422, r.text
    payload = r.json()
    assert set(payload) == {"error", "message", "problems"}
    assert payload["error"] == "invalid_request"
    fields = [(p["step"], p["field"]) for p in payload["problems"]]
    assert (step, field) in fields, fields
    assert counts(db_url) == (0, 0, 0)
    assert c.get("/runs").status_code == 200
    problem: dict[str, Any] = next(p for p in payload["problems"] if p["field"] == field)
    return problem


def local_port(r: httpx.Response) -> int:
    """The client-side port of the connection that carried `r` (same port: same connection)."""
    port: int = r.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


# --- timestamps -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start_at",
    [
        "0001-01-01T00:00:00+01:00",  # year 0 in UTC
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
        "1969-12-31T23:59:59Z",  # before the lower bound
    ],
)
def test_start_at_out_of_bounds_is_422(client: httpx.Client, db_url: str, start_at: str) -> None:
    r = client.post("/runs", json={"startAt": start_at, "steps": [delay("a")]})
    problem = assert_refused(client, db_url, r, "startAt")
    assert "1970-01-01" in problem["problem"] and "9999" in problem["problem"]


def test_start_at_at_the_bounds_is_accepted_and_reads_back(client: httpx.Client) -> None:
    for start_at in ("1970-01-01T01:00:00+01:00", "9999-12-30T23:59:59Z"):
        r = client.post("/runs", json={"startAt": start_at, "steps": [delay("a")]})
        assert r.status_code == 201, r.text
        assert client.get(f"/runs/{r.json()['id']}").status_code == 200
    assert len(client.get("/runs").json()["runs"]) == 2


@pytest.mark.parametrize("field", ["since", "until"])
def test_retry_dead_letters_bounds_since_and_until(client: httpx.Client, field: str) -> None:
    for value in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        r = client.post("/runs/retry-dead-letters", json={field: value})
        assert r.status_code == 422, r.text
        payload = r.json()
        assert payload["error"] == "invalid_request"
        assert [p["field"] for p in payload["problems"]] == [field]
    ok = client.post("/runs/retry-dead-letters", json={"since": "1970-01-01T00:00:00Z"})
    assert ok.status_code == 200, ok.text


# --- text Postgres cannot store ---------------------------------------------------------------


STEP_A = '{"name": "a", "tool": "DELAY", "input": {"ms": 0}}'


def with_step(fields: str) -> str:
    """A body of JSON text: `fields`, then one good step."""
    return "{" + fields + ', "steps": [' + STEP_A + "]}"


def emit_step(value_text: str) -> str:
    """A body of JSON text: one TEST_EMIT step (its input takes any JSON) with `value_text`."""
    return '{"steps": [{"name": "a", "tool": "TEST_EMIT", "input": {"value": ' + value_text + "}}]}"


@pytest.mark.parametrize(
    ("body", "step", "field"),
    [
        (with_step('"goal": "x\\u0000y"'), None, "goal"),
        (with_step('"goal": "x\\ud800y"'), None, "goal"),
        (with_step('"idempotencyKey": "k\\u0000"'), None, "idempotencyKey"),
        ('{"steps": [{"name": "a\\u0000", "tool": "DELAY", "input": {}}]}', "#0", "name"),
        (
            '{"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0},'
            ' "concurrencyKey": "k\\u0000", "maxConcurrency": 1}]}',
            "a",
            "concurrencyKey",
        ),
        (
            '{"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0},'
            ' "concurrencyKey": "k\\udfff", "maxConcurrency": 1}]}',
            "a",
            "concurrencyKey",
        ),
        (with_step('"\\ud800": 1'), None, "body"),
    ],
)
def test_nul_and_lone_surrogates_are_422_naming_the_field(
    client: httpx.Client, db_url: str, body: str, step: str | None, field: str
) -> None:
    r = post_raw(client, "/runs", body)
    problem = assert_refused(client, db_url, r, field, step)
    assert "NUL" in problem["problem"] or "surrogate" in problem["problem"]
    # The keep-alive connection is still good, and the API still accepts runs.
    ok = client.post("/runs", json={"steps": [delay("a")]})
    assert ok.status_code == 201 and local_port(ok) == local_port(r)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ('["ok", "\\u0000"]', "input.value.1"),
        ('{"y": "\\ud800"}', "input.value.y"),
        ('{"k\\u0000": 1}', "input.value"),
        ('{"\\ud83d": 1}', "input.value"),
    ],
)
def test_nul_and_lone_surrogates_anywhere_in_a_step_input_are_422(
    db_url: str, tmp_path: Path, value: str, field: str
) -> None:
    with (
        api_server(db_url, tmp_path, PGDAG_TOOLS="tests.testtools") as base,
        httpx.Client(base_url=base, timeout=60) as c,
    ):
        r = post_raw(c, "/runs", emit_step(value))
        problem = assert_refused(c, db_url, r, field, "a")
        assert "NUL" in problem["problem"] or "surrogate" in problem["problem"]
        ok = post_raw(c, "/runs", emit_step('"fine"'))
        assert ok.status_code == 201 and local_port(ok) == local_port(r)


def test_nul_in_a_replay_or_bulk_retry_body_is_422(client: httpx.Client) -> None:
    run = client.post("/runs", json={"steps": [delay("a")]}).json()
    r = post_raw(client, f"/runs/{run['id']}/replay", '{"from": "a", "reason": "r\\u0000"}')
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "reason", r.text
    r = post_raw(client, "/runs/retry-dead-letters", '{"tool": "\\ud800"}')
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "tool", r.text
    assert client.get(f"/runs/{run['id']}").status_code == 200


# --- idempotency keys -------------------------------------------------------------------------


def test_same_key_same_payload_is_the_run_another_payload_is_422(
    client: httpx.Client, db_url: str
) -> None:
    body = {"idempotencyKey": "order-7", "goal": "g", "steps": [delay("a"), delay("b", "a")]}
    first = client.post("/runs", json=body)
    assert first.status_code == 201
    # The same payload, spelled differently: defaults explicit, keys reordered, startAt absent.
    same = {
        "steps": [
            {**delay("a"), "maxAttempts": 3, "idempotent": True, "runIf": "all_succeeded"},
            delay("b", "a"),
        ],
        "priority": 0,
        "goal": "g",
        "idempotencyKey": "order-7",
    }
    again = client.post("/runs", json=same)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = client.post("/runs", json={**body, "goal": "another goal"})
    assert other.status_code == 422, other.text
    payload = other.json()
    assert payload["error"] == "idempotency_key_reused"
    assert [p["field"] for p in payload["problems"]] == ["idempotencyKey"]
    assert "order-7" in payload["message"]
    assert counts(db_url)[:2] == (1, 2)


def test_start_at_in_another_zone_is_the_same_payload(client: httpx.Client) -> None:
    body = {"idempotencyKey": "k", "startAt": "2030-01-01T01:00:00+01:00", "steps": [delay("a")]}
    first = client.post("/runs", json=body)
    again = client.post("/runs", json={**body, "startAt": "2030-01-01T00:00:00Z"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


def test_concurrent_submits_one_key_two_payloads(db_url: str, tmp_path: Path) -> None:
    body = {"idempotencyKey": "order-42", "steps": [delay("a"), delay("b", "a")]}
    other = {**body, "goal": "not the same"}

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            first = await c.post("/runs", json=body)
            rest = await asyncio.gather(
                *(c.post("/runs", json=body if i % 2 else other) for i in range(32))
            )
            return [first, *rest]

    with api_server(db_url, tmp_path) as base:
        responses = asyncio.run(burst(base))
    assert responses[0].status_code == 201
    assert sorted(r.status_code for r in responses[1:]) == [200] * 16 + [422] * 16
    assert len({r.json()["id"] for r in responses if r.status_code < 300}) == 1
    assert counts(db_url)[:2] == (1, 2)


def test_run_from_before_the_fingerprint_keeps_its_key(client: httpx.Client, db_url: str) -> None:
    first = client.post("/runs", json={"idempotencyKey": "old", "steps": [delay("a")]}).json()
    query(db_url, "UPDATE runs SET idempotency_fingerprint = NULL")  # as migrated from 0003
    r = client.post("/runs", json={"idempotencyKey": "old", "goal": "new", "steps": [delay("b")]})
    assert r.status_code == 200 and r.json()["id"] == first["id"]


# --- the 500 --------------------------------------------------------------------------------


def test_internal_error_is_json_keeps_the_connection_and_logs_the_traceback(
    client: httpx.Client, db_url: str, tmp_path: Path
) -> None:
    ok = client.get("/workers")
    assert ok.status_code == 200
    query(db_url, "DROP TABLE workers CASCADE")  # a schema broken under the API's feet
    r = client.get("/workers")
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json() == INTERNAL
    assert r.headers.get("connection", "").lower() != "close"
    after = client.get("/health")
    assert after.status_code == 200 and local_port(after) == local_port(r)
    log = (tmp_path / "api.log").read_text()
    assert "Traceback" in log and "UndefinedTable" in log
    assert "Traceback" not in r.text


def test_websocket_internal_error_closes_1011_without_a_traceback(
    db_url: str, tmp_path: Path
) -> None:
    run_id = submit(db_url, {"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0}}]})
    # A start time no read can load (year 0 in UTC), written straight to the table: what the
    # API stored before startAt was bounded, until migration 0005 repaired such rows.
    query(db_url, "UPDATE runs SET start_at = '0001-12-31 23:00:00+00 BC'")
    with api_server(db_url, tmp_path) as base:
        with ws_connect(base, f"/ws/runs/{run_id}") as ws:
            message = recv(ws)
            assert message == {"type": "error", **INTERNAL}
            assert close_code(ws) == 1011
        with httpx.Client(base_url=base) as c:
            r = c.get(f"/runs/{run_id}")
            assert r.status_code == 500 and r.json() == INTERNAL
            assert c.get("/health").status_code == 200
    log = (tmp_path / "api.log").read_text()
    assert "Traceback" in log
    assert json.dumps(message).find("Traceback") == -1


@pytest.mark.parametrize("name", ["%00", "%ED%A0%80", "a%00b"])
def test_a_step_name_postgres_cannot_hold_in_the_path_is_404(
    client: httpx.Client, db_url: str, name: str
) -> None:
    """A NUL (or bytes that are no UTF-8) in the step name of the retry path names no step:
    404 in the JSON shape, never a 500 from the query Postgres refuses."""
    run = client.post(
        "/runs", json={"steps": [delay("a")]}, headers={"Content-Type": "application/json"}
    ).json()
    r = client.post(f"/runs/{run['id']}/steps/{name}/retry", json={})
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "not_found"
    assert client.get(f"/runs/{run['id']}").status_code == 200


def test_unknown_path_and_method_answer_in_the_json_error_shape(client: httpx.Client) -> None:
    """Starlette's own 404 and 405 are plain text unless the API maps them; every error of
    the API is ``{"error", "message"}`` (the 405 keeps its Allow header)."""
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong = client.delete("/runs", headers={"Content-Type": "application/json"})
    assert wrong.status_code == 405, wrong.text
    assert wrong.json()["error"] == "method_not_allowed"
    assert wrong.headers["allow"]


@pytest.mark.parametrize(
    ("literal", "problem"),
    [("NaN", "NaN"), ("-Infinity", "-Infinity"), ("[1, 1e400]", "Infinity")],
)
def test_nan_and_infinity_in_an_input_are_422_for_local_and_agent_tools(
    db_url: str, tmp_path: Path, literal: str, problem: str
) -> None:
    """Python's json reads NaN, Infinity and 1e400 (as inf); jsonb stores none of them. A
    tool whose input schema takes any value, or one only an agent has (no schema here),
    used to pass them on to Postgres: a 500. Now the body is refused, naming where."""
    with (
        api_server(db_url, tmp_path, PGDAG_TOOLS="tests.testtools") as base,
        httpx.Client(base_url=base, timeout=60) as c,
    ):
        registered = c.post(
            "/agent/register", json={"agentId": "far", "tools": ["agent.far"], "concurrency": 1}
        )
        assert registered.status_code == 200, registered.text
        local = post_raw(c, "/runs", emit_step(literal))
        refused = assert_refused(
            c,
            db_url,
            local,
            "body.steps[0].input.value" + ("[1]" if literal.startswith("[") else ""),
        )
        assert refused["problem"].startswith(problem), refused
        remote = post_raw(
            c,
            "/runs",
            '{"steps": [{"name": "a", "tool": "agent.far", "input": {"x": ' + literal + "}}]}",
        )
        refused = assert_refused(
            c, db_url, remote, "body.steps[0].input.x" + ("[1]" if literal.startswith("[") else "")
        )
        assert "cannot be stored in Postgres jsonb" in refused["problem"]
        fine = post_raw(
            c, "/runs", '{"steps": [{"name": "a", "tool": "agent.far", "input": {"x": 1.5}}]}'
        )
        assert fine.status_code == 201, fine.text
