# pgdag: one image for the API (`python -m engine serve`) and the workers (`python -m workers`).
# It needs no PostgreSQL server binaries: set DATABASE_URL to a Postgres (docker-compose.yml does).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The source tree. Installed editable so that `python -m engine migrate` finds alembic.ini and
# migrations/ next to the engine package, where engine/migrate.py looks for them.
COPY pyproject.toml README.md alembic.ini ./
COPY engine/ ./engine/
COPY workers/ ./workers/
COPY migrations/ ./migrations/
RUN pip install -e .

# Run as an unprivileged user; the source stays owned by root (read-only to the app).
RUN useradd --create-home --uid 10001 --user-group pgdag
USER pgdag
# Only used without DATABASE_URL (the embedded Postgres, absent from this image).
ENV PGDAG_HOME=/home/pgdag/.pgdag

EXPOSE 4000
CMD ["python", "-m", "engine", "serve", "--host", "0.0.0.0", "--port", "4000"]
