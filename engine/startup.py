"""Start-up checks of the database, in words: is DATABASE_URL well formed, does Postgres
answer, does it take our credentials and know our database.

Permanent errors end the process at once (`DatabaseUnavailable` with ``permanent=True``);
a server that does not answer (yet) is waited for, one log line, up to ``PGDAG_DB_WAIT``.
No message made here holds the password (`redact`), wherever DATABASE_URL carries it.

Why messages, not SQLSTATEs
---------------------------
The server sends a SQLSTATE with every connection-time FATAL (28P01 invalid_password,
28000 invalid_authorization_specification, 3D000 invalid_catalog_name...), but libpq keeps
only its text: psycopg raises `OperationalError` with ``sqlstate`` None for every failed
connection (psycopg issue #1188). So a failure is classified by psycopg's error class
(`ProgrammingError`: the conninfo could not be parsed) and by the server's message texts
for those SQLSTATEs (`PERMANENT`, from PostgreSQL's ``auth.c`` and ``postinit.c``). A server
whose ``lc_messages`` is not English sends translated texts: those match nothing, count as
transient, and the process exits after ``PGDAG_DB_WAIT`` with the server's words instead.
"""

from __future__ import annotations

import asyncio
import logging
import re
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from engine.db import Backoff
from engine.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5  # libpq connect_timeout of each try (whole seconds)
WAIT_FIRST_S = 0.25  # first pause between tries while waiting; doubles up to WAIT_MAX_S
WAIT_MAX_S = 2.0

# (SQLSTATE the server sent, or "client" for libpq's own errors; the pattern of its text).
PERMANENT: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("28P01", re.compile(r"password authentication failed for user")),
    (
        "28000",
        re.compile(
            r'role ".*" does not exist|no pg_hba\.conf entry|pg_hba\.conf rejects'
            r"|authentication failed for user|is not permitted to log in"
        ),
    ),
    ("3D000", re.compile(r'database ".*" does not exist')),
    ("42501", re.compile(r"permission denied for database")),
    ("55000", re.compile(r"is not currently accepting connections")),
    (
        "client",
        re.compile(
            r"fe_sendauth: no password supplied|^connection is bad: |SSL was required"
            r"|server does not support SSL|SCRAM authentication requires"
        ),
    ),
)

_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^@/?#]*)@")
_URL_QUERY_PASSWORD = re.compile(r"[?&]password=([^&#]*)")
_KEYWORD_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
_SERVER_PREFIX = re.compile(
    r'^(?:connection failed: )?(?:connection to server (?:at "[^"]*"(?: \([^)]*\))?, '
    r'port \d+|on socket "[^"]*") failed: )?(?:FATAL:\s+)?'
)


def _secrets(url: str) -> set[str]:
    """Every spelling of the password that `url` (a URL or key=value conninfo) holds."""
    found: set[str] = set()
    with_userinfo = _URL_USERINFO.match(url)
    if with_userinfo and ":" in with_userinfo.group(1):
        found.add(with_userinfo.group(1).split(":", 1)[1])
    found.update(_URL_QUERY_PASSWORD.findall(url))
    for raw in _KEYWORD_PASSWORD.findall(url):
        found.add(raw)
        if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
            found.add(re.sub(r"\\(.)", r"\1", raw[1:-1]))
    try:
        parsed = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        parsed = None
    if parsed:
        found.add(str(parsed))
    found.update({unquote(s) for s in found})
    return {s for s in found if s}


def redact(text: str, url: str) -> str:
    """`text` with every spelling of the password in `url` replaced by ``***``.

    `url` is a libpq connection string: a URL (password in its user-info or a
    ``?password=`` parameter) or ``key=value`` pairs (``password=...``, quoted or not).
    """
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def where(url: str, exc: psycopg.Error | None = None) -> tuple[str, str]:
    """``(host:port, "Postgres at host:port as "user"")`` for messages, never the password.

    Taken from the connection libpq tried (`exc.pgconn`, which includes libpq's defaults
    and ``PG*`` environment variables) when there is one, else from `url` as written.
    """
    pgconn = exc.pgconn if exc is not None else None
    if pgconn is not None:
        host = pgconn.host.decode(errors="replace") or "localhost"
        port = pgconn.port.decode(errors="replace") or "5432"
        user = pgconn.user.decode(errors="replace")
    else:
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error:
            params = {}
        host = str(params.get("host") or "localhost")
        port = str(params.get("port") or "5432")
        user = str(params.get("user") or "")
    hostport = f"{host}:{port}" if not host.startswith("/") else f"socket {host}/.s.PGSQL.{port}"
    as_user = f' as "{user}"' if user else ""
    return hostport, f"Postgres at {hostport}{as_user}"


def _first_line(exc: psycopg.Error) -> str:
    """libpq's first line without its ``connection to server at ... failed: FATAL:`` prefix
    (not redacted: for classifying only, never for showing)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return _SERVER_PREFIX.sub("", lines[0]) if lines else ""


def connect_reason(exc: psycopg.Error, url: str) -> str:
    """The short reason of a failed connection, to show: `_first_line` with the password
    redacted."""
    return redact(_first_line(exc), url) or type(exc).__name__


def permanent_sqlstate(reason: str) -> str | None:
    """The SQLSTATE (or ``"client"``) whose text `reason` is, when waiting cannot cure it."""
    for sqlstate, pattern in PERMANENT:
        if pattern.search(reason):
            return sqlstate
    return None


async def wait_for_postgres(url: str, *, wait_s: float) -> None:
    """Connect to `url` once to prove it works, waiting up to `wait_s` seconds (``inf``: for
    ever) for a server that does not answer yet. Logs one ``waiting for Postgres at
    host:port`` line when it has to wait, and one when the server answers after all.

    Raises `DatabaseUnavailable`: ``permanent=True`` at once when DATABASE_URL cannot be
    parsed (psycopg `ProgrammingError`) or the server refused the credentials or the
    database (`PERMANENT`); ``permanent=False`` when `wait_s` passed without an answer.
    Neither message holds the password, and neither chains the psycopg error (whose text
    may hold it).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    backoff = Backoff(WAIT_FIRST_S, WAIT_MAX_S)
    waited = False
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True
            )
        except psycopg.ProgrammingError as exc:
            raise DatabaseUnavailable(
                f"DATABASE_URL is malformed: {connect_reason(exc, url)}", permanent=True
            ) from None
        except psycopg.OperationalError as exc:
            hostport, target = where(url, exc)
            reason = connect_reason(exc, url)
            # Classified on the server's own words: a password that happens to be one of them
            # ("user") would make the redacted text match no pattern.
            if permanent_sqlstate(_first_line(exc)) is not None:
                raise DatabaseUnavailable(
                    f"cannot connect to {target}: {reason}", permanent=True
                ) from None
            remaining = started + wait_s - loop.time()
            if remaining <= 0:
                raise DatabaseUnavailable(
                    f"{target} did not answer within {wait_s:g} s (PGDAG_DB_WAIT): {reason}",
                    permanent=False,
                ) from None
            if not waited:
                waited = True
                logger.warning(
                    "waiting for Postgres at %s (%s), up to %g s (PGDAG_DB_WAIT)",
                    hostport,
                    reason,
                    wait_s,
                )
            await asyncio.sleep(min(backoff.next_delay(), remaining))
            continue
        await conn.close()
        if waited:
            logger.warning(
                "Postgres at %s answered after %.1f s", where(url)[0], loop.time() - started
            )
        return
