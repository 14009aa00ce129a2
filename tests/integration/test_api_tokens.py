"""Scoped tokens on a real API and Postgres: tokens made, listed and revoked with the CLI
(a subprocess), each scope let through and refused on representative routes (a refused
scope gets 403 before routing, also on a path this branch may not serve), a revoked token
refused within the cache's TTL, ``PGDAG_API_TOKEN`` still an admin token, WebSockets closed
with 4401 / 4403 / 1013, and 503 when Postgres cannot say who a token is."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from engine.embedded import EmbeddedCluster
from engine.migrate import upgrade_head
from engine.tokens import CACHE_TTL_S
from tests.pgfixtures import server_home
from tests.support import ROOT, api_server, base_env, query, wait_for

JSON = {"content-type": "application/json"}
RUN = {"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0}}]}
TOKEN = re.compile(r"pgdag_[A-Za-z0-9_-]{43}")
ENV_TOKEN = "env-admin-s3cret"


def token_cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m engine token ARGS`` on `db_url`."""
    return subprocess.run(
        [sys.executable, "-m", "engine", "token", *args],
        env=base_env(db_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create(db_url: str, name: str, scope: str) -> str:
    done = token_cli(db_url, "create", name, "--scope", scope)
    assert done.returncode == 0, done.stderr
    assert TOKEN.fullmatch(done.stdout.strip()), done.stdout  # the token alone on stdout
    assert f"created token {name!r} (scope {scope})" in done.stderr
    return done.stdout.strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ws_close_code(base: str, path: str, token: str | None) -> int | None:
    """The close code of a WebSocket to `path` with `token` that the API closes at once;
    None when it is let through (it sends its first message)."""
    url = base.replace("http://", "ws://") + path
    headers = bearer(token) if token else None
    ws: ClientConnection
    with connect(url, additional_headers=headers, proxy=None, open_timeout=30) as ws:
        try:
            ws.recv(timeout=30)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code
    return None


def test_cli_creates_lists_and_revokes_and_keeps_only_the_hash(db_url: str) -> None:
    token = create(db_url, "ci-bot", "submit")
    rows = query(db_url, "SELECT name, scope, token_sha256 FROM api_tokens")
    assert [(r["name"], r["scope"]) for r in rows] == [("ci-bot", "submit")]
    assert bytes(rows[0]["token_sha256"]) == hashlib.sha256(token.encode()).digest()

    taken = token_cli(db_url, "create", "ci-bot", "--scope", "agent")
    assert taken.returncode == 2 and taken.stdout == ""
    assert "a live token is named 'ci-bot' already" in taken.stderr

    listed = token_cli(db_url, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SCOPE", "CREATED", "LAST", "USED", "REVOKED"]
    assert lines[1].split()[:2] == ["ci-bot", "submit"] and lines[1].rstrip().endswith("-")
    assert token not in listed.stdout and token[6:20] not in listed.stdout

    unknown = token_cli(db_url, "revoke", "nobody")
    assert unknown.returncode == 2 and "no live token is named 'nobody'" in unknown.stderr
    bad = token_cli(db_url, "create", "a b", "--scope", "admin")
    assert bad.returncode == 2 and "not allowed" in bad.stderr

    revoked = token_cli(db_url, "revoke", "ci-bot")
    assert revoked.returncode == 0 and "revoked token 'ci-bot'" in revoked.stderr
    assert token_cli(db_url, "revoke", "ci-bot").returncode == 2
    create(db_url, "ci-bot", "agent")  # the name is free again
    as_json = token_cli(db_url, "list", "--json")
    assert [(t["name"], t["scope"], t["revokedAt"] is None) for t in _json(as_json.stdout)] == [
        ("ci-bot", "submit", False),
        ("ci-bot", "agent", True),
    ]


def _json(text: str) -> Any:
    import json

    return json.loads(text)


def test_each_scope_is_let_through_and_refused_where_it_should(db_url: str, tmp_path: Path) -> None:
    admin = create(db_url, "ops", "admin")
    submit = create(db_url, "ci", "submit")
    agent = create(db_url, "agent-1", "agent")
    with (
        api_server(db_url, tmp_path, PGDAG_API_TOKEN=ENV_TOKEN) as base,
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        assert c.get("/health").status_code == 200  # open to all
        for headers in ({}, bearer("pgdag_" + "x" * 43), bearer(submit + "x")):
            r = c.get("/runs", headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text

        # submit: runs, workers, the document, the page; not the agent routes
        r = c.post("/runs", json=RUN, headers=bearer(submit))
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        for path in ("/runs", f"/runs/{run_id}", f"/runs/{run_id}/events", "/workers"):
            assert c.get(path, headers=bearer(submit)).status_code == 200, path
        assert c.get("/openapi.json", params={"token": submit}).status_code == 200
        assert c.get("/", params={"token": submit}).status_code == 200
        r = c.post(f"/runs/{run_id}/cancel", headers={**JSON, **bearer(submit)})
        assert r.status_code in (200, 409), r.text
        r = c.post("/agent/claim", json={}, headers=bearer(submit))
        assert r.status_code == 403, r.text
        assert r.json() == {
            "error": "forbidden",
            "message": "token 'ci' (scope submit) may not POST /agent/claim",
        }

        # agent: only /agent/*, refused before routing (403, not 404) everywhere else
        for method, path in (
            ("GET", "/runs"),
            ("POST", "/runs"),
            ("GET", "/workers"),
            ("GET", "/openapi.json"),
            ("GET", "/"),
            ("GET", "/no/such/path"),
        ):
            r = c.request(
                method, path, json=RUN if method == "POST" else None, headers=bearer(agent)
            )
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["message"] == f"token 'agent-1' (scope agent) may not {method} {path}"
        # /agent/claim is not served on every branch: whatever the route answers, the token
        # got through (404 where there is no such route yet, 409/422 where there is)
        for token in (agent, admin, ENV_TOKEN):
            r = c.post("/agent/claim", json={}, headers=bearer(token))
            assert r.status_code not in (401, 403), r.text

        # admin and PGDAG_API_TOKEN: everything
        for token in (admin, ENV_TOKEN):
            assert c.post("/runs", json=RUN, headers=bearer(token)).status_code == 201
            assert c.get("/workers", headers=bearer(token)).status_code == 200

        # WebSockets: 4401 without a known token, 4403 for a scope without them
        assert ws_close_code(base, "/ws", None) == 4401
        assert ws_close_code(base, "/ws", "pgdag_unknown") == 4401
        assert ws_close_code(base, f"/ws/runs/{run_id}", agent) == 4403
        assert ws_close_code(base, "/ws", agent) == 4403
        assert ws_close_code(base, "/ws", submit) is None
        assert ws_close_code(base, f"/ws/runs/{run_id}", admin) is None

        # every token used got its last_used_at, none that was not
        used = wait_for(
            lambda: (
                {
                    r["name"]
                    for r in query(
                        db_url, "SELECT name FROM api_tokens WHERE last_used_at IS NOT NULL"
                    )
                }
                == {"ops", "ci", "agent-1"}
            ),
            what="last_used_at of the tokens used",
        )
        assert used


def test_revoke_takes_effect_within_the_cache_ttl_and_a_first_token_closes_the_api(
    db_url: str, tmp_path: Path
) -> None:
    with (
        api_server(db_url, tmp_path) as base,
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        assert c.get("/runs").status_code == 200  # no token anywhere: open, as before
        token = create(db_url, "ci", "submit")
        wait_for(
            lambda: c.get("/runs").status_code == 401,
            timeout_s=CACHE_TTL_S + 5,
            what="the API to want a token once one exists",
        )
        assert c.get("/runs", headers=bearer(token)).status_code == 200
        create(db_url, "other", "agent")  # a live token left: the API stays closed
        revoked = token_cli(db_url, "revoke", "ci")
        assert revoked.returncode == 0, revoked.stderr
        started = time.monotonic()
        wait_for(
            lambda: c.get("/runs", headers=bearer(token)).status_code == 401,
            timeout_s=CACHE_TTL_S + 5,
            what="the revoked token to be refused",
        )
        assert time.monotonic() - started < CACHE_TTL_S + 2
        # the last live token revoked: open again, as with no token ever made
        assert token_cli(db_url, "revoke", "other").returncode == 0
        wait_for(lambda: c.get("/runs").status_code == 200, timeout_s=CACHE_TTL_S + 5)


@pytest.fixture
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """A cluster of this test's own, since the test stops it."""
    cluster = EmbeddedCluster(server_home(tmp_path_factory, "tokens-pg"))
    yield cluster
    cluster.stop()


def test_postgres_down_while_checking_a_token_is_503_and_ws_1013(
    own_cluster: EmbeddedCluster, tmp_path: Path
) -> None:
    url = own_cluster.start()
    upgrade_head(url)
    token = create(url, "ci", "submit")
    with (
        api_server(url, tmp_path, PGDAG_API_TOKEN=ENV_TOKEN) as base,
        httpx.Client(base_url=base, timeout=60) as c,
    ):
        # /openapi.json needs no database: what answers is the token check alone
        assert c.get("/openapi.json", headers=bearer(token)).status_code == 200
        own_cluster.stop()
        r = wait_for(
            lambda: (r := c.get("/openapi.json", headers=bearer(token))).status_code == 503 and r,
            timeout_s=CACHE_TTL_S + 30,
            what="503 once the cached answer is older than the TTL",
        )
        assert r.json()["error"] == "database_unavailable", r.text
        assert "bearer token cannot be checked" in r.json()["message"]
        assert ws_close_code(base, "/ws", token) == 1013
        # PGDAG_API_TOKEN needs no database
        assert c.get("/openapi.json", headers=bearer(ENV_TOKEN)).status_code == 200
        own_cluster.start()
        wait_for(
            lambda: c.get("/openapi.json", headers=bearer(token)).status_code == 200,
            timeout_s=60,
            what="the token accepted again once Postgres is back",
        )
