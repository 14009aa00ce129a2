"""The supervisor's restart schedule, argv rewriting and exit descriptions (no processes)."""

from __future__ import annotations

import pytest

from engine.config import Settings
from engine.errors import ConfigError
from engine.supervisor import RestartBackoff, describe_exit
from workers.supervisor import child_argv


def test_schedule_doubles_from_one_second_to_sixty() -> None:
    b = RestartBackoff(first_s=1.0, max_s=60.0, reset_s=60.0)
    assert [b.next_delay(0.5) for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_schedule_resets_after_a_child_stayed_up() -> None:
    b = RestartBackoff(first_s=1.0, max_s=60.0, reset_s=60.0)
    assert [b.next_delay(3.0) for _ in range(4)] == [1, 2, 4, 8]
    assert b.next_delay(59.9) == 16  # not quite long enough
    assert b.next_delay(60.0) == 1  # up a full reset period: start over
    assert b.next_delay(1.0) == 2


def test_schedule_from_settings_environment() -> None:
    s = Settings.from_env(
        {
            "PGDAG_RESTART_BACKOFF_FIRST": "0.1",
            "PGDAG_RESTART_BACKOFF_MAX": "0.3",
            "PGDAG_RESTART_RESET": "2",
        }
    )
    b = RestartBackoff(s.restart_backoff_first_s, s.restart_backoff_max_s, s.restart_reset_s)
    assert [b.next_delay(0) for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]
    defaults = Settings.from_env({})
    assert (
        defaults.restart_backoff_first_s,
        defaults.restart_backoff_max_s,
        defaults.restart_reset_s,
    ) == (1.0, 60.0, 60.0)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PGDAG_RESTART_BACKOFF_FIRST": "0"}, "PGDAG_RESTART_BACKOFF_FIRST"),
        ({"PGDAG_RESTART_BACKOFF_FIRST": "soon"}, "PGDAG_RESTART_BACKOFF_FIRST"),
        ({"PGDAG_RESTART_BACKOFF_MAX": "inf"}, "PGDAG_RESTART_BACKOFF_MAX"),
        (
            {"PGDAG_RESTART_BACKOFF_FIRST": "5", "PGDAG_RESTART_BACKOFF_MAX": "2"},
            "PGDAG_RESTART_BACKOFF_MAX",
        ),
        ({"PGDAG_RESTART_RESET": "-1"}, "PGDAG_RESTART_RESET"),
        ({"PGDAG_RESTARTS": "-1"}, "PGDAG_RESTARTS"),
        ({"PGDAG_LAST_EXIT_CODE": "nine"}, "PGDAG_LAST_EXIT_CODE"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_child_learns_restarts_and_last_exit_code() -> None:
    s = Settings.from_env({"PGDAG_RESTARTS": "3", "PGDAG_LAST_EXIT_CODE": "-9"})
    assert (s.restarts, s.last_exit_code) == (3, -9)
    assert (Settings.from_env({}).restarts, Settings.from_env({}).last_exit_code) == (0, None)


def test_child_argv_drops_processes_and_numbers_the_worker_id() -> None:
    argv = ["--processes", "3", "--concurrency", "8", "--worker-id", "w", "--server", "http://x"]
    assert child_argv(argv, 2) == [
        "--concurrency",
        "8",
        "--worker-id",
        "w-2",
        "--server",
        "http://x",
    ]
    assert child_argv(["--processes=2", "--worker-id=box", "--lease-ttl", "5"], 1) == [
        "--worker-id",
        "box-1",
        "--lease-ttl",
        "5",
    ]
    # abbreviations argparse accepts are recognised too (else a child would supervise)
    assert child_argv(["--proc", "2", "--worker", "a"], 1) == ["--worker-id", "a-1"]
    # without --worker-id each child takes its own default id; unknown flags pass through
    assert child_argv(["--processes", "2", "--future-flag", "x"], 1) == ["--future-flag", "x"]


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(2) == "exited with code 2"
    assert describe_exit(-9) == "killed by SIGKILL (exit code -9)"
    assert describe_exit(-15) == "killed by SIGTERM (exit code -15)"
