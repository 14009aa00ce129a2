"""The SSRF guard: every refused address class in every encoding, the URL check, and
resolution through the system resolver (numeric host names only: no DNS traffic)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator

import pytest

from engine.errors import ToolError
from workers.tools.netguard import check_address, check_url, resolve_checked

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("169.254.169.254", "cloud metadata"),
    ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("169.254.170.2", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("::ffff:0.0.0.0", "IPv4-mapped unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("::7f00:1", "reserved"),  # IPv4-compatible ::127.0.0.1 (deprecated)
    ("2002:7f00:1::", "6to4-embedded loopback"),
    ("2002:a9fe:a9fe::1", "6to4-embedded cloud metadata"),
    ("2002:a00:1::", "6to4-embedded private"),
    ("64:ff9b::7f00:1", "NAT64-embedded loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64-embedded cloud metadata"),
    ("64:ff9b:1::a00:1", "NAT64 local-use"),
    ("2001::1", "Teredo"),
    ("192.0.2.1", "not globally routable"),  # TEST-NET-1
    ("198.18.0.1", "not globally routable"),  # benchmarking
    ("2001:db8::1", "not globally routable"),  # documentation
]

ALLOWED = [
    "93.184.215.14",
    "8.8.8.8",
    "2606:4700:4700::1111",
    "::ffff:93.184.215.14",  # IPv4-mapped form of a public address
    "64:ff9b::5db8:d70e",  # NAT64 (DNS64) form of 93.184.215.14
    "2002:5db8:d70e::1",  # 6to4 form of a public address
]


@pytest.fixture(autouse=True)
def no_connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Record any outgoing connection; the guard's tests must make none."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise AssertionError(f"the guard's tests must not connect anywhere (to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == []


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_refused_address_classes(address: str, reason: str) -> None:
    got = check_address(ipaddress.ip_address(address))
    assert got is not None, f"{address} must be refused"
    assert reason in got


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address: str) -> None:
    assert check_address(ipaddress.ip_address(address)) is None
    assert check_address(ipaddress.ip_address(address), allow_private=True) is None


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "::1", "10.0.0.1", "192.168.0.10", "fc00::1", "::ffff:127.0.0.1"]
)
def test_allow_private_lets_loopback_and_private_through(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert check_address(ip) is not None
    assert check_address(ip, allow_private=True) is None


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
        "169.254.1.1",
        "fe80::1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "64:ff9b::7f00:1",
    ],
)
def test_allow_private_keeps_metadata_link_local_and_the_rest_refused(address: str) -> None:
    assert check_address(ipaddress.ip_address(address), allow_private=True) is not None


def resolve(host: str, *, allow_private: bool = False) -> list[str]:
    return asyncio.run(resolve_checked(host, 80, allow_private))


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001", "127.1", "127.0.0.1"])
def test_numeric_encodings_of_loopback_resolve_and_are_refused(host: str) -> None:
    with pytest.raises(ToolError) as info:
        resolve(host)
    assert info.value.retryable is False
    message = str(info.value)
    assert host in message and "loopback" in message
    if host != "127.0.0.1":
        assert "127.0.0.1" in message  # names what the encoding resolved to
    assert "PGDAG_HTTP_ALLOW_PRIVATE" in message


@pytest.mark.parametrize(
    ("host", "reason", "allow_private"),
    [
        ("::ffff:127.0.0.1", "IPv4-mapped loopback", False),
        ("::ffff:a9fe:a9fe", "IPv4-mapped cloud metadata", True),
        ("0xa9fea9fe", "cloud metadata", True),  # 169.254.169.254 written as hex
        ("2852039166", "cloud metadata", True),  # 169.254.169.254 written as one decimal
        ("fd00:ec2::254", "cloud metadata", True),
        ("100.64.0.1", "CGNAT", True),
        ("0", "unspecified", True),
        ("224.0.0.1", "multicast", True),
    ],
)
def test_resolved_literals_are_refused(host: str, reason: str, allow_private: bool) -> None:
    with pytest.raises(ToolError) as info:
        resolve(host, allow_private=allow_private)
    assert info.value.retryable is False
    assert host in str(info.value) and reason in str(info.value)


def test_resolution_with_allow_private_returns_the_checked_addresses() -> None:
    assert resolve("2130706433", allow_private=True) == ["127.0.0.1"]
    assert resolve("93.184.215.14") == ["93.184.215.14"]


def test_injected_check_decides_every_address() -> None:
    seen: list[str] = []

    def check(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: bool) -> str | None:
        seen.append(str(ip))
        return "refused by test"

    with pytest.raises(ToolError, match="refused by test"):
        asyncio.run(resolve_checked("93.184.215.14", 443, True, check=check))
    assert seen == ["93.184.215.14"]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://example.com/x", "scheme must be http or https, not 'ftp'"),
        ("file:///etc/passwd", "scheme must be http or https, not 'file'"),
        ("gopher://127.0.0.1:6379/_", "not 'gopher'"),
        ("//example.com/x", "scheme must be http or https, not none"),
        ("example.com/x", "scheme must be http or https"),
        ("http:///x", "must have a host"),
        ("https://", "must have a host"),
        ("http://example.com:port/", "cannot be parsed"),
    ],
)
def test_check_url_refuses(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="url") as info:
        check_url(url)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://alice:s3cret@example.com/",
        "https://alice:s3cret@127.0.0.1:8080/x?y=1",
        "http://alice:s3cret@[::1/",  # unparsable too: still no echo
        "http://alice:s3cret@example.com:bad/",
    ],
)
def test_check_url_refuses_user_info_without_echoing_it(url: str) -> None:
    with pytest.raises(ValueError) as info:
        check_url(url)
    message = str(info.value)
    assert "s3cret" not in message and "alice" not in message


def test_check_url_refuses_user_info_message() -> None:
    with pytest.raises(ValueError, match="user-info"):
        check_url("http://token@example.com/")


def test_check_url_accepts_http_and_https() -> None:
    assert check_url("HTTP://Example.COM/a?b=1").raw_host == b"example.com"
    assert check_url("https://[2606:4700:4700::1111]:8443/").port == 8443
