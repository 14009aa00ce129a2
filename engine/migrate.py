"""Apply the alembic migrations (the only way the schema is created)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    """The alembic `Config` for `url` (any libpq connection string: a URL or key=value
    pairs), from the project's alembic.ini and migrations/."""
    ini = _ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(_ROOT / "migrations"))
    cfg.attributes["conninfo"] = url  # read by migrations/env.py; never logged
    return cfg


def upgrade_head(url: str) -> None:
    """Run ``alembic upgrade head`` against the Postgres at `url` (a libpq URL)."""
    command.upgrade(alembic_config(url), "head")


def downgrade_base(url: str) -> None:
    """Run ``alembic downgrade base`` against `url` (drops every pgdag table)."""
    command.downgrade(alembic_config(url), "base")
