"""`workers.agent.AgentSettings`: where the agent finds the API, its token and its log."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from workers.agent import AgentSettings


def test_flags_win_over_the_environment() -> None:
    env = {"PGDAG_SERVER": "http://api:8000", "PGDAG_AGENT_TOKEN": "pgdag_env"}
    s = AgentSettings.from_env(env)
    assert (s.server, s.token) == ("http://api:8000", "pgdag_env")
    s = AgentSettings.from_env(env, server="https://other", token="pgdag_flag")
    assert (s.server, s.token) == ("https://other", "pgdag_flag")
    assert AgentSettings.from_env({}).server is None  # a database worker


def test_server_must_be_http() -> None:
    with pytest.raises(ConfigError, match="PGDAG_SERVER must be an http"):
        AgentSettings.from_env({"PGDAG_SERVER": "api:8000"})


def test_log_path_per_agent() -> None:
    default = AgentSettings.from_env({}).log_path("box-1")
    assert default == Path("~/.pgdag/agent-box-1.sqlite3").expanduser()
    given = AgentSettings.from_env({}, agent_log="/var/lib/pgdag/a.sqlite3")
    assert given.log_path("box-1") == Path("/var/lib/pgdag/a.sqlite3")
    templ = AgentSettings.from_env({}, agent_log="/var/lib/pgdag/{agentId}.db")
    assert templ.log_path("box-1") == Path("/var/lib/pgdag/box-1.db")
    # supervised children share the flags, not the file
    sup = AgentSettings.from_env({"PGDAG_SUPERVISOR_PID": "42"}, agent_log="/l/a.sqlite3")
    assert sup.log_path("box-2") == Path("/l/a-box-2.sqlite3")
