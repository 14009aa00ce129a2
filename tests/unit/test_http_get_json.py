"""HTTP_GET_JSON against a real HTTP server on 127.0.0.1, started by the test.

No mocks of httpx. Every outgoing connection is recorded, and any to an address other
than 127.0.0.1 fails the test: refusals must happen before connecting.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import ssl
import subprocess
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydantic
import pytest

from engine.errors import ToolError
from engine.tools import ToolContext, get_tool, load_tool_modules
from workers.tools.http_get_json import (
    MAX_BODY_BYTES,
    MAX_REDIRECTS,
    HttpGetJsonInput,
    get_json,
    http_get_json,
)
from workers.tools.netguard import check_address

load_tool_modules(["workers.tools.builtin"])

SECRET = "s3cret-pw"

BIG_GZIP_JSON = gzip.compress(b'"' + b"0" * 5_000_000 + b'"')  # ~5 KB on the wire


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class Server:
    port: int
    seen: list[Seen] = field(default_factory=list)
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    sni_names: list[str | None] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def _routes(
    server: Server,
) -> dict[str, Callable[[dict[str, list[str]]], tuple[int, dict[str, str], bytes]]]:
    def fixed(status: int, body: bytes, **headers: str) -> Callable[..., Any]:
        return lambda query: (status, headers, body)

    def redirect(query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        return 302, {"Location": query["to"][0]}, b""

    def echo_headers(query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        return (
            200,
            {"Content-Type": "application/json"},
            json.dumps(server.seen[-1].headers).encode(),
        )

    def stall(query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        server.stalled.set()
        server.release.wait(30)  # released by the fixture's teardown
        return 200, {}, b"{}"

    return {
        "/json": fixed(
            200, b'{"ok": true, "items": [1, 2, 3]}', **{"Content-Type": "application/json"}
        ),
        "/text": fixed(200, b"hello, not json", **{"Content-Type": "text/plain"}),
        "/big": fixed(200, b'"' + b"x" * 200_000 + b'"'),
        "/exact": fixed(200, b'"' + b"x" * (MAX_BODY_BYTES - 2) + b'"'),
        "/404": fixed(404, b'{"error": "no such thing"}'),
        "/503": fixed(503, b'{"error": "down"}'),
        "/429": fixed(429, b'{"error": "slow down"}', **{"Retry-After": "1"}),
        "/204": fixed(204, b""),
        "/deep": fixed(200, b"[" * 50_000 + b"]" * 50_000),
        "/nan": fixed(200, b"[1, NaN]"),
        "/inf": fixed(200, b"[1e999]"),
        "/nul": fixed(200, b'{"a": "x\\u0000y"}'),
        "/surrogate": fixed(200, b'{"items": [1, {"name": "x\\ud800y"}]}'),
        "/surrogate-key": fixed(200, b'{"ok": {"\\udc00": 1}}'),
        "/surrogate-pair": fixed(200, b'{"smile": "\\ud83d\\ude00"}'),
        "/latin1": fixed(200, b'"caf\xe9"'),
        "/gzip": fixed(200, gzip.compress(b'{"zipped": true}'), **{"Content-Encoding": "gzip"}),
        "/gzip-bomb": fixed(200, BIG_GZIP_JSON, **{"Content-Encoding": "gzip"}),
        "/gzip-corrupt": fixed(200, b"\x1f\x8b not gzip at all", **{"Content-Encoding": "gzip"}),
        "/deflate-raw": fixed(
            200,
            zlib.compress(b'{"deflated": 1}')[2:-4],  # raw deflate, no zlib wrapper
            **{"Content-Encoding": "deflate"},
        ),
        "/br": fixed(200, b"\x0b\x02\x80{}\x03", **{"Content-Encoding": "br"}),
        "/redirect": redirect,
        "/loop": fixed(302, b"", Location="/loop"),
        "/headers": echo_headers,
        "/stall": stall,
    }


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def do_GET(self) -> None:
        state = self.server.state
        split = urlsplit(self.path)
        state.seen.append(Seen(split.path, {k: v for k, v in self.headers.items()}))
        route = self.server.routes.get(split.path)
        status, headers, body = route(parse_qs(split.query)) if route else (404, {}, b"")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    state: Server
    routes: dict[str, Any]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hanging up on a truncated body is expected


def _start(tls: ssl.SSLContext | None = None) -> tuple[_HTTPServer, threading.Thread]:
    httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = Server(port=httpd.server_address[1])
    httpd.routes = _routes(httpd.state)
    if tls is not None:
        httpd.socket = tls.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, name="test-http", daemon=True
    )
    thread.start()
    return httpd, thread


def _stop(httpd: _HTTPServer, thread: threading.Thread) -> None:
    httpd.state.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.fixture
def server() -> Iterator[Server]:
    httpd, thread = _start()
    yield httpd.state
    _stop(httpd, thread)


@pytest.fixture(autouse=True)
def connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every address the code under test connects to; anything but 127.0.0.1 fails."""
    attempts: list[str] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def remember(address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        attempts.append(host)
        if host != "127.0.0.1":
            raise AssertionError(f"test tried to connect to {host}")

    def connect(self: socket.socket, address: Any) -> None:
        remember(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        remember(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    assert set(attempts) <= {"127.0.0.1"}, attempts


def ctx(*, allow_private: bool = True, timeout_ms: int | None = 5_000) -> ToolContext:
    return ToolContext(
        run_id="run-1",
        step_name="fetch",
        attempt=1,
        idempotency_key="run-1:fetch",
        timeout_ms=timeout_ms,
        http_allow_private=allow_private,
    )


def fetch(url: str, context: ToolContext | None = None) -> dict[str, Any]:
    """Run the registered tool function as a worker would: validated input, a context."""
    return asyncio.run(http_get_json(HttpGetJsonInput(url=url), context or ctx()))


def fetch_fails(url: str, context: ToolContext | None = None) -> ToolError:
    with pytest.raises(ToolError) as info:
        asyncio.run(get_json(url, context or ctx()))
    return info.value


def only_127_0_0_1(ip: IPv4Address | IPv6Address, allow_private: bool) -> str | None:
    """An address check that lets the test server through and judges everything else."""
    return None if ip == IPv4Address("127.0.0.1") else check_address(ip, allow_private)


# --- answers ---------------------------------------------------------------------------


def test_json_body(server: Server) -> None:
    out = fetch(server.url("/json"))
    assert out == {
        "status": 200,
        "body": {"ok": True, "items": [1, 2, 3]},
        "truncated": False,
        "bytesReturned": len(b'{"ok": true, "items": [1, 2, 3]}'),
        "error": None,
    }


def test_not_json_body_succeeds_with_error(server: Server) -> None:
    out = fetch(server.url("/text"))
    assert out["status"] == 200 and out["body"] is None and out["truncated"] is False
    assert out["bytesReturned"] == len(b"hello, not json")
    assert out["error"] == "body is not JSON: Expecting value at line 1 column 1"


def test_body_over_100_kb_is_truncated_and_not_parsed(server: Server) -> None:
    out = fetch(server.url("/big"))
    assert out["status"] == 200 and out["body"] is None and out["truncated"] is True
    assert out["bytesReturned"] == MAX_BODY_BYTES == 102_400
    assert "truncated" in out["error"] and "not parsed" in out["error"]


def test_body_of_exactly_100_kb_is_parsed(server: Server) -> None:
    out = fetch(server.url("/exact"))
    assert out["truncated"] is False and out["error"] is None
    assert out["bytesReturned"] == MAX_BODY_BYTES and len(out["body"]) == MAX_BODY_BYTES - 2


def test_404_succeeds_with_its_status(server: Server) -> None:
    out = fetch(server.url("/404"))
    assert out["status"] == 404 and out["body"] == {"error": "no such thing"}
    assert out["error"] is None


def test_204_has_no_body_and_no_error(server: Server) -> None:
    out = fetch(server.url("/204"))
    assert out == {
        "status": 204,
        "body": None,
        "truncated": False,
        "bytesReturned": 0,
        "error": None,
    }


@pytest.mark.parametrize("status", [503, 429])
def test_5xx_and_429_raise_retryable(server: Server, status: int) -> None:
    error = fetch_fails(server.url(f"/{status}"))
    assert error.retryable is True
    assert f"HTTP {status}" in str(error) and f"127.0.0.1:{server.port}/{status}" in str(error)


def test_deeply_nested_json_is_body_null_not_a_crash(server: Server) -> None:
    out = fetch(server.url("/deep"))
    assert out["status"] == 200 and out["body"] is None and out["truncated"] is False
    assert "nested too deeply" in out["error"]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/nan", "NaN is not valid JSON"),
        ("/inf", "out of range"),
        ("/nul", "NUL"),
        (
            "/surrogate",
            "body cannot be stored: body.items[1].name: lone surrogate \\ud800 cannot be "
            "stored in Postgres jsonb",
        ),
        ("/surrogate-key", 'body.ok (key "\\udc00"): lone surrogate \\udc00'),
        ("/latin1", "not UTF-8"),
    ],
)
def test_json_that_jsonb_cannot_store_is_body_null(server: Server, path: str, problem: str) -> None:
    out = fetch(server.url(path))
    assert out["status"] == 200 and out["body"] is None
    assert problem in out["error"]


def test_a_surrogate_pair_escape_is_one_character(server: Server) -> None:
    out = fetch(server.url("/surrogate-pair"))
    assert out["body"] == {"smile": "\U0001f600"} and out["error"] is None


# --- encodings -------------------------------------------------------------------------


def test_gzip_body_is_decoded(server: Server) -> None:
    out = fetch(server.url("/gzip"))
    assert out["body"] == {"zipped": True} and out["bytesReturned"] == len(b'{"zipped": true}')


def test_gzip_bomb_is_counted_decompressed_and_truncated(server: Server) -> None:
    assert len(BIG_GZIP_JSON) < MAX_BODY_BYTES  # small on the wire, 5 MB decoded
    out = fetch(server.url("/gzip-bomb"))
    assert out["truncated"] is True and out["body"] is None
    assert out["bytesReturned"] == MAX_BODY_BYTES


def test_gzip_bomb_is_never_inflated_in_memory(server: Server) -> None:
    tracemalloc.start()
    try:
        out = fetch(server.url("/gzip-bomb"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["truncated"] is True
    assert peak < 2_000_000, f"peak {peak} bytes: the 5 MB body was inflated at once"


def test_raw_deflate_is_decoded(server: Server) -> None:
    assert fetch(server.url("/deflate-raw"))["body"] == {"deflated": 1}


def test_corrupt_gzip_is_body_null_with_error(server: Server) -> None:
    out = fetch(server.url("/gzip-corrupt"))
    assert out["status"] == 200 and out["body"] is None and "cannot be decoded" in out["error"]


def test_unasked_encoding_is_not_decoded(server: Server) -> None:
    out = fetch(server.url("/br"))
    assert out["body"] is None and "unsupported Content-Encoding 'br'" in out["error"]


# --- request -----------------------------------------------------------------------------


def test_request_headers_arrive(server: Server) -> None:
    out = fetch(server.url("/headers"))
    headers = {k.lower(): v for k, v in out["body"].items()}
    assert headers["idempotency-key"] == "run-1:fetch"
    assert headers["accept"] == "application/json"
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert "authorization" not in headers


def test_resolves_once_connects_to_the_checked_address_and_sends_the_original_host(
    server: Server, connections: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host.decode() if isinstance(host, bytes) else str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    # "2130706433" is 127.0.0.1 as one decimal number; getaddrinfo resolves it.
    out = fetch(server.url("/headers", host="2130706433"))
    headers = {k.lower(): v for k, v in out["body"].items()}
    assert headers["host"] == f"2130706433:{server.port}"
    assert connections == ["127.0.0.1"]
    assert lookups.count("2130706433") == 1  # the name was never looked up again


# --- failures ----------------------------------------------------------------------------


def test_stalled_server_times_out_retryably(server: Server) -> None:
    error = fetch_fails(server.url("/stall"), ctx(timeout_ms=300))
    assert error.retryable is True and "timed out after 0.3 s" in str(error)
    assert server.stalled.wait(5), "the request never reached the server"


def test_refused_connection_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = fetch_fails(f"http://127.0.0.1:{port}/json")
    assert error.retryable is True and "network error" in str(error)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "2130706433", "0x7f.1", "017700000001", "[::ffff:127.0.0.1]"]
)
def test_loopback_refused_by_default_before_connecting(
    server: Server, connections: list[str], host: str
) -> None:
    error = fetch_fails(server.url("/json", host=host), ctx(allow_private=False))
    assert error.retryable is False and "loopback" in str(error)
    assert connections == [] and server.seen == []


def test_private_address_refused_by_default_before_connecting(connections: list[str]) -> None:
    error = fetch_fails("http://10.0.0.1/json", ctx(allow_private=False))
    assert error.retryable is False and "10.0.0.1" in str(error) and "private" in str(error)
    assert connections == []


def test_metadata_refused_even_when_private_is_allowed(connections: list[str]) -> None:
    error = fetch_fails("http://169.254.169.254/latest/meta-data/", ctx(allow_private=True))
    assert error.retryable is False and "cloud metadata" in str(error)
    assert connections == []


# --- redirects ---------------------------------------------------------------------------


def test_redirect_is_followed(server: Server) -> None:
    out = fetch(server.url("/redirect?to=/json"))
    assert out["status"] == 200 and out["body"]["ok"] is True
    assert server.paths() == ["/redirect", "/json"]


@pytest.mark.parametrize(
    ("target", "address", "reason"),
    [
        ("http://10.0.0.1/admin", "10.0.0.1", "private"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/", "fd00:ec2::254", "cloud metadata"),
        ("http://0xa9fea9fe/latest/", "169.254.169.254", "cloud metadata"),
    ],
)
def test_redirect_to_a_refused_address_is_refused_before_connecting(
    server: Server, connections: list[str], target: str, address: str, reason: str
) -> None:
    # The check lets the test server (127.0.0.1) through, as a public host would be.
    start = server.url(f"/redirect?to={target}")
    with pytest.raises(ToolError) as info:
        asyncio.run(get_json(start, ctx(allow_private=False), check=only_127_0_0_1))
    error = info.value
    assert error.retryable is False
    assert "redirect 1" in str(error) and address in str(error) and reason in str(error)
    assert server.paths() == ["/redirect"]
    assert connections == ["127.0.0.1"]


def test_redirect_to_loopback_refused_without_allow_private(server: Server) -> None:
    # The first hop is let through by the injected check; the redirect target is the
    # same server by another name, which the real check refuses.
    start = server.url(f"/redirect?to=http://2130706433:{server.port}/json")

    def only_first_hop(ip: IPv4Address | IPv6Address, allow: bool) -> str | None:
        return None if not server.seen else check_address(ip, allow)

    with pytest.raises(ToolError) as info:
        asyncio.run(get_json(start, ctx(allow_private=False), check=only_first_hop))
    assert info.value.retryable is False and "loopback" in str(info.value)
    assert server.paths() == ["/redirect"]


def test_redirect_to_another_scheme_is_refused(server: Server) -> None:
    error = fetch_fails(server.url("/redirect?to=file:///etc/passwd"))
    assert error.retryable is False and "scheme must be http or https" in str(error)
    assert server.paths() == ["/redirect"]


def test_too_many_redirects(server: Server) -> None:
    error = fetch_fails(server.url("/loop"))
    assert error.retryable is False and f"more than {MAX_REDIRECTS}" in str(error)
    assert server.paths() == ["/loop"] * (MAX_REDIRECTS + 1)


# --- secrets -----------------------------------------------------------------------------


def test_user_info_refused_at_validation_without_echo() -> None:
    url = f"http://alice:{SECRET}@127.0.0.1:8080/json"
    with pytest.raises(pydantic.ValidationError) as info:
        HttpGetJsonInput(url=url)
    assert SECRET not in str(info.value) and "alice" not in str(info.value)
    [err] = info.value.errors(include_url=False)
    assert "user-info" in err["msg"] and SECRET not in err["msg"]


def test_user_info_refused_by_the_tool_without_echo(connections: list[str]) -> None:
    error = fetch_fails(f"http://alice:{SECRET}@127.0.0.1:8080/json")
    assert error.retryable is False and "user-info" in str(error)
    assert SECRET not in str(error) and "alice" not in str(error)
    assert connections == []


def test_user_info_in_a_redirect_is_refused_without_echo(server: Server) -> None:
    target = f"http://alice:{SECRET}@127.0.0.1:{server.port}/json"
    error = fetch_fails(server.url(f"/redirect?to={target}"))
    assert error.retryable is False and "user-info" in str(error)
    assert SECRET not in str(error) and "alice" not in str(error)
    assert server.paths() == ["/redirect"]


def test_errors_do_not_echo_the_query(server: Server) -> None:
    error = fetch_fails(server.url(f"/503?api_key={SECRET}"))
    assert SECRET not in str(error)


# --- input schema ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"url": "ftp://example.com/x"}, "scheme must be http or https"),
        ({"url": "http:///nohost"}, "must have a host"),
        ({"url": 42}, "string"),
        ({"url": "http://example.com/", "method": "POST"}, "Extra inputs"),
        ({}, "Field required"),
    ],
)
def test_input_schema_refuses_bad_input_clearly(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        get_tool("HTTP_GET_JSON").parse_input(raw)
    assert problem in str(info.value)


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Server]:
    """An https server with a self-signed certificate; records the SNI names it gets."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=2130706433",
         "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    names: list[str | None] = []
    tls.sni_callback = lambda sock, name, context: names.append(name)  # type: ignore[assignment,func-returns-value]
    httpd, thread = _start(tls)
    httpd.state.sni_names = names
    yield httpd.state
    _stop(httpd, thread)


def test_https_sends_the_host_name_as_sni_and_verifies_the_certificate(
    tls_server: Server, connections: list[str]
) -> None:
    error = fetch_fails(tls_server.url("/json", host="2130706433", scheme="https"))
    # Connected to 127.0.0.1, but TLS was for the name in the URL (not the IP) ...
    assert connections == ["127.0.0.1"]
    assert tls_server.sni_names == ["2130706433"]
    # ... and the self-signed certificate is refused, which no retry can fix.
    assert error.retryable is False and "certificate" in str(error)
