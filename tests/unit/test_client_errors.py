"""`engine.client.api_error`: the class, code and message of an error answer, including the
ones that do not come from pgdag itself (a proxy's HTML page). The real API's answers are
tested in tests/integration/test_client.py."""

from __future__ import annotations

from typing import Any

import pytest

from engine.client import (
    Conflict,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    PgdagApiError,
    RequestRefused,
    Unauthorized,
    Unavailable,
    api_error,
)
from engine.errors import PgdagError


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (401, "unauthorized", Unauthorized),
        (404, "not_found", NotFound),
        (409, "illegal_transition", Conflict),
        (422, "invalid_request", InvalidRequest),
        (422, "idempotency_key_reused", IdempotencyKeyReused),
        (503, "database_unavailable", Unavailable),
        (503, "schema_not_current", Unavailable),
        (415, "unsupported_media_type", RequestRefused),
        (421, "host_not_allowed", RequestRefused),
        (405, "method_not_allowed", RequestRefused),
        (403, "origin_not_allowed", RequestRefused),
        (500, "internal", PgdagApiError),
    ],
)
def test_the_class_follows_the_status_and_the_code(
    status: int, code: str, cls: type[PgdagApiError]
) -> None:
    body: dict[str, Any] = {"error": code, "message": "words", "problems": [{"field": "x"}]}
    error = api_error(status, body)
    assert type(error) is cls
    assert (error.status, error.code, error.message) == (status, code, "words")
    assert error.problems == [{"field": "x"}]
    assert str(error) == f"words ({status} {code})"
    assert isinstance(error, PgdagError)


def test_an_answer_not_in_the_api_shape_keeps_its_status_and_text() -> None:
    error = api_error(502, None, "<html>Bad Gateway</html>\n")
    assert type(error) is PgdagApiError
    assert (error.code, error.message, error.problems) == (
        "http_502",
        "<html>Bad Gateway</html>",
        [],
    )
    assert type(api_error(429, "slow down", "slow down")) is PgdagApiError  # not "refused"
    assert api_error(404, ["not", "a", "dict"], "").message == "HTTP 404"
    assert type(api_error(404, None, "Not Found")) is NotFound
