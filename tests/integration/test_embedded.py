"""The embedded PostgreSQL cluster, for real, each test in a fresh home directory."""

from __future__ import annotations

import contextlib
import json
import os
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
from engine.embedded import INITDB_MARKER, EmbeddedCluster, find_server_binaries
from engine.errors import EmbeddedPostgresError
from tests.support import wait_for


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh PGDAG_HOME (under pytest's base temp, which root's postgres user can reach)."""
    return tmp_path_factory.mktemp("home")


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
    assert status["data_dir"] == str(cluster.data_dir)
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


def test_missing_binaries_say_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.raises(EmbeddedPostgresError, match=r"apt-get install postgresql"):
        find_server_binaries(path=str(empty), versioned_globs=())

    # The same through the cluster: PATH has no pg_ctl or pg_config, no versioned dirs.
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(embedded, "VERSIONED_BIN_GLOBS", ())
    with pytest.raises(EmbeddedPostgresError, match=r"apt-get install postgresql") as info:
        EmbeddedCluster(tmp_path / "home").start(timeout_s=10)
    assert "initdb, pg_ctl, postgres" in str(info.value)
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
    assert find_server_binaries(path=str(empty), versioned_globs=[glob_]) == v15

    # pg_ctl on PATH wins, found through its symlink.
    opt = _fake_bin(tmp_path / "opt" / "pg" / "bin", "initdb", "pg_ctl", "postgres")
    on_path = tmp_path / "on-path"
    on_path.mkdir()
    (on_path / "pg_ctl").symlink_to(opt / "pg_ctl")
    assert find_server_binaries(path=str(on_path), versioned_globs=[glob_]) == opt.resolve()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs postgres as another OS user")
def test_root_with_home_the_server_user_cannot_reach(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    private = tmp_path_factory.mktemp("private")
    private.chmod(0o700)  # like /root
    with pytest.raises(EmbeddedPostgresError, match=r"PGDAG_HOME") as info:
        EmbeddedCluster(private / "home").start(timeout_s=20)
    assert "cannot reach" in str(info.value)
    assert not (private / "home" / "data").exists()
