"""pgdag as its users get it, each run against the session's real Postgres, from a directory
that holds no source:

- installed from the checkout into a fresh venv, not editable (``pip install <checkout>``):
  ``pgdag migrate``, ``pgdag serve`` (page, assets, ``/runs``), ``pgdag-worker`` completing
  a DELAY + HTTP_GET_JSON run, and the ``python -m`` forms;
- the Docker image, built the closest way without a Docker engine (`tests.containers`:
  the Dockerfile's own COPY and RUN lines, the same pip command, into a fresh venv):
  ``pgdag migrate``, the image's CMD and ``pgdag-worker``;
- each docker-compose.yml service on that image, with its command, its environment and
  its healthcheck, started in compose's order and conditions.

Each venv is built once per module (a fresh ``pip install`` of pgdag and its dependencies;
pip's local cache makes the second time quick).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from tests.containers import (
    DOCKERFILE,
    ROOT,
    Image,
    build_image,
    command_of,
    depends_on,
    duration_s,
    environment,
    fresh_venv,
    healthcheck_argv,
    host_pip_env,
    load_compose,
    published,
    published_ports,
    run_logged,
    start_order,
)
from tests.pgfixtures import create_database, drop_database, unique_name
from tests.support import Proc, free_port, wait_for

# A fresh venv and a pip install come first (under a minute with pip's cache; more on a cold
# one): a longer bound than the suite's default per test.
pytestmark = pytest.mark.timeout(600)

RUN = {
    "goal": "packaging smoke test",
    "steps": [
        {"name": "first", "tool": "DELAY", "input": {"ms": 50}},
        {"name": "second", "tool": "DELAY", "input": {"ms": 50}, "dependsOn": ["first"]},
    ],
}


@pytest.fixture
def empty_db(pg_server_url: str) -> Iterator[str]:
    """A new database with no schema at all (the commands under test migrate it)."""
    db = create_database(pg_server_url, unique_name("pkg_"))
    try:
        yield db.url
    finally:
        drop_database(pg_server_url, db.name)


# --- what the tests check on a running API -------------------------------------------------


def wait_healthy(base: str, procs: list[Proc]) -> None:
    """Wait for 200 from /health; fail at once with its log if a process exits."""

    def healthy() -> bool:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.log.name} exited:\n{proc.output()}")
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout_s=60, what=f"{base}/health")


def check_dashboard(base: str) -> None:
    """The page at / and its assets are served (they ship as package data)."""
    page = httpx.get(f"{base}/", timeout=10)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "/dashboard/static/app.js" in page.text, page.text[:500]
    for asset in ("app.js", "app.css", "vendor/dagre-3.1.3.min.js"):
        r = httpx.get(f"{base}/dashboard/static/{asset}", timeout=10)
        assert r.status_code == 200, f"{asset}: {r.status_code}"


def complete_run(base: str, body: Mapping[str, Any], procs: list[Proc]) -> dict[str, Any]:
    """Submit `body` through the API and wait for the run to complete; returns it."""
    created = httpx.post(f"{base}/runs", json=body, timeout=10)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]

    def finished() -> dict[str, Any] | None:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.log.name} exited:\n{proc.output()}")
        run: dict[str, Any] = httpx.get(f"{base}/runs/{run_id}", timeout=10).json()
        return run if run["status"] in ("completed", "failed", "cancelled") else None

    run = wait_for(finished, timeout_s=60, what=f"run {run_id} to finish")
    assert run["status"] == "completed", run
    return run


def stop_all(procs: list[Proc]) -> None:
    for proc in reversed(procs):
        proc.stop()


# --- pip install <checkout> ----------------------------------------------------------------


def checkout_files() -> list[str]:
    """The checkout's files as a clone (plus uncommitted new files) has them: tracked and
    untracked-but-not-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return [f for f in listed.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install <checkout>`` (not editable). The checkout is copied
    first, as a clone would have it, so setuptools' in-tree build/ never lands in (or reads
    stale files from) the working checkout."""
    base = tmp_path_factory.mktemp("installed")
    source = base / "checkout"
    for rel in checkout_files():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, source / rel)
    venv = fresh_venv(base / "venv")
    env = {**host_pip_env(), "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    run_logged(
        [str(venv / "bin" / "pip"), "install", str(source)],
        env=env,
        cwd=base,
        log=base / "pip.log",
    )
    return venv


def venv_env(venv: Path, db_url: str, **extra: str) -> dict[str, str]:
    """A user's shell with the venv activated: no PYTHONPATH, no PGDAG_ settings of ours."""
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "DATABASE_URL": db_url, **extra}


def test_installed_package_does_what_the_checkout_does(
    installed: Path, empty_db: str, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = venv_env(installed, empty_db, PGDAG_LEASE_TTL="5")

    def run(*argv: str) -> str:
        result = subprocess.run(
            argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
        return result.stdout

    # the venv's own copy is what runs, with its migrations inside the package
    where = run("python", "-c", "import engine.migrate as m; print(m.migrations_dir())")
    assert where.strip().startswith(str(installed)), where
    assert "engine/migrations" in where, where
    for argv in (("pgdag", "--help"), ("python", "-m", "engine", "--help")):
        usage = run(*argv)
        for command in ("dev", "serve", "migrate", "submit", "watch", "db"):
            assert command in usage, f"{argv} does not offer {command}:\n{usage}"
    assert "--concurrency" in run("pgdag-worker", "--help")
    assert "--concurrency" in run("python", "-m", "workers", "--help")

    assert "migrations applied" in run("pgdag", "migrate")
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[Proc] = []
    try:
        procs.append(
            Proc(
                ["pgdag", "serve", "--port", str(port)],
                env,
                tmp_path / "serve.log",
                cwd=elsewhere,
                program=None,
            )
        )
        wait_healthy(base, procs)
        check_dashboard(base)
        listed = httpx.get(f"{base}/runs", timeout=10)
        assert listed.status_code == 200 and listed.json()["runs"] == [], listed.text
        procs.append(
            Proc(
                ["pgdag-worker", "--concurrency", "2"],
                {**env, "PGDAG_HTTP_ALLOW_PRIVATE": "1"},
                tmp_path / "worker.log",
                cwd=elsewhere,
                program=None,
            )
        )
        body = {
            **RUN,
            "steps": [
                *RUN["steps"],
                {"name": "health", "tool": "HTTP_GET_JSON", "input": {"url": f"{base}/health"}},
            ],
        }
        run_ = complete_run(base, body, procs)
        health = next(s for s in run_["steps"] if s["name"] == "health")
        assert health["output"]["body"] == {"status": "ok"}, health
    finally:
        stop_all(procs)


# --- the Docker image and docker-compose.yml -----------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The Dockerfile's image, built into a fresh directory and venv (`tests.containers`)."""
    return build_image(DOCKERFILE.read_text(encoding="utf-8"), tmp_path_factory.mktemp("image"))


def test_docker_image_migrates_serves_and_works(
    image: Image, empty_db: str, tmp_path: Path
) -> None:
    """``docker run`` of the image, three ways (the Dockerfile's header shows them): the
    migration, its default CMD (the API and dashboard), a worker."""
    assert image.cmd, "the image has no CMD"
    assert image.exposed, "the image exposes no port"
    port = free_port()
    publish = {image.exposed[0]: port}
    env = {"DATABASE_URL": empty_db}
    migrate = image.start(["pgdag", "migrate"], env, tmp_path / "migrate.log", publish=publish)
    code = migrate.popen.wait(timeout=120)
    migrate.stop()
    assert code == 0, migrate.output()
    assert "migrations applied" in migrate.output()
    procs = [image.start(image.cmd, env, tmp_path / "cmd.log", publish=publish)]
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, procs)
        check_dashboard(base)
        procs.append(image.start(["pgdag-worker"], env, tmp_path / "worker.log", publish=publish))
        complete_run(base, RUN, procs)
    finally:
        stop_all(procs)


def test_each_compose_service_starts_from_the_image(
    image: Image, empty_db: str, tmp_path: Path
) -> None:
    """Every service of docker-compose.yml: ``postgres`` is the session's Postgres (its
    URL replaces each DATABASE_URL that names it); every other service is built from this
    Dockerfile and runs its own command with its own environment (``${VAR:-default}``
    at its defaults), in compose's order, each waiting for its ``depends_on`` conditions;
    a service with a healthcheck is healthy once its own test command passes."""
    services = load_compose()["services"]
    postgres = {n for n, s in services.items() if str(s.get("image", "")).startswith("postgres:")}
    assert postgres, "no postgres service"
    healthy: set[str] = set(postgres)  # the session's Postgres answers
    procs: dict[str, Proc] = {}
    host_ports: dict[int, int] = {}
    try:
        for name in start_order(services):
            if name in postgres:
                continue
            service = services[name]
            assert service.get("build") in (".", {"context": "."}), (
                f"{name} is not built from this Dockerfile: {service.get('build')!r}"
            )
            assert "entrypoint" not in service, f"{name}: entrypoint is not supported here"
            for dep, condition in depends_on(service).items():
                assert condition in ("service_started", "service_healthy"), condition
                assert dep in procs or dep in postgres, f"{name} starts before {dep}"
                if condition == "service_healthy":
                    assert dep in healthy, f"{dep} has no healthcheck that passed"
            env = environment(service, variables={})
            for key, value in env.items():
                if "://" in value and urlsplit(value).hostname in postgres:
                    env[key] = empty_db
            for container_port in published_ports(service):
                host_ports[container_port] = free_port()
            argv = command_of(service, variables={}) or image.cmd
            procs[name] = image.start(argv, env, tmp_path / f"{name}.log", publish=host_ports)
            check = healthcheck_argv(service, variables={})
            if check is not None:
                wait_service_healthy(image, name, service, check, env, host_ports, procs)
                healthy.add(name)
        assert "api" in procs, "no api service"
        base = f"http://127.0.0.1:{host_ports[4000]}"
        wait_healthy(base, list(procs.values()))
        check_dashboard(base)
        complete_run(base, RUN, list(procs.values()))
    finally:
        stop_all(list(procs.values()))


def wait_service_healthy(
    image: Image,
    name: str,
    service: Mapping[str, Any],
    check: list[str],
    env: Mapping[str, str],
    host_ports: Mapping[int, int],
    procs: Mapping[str, Proc],
) -> None:
    """Run the service's healthcheck command in its "container" until it passes, within
    what compose allows (start_period + interval x retries)."""
    health = service.get("healthcheck") or {}
    interval = duration_s(health.get("interval"), 30)
    budget = duration_s(health.get("start_period"), 0) + interval * int(health.get("retries", 3))
    timeout = duration_s(health.get("timeout"), 30)
    assert image.workdir is not None
    argv = [published(a, host_ports) for a in check]

    def passes() -> bool:
        proc = procs[name]
        if proc.popen.poll() is not None:
            raise AssertionError(f"{name} exited:\n{proc.output()}")
        try:
            result = subprocess.run(
                argv,
                cwd=image.workdir,
                env=image.environ(env),
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    wait_for(passes, timeout_s=min(budget, 120), interval_s=0.2, what=f"{name} healthcheck")
