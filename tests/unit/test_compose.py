"""docker-compose.yml and the Dockerfile: the properties users rely on that no run of them
here can show (ports published, volumes, restart and scaling, who the process runs as), each
checked on the real files without Docker.

Whether the image builds and every service starts and serves is not checked here but for
real: tests/integration/test_packaging.py builds the Dockerfile's file set into a fresh venv
and runs each compose service's command against a real Postgres.

Each `check_*` function asserts one property; the tests run them on the real files, and
`test_each_check_catches_its_breakage` runs each on a broken copy to prove it can fail.
`docker compose config -q` runs only where a Docker engine answers (CI starts no compose stack).
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.containers import (
    COMPOSE,
    DOCKERFILE,
    ROOT,
    argv_of,
    command_text,
    depends_condition,
    environment,
    healthcheck_text,
    load_compose,
    read_dockerfile,
)

Compose = dict[str, Any]
MIGRATE = re.compile(r"(pgdag|python -m engine) migrate")
SERVE = re.compile(r"(pgdag|python -m engine) serve")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile `text`, comments dropped."""
    return [(i.keyword, i.value) for i in read_dockerfile(text)]


# --- the checks ----------------------------------------------------------------------------


def check_services(compose: Compose, dockerfile: str) -> None:
    services = compose.get("services") or {}
    assert {"postgres", "api", "workers"} <= set(services), sorted(services)


def check_postgres_volume(compose: Compose, dockerfile: str) -> None:
    postgres = compose["services"]["postgres"]
    assert str(postgres.get("image", "")).startswith("postgres:16"), postgres.get("image")
    mounts = [str(v) for v in postgres.get("volumes") or []]
    data_mounts = [m for m in mounts if m.split(":")[1:2] == ["/var/lib/postgresql/data"]]
    assert data_mounts, f"no volume on /var/lib/postgresql/data: {mounts}"
    volume_name = data_mounts[0].split(":")[0]
    assert volume_name in (compose.get("volumes") or {}), f"{volume_name!r} is not a named volume"


def check_postgres_healthcheck(compose: Compose, dockerfile: str) -> None:
    postgres = compose["services"]["postgres"]
    health = postgres.get("healthcheck") or {}
    assert "pg_isready" in healthcheck_text(postgres), health
    for key in ("interval", "timeout", "retries"):
        assert key in health, f"postgres healthcheck has no {key}"


def check_postgres_credentials(compose: Compose, dockerfile: str) -> None:
    env = environment(compose["services"]["postgres"])
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env.get(key), f"postgres service does not set {key}"


def check_api_waits_for_healthy_postgres(compose: Compose, dockerfile: str) -> None:
    api = compose["services"]["api"]
    assert depends_condition(api, "postgres") == "service_healthy"


def check_api_migrates_then_serves(compose: Compose, dockerfile: str) -> None:
    command = command_text(compose["services"]["api"])
    migrate, serve = MIGRATE.search(command), SERVE.search(command)
    assert migrate, f"api command does not migrate: {command!r}"
    assert serve, f"api command does not serve: {command!r}"
    assert migrate.start() < serve.start(), f"api command serves before it migrates: {command!r}"
    between = command[migrate.start() : serve.start()]
    assert "&&" in between, f"serve must run only if migrate succeeded: {command!r}"
    assert "--host 0.0.0.0" in command[serve.start() :], f"api must listen on 0.0.0.0: {command!r}"
    assert "--port 4000" in command[serve.start() :], command


def check_api_published_and_healthchecked(compose: Compose, dockerfile: str) -> None:
    api = compose["services"]["api"]
    ports = [str(p) for p in api.get("ports") or []]
    assert any(p.endswith(":4000") or p == "4000" for p in ports), ports
    test = healthcheck_text(api)
    assert "/health" in test and "urllib" in test, f"api healthcheck: {test!r}"


def check_api_token_passed_through(compose: Compose, dockerfile: str) -> None:
    env = environment(compose["services"]["api"])
    assert env.get("PGDAG_API_TOKEN") == "${PGDAG_API_TOKEN:-}", env.get("PGDAG_API_TOKEN")


def check_api_hosts_and_open_health(compose: Compose, dockerfile: str) -> None:
    """Bound to 0.0.0.0 the API answers only the loopback names and PGDAG_ALLOWED_HOSTS:
    other containers reach it as `api`. /health needs no token, so the probe sends none."""
    api = compose["services"]["api"]
    hosts = environment(api).get("PGDAG_ALLOWED_HOSTS", "")
    assert hosts.startswith("${PGDAG_ALLOWED_HOSTS:-"), f"not overridable: {hosts!r}"
    default = hosts.removeprefix("${PGDAG_ALLOWED_HOSTS:-").removesuffix("}").split(",")
    assert "api" in default, f"other containers reach the API as 'api': {hosts!r}"
    test = healthcheck_text(api)
    assert "127.0.0.1:4000/health" in test or "localhost:4000/health" in test, test
    assert "Authorization" not in test and "TOKEN" not in test, f"probe sends a token: {test!r}"


def check_workers(compose: Compose, dockerfile: str) -> None:
    workers = compose["services"]["workers"]
    assert depends_condition(workers, "postgres") == "service_healthy"
    assert depends_condition(workers, "api") == "service_healthy", "migrations may not have run"
    command = command_text(workers)
    assert command.startswith(("pgdag-worker", "python -m workers")), command
    assert "--concurrency" in command, command


def check_workers_scalable(compose: Compose, dockerfile: str) -> None:
    workers = compose["services"]["workers"]
    for key in ("container_name", "ports", "hostname"):
        assert key not in workers, f"workers sets {key}: `--scale workers=3` would clash"


def check_same_image(compose: Compose, dockerfile: str) -> None:
    api, workers = compose["services"]["api"], compose["services"]["workers"]
    assert "build" in api, "api is not built from the Dockerfile"
    assert workers.get("image") == api.get("image"), "workers do not use the api's image"
    assert workers.get("build", api["build"]) == api["build"], "workers build another image"


def check_database_urls(compose: Compose, dockerfile: str) -> None:
    services = compose["services"]
    pg = environment(services["postgres"])
    for name in ("api", "workers"):
        url = environment(services[name]).get("DATABASE_URL", "")
        parts = urlsplit(url)
        assert parts.scheme in ("postgresql", "postgres"), f"{name}: {url!r}"
        assert parts.hostname == "postgres", f"{name} DATABASE_URL host: {url!r}"
        assert parts.port in (None, 5432), f"{name} DATABASE_URL port: {url!r}"
        assert parts.username == pg.get("POSTGRES_USER"), f"{name} DATABASE_URL user: {url!r}"
        assert parts.password == pg.get("POSTGRES_PASSWORD"), f"{name} DATABASE_URL password"
        assert parts.path.lstrip("/") == pg.get("POSTGRES_DB"), f"{name} DATABASE_URL db: {url!r}"


def check_dockerfile(compose: Compose, dockerfile: str) -> None:
    """The image's shape: its base, a non-editable install (the image runs the wheel's files,
    not a source tree), an unprivileged final USER set after the install, the API's port
    exposed and served by default. What it copies is proven by building it (see the module
    docstring), not by a list here."""
    instructions = dockerfile_instructions(dockerfile)
    keywords = [k for k, _ in instructions]
    assert instructions and instructions[0] == ("FROM", "python:3.11-slim"), instructions[:1]
    installs = [
        i for i, (k, args) in enumerate(instructions) if k == "RUN" and "pip install" in args
    ]
    assert installs, "no pip install"
    for i in installs:
        words = shlex.split(instructions[i][1])
        assert "-e" not in words and "--editable" not in words, f"editable: {instructions[i]}"
    users = [args.split(":")[0] for k, args in instructions if k == "USER"]
    assert users, "the Dockerfile has no USER: the container runs as root"
    assert users[-1] not in ("root", "0"), f"the final USER is {users[-1]!r}"
    assert keywords.index("USER") > max(installs), (
        "USER must come after the install (pip would run unprivileged)"
    )
    assert ("EXPOSE", "4000") in instructions, "the Dockerfile does not EXPOSE 4000"
    cmds = [args for k, args in instructions if k == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    cmd = " ".join(argv_of(cmds[-1]))
    assert SERVE.search(cmd) and "0.0.0.0" in cmd and "4000" in cmd, cmd


CHECKS: list[Callable[[Compose, str], None]] = [
    check_services,
    check_postgres_volume,
    check_postgres_healthcheck,
    check_postgres_credentials,
    check_api_waits_for_healthy_postgres,
    check_api_migrates_then_serves,
    check_api_published_and_healthchecked,
    check_api_token_passed_through,
    check_api_hosts_and_open_health,
    check_workers,
    check_workers_scalable,
    check_same_image,
    check_database_urls,
    check_dockerfile,
]


@pytest.fixture(scope="module")
def compose() -> Compose:
    assert COMPOSE.is_file(), "docker-compose.yml is missing"
    return load_compose()


@pytest.fixture(scope="module")
def dockerfile() -> str:
    assert DOCKERFILE.is_file(), "Dockerfile is missing"
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_compose_and_dockerfile(
    check: Callable[[Compose, str], None], compose: Compose, dockerfile: str
) -> None:
    check(compose, dockerfile)


# --- every check can fail ------------------------------------------------------------------


def _services(c: Compose) -> dict[str, Any]:
    services: dict[str, Any] = c["services"]
    return services


def _set(path: str, value: Any) -> Callable[[Compose], None]:
    """A breakage that sets services.<path> (dot-separated) to `value`."""

    def apply(c: Compose) -> None:
        *parents, last = path.split(".")
        node = _services(c)
        for key in parents:
            node = node[key]
        node[last] = value

    return apply


def _drop(path: str) -> Callable[[Compose], None]:
    def apply(c: Compose) -> None:
        *parents, last = path.split(".")
        node = _services(c)
        for key in parents:
            node = node[key]
        del node[last]

    return apply


SERVE_CMD = "pgdag serve --host 0.0.0.0 --port 4000"
MIGRATE_CMD = "pgdag migrate"
OTHER_URL = "postgresql://pgdag:pgdag@localhost:5432/pgdag"

# (the check, a breakage of the compose file, a breakage of the Dockerfile text)
BREAKAGES: list[tuple[Callable[..., None], Callable[[Compose], None] | None, Any]] = [
    (check_services, _drop("workers"), None),
    (check_postgres_volume, _drop("postgres.volumes"), None),
    (check_postgres_volume, _set("postgres.volumes", ["/var/lib/postgresql/data"]), None),
    (check_postgres_volume, _set("postgres.image", "postgres:15"), None),
    (check_postgres_healthcheck, _set("postgres.healthcheck.test", ["CMD", "true"]), None),
    (check_postgres_healthcheck, _drop("postgres.healthcheck.retries"), None),
    (check_postgres_credentials, _drop("postgres.environment.POSTGRES_PASSWORD"), None),
    (check_api_waits_for_healthy_postgres, _set("api.depends_on", ["postgres"]), None),
    (check_api_migrates_then_serves, _set("api.command", ["sh", "-c", SERVE_CMD]), None),
    (
        check_api_migrates_then_serves,
        _set("api.command", f"sh -c '{SERVE_CMD} && {MIGRATE_CMD}'"),
        None,
    ),
    (
        check_api_migrates_then_serves,
        _set("api.command", f"sh -c '{MIGRATE_CMD}; {SERVE_CMD}'"),
        None,
    ),
    (check_api_published_and_healthchecked, _drop("api.ports"), None),
    (check_api_published_and_healthchecked, _drop("api.healthcheck"), None),
    (
        check_api_migrates_then_serves,
        _set("api.command", f"{MIGRATE_CMD} && {SERVE_CMD[:-5]} 8000"),
        None,
    ),
    (check_workers, _set("workers.command", "pgdag-worker"), None),
    (check_api_token_passed_through, _set("api.environment.PGDAG_API_TOKEN", "secret"), None),
    (check_api_hosts_and_open_health, _drop("api.environment.PGDAG_ALLOWED_HOSTS"), None),
    (
        check_api_hosts_and_open_health,
        _set("api.environment.PGDAG_ALLOWED_HOSTS", "${PGDAG_ALLOWED_HOSTS:-localhost}"),
        None,
    ),
    (
        check_api_hosts_and_open_health,
        _set(
            "api.healthcheck.test", ["CMD", "python", "-c", "u.urlopen('http://evil:4000/health')"]
        ),
        None,
    ),
    (
        check_api_hosts_and_open_health,
        _set(
            "api.healthcheck.test",
            ["CMD", "sh", "-c", 'curl -H "Authorization: Bearer $$T" 127.0.0.1:4000/health'],
        ),
        None,
    ),
    (check_workers, _set("workers.depends_on", {"api": {"condition": "service_healthy"}}), None),
    (check_workers, _set("workers.depends_on.api.condition", "service_started"), None),
    (check_workers, _set("workers.command", ["python", "-m", "engine", "serve"]), None),
    (check_workers_scalable, _set("workers.container_name", "pgdag-worker"), None),
    (check_workers_scalable, _set("workers.ports", ["5000:5000"]), None),
    (check_same_image, _set("workers.image", "other:latest"), None),
    (check_same_image, _set("workers.build", "./other"), None),
    (check_database_urls, _set("workers.environment.DATABASE_URL", OTHER_URL), None),
    (
        check_database_urls,
        _set("api.environment.DATABASE_URL", "postgresql://pgdag:pgdag@postgres:6543/pgdag"),
        None,
    ),
    (
        check_database_urls,
        _set("api.environment.DATABASE_URL", "postgresql://pgdag:wrong@postgres:5432/pgdag"),
        None,
    ),
    (
        check_database_urls,
        _set("api.environment.DATABASE_URL", "postgresql://pgdag:pgdag@postgres:5432/other"),
        None,
    ),
    (check_dockerfile, None, lambda text: text.replace("USER pgdag", "USER root")),
    (check_dockerfile, None, lambda text: text.replace("USER pgdag", "")),
    (check_dockerfile, None, lambda text: text.replace("pip install .", "pip install -e .")),
    (check_dockerfile, None, lambda text: text.replace("EXPOSE 4000", "EXPOSE 8000")),
    (check_dockerfile, None, lambda text: text.replace("python:3.11-slim", "python:3.12")),
    (check_dockerfile, None, lambda text: text.replace("RUN pip install", "RUN echo")),
    (check_dockerfile, None, lambda text: text.replace('"0.0.0.0"', '"127.0.0.1"')),
    (
        check_dockerfile,
        None,
        lambda text: text.replace("USER pgdag", "").replace("WORKDIR", "USER 10001\nWORKDIR"),
    ),
    (
        check_dockerfile,
        None,
        lambda text: text.replace("USER pgdag", "USER pgdag\nRUN pip install httpx"),
    ),
]


@pytest.mark.parametrize(
    ("check", "break_compose", "break_dockerfile"),
    BREAKAGES,
    ids=[f"{c.__name__.removeprefix('check_')}-{i}" for i, (c, _, _) in enumerate(BREAKAGES)],
)
def test_each_check_catches_its_breakage(
    check: Callable[[Compose, str], None],
    break_compose: Callable[[Compose], None] | None,
    break_dockerfile: Callable[[str], str] | None,
    compose: Compose,
    dockerfile: str,
) -> None:
    broken = copy.deepcopy(compose)
    text = dockerfile
    if break_compose is not None:
        break_compose(broken)
    if break_dockerfile is not None:
        text = break_dockerfile(dockerfile)
        assert text != dockerfile, "the breakage did not change the Dockerfile"
    with pytest.raises(AssertionError):
        check(broken, text)


def test_every_check_has_a_breakage() -> None:
    broken_checks = {c for c, _, _ in BREAKAGES}
    assert [c.__name__ for c in CHECKS if c not in broken_checks] == []


# --- the real thing, where Docker exists ---------------------------------------------------


def _docker_engine_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    for args in (["compose", "version"], ["info"]):
        try:
            result = subprocess.run([docker, *args], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if result.returncode != 0:
            return False
    return True


@pytest.mark.skipif(
    not _docker_engine_answers(), reason="no Docker engine; CI does not start the compose stack"
)
def test_docker_compose_config_is_valid() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"{shlex.join(result.args)} failed:\n{result.stdout}{result.stderr}"
    )
