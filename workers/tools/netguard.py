"""The SSRF guard of HTTP_GET_JSON: which URLs and addresses a fetch may reach.

A fetch-any-URL tool run inside a private network is an SSRF vector, so every hop of a
fetch goes through three checks before a single byte is sent:

1. `check_url`: only ``http`` and ``https``, a host is required, and user-info
   (``user:password@``) is refused. No error message ever echoes the user-info.
2. `resolve_checked`: the host is resolved ONCE (``loop.getaddrinfo``, which also turns
   ``2130706433``, ``0x7f.1`` and ``017700000001`` into ``127.0.0.1``) and EVERY address
   it resolves to is checked; one refused address refuses the host, so a name that
   answers with both a public and a private address cannot be used to reach the private
   one. The caller then connects to a returned address, never re-resolving the name (a
   second lookup is how DNS rebinding gets through).
3. `check_address`: refuses loopback, private (RFC 1918, IPv6 ULA), link-local, CGNAT
   (100.64.0.0/10), multicast, unspecified, reserved and otherwise not globally routable
   addresses, cloud metadata endpoints, and the IPv4-mapped (``::ffff:a.b.c.d``), 6to4
   (``2002::/16``) and NAT64 (``64:ff9b::/96``) IPv6 forms of the refused IPv4 addresses.

``PGDAG_HTTP_ALLOW_PRIVATE=1`` (``allow_private=True``) lets loopback and private
addresses through; link-local, metadata, CGNAT, multicast, unspecified and reserved
addresses stay refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from engine.errors import ToolError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Decides one resolved address: returns why it is refused, or None to allow it. Its
#: second argument is ``allow_private``. `check_address` is the default; tests inject
#: their own to let 127.0.0.1 through while every other address gets the real verdict.
AddressCheck = Callable[[IPAddress, bool], str | None]

ALLOWED_SCHEMES = frozenset({"http", "https"})

# Cloud instance metadata endpoints: refused even with allow_private (fd00:ec2::254 is in
# the private fc00::/7 range, so it must be checked before the private rule).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.IPv4Address("169.254.169.254"),  # AWS, GCP, Azure, OCI, DigitalOcean...
        ipaddress.IPv4Address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.IPv4Address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.IPv6Address("fd00:ec2::254"),  # AWS IMDS over IPv6
    }
)

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
# What allow_private lets through besides loopback: RFC 1918, IPv6 unique-local and the
# deprecated IPv6 site-local range.
_PRIVATE_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv6Network("fc00::/7"),
    ipaddress.IPv6Network("fec0::/10"),
)


def _classify(ip: IPAddress) -> tuple[str, bool] | None:
    """Return ``(address class, allowed with allow_private)`` for a refused `ip`, else None."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address the packets end up at: judge that address.
        if ip.ipv4_mapped is not None:
            inner = _classify(ip.ipv4_mapped)
            return None if inner is None else (f"IPv4-mapped {inner[0]}", inner[1])
        if ip in _NAT64_WELL_KNOWN:
            inner = _classify(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return None if inner is None else (f"NAT64-embedded {inner[0]}", False)
        if ip in _NAT64_LOCAL_USE:
            return ("NAT64 local-use (64:ff9b:1::/48)", False)
        if ip.sixtofour is not None:
            inner = _classify(ip.sixtofour)
            if inner is not None:
                return (f"6to4-embedded {inner[0]}", False)
        if ip.teredo is not None:
            return ("Teredo (2001::/32)", False)
    if ip in METADATA_ADDRESSES:
        return ("cloud metadata", False)
    if ip.is_unspecified:
        return ("unspecified", False)
    if ip.is_loopback:
        return ("loopback", True)
    if ip.is_multicast:
        return ("multicast", False)
    if ip.is_link_local:
        return ("link-local", False)
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return ("CGNAT (100.64.0.0/10)", False)
    if any(ip.version == net.version and ip in net for net in _PRIVATE_NETWORKS):
        return ("private", True)
    if ip.is_reserved:
        return ("reserved", False)
    if not ip.is_global or ip.is_private:
        return ("not globally routable", False)
    return None


def check_address(ip: IPAddress, allow_private: bool = False) -> str | None:
    """Return why `ip` may not be fetched (its address class, e.g. ``"loopback"``), or None.

    With `allow_private`, loopback and private (RFC 1918, IPv6 unique-local) addresses
    pass; every other refused class stays refused.
    """
    verdict = _classify(ip)
    if verdict is None:
        return None
    reason, overridable = verdict
    if overridable and allow_private:
        return None
    return reason


async def resolve_checked(
    host: str,
    port: int,
    allow_private: bool,
    *,
    check: AddressCheck = check_address,
) -> list[str]:
    """Resolve `host` once and return its addresses, every one of them checked by `check`.

    Raises `ToolError` (``retryable=False``) naming the host, the address and its class
    when any resolved address is refused, and `ToolError` (``retryable=True``) when the
    name does not resolve (DNS failures are often transient).
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise ToolError(f"cannot resolve host {host!r}: {exc}", retryable=True) from None
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ToolError(f"host {host!r} resolves to no address", retryable=True)
    for address in addresses:
        ip = ipaddress.ip_address(address)
        reason = check(ip, allow_private)
        if reason is not None:
            hint = (
                "; PGDAG_HTTP_ALLOW_PRIVATE=1 allows loopback and private addresses"
                if reason.endswith(("loopback", "private")) and not allow_private
                else ""
            )
            shown = host if host == address else f"{host!r} (resolves to {address})"
            raise ToolError(f"refused to fetch {shown}: {reason} address{hint}", retryable=False)
    return addresses


def _userinfo_of(url: str) -> str:
    """The user-info part of `url` as written, or "" (best effort, for redaction only)."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = url.partition("//")[2].partition("/")[0]
    return netloc.rpartition("@")[0]


def redact(text: str, url: str) -> str:
    """`text` with the user-info of `url` (if any) replaced by ``***``."""
    userinfo = _userinfo_of(url)
    return text.replace(userinfo, "***") if userinfo else text


def describe(url: httpx.URL) -> str:
    """A loggable form of `url`: scheme, host, port and path; no user-info, no query."""
    text = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"
    return text if len(text) <= 200 else text[:197] + "..."


def check_url(url: str | httpx.URL) -> httpx.URL:
    """Parse `url` and return it if it may be fetched: http(s), with a host, no user-info.

    Raises `ValueError` saying why not; the message never contains the URL's user-info.
    """
    raw = str(url)
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"url cannot be parsed: {redact(str(exc), raw)}") from None
    if parsed.scheme not in ALLOWED_SCHEMES:
        shown = f"{parsed.scheme!r}" if parsed.scheme else "none"
        raise ValueError(f"url scheme must be http or https, not {shown}")
    if parsed.userinfo:
        raise ValueError(
            "url must not contain user-info (user:password@); credentials in URLs are refused"
        )
    if not parsed.raw_host:
        raise ValueError("url must have a host (http(s)://host/...)")
    return parsed
