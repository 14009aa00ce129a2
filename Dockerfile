# pgdag: one image for the API (`pgdag serve`) and the workers (`pgdag-worker`).
# It needs no PostgreSQL server binaries: set DATABASE_URL to a Postgres (docker-compose.yml does).
#   docker build -t pgdag .
#   docker run --rm -e DATABASE_URL=postgresql://... pgdag pgdag migrate
#   docker run -d -p 4000:4000 -e DATABASE_URL=postgresql://... pgdag              # API + dashboard
#   docker run -d -e DATABASE_URL=postgresql://... pgdag pgdag-worker --concurrency 4
# tests/integration/test_packaging.py builds what this file describes (the same files, the same
# pip command, in a fresh venv) and runs those commands against a real Postgres.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The build context (the checkout less .dockerignore), installed as a package (not editable):
# the image runs the wheel's files, so it has exactly what `pip install pgdag` gives, with the
# migrations and the dashboard's static files inside the packages.
WORKDIR /src
COPY . .
RUN pip install .

# Run as an unprivileged user, from its home: the installed package stays owned by root
# (read-only to the app), and no source tree sits in the working directory.
RUN useradd --create-home --uid 10001 --user-group pgdag
USER pgdag
WORKDIR /home/pgdag
# Only used without DATABASE_URL (the embedded Postgres, absent from this image).
ENV PGDAG_HOME=/home/pgdag/.pgdag

EXPOSE 4000
CMD ["pgdag", "serve", "--host", "0.0.0.0", "--port", "4000"]
