"""Scoped API tokens: what each scope may do, how a token is made and kept, and the cache
that keeps a request from costing a query.

A token is ``pgdag_`` + `secrets.token_urlsafe` of 32 random bytes. Postgres keeps only its
sha256 (``api_tokens``, migration 0006) with a name and a scope; the token itself is shown
once, by ``python -m engine token create``. A fast hash is enough for 256 random bits: there
is nothing to guess a preimage from (slow hashes are for passwords people choose).

Scopes (`SCOPE_RULES` is the one definition; docs/operations.md shows it as a table and a
unit test checks the two agree):

- ``admin``: everything, and alone ``GET /metrics`` (Prometheus, `engine.metrics`).
- ``submit``: submit, read, cancel, retry and replay runs, send them signals; create, read,
  pause, resume and delete schedules; read workers, the queue, the maintenance status and the
  OpenAPI document; the WebSockets and the dashboard. Not ``/agent/*``.
- ``agent``: only ``/agent/*`` (claim, heartbeat, report, ...), all POST.

``GET /health`` needs no token at all (`engine.guards.OPEN_PATHS`). ``PGDAG_API_TOKEN`` is
an admin token that lives in the environment instead of the table. With neither it nor a
live token in the table, the API is open, as it was before tokens.

`TokenCache` answers `engine.guards.BearerAuth` from memory: a token's row is read at most
once per `CACHE_TTL_S` (5 s; so a revoked token stops working within 5 s), whether the table
holds any live token likewise, and ``last_used_at`` is written at most once a minute per
token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeVar, get_args
from urllib.parse import unquote_to_bytes

import psycopg
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

from engine.errors import PgdagError, TokenNameTaken, TokenNotFound
from engine.sql import queries

logger = logging.getLogger(__name__)

Scope = Literal["admin", "submit", "agent"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
TOKEN_PREFIX = "pgdag_"
TOKEN_BYTES = 32  # random bytes in a token (43 urlsafe base64 characters)
NAME_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,200}")
CACHE_TTL_S = 5.0  # a row read for a token (or "any live token?") is trusted this long
TOUCH_INTERVAL_S = 60.0  # last_used_at is written at most this often per token
CACHE_MAX_ENTRIES = 10_000  # tokens remembered (known and unknown) before the oldest go
WS = "WS"  # the "method" of a WebSocket handshake in `SCOPE_RULES`

T = TypeVar("T")
Pool = AsyncConnectionPool[psycopg.AsyncConnection[DictRow]]


# --- rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One thing a scope may do: `method` (``GET``, which also covers ``HEAD``; ``POST``;
    `WS` for a WebSocket handshake; ``*`` any) on `path`, where a ``{name}`` segment stands
    for one non-empty segment without ``/`` (as Starlette matches ``{run_id}``) and a final
    ``*`` for any rest (``/agent/*``: every path under ``/agent/``)."""

    method: str
    path: str

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with `method` (``WS`` for a WebSocket) on `path` is allowed."""
        wanted = "GET" if method == "HEAD" else method
        if self.method not in ("*", wanted):
            return False
        return _path_regex(self.path).fullmatch(path) is not None


_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def _path_regex(pattern: str) -> re.Pattern[str]:
    regex = _REGEX_CACHE.get(pattern)
    if regex is None:
        prefix, star, _ = pattern.partition("*")
        parts = re.split(r"(\{[A-Za-z_]+\})", prefix)
        text = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
        regex = _REGEX_CACHE[pattern] = re.compile(text + (".*" if star else ""))
    return regex


SCOPE_RULES: Mapping[Scope, tuple[Rule, ...]] = {
    # /metrics is in "/*" already; named so that the table (docs/operations.md) shows it is
    # admin-only: the scope of an operator, not of a submitter or an agent.
    "admin": (Rule("*", "/*"), Rule("GET", "/metrics")),
    "submit": (
        Rule("POST", "/runs"),
        Rule("GET", "/runs"),
        Rule("GET", "/runs/{runId}"),
        Rule("GET", "/runs/{runId}/events"),
        Rule("POST", "/runs/{runId}/cancel"),
        Rule("POST", "/runs/{runId}/steps/{stepName}/retry"),
        Rule("POST", "/runs/{runId}/replay"),
        Rule("POST", "/runs/{runId}/signals/{signal}"),
        Rule("POST", "/runs/retry-dead-letters"),
        Rule("POST", "/schedules"),
        Rule("GET", "/schedules"),
        Rule("GET", "/schedules/{scheduleId}"),
        Rule("POST", "/schedules/{scheduleId}/pause"),
        Rule("POST", "/schedules/{scheduleId}/resume"),
        Rule("DELETE", "/schedules/{scheduleId}"),
        Rule("GET", "/workers"),
        Rule("GET", "/queue"),
        Rule("GET", "/maintenance"),
        Rule("GET", "/openapi.json"),
        Rule(WS, "/ws"),
        Rule(WS, "/ws/runs/{runId}"),
        Rule("GET", "/"),
        Rule("GET", "/dashboard/*"),
    ),
    "agent": (Rule("POST", "/agent/*"),),
}


def allows(scope: Scope, method: str, path: str) -> bool:
    """Whether a token of `scope` may send `method` (``WS`` for a WebSocket handshake) to
    `path`. Unknown paths are refused like known ones: a scope is checked before routing, so
    a refused token learns nothing about which paths exist."""
    return any(rule.matches(method, path) for rule in SCOPE_RULES[scope])


def parse_scope(text: str) -> Scope:
    """`text` as a scope; raises `ValueError` naming the scopes."""
    for scope in SCOPES:
        if text == scope:
            return scope
    raise ValueError(f"unknown scope {text!r}; one of {', '.join(SCOPES)}")


def check_name(name: str) -> str:
    """`name` if it can name a token (1 to 200 of ``A-Z a-z 0-9 . _ : @ -``); raises
    `PgdagError` saying what is wrong."""
    if not NAME_PATTERN.fullmatch(name):
        raise PgdagError(
            f"token name {name!r} is not allowed: 1 to 200 characters of letters, digits "
            "and . _ : @ -"
        )
    return name


# --- tokens --------------------------------------------------------------------------------


def generate_token() -> str:
    """A new token: ``pgdag_`` and 32 random bytes in urlsafe base64 (49 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str | bytes) -> bytes:
    """The sha256 (32 bytes) of `token` (str: its UTF-8), as ``api_tokens`` keeps it."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def query_tokens(query_string: bytes) -> Iterator[bytes]:
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


def presented_tokens(headers: Iterable[tuple[bytes, bytes]], query_string: bytes) -> list[bytes]:
    """Every token a request presents, in order: each ``Authorization: Bearer <token>``
    header (scheme in any case), then each ``?token=`` (`query_tokens`). Empty ones are
    dropped; duplicates kept once."""
    found: list[bytes] = []
    for key, value in headers:
        if key.lower() == b"authorization":
            scheme, _, given = value.partition(b" ")
            if scheme.lower() == b"bearer":
                found.append(given.strip())
    found.extend(query_tokens(query_string))
    return list(dict.fromkeys(t for t in found if t))


# --- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    """A live token as a request sees it: its row `id` (None: ``PGDAG_API_TOKEN``), `name`
    and `scope`."""

    id: int | None
    name: str
    scope: Scope


ENV_TOKEN = TokenInfo(id=None, name="PGDAG_API_TOKEN", scope="admin")


@dataclass(frozen=True)
class TokenRow:
    """One ``api_tokens`` row as ``token list`` shows it (never the hash)."""

    name: str
    scope: Scope
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenStore:
    """``api_tokens`` over `pool` (autocommit, dict rows: `engine.db.open_pool`). Every
    method may raise `psycopg.OperationalError` when Postgres does not answer."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def create(self, name: str, scope: Scope) -> str:
        """Make a token named `name` with `scope`; returns the token, which is kept nowhere
        (only its sha256 is). Raises `TokenNameTaken` when a live token has that name, and
        `PgdagError` for a name `check_name` refuses."""
        check_name(name)
        token = generate_token()
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    queries["insert_api_token"],
                    {"name": name, "scope": scope, "token_sha256": hash_token(token)},
                )
        except psycopg.errors.UniqueViolation:
            raise TokenNameTaken(
                f"a live token is named {name!r} already; revoke it first "
                f"(python -m engine token revoke {name}) or pick another name"
            ) from None
        return token

    async def list(self) -> list[TokenRow]:
        """Every token, live and revoked, oldest first."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["list_api_tokens"])
            rows = await cur.fetchall()
        return [
            TokenRow(
                name=r["name"],
                scope=r["scope"],
                created_at=r["created_at"],
                last_used_at=r["last_used_at"],
                revoked_at=r["revoked_at"],
            )
            for r in rows
        ]

    async def revoke(self, name: str) -> None:
        """Revoke the live token named `name` (the row stays, with ``revoked_at``). Raises
        `TokenNotFound` when no live token has that name."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["revoke_api_token"], {"name": name})
            if await cur.fetchone() is None:
                raise TokenNotFound(
                    f"no live token is named {name!r} (python -m engine token list)"
                )

    async def count_live(self) -> int:
        """How many tokens are live (not revoked); 0 in a database whose schema is older
        than ``api_tokens`` (the API answers 503 ``schema_not_current`` then anyway)."""
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(queries["count_live_api_tokens"])
                row = await cur.fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
        assert row is not None
        return int(row["n"])

    async def lookup(self, token_sha256: bytes) -> TokenInfo | None:
        """The live token whose sha256 is `token_sha256`; None when there is none."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                queries["select_live_api_token"], {"token_sha256": token_sha256}
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return TokenInfo(id=row["id"], name=row["name"], scope=row["scope"])

    async def touch(self, token_id: int) -> None:
        """Set the token's ``last_used_at`` to now, unless it was set within the last
        `TOUCH_INTERVAL_S` (by any API process)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                queries["touch_api_token"], {"id": token_id, "interval_s": TOUCH_INTERVAL_S}
            )


# --- the cache -----------------------------------------------------------------------------


def _share(future: asyncio.Future[T], outcome: T | BaseException) -> None:
    """Hand the callers waiting on `future` (a query they share) its `outcome`: a result, or
    the error it raised (any other end, such as cancellation, as a
    `psycopg.OperationalError`, so that a waiter answers 503 rather than waits)."""
    if future.done():
        return
    if isinstance(outcome, psycopg.Error):
        future.set_exception(outcome)
        future.exception()  # marked retrieved: no warning when nobody was waiting
    elif isinstance(outcome, BaseException):
        future.set_exception(psycopg.OperationalError(f"token check interrupted: {outcome!r}"))
        future.exception()
    else:
        future.set_result(outcome)


class TokenCache:
    """What `engine.guards.BearerAuth` asks, from memory, read from `store` at most once per
    `ttl_s` per question. `store` is None until the API's pool is open.

    Concurrent misses of the same question share one query. A failed read raises
    (`psycopg.OperationalError` and other `psycopg.Error`): the caller answers 503; nothing
    stale is trusted past `ttl_s`, except "no live token" (see `any_live`: the API stays as
    open as it was, and nobody can make a token in a database that does not answer).
    """

    def __init__(
        self,
        store: TokenStore | None = None,
        *,
        ttl_s: float = CACHE_TTL_S,
        touch_interval_s: float = TOUCH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.touch_interval_s = touch_interval_s
        self.clock = clock
        self._any: tuple[bool, float] | None = None
        self._tokens: dict[bytes, tuple[TokenInfo | None, float]] = {}
        self._inflight: dict[bytes, asyncio.Future[TokenInfo | None]] = {}
        self._any_inflight: asyncio.Future[bool] | None = None
        self._any_refresh: asyncio.Task[None] | None = None
        self._touched: dict[int, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _store(self) -> TokenStore:
        if self.store is None:
            raise psycopg.OperationalError("the token store is not open yet")
        return self.store

    async def any_live(self) -> bool:
        """Whether ``api_tokens`` holds a live token (cached `ttl_s`). False while `store`
        is None: an app run without its lifespan has no pool, hence no table to read (a
        server always runs the lifespan, which sets `store`, before any request).

        A stale "no" is answered at once and read again in the background: an open API
        stays open during an outage without making each request wait for the pool before
        its route does, and a first token closes it within `ttl_s` and one query. A stale
        "yes" is read again before answering; raises `psycopg.Error` when that fails."""
        if self.store is None:
            return False
        cached = self._any
        if cached is not None and self.clock() - cached[1] < self.ttl_s:
            return cached[0]
        if cached is not None and not cached[0]:
            if self._any_refresh is None or self._any_refresh.done():
                self._any_refresh = asyncio.create_task(
                    self._refresh_any(), name="pgdag-token-any-live"
                )
            return False
        return await self._read_any()

    async def _refresh_any(self) -> None:
        try:
            await self._read_any()
        except psycopg.Error as exc:
            logger.debug("could not read whether any token is live: %s", exc)

    async def _read_any(self) -> bool:
        """`TokenStore.count_live` > 0, remembered; one query for concurrent callers."""
        if self._any_inflight is not None:
            return await asyncio.shield(self._any_inflight)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._any_inflight = future
        try:
            live = await self._store().count_live() > 0
        except BaseException as exc:
            _share(future, exc)
            raise
        finally:
            self._any_inflight = None
        self._any = (live, self.clock())
        _share(future, live)
        return live

    async def lookup(self, token: bytes) -> TokenInfo | None:
        """The live token `token` is, from ``api_tokens`` (cached `ttl_s`, unknown tokens
        too); None when it is none."""
        digest = hash_token(token)
        now = self.clock()
        cached = self._tokens.get(digest)
        if cached is not None and now - cached[1] < self.ttl_s:
            return cached[0]
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[TokenInfo | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            info = await self._store().lookup(digest)
        except BaseException as exc:
            _share(future, exc)
            raise
        finally:
            del self._inflight[digest]
        self._remember(digest, info)
        _share(future, info)
        return info

    def _remember(self, digest: bytes, info: TokenInfo | None) -> None:
        now = self.clock()
        if len(self._tokens) >= CACHE_MAX_ENTRIES:
            self._tokens = {k: v for k, v in self._tokens.items() if now - v[1] < self.ttl_s}
            if len(self._tokens) >= CACHE_MAX_ENTRIES:
                self._tokens.clear()
        self._tokens[digest] = (info, now)

    def used(self, info: TokenInfo) -> None:
        """Note that `info` was just used: its ``last_used_at`` is written in the background
        when this process has not written it for `touch_interval_s` (a failure is logged at
        debug level and tried again at the next use)."""
        if info.id is None or self.store is None:
            return
        now = self.clock()
        last = self._touched.get(info.id)
        if last is not None and now - last < self.touch_interval_s:
            return
        self._touched[info.id] = now
        task = asyncio.create_task(self._touch(info), name=f"pgdag-token-touch-{info.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch(self, info: TokenInfo) -> None:
        assert info.id is not None
        try:
            await self._store().touch(info.id)
        except psycopg.Error as exc:
            logger.debug("could not note the use of token %r: %s", info.name, exc)
            self._touched.pop(info.id, None)

    async def close(self) -> None:
        """Wait for the background ``last_used_at`` writes and stop a background read (at
        shutdown, before the pool closes)."""
        if self._any_refresh is not None:
            self._any_refresh.cancel()
            await asyncio.gather(self._any_refresh, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
