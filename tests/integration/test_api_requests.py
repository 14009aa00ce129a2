"""Requests that used to break the API (issue 10, part 4), against a real `engine serve` on a
real Postgres: timestamps outside what Python and Postgres both hold, NUL and lone surrogates,
an idempotency key reused with another payload, and the JSON shape of every error, a 500
included, on a keep-alive connection that survives it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.test_api import counts, delay


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
