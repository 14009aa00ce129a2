"""Apply the alembic migrations (the only way the schema is created).

Where the migrations are: an installed pgdag carries them inside this package, as
``engine/migrations`` (pyproject.toml maps the checkout's top-level ``migrations/`` there
with ``[tool.setuptools] package-dir``); a source checkout (or an editable install) has
them at the top, beside ``engine/``. `migrations_dir` looks in that order.

alembic is configured here, in code, so nothing depends on the working directory or on
``alembic.ini``: that file stays at the top of the checkout for the ``alembic`` command a
developer writes a new revision with (``alembic revision -m ...``), and is not shipped.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config

from engine.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent
# Installed (the wheel's package data) first, so a stray top-level migrations/ on sys.path
# can never shadow the revisions this pgdag ships; then the checkout's.
_CANDIDATES = (_PACKAGE / "migrations", _PACKAGE.parent / "migrations")


@cache
def migrations_dir() -> Path:
    """The directory of alembic's ``env.py`` and ``versions/`` this pgdag ships.

    Raises `ConfigError` naming the places looked in when neither has them (a broken
    install: reinstall pgdag).
    """
    for candidate in _CANDIDATES:
        if (candidate / "env.py").is_file():
            return candidate
    looked = ", ".join(str(c) for c in _CANDIDATES)
    raise ConfigError(f"pgdag's migrations are missing (looked in {looked}); reinstall pgdag")


def alembic_config(url: str) -> Config:
    """The alembic `Config` for `url` (any libpq connection string: a URL or key=value
    pairs; read by migrations/env.py, never logged), with `migrations_dir` as its script
    location. Raises `ConfigError` when the migrations are missing."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")  # the one alembic.ini sets for the CLI
    cfg.attributes["conninfo"] = url
    return cfg


def upgrade_head(url: str) -> None:
    """Run ``alembic upgrade head`` against the Postgres at `url` (a libpq URL)."""
    command.upgrade(alembic_config(url), "head")


def downgrade_base(url: str) -> None:
    """Run ``alembic downgrade base`` against `url` (drops every pgdag table)."""
    command.downgrade(alembic_config(url), "base")
