"""Fixtures for the whole suite: the PostgreSQL server, a migrated template, a database per
test; and the ``integration`` and ``chaos`` markers. See tests/pgfixtures.py for how the
server is chosen."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# The suite imports its helpers as `tests.<module>`; plain `pytest` (unlike `python -m pytest`)
# puts only tests/ on sys.path, so add the project root. pyproject's pytest `pythonpath = ["."]`
# would do the same; this keeps the suite runnable either way.
if str(TESTS.parent) not in sys.path:
    sys.path.insert(0, str(TESTS.parent))

from tests.pgfixtures import (  # noqa: E402  (needs the path above)
    Database,
    cloned_database,
    docker_postgres,
    docker_unavailable_reason,
    embedded_postgres,
    let_server_user_through,
    migrated_template,
)

logger = logging.getLogger(__name__)

# Where the session's Postgres came from, shown at the end of the run.
_POSTGRES_SOURCE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a real PostgreSQL (every test in tests/integration)"
    )
    config.addinivalue_line(
        "markers", "chaos: kills processes on purpose (every test in tests/chaos)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by directory, so ``-m "not integration"`` runs only what needs no database.
    Chaos tests use a real Postgres too, so they are also ``integration``."""
    for item in items:
        if item.path.is_relative_to(TESTS / "integration"):
            item.add_marker(pytest.mark.integration)
        elif item.path.is_relative_to(TESTS / "chaos"):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.chaos)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    source = config.stash.get(_POSTGRES_SOURCE, None)
    if source:
        terminalreporter.write_line(f"postgres for this session: {source}")


@pytest.fixture(scope="session", autouse=True)
def _server_user_can_reach_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """As root, embedded clusters run as an unprivileged user: let it through pytest's
    (mode 0700) base temp directory; `tests.pgfixtures.server_home` opens each cluster's own
    home below it, so the data stays there rather than going to /var/lib/pgdag."""
    if os.geteuid() != 0:
        return
    basetemp = tmp_path_factory.getbasetemp()
    top = basetemp.parent if basetemp.parent.name.startswith("pytest-of-") else basetemp
    let_server_user_through(basetemp, up_to=top)


@pytest.fixture(scope="session")
def pg_server_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An admin URL of the session's PostgreSQL: ``DATABASE_URL``, else a Docker
    ``postgres:16``, else an embedded cluster in a temp directory."""
    stash = request.config.stash
    if os.environ.get("DATABASE_URL"):
        stash[_POSTGRES_SOURCE] = "DATABASE_URL"
        yield os.environ["DATABASE_URL"]
        return
    reason = docker_unavailable_reason()
    if reason is None:
        stash[_POSTGRES_SOURCE] = "Docker (testcontainers postgres:16)"
        with docker_postgres() as url:
            yield url
        return
    home = tmp_path_factory.mktemp("pgdag-postgres")
    stash[_POSTGRES_SOURCE] = f"embedded cluster in {home}; not Docker: {reason}"
    logger.info("not using Docker for postgres: %s; embedded cluster in %s", reason, home)
    with embedded_postgres(home) as url:
        yield url


@pytest.fixture(scope="session")
def template_db(pg_server_url: str) -> Iterator[Database]:
    """A database ``pgdag_template_<random>`` migrated to head once per session; tests
    never connect to it (it refuses connections), they get clones from `db_url`."""
    from engine.migrate import upgrade_head

    with migrated_template(pg_server_url, upgrade_head) as template:
        yield template


@pytest.fixture
def db_url(pg_server_url: str, template_db: Database) -> Iterator[str]:
    """The URL of a fresh database ``test_<random>`` cloned from the migrated template,
    dropped after the test."""
    with cloned_database(pg_server_url, template_db.name) as db:
        yield db.url
