"""The guards in front of the API's routes, as ASGI middleware, outermost first:

1. `HostGuard`: the ``Host`` header must name this API (DNS rebinding: a page on
   ``evil.example`` whose name is made to resolve to 127.0.0.1 talks to the API with
   ``Host: evil.example``), else 421 Misdirected Request (RFC 9110 section 15.5.20). A
   browser's WebSocket handshake must also come from an allowed ``Origin`` (browsers do not
   apply CORS to WebSockets), else 403. A WebSocket without ``Origin`` is not a browser's
   (``engine watch``) and is let through.
2. CORS (Starlette's `CORSMiddleware`), only when ``PGDAG_CORS_ORIGINS`` is set; it answers
   preflights before auth, since a browser sends them without credentials.
3. `BearerAuth`: ``PGDAG_API_TOKEN``; ``GET /health`` is open (it reveals nothing).
4. `JsonOnly`: a state-changing request (POST, PUT, PATCH, DELETE) must say
   ``Content-Type: application/json`` (parameters such as ``charset`` allowed), body or
   not, else 415. A page on another origin can send ``text/plain``, form and multipart
   bodies without a CORS preflight ("simple requests", Fetch standard, CORS-safelisted
   request-header), never ``application/json``. ``application/*+json`` is refused too: no
   client of this API needs it, and one media type is easy to state.

Refusals use the API's error shape ``{"error": code, "message": text}``.

Hosts are compared as ``host[:port]``, lower case, without a trailing dot: an allow-list
entry without a port matches any port, one with a port only that port.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Iterator
from urllib.parse import unquote_to_bytes, urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Always answered: the loopback names, on any port.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Bound to these, the API is reached by names it cannot know: only LOCAL_HOSTS and
# PGDAG_ALLOWED_HOSTS are answered.
WILDCARD_BINDS = ("", "0.0.0.0", "::", "[::]")
ANY_HOST = "*"
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_MEDIA_TYPE = "application/json"
# Paths answered without a token: they reveal nothing (probes and load balancers use them).
OPEN_PATHS = frozenset({"/health"})

HostPort = tuple[str, int | None]


def _port(raw: str, what: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{what!r}: port must be 1-65535, got {raw!r}")
    return int(raw)


def _name(host: str) -> str:
    """Lower case, no trailing dot (``localhost.`` is ``localhost``), IPv6 in brackets."""
    host = host.lower().rstrip(".")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host


def parse_host_entry(entry: str) -> HostPort:
    """One allow-list entry: ``name``, ``name:port``, ``1.2.3.4[:port]``, ``[v6][:port]``,
    a bare IPv6 address (``::1``), or ``*``. Returns (host, port or None for any port).

    Raises `ValueError` saying what is wrong with `entry` (a scheme, a path, a bad port).
    """
    text = entry.strip()
    if text == ANY_HOST:
        return ANY_HOST, None
    if not text or "://" in text or any(c in text for c in "/@ \t?#,"):
        raise ValueError(
            f"{entry!r} is not a host name or host:port (no scheme, path or spaces: "
            "e.g. 'pgdag.example.com' or 'api:4000')"
        )
    if text.startswith("["):
        host, sep, rest = text.partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: an IPv6 address is written [addr] or [addr]:port")
        _check_ipv6(host[1:], entry)
        return _name(host + "]"), _port(rest[1:], entry) if rest else None
    if text.count(":") > 1:  # a bare IPv6 address: no port
        _check_ipv6(text, entry)
        return _name(text), None
    host, sep, port = text.partition(":")
    if not host:
        raise ValueError(f"{entry!r} has no host name")
    return _name(host), _port(port, entry) if sep else None


def _check_ipv6(text: str, entry: str) -> None:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(f"{entry!r}: {text!r} is not an IPv6 address") from None


def parse_host_header(value: str) -> HostPort | None:
    """A ``Host`` header (RFC 9110 section 7.2: ``host[:port]``) or an Origin's netloc as
    (host, port or None); None when it is malformed."""
    try:
        host, port = parse_host_entry(value)
    except ValueError:
        return None
    return None if host == ANY_HOST else (host, port)


def check_cors_origin(origin: str) -> str:
    """One ``PGDAG_CORS_ORIGINS`` item: ``*`` or ``scheme://host[:port]`` exactly as a
    browser sends it in ``Origin`` (RFC 6454 section 6.1: no path, no trailing slash).
    Returns it; raises `ValueError` saying what is wrong."""
    if origin == ANY_HOST:
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{origin!r} is not an origin like 'https://ops.example.com'")
    if parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(
            f"{origin!r}: an origin is scheme://host[:port] only (no path, no trailing slash)"
        )
    return origin


class AllowedHosts:
    """The names this API answers to: `LOCAL_HOSTS`, the bound address with its port
    (unless it is a wildcard bind such as 0.0.0.0), and `extra` (``PGDAG_ALLOWED_HOSTS``
    entries, see `parse_host_entry`; ``*`` answers any Host)."""

    def __init__(self, extra: Iterable[str] = (), bound: tuple[str, int] | None = None) -> None:
        entries = [parse_host_entry(e) for e in (*LOCAL_HOSTS, *extra)]
        if bound is not None and bound[0].strip().lower() not in WILDCARD_BINDS:
            entries.append((parse_host_entry(bound[0])[0], bound[1]))
        self.any_host = (ANY_HOST, None) in entries
        self.entries = tuple(e for e in entries if e[0] != ANY_HOST)

    def _listed(self, value: str) -> bool:
        parsed = parse_host_header(value)
        if parsed is None:
            return False
        host, port = parsed
        return any(h == host and (p is None or p == port) for h, p in self.entries)

    def allows_host(self, host_header: str | None) -> bool:
        """Whether a request with this ``Host`` header is answered."""
        if self.any_host:
            return True
        return host_header is not None and self._listed(host_header)

    def allows_origin(self, origin: str, host_header: str | None) -> bool:
        """Whether a browser page at `origin` may open a WebSocket. Its host[:port] must be
        listed (scheme ignored); with ``*`` (behind a proxy that sets Host) it must be the
        request's own Host instead, which is all a proxy-set Host can vouch for."""
        netloc = urlsplit(origin).netloc
        if not netloc:  # "null" (sandboxed frames, file: pages)
            return False
        if self._listed(netloc):
            return True
        if self.any_host and host_header is not None:
            return parse_host_header(netloc) == parse_host_header(host_header)
        return False


def _refuse(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": code, "message": message}, status_code=status, headers=headers or None
    )


class HostGuard:
    """ASGI middleware: 421 for a Host not in `hosts`; 403 for a WebSocket whose Origin is
    neither allowed by `hosts` nor one of `cors_origins`. Both refusals are HTTP answers
    to the request or the handshake, in the JSON error shape."""

    def __init__(self, app: ASGIApp, hosts: AllowedHosts, cors_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.cors_origins = frozenset(o.lower() for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        # An HTTP/1.0 probe may send no Host at all (RFC 9110 section 7.2 requires it from
        # HTTP/1.1 clients only); the open paths reveal nothing, so they answer it.
        no_host_probe = host is None and scope["type"] == "http" and scope["path"] in OPEN_PATHS
        if not no_host_probe and not self.hosts.allows_host(host):
            response = _refuse(
                421,
                "host_not_allowed",
                f"Host {host!r} is not a name this API answers to; add it to "
                "PGDAG_ALLOWED_HOSTS (--allowed-hosts) if it is",
            )
            await response(scope, receive, send)
            return
        origin = headers.get("origin")
        browser_socket = scope["type"] == "websocket" and origin is not None
        if browser_socket and not self._origin_ok(str(origin), host):
            response = _refuse(
                403,
                "origin_not_allowed",
                f"Origin {origin!r} may not open a WebSocket here; add its host to "
                "PGDAG_ALLOWED_HOSTS or the origin to PGDAG_CORS_ORIGINS",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        if "*" in self.cors_origins or origin.lower() in self.cors_origins:
            return True
        return self.hosts.allows_origin(origin, host)


def _query_tokens(query_string: bytes) -> Iterator[bytes]:
    """Each ``token`` value of a query string, percent-decoded as a form
    (`urllib.parse.parse_qs`: ``+`` is a space, ``%2B`` a plus) and, when it holds a ``+``,
    also with ``+`` kept: a bearer token never holds a space (RFC 6750 section 2.1, the
    b64token syntax), and a base64 token pasted into an address bar keeps its ``+``."""
    for pair in query_string.split(b"&"):
        name, _, value = pair.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) != b"token":
            continue
        yield unquote_to_bytes(value.replace(b"+", b" "))
        if b"+" in value:
            yield unquote_to_bytes(value)


class BearerAuth:
    """ASGI middleware: when a token is configured, every HTTP and WebSocket request must
    carry ``Authorization: Bearer <token>`` (browsers may use ``?token=``, percent-encoded
    as `_query_tokens` decodes it); `OPEN_PATHS` are exempt. Compared in constant time.
    Sends 401 (HTTP); a WebSocket is accepted and at once closed with code 4401, which a
    browser can see (a handshake refused with 403 shows it only 1006)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
                    return True
        return any(
            hmac.compare_digest(given, self.token)
            for given in _query_tokens(scope.get("query_string", b""))
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": 4401, "reason": "unauthorized"})
            return
        response = _refuse(
            401,
            "unauthorized",
            "missing or wrong bearer token",
            **{"WWW-Authenticate": 'Bearer realm="pgdag"'},
        )
        await response(scope, receive, send)


class JsonOnly:
    """ASGI middleware: 415 for a POST, PUT, PATCH or DELETE whose ``Content-Type`` is not
    ``application/json`` (any parameters), including body-less ones, before the route runs
    or the body is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in STATE_CHANGING_METHODS:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("content-type")
        media_type = (given or "").partition(";")[0].strip().lower()
        if media_type == JSON_MEDIA_TYPE:
            await self.app(scope, receive, send)
            return
        what = f"got {given!r}" if given is not None else "it has none"
        response = _refuse(
            415,
            "unsupported_media_type",
            f"a {scope['method']} must have Content-Type: application/json ({what}), "
            "even without a body",
        )
        await response(scope, receive, send)
