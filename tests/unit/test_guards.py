"""The rules of `engine.guards` that need no server: host entries, the allow-list, the
token in a query string, and the settings that feed them (clear errors, nothing started).
The middleware itself is tested over real HTTP in tests/integration/test_api_guards.py."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import pytest

from engine.cli import main
from engine.config import Settings
from engine.errors import ConfigError
from engine.guards import AllowedHosts, _query_tokens, parse_host_entry


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("api", ("api", None)),
        ("API:8080", ("api", 8080)),
        ("pgdag.example.com.", ("pgdag.example.com", None)),
        ("10.0.0.5:4000", ("10.0.0.5", 4000)),
        ("[::1]", ("[::1]", None)),
        ("[2001:db8::1]:4000", ("[2001:db8::1]", 4000)),
        ("::1", ("[::1]", None)),
        ("*", ("*", None)),
    ],
)
def test_host_entries(entry: str, parsed: tuple[str, int | None]) -> None:
    assert parse_host_entry(entry) == parsed


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("http://api:4000", "no scheme"),
        ("api/path", "no scheme, path"),
        ("api:0", "port must be 1-65535"),
        ("api:http", "port must be 1-65535"),
        ("[::1", "[addr]"),
        ("[nope]:80", "not an IPv6 address"),
        (":4000", "no host name"),
    ],
)
def test_bad_host_entries_say_what_is_wrong(entry: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_host_entry(entry)
    assert words in str(info.value) and repr(entry) in str(info.value)


def test_allow_list_names_ports_and_binds() -> None:
    hosts = AllowedHosts(["pgdag.internal", "api:8080"], bound=("10.1.2.3", 4000))
    for ok in ("localhost", "localhost:4000", "127.0.0.1:9", "[::1]:4000", "LOCALHOST."):
        assert hosts.allows_host(ok), ok
    for ok in ("pgdag.internal", "pgdag.internal:443", "api:8080", "10.1.2.3:4000"):
        assert hosts.allows_host(ok), ok
    for refused in ("api", "api:4000", "10.1.2.3", "10.1.2.3:80", "evil.example", "", None):
        assert not hosts.allows_host(refused), refused
    assert not hosts.allows_host("localhost:4000, evil.example")
    wildcard = AllowedHosts([], bound=("0.0.0.0", 4000))
    assert not wildcard.allows_host("0.0.0.0:4000") and wildcard.allows_host("localhost:4000")


def test_origins_are_compared_by_host_and_port_whatever_the_scheme() -> None:
    hosts = AllowedHosts(["pgdag.internal"], bound=None)
    assert hosts.allows_origin("https://pgdag.internal", "pgdag.internal")
    assert hosts.allows_origin("http://localhost:4000", "127.0.0.1:4000")
    assert not hosts.allows_origin("http://evil.example:4000", "evil.example:4000")
    assert not hosts.allows_origin("null", "localhost:4000")
    proxied = AllowedHosts(["*"])
    assert proxied.allows_host("anything.example")
    assert proxied.allows_origin("https://pgdag.example", "pgdag.example")
    assert not proxied.allows_origin("https://evil.example", "pgdag.example")


def test_query_token_is_percent_decoded_and_keeps_a_literal_plus() -> None:
    token = "q+Lz/9Xw0r+T1sA/bcQ="
    encoded = quote(token, safe="").encode()
    assert token.encode() in list(_query_tokens(b"after=3&token=" + encoded))
    assert token.encode() in list(_query_tokens(b"token=" + token.encode()))
    assert list(_query_tokens(b"token=a+b")) == [b"a b", b"a+b"]
    assert list(_query_tokens(b"tokens=x&xtoken=y")) == []


def test_settings_refuse_bad_hosts_and_origins_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=re.escape("PGDAG_ALLOWED_HOSTS: 'https://x.example'")):
        Settings.from_env({"PGDAG_ALLOWED_HOSTS": "api, https://x.example"})
    with pytest.raises(ConfigError, match=re.escape("PGDAG_CORS_ORIGINS: 'https://ops.example/'")):
        Settings.from_env({"PGDAG_CORS_ORIGINS": "https://ops.example/"})
    with pytest.raises(ConfigError, match=re.escape("PGDAG_CORS_ORIGINS: 'ops.example'")):
        Settings.from_env({"PGDAG_CORS_ORIGINS": "ops.example"})
    settings = Settings.from_env(
        {"PGDAG_ALLOWED_HOSTS": " api ,, pgdag.example:443 ", "PGDAG_CORS_ORIGINS": "*"}
    )
    assert settings.allowed_hosts == ("api", "pgdag.example:443")
    assert settings.cors_origins == ("*",)
    assert Settings.from_env({}).allowed_hosts == () and Settings.from_env({}).cors_origins == ()


def test_serve_flag_with_a_bad_host_exits_with_the_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--allowed-hosts", "api,http://x.example"]) == 2
    err = capsys.readouterr().err
    assert "PGDAG_ALLOWED_HOSTS" in err and "'http://x.example'" in err


def test_an_http10_probe_without_host_reaches_health_only() -> None:
    """Load balancers' HTTP/1.0 probes may send no Host header: /health answers them, any
    other path still gets 421."""
    import asyncio

    from engine.guards import AllowedHosts, HostGuard

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = HostGuard(app, AllowedHosts())

    async def status(path: str) -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
        await guard(scope, receive, send)
        return int(sent[0]["status"])

    assert asyncio.run(status("/health")) == 200
    assert asyncio.run(status("/runs")) == 421
