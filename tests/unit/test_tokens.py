"""The rules of `engine.tokens` that need no server: what each scope may do, how tokens are
made, hashed and found in a request, and that docs/operations.md shows `SCOPE_RULES` as
they are. The middleware and the table are tested on a real API and Postgres in
tests/integration/test_api_tokens.py."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pytest

from engine.api import OPERATIONS, routes
from engine.errors import PgdagError
from engine.openapi import openapi_path
from engine.tokens import (
    SCOPE_RULES,
    SCOPES,
    TOKEN_PREFIX,
    WS,
    allows,
    check_name,
    generate_token,
    hash_token,
    parse_scope,
    presented_tokens,
    query_tokens,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
RUN = "0b7c0d3e-55c6-4b8e-a0c5-3f7bda2f4f11"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/runs"),
        ("GET", "/runs"),
        ("HEAD", "/runs"),
        ("GET", f"/runs/{RUN}"),
        ("GET", f"/runs/{RUN}/events"),
        ("POST", f"/runs/{RUN}/cancel"),
        ("POST", f"/runs/{RUN}/steps/fetch[3]/retry"),
        ("POST", f"/runs/{RUN}/replay"),
        ("POST", "/runs/retry-dead-letters"),
        ("GET", "/workers"),
        ("GET", "/openapi.json"),
        (WS, "/ws"),
        (WS, f"/ws/runs/{RUN}"),
        ("GET", "/"),
        ("GET", "/dashboard/static/app.js"),
        ("GET", "/dashboard/runs"),
    ],
)
def test_submit_may_use_runs_workers_sockets_and_the_page(method: str, path: str) -> None:
    assert allows("submit", method, path)
    assert allows("admin", method, path)
    assert not allows("agent", method, path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/agent/claim"),
        ("POST", "/agent/register"),
        ("POST", "/agent/heartbeat"),
        ("POST", "/agent/report"),
        ("POST", "/agent/release"),
        ("POST", "/agent/stopped"),
        ("POST", "/agent/not-yet-a-route"),
    ],
)
def test_agent_may_use_only_the_agent_routes(method: str, path: str) -> None:
    assert allows("agent", method, path)
    assert allows("admin", method, path)
    assert not allows("submit", method, path)


@pytest.mark.parametrize(
    ("scope", "method", "path"),
    [
        ("submit", "DELETE", "/runs"),
        ("submit", "POST", "/workers"),
        ("submit", "GET", f"/runs/{RUN}/cancel"),  # a state change is a POST only
        ("submit", "POST", f"/runs/{RUN}"),
        ("submit", "POST", f"/runs/{RUN}/steps/a/b/retry"),  # a name is one segment
        ("submit", "POST", "/runs//cancel"),  # an empty segment is no run id
        ("submit", "GET", "/runsx"),
        ("submit", "GET", "/agent/claim"),
        ("submit", WS, "/agent/claim"),
        ("submit", "GET", "/ws"),  # the socket is a WebSocket, not a GET
        ("agent", "GET", "/agent/claim"),
        ("agent", WS, "/ws"),
        ("agent", "GET", "/openapi.json"),
        ("agent", "POST", "/agent"),  # the prefix is /agent/, not /agent
        ("agent", "POST", "/agentx/claim"),
    ],
)
def test_refused(scope: str, method: str, path: str) -> None:
    assert not allows(parse_scope(scope), method, path)


def test_admin_may_do_anything() -> None:
    for method in ("GET", "POST", "DELETE", WS, "OPTIONS"):
        assert allows("admin", method, "/anything/at/all")


def test_every_route_is_allowed_to_admin_and_to_submit_or_agent() -> None:
    """Each route of the API is in some narrower scope, so no route is admin-only by a
    forgotten rule (the agent routes come with issue 12's protocol, under /agent/); the
    admin-only ones are named in admin's own rules (GET /metrics)."""
    admin_only = {(r.method, r.path) for r in SCOPE_RULES["admin"] if r.path != "/*"}
    assert admin_only == {("GET", "/metrics")}
    for op in OPERATIONS:
        path = openapi_path(op).replace("{runId}", RUN).replace("{stepName}", "s")
        if path == "/health":
            continue  # open to all (engine.guards.OPEN_PATHS)
        in_scopes = [s for s in SCOPES if allows(s, op.method, path)]
        wanted = 1 if (op.method, path) in admin_only else 2
        assert "admin" in in_scopes and len(in_scopes) == wanted, (op.method, path, in_scopes)
    for route in routes:
        if not hasattr(route, "methods"):  # a WebSocket route
            assert allows("submit", WS, route.path.replace("{run_id}", RUN))


def test_tokens_are_prefixed_urlsafe_and_random() -> None:
    tokens = {generate_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert token.startswith(TOKEN_PREFIX)
        body = token.removeprefix(TOKEN_PREFIX)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body), token
        assert len(base64.urlsafe_b64decode(body + "=")) == 32


def test_hash_is_the_sha256_of_the_token() -> None:
    token = "pgdag_abc"
    assert hash_token(token) == hashlib.sha256(b"pgdag_abc").digest()
    assert hash_token(token.encode()) == hash_token(token)
    assert len(hash_token(generate_token())) == 32


def test_presented_tokens_header_then_query() -> None:
    headers = [(b"authorization", b"Bearer  pgdag_a "), (b"host", b"x")]
    assert presented_tokens(headers, b"token=pgdag_b") == [b"pgdag_a", b"pgdag_b"]
    assert presented_tokens([(b"authorization", b"bearer pgdag_a")], b"") == [b"pgdag_a"]
    assert presented_tokens([(b"authorization", b"Basic dXNlcjpw")], b"") == []
    assert presented_tokens([(b"authorization", b"Bearer ")], b"token=") == []
    assert presented_tokens([(b"authorization", b"Bearer t")], b"token=t") == [b"t"]


def test_query_tokens_decode_like_a_form_and_keep_a_plus() -> None:
    assert list(query_tokens(b"after=3&token=pgdag_x%2By")) == [b"pgdag_x+y"]
    assert list(query_tokens(b"token=a+b")) == [b"a b", b"a+b"]
    assert list(query_tokens(b"tokens=x&xtoken=y")) == []


def test_scope_and_name_parsing() -> None:
    assert [parse_scope(s) for s in ("admin", "submit", "agent")] == list(SCOPES)
    with pytest.raises(ValueError, match="one of admin, submit, agent"):
        parse_scope("Admin")
    assert check_name("ci-bot@build.01:x_y") == "ci-bot@build.01:x_y"
    for bad in ("", "a b", "x" * 201, "naïve", "a/b", "a\nb"):
        with pytest.raises(PgdagError, match="not allowed"):
            check_name(bad)


def _documented_rules() -> set[tuple[str, str, str]]:
    """The rows of the scope table in docs/operations.md, section "Tokens and scopes":
    ``| `scope` | `METHOD` | `path` | what |`` (``any`` method: ``*``)."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Tokens and scopes", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        scope, method, path = (c.strip("`") for c in cells[:3])
        rows.add((scope, "*" if method == "any" else method, path))
    return rows


def test_the_documented_scope_table_is_scope_rules() -> None:
    rules = {(scope, r.method, r.path) for scope, rs in SCOPE_RULES.items() for r in rs}
    assert _documented_rules() == rules


def test_the_openapi_document_names_401_and_403_on_every_operation() -> None:
    from engine.openapi import document

    doc = document(OPERATIONS, title="pgdag", version="0")
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert {"401", "403"} <= set(op["responses"]), (method, path)
            assert "scope" in op["responses"]["403"]["description"]


def test_the_client_names_a_scope_refusal_forbidden() -> None:
    from engine.client import Forbidden, RequestRefused, api_error

    body = {"error": "forbidden", "message": "token 'a' (scope agent) may not GET /runs"}
    error = api_error(403, body)
    assert isinstance(error, Forbidden) and error.message == body["message"]
    other = api_error(403, {"error": "origin_not_allowed", "message": "no"})
    assert isinstance(other, RequestRefused) and not isinstance(other, Forbidden)
