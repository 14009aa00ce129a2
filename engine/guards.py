"""The guards in front of the API's routes, as ASGI middleware, outermost first:

1. `HostGuard`: the ``Host`` header must name this API (DNS rebinding: a page on
   ``evil.example`` whose name is made to resolve to 127.0.0.1 talks to the API with
   ``Host: evil.example``), else 421 Misdirected Request (RFC 9110 section 15.5.20). A
   browser's WebSocket handshake must also come from an allowed ``Origin`` (browsers do not
   apply CORS to WebSockets), else 403. A WebSocket without ``Origin`` is not a browser's
   (``engine watch``) and is let through.
2. CORS (Starlette's `CORSMiddleware`), only when ``PGDAG_CORS_ORIGINS`` is set; it answers
   preflights before auth, since a browser sends them without credentials.
3. `BearerAuth`: ``PGDAG_API_TOKEN`` (admin) and the scoped tokens of ``api_tokens``
   (`engine.tokens`); ``GET /health`` is open (it reveals nothing).
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
from collections.abc import Iterable
from typing import Literal
from urllib.parse import urlsplit

import psycopg
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.tokens import (
    ENV_TOKEN,
    WS,
    TokenCache,
    TokenInfo,
    allows,
    presented_tokens,
    query_tokens,
)

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
# WebSocket close codes of a refused handshake: 4000 + the HTTP status, and RFC 6455's
# "try again later" while Postgres cannot say who the token is.
WS_UNAUTHORIZED = 4401
WS_FORBIDDEN = 4403
WS_TRY_AGAIN_LATER = 1013

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


_query_tokens = query_tokens  # its old name here


class BearerAuth:
    """ASGI middleware: who may send this request (`engine.tokens`).

    A request presents a token as ``Authorization: Bearer <token>`` or, from a browser,
    ``?token=`` (`engine.tokens.presented_tokens`). In order:

    1. `OPEN_PATHS` (``GET /health``) pass without a token.
    2. A token equal to `token` (``PGDAG_API_TOKEN``, compared in constant time) is admin.
    3. With no `token` and no live token in ``api_tokens`` (`TokenCache.any_live`), the API
       is open: everything passes, as before tokens.
    4. A presented token found live in ``api_tokens`` (`TokenCache.lookup`) passes when its
       scope allows the method and path (`engine.tokens.allows`), before routing: a refused
       scope gets 403 for a path that does not exist too. The token is left in the scope
       as ``scope["pgdag_token"]`` (a `TokenInfo`) for the routes.

    Refusals, in the API's error shape: 401 ``unauthorized`` (missing or unknown token),
    403 ``forbidden`` (naming the token and its scope), 503 ``database_unavailable`` when
    Postgres does not answer while a token must be read from it. A WebSocket is accepted
    and at once closed with 4401, 4403 or 1013, which a browser can see (a handshake
    refused with an HTTP status shows it only 1006).
    """

    def __init__(self, app: ASGIApp, token: str | None, tokens: TokenCache | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.tokens = tokens

    def _env_token(self, presented: list[bytes]) -> bool:
        if self.token is None:
            return False
        # every candidate compared, in constant time each
        return sum(hmac.compare_digest(given, self.token) for given in presented) > 0

    async def _who(self, presented: list[bytes]) -> TokenInfo | Literal["open"] | None:
        """The token the request is sent with; "open" when none is configured anywhere;
        None when it presents no live one. Raises `psycopg.Error` when Postgres does not
        answer."""
        if self._env_token(presented):
            return ENV_TOKEN
        if self.tokens is None:
            return "open" if self.token is None else None
        if not await self.tokens.any_live():
            return "open" if self.token is None else None
        for given in presented:
            info = await self.tokens.lookup(given)
            if info is not None:
                return info
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or (kind == "http" and scope["path"] in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        if self.token is None and self.tokens is None:
            await self.app(scope, receive, send)
            return
        presented = presented_tokens(scope.get("headers", []), scope.get("query_string", b""))
        try:
            who = await self._who(presented)
        except psycopg.Error as exc:
            await _deny(
                scope,
                receive,
                send,
                503,
                "database_unavailable",
                f"postgres is not answering, so the bearer token cannot be checked: "
                f"{type(exc).__name__}",
                ws_code=WS_TRY_AGAIN_LATER,
            )
            return
        if who == "open":
            await self.app(scope, receive, send)
            return
        if who is None:
            await _deny(
                scope,
                receive,
                send,
                401,
                "unauthorized",
                "missing or wrong bearer token",
                ws_code=WS_UNAUTHORIZED,
                **{"WWW-Authenticate": 'Bearer realm="pgdag"'},
            )
            return
        method = WS if kind == "websocket" else str(scope["method"])
        if not allows(who.scope, method, scope["path"]):
            await _deny(
                scope,
                receive,
                send,
                403,
                "forbidden",
                f"token {who.name!r} (scope {who.scope}) may not {method} {scope['path']}",
                ws_code=WS_FORBIDDEN,
            )
            return
        if self.tokens is not None:
            self.tokens.used(who)
        scope["pgdag_token"] = who
        await self.app(scope, receive, send)


async def _deny(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    ws_code: int,
    **headers: str,
) -> None:
    """Refuse: an HTTP answer `status` ``{"error": code, "message": message}``; a WebSocket
    accepted and closed with `ws_code` (the close reason is the code, as short as a close
    frame needs)."""
    if scope["type"] == "websocket":
        event = await receive()
        if event["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": ws_code, "reason": code})
        return
    await _refuse(status, code, message, **headers)(scope, receive, send)


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
