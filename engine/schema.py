"""Is the database's schema the one this pgdag ships? Compared by alembic revision.

`expected_schema` reads the head revision(s) from the migrations this pgdag ships
(`engine.migrate.migrations_dir`: inside the installed package, or the checkout's) at run
time, never a hard-coded id; `schema_problem` compares them with ``alembic_version``. Workers
refuse to start on a database that is not at head; the API starts anyway and answers 503
with the advice until it is (`SchemaGate`), so ``python -m engine migrate`` run beside it
turns it healthy without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from functools import cache

import psycopg
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.sql import queries

logger = logging.getLogger(__name__)

MIGRATE_ADVICE = "run `python -m engine migrate`"
RECHECK_OK_S = 30.0  # while the schema is current: read alembic_version again this often
RECHECK_BAD_S = 1.0  # while it is not: at most this often, when a request comes
CHECK_TIMEOUT_S = 3.0
# Paths that answer without the schema: /health reports it itself; the dashboard page and
# its static files need no database (the page then shows the API's 503 messages); the
# OpenAPI document is built from the code's models alone.
UNGATED_PATHS = frozenset({"/health", "/", "/openapi.json"})
UNGATED_PREFIXES = ("/dashboard/static/",)


@dataclass(frozen=True)
class ExpectedSchema:
    """The revisions this package ships: `heads` the database must be at, `known` all."""

    heads: frozenset[str]
    known: frozenset[str]


@cache
def expected_schema() -> ExpectedSchema:
    """The head revision(s) and every revision of the migrations this pgdag ships (read
    once). Raises `ConfigError` when they are missing (`engine.migrate.migrations_dir`)."""
    # alembic (1.16 and later) logs an INFO line per built-in plugin as its modules load:
    # seven lines at every worker start that say nothing to a pgdag user.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from alembic.script import ScriptDirectory

    from engine.migrate import migrations_dir

    script = ScriptDirectory(str(migrations_dir()))
    return ExpectedSchema(
        heads=frozenset(script.get_heads()),
        known=frozenset(rev.revision for rev in script.walk_revisions()),
    )


async def schema_problem(conn: psycopg.AsyncConnection[DictRow]) -> str | None:
    """None when the database at `conn` (autocommit) is at this package's head revision;
    else what is wrong and what to do, in one line. Raises psycopg errors other than a
    missing ``alembic_version`` table (42P01 undefined_table)."""
    expected = expected_schema()
    heads = ", ".join(sorted(expected.heads))
    try:
        cur = await conn.execute(queries["schema_revisions"])
        found = {str(row["version_num"]) for row in await cur.fetchall()}
    except psycopg.errors.UndefinedTable:
        found = set()
    if found == expected.heads:
        return None
    if not found:
        return f"schema missing: the database has no pgdag tables; {MIGRATE_ADVICE}"
    at = ", ".join(sorted(found))
    if found - expected.known:
        return (
            f"schema at revision {at} is newer than this pgdag knows (head {heads}): "
            "upgrade pgdag, or migrate the database with the pgdag version it came from"
        )
    return f"schema at revision {at}, this pgdag needs {heads}: {MIGRATE_ADVICE}"


class SchemaGate:
    """The API's cached view of `schema_problem`, so requests do not query it each time.

    `problem` is re-read when `current` is called and the last read is older than
    `RECHECK_OK_S` (schema current) or `RECHECK_BAD_S` (not), or after `mark_stale` (a
    route answered 500, which is what an older schema looks like). A read that fails
    because Postgres is away keeps the last answer: that outage is the routes' 503 to give.
    """

    def __init__(self) -> None:
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] | None = None
        self.problem: str | None = f"schema not checked yet; {MIGRATE_ADVICE} if this stays"
        self._checked_at: float | None = None
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task[str | None] | None = None

    def mark_stale(self) -> None:
        """Read the schema again at the next `current`."""
        self._checked_at = None

    def _fresh(self) -> bool:
        if self._checked_at is None:
            return False
        max_age = RECHECK_OK_S if self.problem is None else RECHECK_BAD_S
        return time.monotonic() - self._checked_at < max_age

    async def current(self) -> str | None:
        """The schema problem (None: at head). A stale "at head" is re-read in the
        background (a request never waits on it, also during an outage); a stale problem is
        re-read before answering, so the first request after a migration gets through."""
        if self._fresh() or self.pool is None:
            return self.problem
        if self.problem is None:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.create_task(self._check(), name="pgdag-schema-check")
            return None
        return await self._check()

    async def _check(self) -> str | None:
        assert self.pool is not None
        async with self._lock:
            if self._fresh():
                return self.problem
            try:
                async with self.pool.connection(timeout=CHECK_TIMEOUT_S) as conn:
                    problem = await asyncio.wait_for(schema_problem(conn), CHECK_TIMEOUT_S)
            except (psycopg.Error, TimeoutError) as exc:
                logger.debug("schema check failed: %s", type(exc).__name__)
                self._checked_at = time.monotonic()
                return self.problem
            if problem != self.problem:
                if problem is None:
                    logger.warning("schema is at head now; the API serves every route")
                else:
                    logger.warning("%s; the API answers 503 until then", problem)
            self.problem = problem
            self._checked_at = time.monotonic()
            return problem

    async def close(self) -> None:
        """Wait for a background re-read to end (at shutdown, before the pool closes)."""
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh


class SchemaGuard:
    """ASGI middleware: while `gate` reports a schema problem, HTTP requests answer 503
    ``{"error": "schema_not_current", "message": ...}`` and WebSocket handshakes are refused
    (except `UNGATED_PATHS`). A 500 from a route (what a table or column the code expects
    but the schema lacks looks like) marks the gate stale; a 503 (Postgres away) does not."""

    def __init__(self, app: ASGIApp, gate: SchemaGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] not in ("http", "websocket")
            or path in UNGATED_PATHS
            or path.startswith(UNGATED_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        problem = await self.gate.current()
        if problem is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013, "reason": "schema"})
                return
            body = json.dumps({"error": "schema_not_current", "message": problem}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 500:
                self.gate.mark_stale()
            await send(message)

        await self.app(scope, receive, watch)
