"""Apply the alembic migrations (the only way the schema is created)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

_ROOT = Path(__file__).resolve().parent.parent


def _sqlalchemy_url(url: str) -> str:
    """alembic speaks SQLAlchemy URLs: select the psycopg 3 driver explicitly."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def alembic_config(url: str) -> Config:
    """The alembic `Config` for `url`, from the project's alembic.ini and migrations/."""
    ini = _ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(_ROOT / "migrations"))
    # configparser treats % as interpolation: escape it in passwords.
    cfg.set_main_option("sqlalchemy.url", _sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade_head(url: str) -> None:
    """Run ``alembic upgrade head`` against the Postgres at `url` (a libpq URL)."""
    command.upgrade(alembic_config(url), "head")


def downgrade_base(url: str) -> None:
    """Run ``alembic downgrade base`` against `url` (drops every pgdag table)."""
    command.downgrade(alembic_config(url), "base")
