"""The Dockerfile and docker-compose.yml read the way Docker reads them, and the image built
the closest way a machine without a Docker engine can.

`read_dockerfile` parses with dockerfile-parse (continuation lines, exec and shell forms,
the ENV in force at each instruction). `build_image` follows the instructions into a
fresh directory standing for the image's ``/``:

- FROM ``python:*``: a fresh venv of this interpreter stands for the base image's Python
  (its ``bin`` first on PATH, as ``/usr/local/bin`` is there).
- WORKDIR and COPY: into that directory, from the build context Docker would send (the
  checkout less .dockerignore, filtered by docker-py's own matcher).
- RUN: ``pip install ...`` runs as written, in the WORKDIR, with the ENV in force, using the
  venv's pip (pip may use its local cache here, which the image turns off with
  PIP_NO_CACHE_DIR: the one setting changed, for speed). ``useradd`` is not run: the
  processes run as the test's user. Any other RUN fails the build, so a new one gets
  taught here rather than skipped.
- USER, EXPOSE, CMD are recorded; other instructions fail the build.

`Image.start` then runs a command "in the container": cwd the final WORKDIR, the image's
ENV plus the given environment, nothing from the test's own environment but the basic
PATH. A container owns its ports and a shared test machine does not, so an exposed
container port is published on a free host port by rewriting it in the command
(`publish`).

Compose helpers interpolate ``${VAR:-default}`` the way compose does and read commands,
environments, dependencies and healthchecks in either of their spellings.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

from tests.support import Proc

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"

Compose = dict[str, Any]


# --- the Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword (upper case), its arguments as written (continuation
    lines joined) and the ENV in force when it runs."""

    keyword: str
    value: str
    env: Mapping[str, str] = field(default_factory=dict)


def read_dockerfile(text: str) -> list[Instruction]:
    """The instructions of the Dockerfile `text`, comments dropped."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode("utf-8")))
    return [
        Instruction(item["instruction"].upper(), item["value"], dict(context.envs))
        for item, context in zip(parser.structure, parser.context_structure, strict=True)
        if item["instruction"] != "COMMENT"
    ]


def argv_of(value: str) -> list[str]:
    """A RUN/CMD argument as an argv: the exec form (a JSON array) as it is, the shell form
    through ``/bin/sh -c`` as Docker runs it."""
    if value.lstrip().startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), value
        return parsed
    return ["/bin/sh", "-c", value]


def build_context(root: Path = ROOT) -> set[str]:
    """The paths (files and directories, relative, ``/``-separated) that Docker sends as the
    build context of `root`: all but what .dockerignore excludes (docker-py's matcher,
    the .dockerignore read the way docker-py reads it)."""
    patterns: list[str] = []
    if (root / ".dockerignore").is_file():
        lines = (root / ".dockerignore").read_text(encoding="utf-8").splitlines()
        patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    return {p.replace(os.sep, "/") for p in exclude_paths(str(root), patterns)}


@dataclass
class Image:
    """What `build_image` built: `rootfs` stands for the image's ``/``, `venv` for its
    Python; `env`, `workdir`, `user`, `cmd` and `exposed` are the final image config."""

    rootfs: Path
    venv: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    user: str = "root"
    cmd: list[str] = field(default_factory=list)
    exposed: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def path(self, image_path: str, cwd: Path | None = None) -> Path:
        """Where the image's path `image_path` (absolute, or relative to `cwd`) lives here."""
        if image_path.startswith("/"):
            return self.rootfs / image_path.lstrip("/")
        assert cwd is not None, f"relative path {image_path!r} before any WORKDIR"
        return cwd / image_path

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A container's environment: PATH with the image's Python first, HOME, the image's
        ENV, then `extra` (``docker run -e``, compose's ``environment``)."""
        home = self.path(f"/home/{self.user}") if self.user != "root" else self.path("/root")
        return {
            "PATH": f"{self.venv / 'bin'}:{BASE_PATH}",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            **self.env,
            **(extra or {}),
        }

    def start(
        self, argv: list[str], env: Mapping[str, str], log: Path, *, publish: dict[int, int]
    ) -> Proc:
        """Run `argv` in a "container" of this image (cwd the WORKDIR, `environ(env)`),
        each container port in `publish` rewritten to its host port; logs to `log`."""
        assert self.workdir is not None, "the image has no WORKDIR"
        return Proc(
            [published(a, publish) for a in argv],
            self.environ(env),
            log,
            cwd=self.workdir,
            program=None,
        )


def published(text: str, ports: Mapping[int, int]) -> str:
    """`text` with each container port of `ports` replaced by its host port."""
    for container, host in ports.items():
        text = re.sub(rf"(?<![\d.]){container}(?!\d)", str(host), text)
    return text


def _copy(image: Image, value: str, context: set[str], root: Path, cwd: Path | None) -> None:
    words = shlex.split(value) if not value.lstrip().startswith("[") else json.loads(value)
    flags = [w for w in words if w.startswith("--")]
    assert not [f for f in flags if f.startswith("--from")], f"multi-stage COPY: {value!r}"
    *sources, dest = [w for w in words if not w.startswith("--")]
    target = image.path(dest, cwd)
    into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1 or target.is_dir()
    for source in sources:
        pattern = str(PurePosixPath(source)).lstrip("/") or "."
        # Docker's wildcards do not cross "/": a match has as many segments as the pattern
        tops = (
            ["."]
            if pattern == "."
            else sorted(
                p
                for p in context
                if p.count("/") == pattern.count("/") and fnmatch.fnmatchcase(p, pattern)
            )
        )
        assert tops, f"COPY {source}: nothing in the build context matches"
        for top in tops:
            src = root / top if top != "." else root
            if src.is_dir():
                # a directory's contents are copied, not the directory itself
                prefix = "" if pattern == "." else f"{top}/"
                for rel in sorted(p for p in context if pattern == "." or p.startswith(prefix)):
                    here = root / rel
                    out = target / rel.removeprefix(prefix)
                    if here.is_dir():
                        out.mkdir(parents=True, exist_ok=True)
                    elif here.is_file():
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(here, out)
            else:
                out = target / src.name if into_dir else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)


def fresh_venv(where: Path) -> Path:
    """A new venv (with pip) of this test's interpreter at `where`; returns it."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    return where


def host_pip_env() -> dict[str, str]:
    """This machine's pip settings (its index and find-links), nothing else of the test's
    environment: what a build on this machine may use to reach the package registry."""
    keep = ("PIP_", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
    env.pop("PIP_NO_CACHE_DIR", None)
    # the user's own pip cache, wherever HOME points the build
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    return env


def run_logged(argv: list[str], *, env: Mapping[str, str], cwd: Path, log: Path) -> None:
    """Run `argv` to completion (15 minutes at most); fails with the tail of its output."""
    with log.open("ab") as out:
        out.write(f"$ {shlex.join(argv)}  (in {cwd})\n".encode())
        out.flush()
        result = subprocess.run(
            argv, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=900
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise AssertionError(f"{shlex.join(argv)} exited {result.returncode}:\n{tail}")


def build_image(dockerfile: str, dest: Path, *, context_root: Path = ROOT) -> Image:
    """Follow the Dockerfile text `dockerfile` (see the module docstring) into `dest`;
    the build log is ``dest / "build.log"``."""
    image = Image(rootfs=dest / "rootfs", venv=dest / "venv")
    image.rootfs.mkdir(parents=True)
    log = dest / "build.log"
    context = build_context(context_root)
    cwd: Path | None = None
    for ins in read_dockerfile(dockerfile):
        if ins.keyword == "FROM":
            assert ins.value.startswith("python:"), f"FROM {ins.value}: only python images here"
            fresh_venv(image.venv)
        elif ins.keyword in ("ENV", "LABEL"):
            pass  # the ENV in force travels with each instruction (Instruction.env)
        elif ins.keyword == "WORKDIR":
            cwd = image.path(ins.value, cwd)
            cwd.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            _copy(image, ins.value, context, context_root, cwd)
        elif ins.keyword == "RUN":
            argv = argv_of(ins.value)
            command = ins.value.strip()
            if command.startswith("useradd "):
                image.skipped.append(f"RUN {command}")
                continue
            assert command.startswith("pip install "), (
                f"RUN {command!r}: tests/containers.py does not know how to run this here; "
                "teach build_image (never run it on the test machine as it is)"
            )
            assert cwd is not None, "RUN before any WORKDIR"
            env = {**host_pip_env(), **image.environ(ins.env)}
            env.pop("PIP_NO_CACHE_DIR", None)  # pip's local cache is allowed here (speed)
            run_logged(argv, env=env, cwd=cwd, log=log)
        elif ins.keyword == "USER":
            image.user = ins.value.split(":")[0]
        elif ins.keyword == "EXPOSE":
            image.exposed.extend(int(p.split("/")[0]) for p in ins.value.split())
        elif ins.keyword == "CMD":
            image.cmd = argv_of(ins.value)
        else:
            raise AssertionError(f"{ins.keyword} {ins.value}: not supported by build_image")
        image.env = dict(ins.env)
    image.workdir = cwd
    return image


# --- docker-compose.yml -----------------------------------------------------------------------


def load_compose(path: Path = COMPOSE) -> Compose:
    """docker-compose.yml as a mapping."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation of `text` with `variables` (the shell's environment):
    ``${V}``, ``$V``, ``${V:-default}`` (unset or empty), ``${V-default}`` (unset),
    ``${V:?message}`` and ``${V?message}`` (an error), ``$$`` for a literal ``$``."""

    def one(match: re.Match[str]) -> str:
        dollar, name, op, arg, bare = match.groups()
        if dollar:
            return "$"
        name = name or bare
        value = variables.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is not None:
            return value
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise AssertionError(f"compose: ${{{name}}} is required: {arg}")
        return ""

    return _VARIABLE.sub(one, text)


def command_of(service: Compose, variables: Mapping[str, str]) -> list[str] | None:
    """The service's command as an argv (None: the image's CMD); a string is split the
    way compose splits it (shell words, no shell)."""
    command = service.get("command")
    if command is None:
        return None
    if isinstance(command, list):
        return [interpolate(str(a), variables) for a in command]
    return shlex.split(interpolate(str(command), variables))


def command_text(service: Compose) -> str:
    """The service's command as one string, whether written as a string or a list."""
    command = service.get("command")
    if isinstance(command, list):
        return " ".join(str(part) for part in command)
    assert isinstance(command, str), f"command is missing or malformed: {command!r}"
    return command


def environment(service: Compose, variables: Mapping[str, str] | None = None) -> dict[str, str]:
    """The service's environment, mapping or list; interpolated when `variables` is given
    (else as written, ``${...}`` and all)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = {str(k): v for k, _, v in (str(item).partition("=") for item in env)}
    else:
        pairs = {str(k): "" if v is None else str(v) for k, v in env.items()}
    if variables is None:
        return pairs
    return {k: interpolate(v, variables) for k, v in pairs.items()}


def depends_on(service: Compose) -> dict[str, str]:
    """The services this one waits for, each with its condition."""
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {str(name): "service_started" for name in depends}
    return {
        str(name): str((entry or {}).get("condition", "service_started"))
        for name, entry in depends.items()
    }


def depends_condition(service: Compose, on: str) -> str | None:
    return depends_on(service).get(on)


def healthcheck_text(service: Compose) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, list):
        return " ".join(str(part) for part in test)
    return str(test or "")


def healthcheck_argv(service: Compose, variables: Mapping[str, str]) -> list[str] | None:
    """The healthcheck's test as an argv (None: no healthcheck)."""
    test = (service.get("healthcheck") or {}).get("test")
    if test is None:
        return None
    if isinstance(test, str):
        return ["/bin/sh", "-c", interpolate(test, variables)]
    kind, *args = [interpolate(str(a), variables) for a in test]
    if kind == "NONE":
        return None
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(args)]
    assert kind == "CMD", f"healthcheck test starts with {kind!r}"
    return args


def duration_s(text: str | None, default_s: float) -> float:
    """A compose duration (``2s``, ``1m30s``, ``500ms``) in seconds."""
    if not text:
        return default_s
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(text))
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def start_order(services: Compose) -> list[str]:
    """Service names, each after the services it depends on (compose's start order)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name in order:
            return
        for dep in depends_on(services[name]):
            visit(dep, (*path, name))
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def published_ports(service: Compose) -> dict[int, int]:
    """Container port -> host port of the service's ``ports`` (short syntax)."""
    ports: dict[int, int] = {}
    for entry in service.get("ports") or []:
        parts = str(entry).split(":")
        ports[int(parts[-1].split("/")[0])] = int(parts[-2]) if len(parts) > 1 else 0
    return ports
