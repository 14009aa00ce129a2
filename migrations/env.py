"""alembic environment: runs migrations online against the URL given in the config.

The libpq connection string (a URL or ``key=value`` pairs, as DATABASE_URL may be) arrives in
``config.attributes["conninfo"]``, set by `engine.migrate`; psycopg connects with it. The
migrations are raw SQL (op.execute); there is no SQLAlchemy model metadata.
"""

from __future__ import annotations

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool

config = context.config


def run_migrations_online() -> None:
    conninfo = config.attributes.get("conninfo")
    if not conninfo:
        raise RuntimeError("no database URL: run migrations with `python -m engine migrate`")
    connectable = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(conninfo),
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection, target_metadata=None, transaction_per_migration=True
        )
        with context.begin_transaction():
            context.run_migrations()
    connectable.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; run `python -m engine migrate`")
run_migrations_online()
