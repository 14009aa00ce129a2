"""The guards in front of the API, against a real `python -m engine serve` on a real Postgres
over real HTTP and WebSocket: state-changing requests must be JSON (a cross-site page can
send only text/plain, form or multipart bodies without a CORS preflight), the Host (and a
browser's WebSocket Origin) must be one the API answers to (DNS rebinding), no CORS unless
configured, tokens with ``+ / =`` work in ``?token=``, and ``/health`` needs no token."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
from websockets.sync.client import connect

from tests.integration.test_api import counts, delay
from tests.support import api_server, query, wait_for, workers

TOOLS = "tests.testtools"
# A real `openssl rand -base64 18`-shaped token holding every character that URL encoding
# changes: '+', '/' and '='.
B64_TOKEN = "q+Lz/9Xw0r+T1sA/bcQ="


def port_of(base: str) -> int:
    port = urlsplit(base).port
    assert port is not None
    return port


def ws_handshake(base: str, path: str, headers: dict[str, str]) -> str:
    """Send a WebSocket upgrade request with exactly these `headers` (Host included) over a
    plain socket; return the status line the API answers with. A client library would set
    Host from the URL; a DNS-rebinding browser sends the attacker's name instead."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode()


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[str]:
    with api_server(db_url, tmp_path, PGDAG_TOOLS=TOOLS) as base:
        yield base


# --- state-changing requests must be JSON ---------------------------------------------------


def test_post_runs_that_is_not_json_is_415_and_writes_nothing(api: str, db_url: str) -> None:
    body = json.dumps({"goal": "cross-site", "steps": [delay("a")]}).encode()
    before = counts(db_url)
    for content_type in (
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ):
        headers = {"Content-Type": content_type} if content_type else {}
        r = httpx.post(f"{api}/runs", content=body, headers=headers, timeout=30)
        assert r.status_code == 415, (content_type, r.status_code, r.text)
        payload = r.json()
        assert payload["error"] == "unsupported_media_type"
        assert "application/json" in payload["message"] and "Content-Type" in payload["message"]
    assert counts(db_url) == before
    ok = httpx.post(
        f"{api}/runs",
        content=body,
        headers={"Content-Type": "application/json; charset=utf-8"},
        timeout=30,
    )
    assert ok.status_code == 201, ok.text


def test_form_encoded_retry_of_dead_letters_is_415_and_the_dead_letter_stays(
    api: str, db_url: str, tmp_path: Path
) -> None:
    """A page on any origin could re-run a dead-lettered ``"idempotent": false`` step with
    a form post; now every state-changing request, body or not, must say it is JSON."""
    once = {
        "name": "charge",
        "tool": "TEST_FAIL_TIMES",
        "input": {"failTimes": 5, "retryable": False},
        "maxAttempts": 1,
        "idempotent": False,
    }
    r = httpx.post(f"{api}/runs", json={"goal": "charge once", "steps": [once]}, timeout=30)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]

    def dead_letter() -> bool:
        rows = query(db_url, "SELECT status FROM steps WHERE run_id = %(r)s", {"r": run_id})
        return rows[0]["status"] == "dead_letter"

    with workers(db_url, tmp_path, n=1, PGDAG_TOOLS=TOOLS):
        wait_for(dead_letter, what="the step to be dead-lettered")
    before = counts(db_url)
    attempts = [
        ("/runs/retry-dead-letters", {"Content-Type": "application/x-www-form-urlencoded"}, b"a=1"),
        ("/runs/retry-dead-letters", {"Content-Type": "text/plain"}, b"{}"),
        ("/runs/retry-dead-letters", {}, b""),
        (f"/runs/{run_id}/steps/charge/retry", {}, b""),
        (f"/runs/{run_id}/steps/charge/retry", {"Content-Type": "text/plain"}, b""),
        (f"/runs/{run_id}/cancel", {"Content-Type": "application/x-www-form-urlencoded"}, b""),
        (f"/runs/{run_id}/replay", {"Content-Type": "text/plain"}, b'{"from": "charge"}'),
    ]
    for path, headers, content in attempts:
        r = httpx.post(f"{api}{path}", content=content, headers=headers, timeout=30)
        assert r.status_code == 415, (path, headers, r.status_code, r.text)
        assert r.json()["error"] == "unsupported_media_type"
    assert dead_letter()
    assert counts(db_url) == before  # no step_retried / run_cancelled / replay event
    dry = httpx.post(f"{api}/runs/retry-dead-letters", json={"dryRun": True}, timeout=30)
    assert dry.status_code == 200 and dry.json()["matched"] == 1, dry.text


# --- Host allow-list and the WebSocket Origin ------------------------------------------------


def test_unknown_host_is_421_before_anything_runs(api: str, db_url: str) -> None:
    port = port_of(api)
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.2:{port}"):
        r = httpx.get(f"{api}/runs", headers={"Host": host}, timeout=30)
        assert r.status_code == 421, (host, r.status_code, r.text)
        payload = r.json()
        assert payload["error"] == "host_not_allowed"
        assert host in payload["message"] and "PGDAG_ALLOWED_HOSTS" in payload["message"]
    r = httpx.post(
        f"{api}/runs",
        json={"steps": [delay("a")]},
        headers={"Host": f"evil.example:{port}"},
        timeout=30,
    )
    assert r.status_code == 421
    assert counts(db_url) == (0, 0, 0)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        r = httpx.get(f"{api}/runs", headers={"Host": host}, timeout=30)
        assert r.status_code == 200, (host, r.text)


def test_dns_rebinding_shape_on_the_websocket_is_refused(api: str) -> None:
    """After a DNS rebind the attacker's page talks to 127.0.0.1 with its own name as Host
    and as Origin; the two agree, so comparing them (the old check) let it in."""
    port = port_of(api)
    evil = f"evil.example:{port}"
    status = ws_handshake(api, "/ws", {"Host": evil, "Origin": f"http://{evil}"})
    assert " 101 " not in status and status.split()[1] in ("403", "421"), status
    # The right Host but a foreign page's Origin: refused too.
    local = f"127.0.0.1:{port}"
    status = ws_handshake(api, "/ws", {"Host": local, "Origin": f"http://{evil}"})
    assert status.split()[1] == "403", status
    # The dashboard's own origin, under any of the local names, and a client sending no
    # Origin (engine watch): let in.
    for origin in (f"http://{local}", f"http://localhost:{port}"):
        status = ws_handshake(api, "/ws", {"Host": local, "Origin": origin})
        assert status.split()[1] == "101", (origin, status)
    assert ws_handshake(api, "/ws", {"Host": local}).split()[1] == "101"


def test_allowed_hosts_setting_adds_names(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, PGDAG_ALLOWED_HOSTS="pgdag.internal, api:8080") as base:
        port = port_of(base)
        for host in ("pgdag.internal", f"pgdag.internal:{port}", "api:8080", f"localhost:{port}"):
            r = httpx.get(f"{base}/runs", headers={"Host": host}, timeout=30)
            assert r.status_code == 200, (host, r.text)
        for host in ("api:9999", "api", "evil.example"):
            r = httpx.get(f"{base}/runs", headers={"Host": host}, timeout=30)
            assert r.status_code == 421, (host, r.text)
        origin = "https://pgdag.internal"
        status = ws_handshake(base, "/ws", {"Host": "pgdag.internal", "Origin": origin})
        assert status.split()[1] == "101", status


def test_allowed_hosts_star_answers_any_host(db_url: str, tmp_path: Path) -> None:
    """For an API behind a proxy that sets Host; the WebSocket Origin must then match it."""
    with api_server(db_url, tmp_path, PGDAG_ALLOWED_HOSTS="*") as base:
        r = httpx.get(f"{base}/runs", headers={"Host": "anything.example"}, timeout=30)
        assert r.status_code == 200, r.text
        same = ws_handshake(
            base, "/ws", {"Host": "pgdag.example", "Origin": "https://pgdag.example"}
        )
        assert same.split()[1] == "101", same
        other = ws_handshake(
            base, "/ws", {"Host": "pgdag.example", "Origin": "https://evil.example"}
        )
        assert other.split()[1] == "403", other


# --- CORS -----------------------------------------------------------------------------------


def preflight(base: str, origin: str) -> httpx.Response:
    return httpx.options(
        f"{base}/runs",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=30,
    )


def test_no_cors_by_default(api: str) -> None:
    r = preflight(api, "https://ops.example")
    assert "access-control-allow-origin" not in r.headers, dict(r.headers)
    r = httpx.get(f"{api}/runs", headers={"Origin": "https://ops.example"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_origins_setting_allows_only_those_origins(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, PGDAG_CORS_ORIGINS="https://ops.example") as base:
        r = preflight(base, "https://ops.example")
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://ops.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = httpx.get(f"{base}/runs", headers={"Origin": "https://ops.example"}, timeout=30)
        assert r.headers["access-control-allow-origin"] == "https://ops.example"
        r = preflight(base, "https://evil.example")
        assert "access-control-allow-origin" not in r.headers, dict(r.headers)
        r = httpx.get(f"{base}/runs", headers={"Origin": "https://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in r.headers


# --- tokens -------------------------------------------------------------------------------


def test_base64_token_works_in_the_query_over_http_and_websocket(
    db_url: str, tmp_path: Path
) -> None:
    assert {"+", "/", "="} <= set(B64_TOKEN)
    with api_server(db_url, tmp_path, PGDAG_API_TOKEN=B64_TOKEN) as base:
        encoded = quote(B64_TOKEN, safe="")  # what encodeURIComponent / URLSearchParams send
        r = httpx.get(f"{base}/runs?token={encoded}", timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.get(f"{base}/runs", headers={"Authorization": f"Bearer {B64_TOKEN}"})
        assert r.status_code == 200, r.text
        # Pasted into the address bar as it is: '+' is kept (a bearer token never holds a
        # space, RFC 6750 section 2.1), '/' and '=' need no encoding in a query value.
        r = httpx.get(f"{base}/runs?token={B64_TOKEN}", timeout=30)
        assert r.status_code == 200, r.text
        for wrong in (quote(B64_TOKEN[:-1], safe=""), "nope", ""):
            r = httpx.get(f"{base}/runs?token={wrong}", timeout=30)
            assert r.status_code == 401, (wrong, r.text)
        ws_base = "ws://" + base.removeprefix("http://")
        with connect(f"{ws_base}/ws?token={encoded}", proxy=None) as ws:
            hello = json.loads(ws.recv(timeout=30))
            assert hello["type"] == "hello", hello
        with connect(
            f"{ws_base}/ws", additional_headers={"Authorization": f"Bearer {B64_TOKEN}"}, proxy=None
        ) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "hello"
        page = httpx.get(f"{base}/?token={encoded}", timeout=30)
        assert page.status_code == 200
        assert f"app.js?token={encoded}" in page.text  # assets load with the same token
        asset = httpx.get(f"{base}/dashboard/static/app.js?token={encoded}", timeout=30)
        assert asset.status_code == 200


def test_health_needs_no_token_but_runs_does(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, PGDAG_API_TOKEN=B64_TOKEN) as base:
        r = httpx.get(f"{base}/health", timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert httpx.get(f"{base}/runs", timeout=30).status_code == 401
        assert httpx.get(f"{base}/workers", timeout=30).status_code == 401
