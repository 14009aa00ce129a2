"""Settings: one frozen object, read from the environment in one place (`Settings.from_env`).

Every variable is also a command-line flag of the process that reads it; the CLI parses
flags and passes them to `Settings.from_env(overrides=...)`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.errors import ConfigError
from engine.guards import check_cors_origin, parse_host_entry
from engine.logs import LOG_FORMAT_DEFAULT, check_log_format

LEASE_TTL_S_DEFAULT = 30.0
BACKOFF_BASE_MS_DEFAULT = 1_000
BACKOFF_CAP_MS_DEFAULT = 60_000
MAX_ATTEMPTS_DEFAULT = 3
MAX_STEPS_PER_RUN_DEFAULT = 10_000
MAX_MAP_WIDTH_DEFAULT = 10_000
MAX_BODY_BYTES_DEFAULT = 10 * 1024 * 1024
MAX_OUTPUT_BYTES_DEFAULT = 8 * 1024 * 1024  # engine.jsonb.MAX_BYTES_DEFAULT
HOME_DEFAULT = ".pgdag"
API_HOST_DEFAULT = "127.0.0.1"
API_PORT_DEFAULT = 4000
POLL_INTERVAL_S_DEFAULT = 1.0
REAPER_INTERVAL_S_DEFAULT = 1.0
# The maintenance service (`engine.maintenance`): a process that does not lead tries to take
# the lead every MAINTENANCE_STANDBY_S_DEFAULT seconds; the leader prunes runs past their
# retention every PRUNE_INTERVAL_S_DEFAULT and looks for workers gone silent every
# LIVENESS_INTERVAL_S_DEFAULT.
MAINTENANCE_STANDBY_S_DEFAULT = 2.0
PRUNE_INTERVAL_S_DEFAULT = 60.0
AUDIT_UPKEEP_INTERVAL_S_DEFAULT = 600.0  # the audit log's daily partitions (engine.retention)
LIVENESS_INTERVAL_S_DEFAULT = 10.0
# How often the leader fires the due schedules (engine.maintenance.scheduler): at most this
# late, in seconds.
SCHEDULER_INTERVAL_S_DEFAULT = 1.0
SHUTDOWN_GRACE_S_DEFAULT = 10.0
RETENTION_DAYS_DEFAULT = 30.0
LIVE_QUEUE_MAX_EVENTS_DEFAULT = 5_000
LIVE_STALL_S_DEFAULT = 5.0
# Host names (and host:port) the API answers to besides its bound address and the
# loopback names (`engine.guards.LOCAL_HOSTS`); "*" means any Host.
ALLOWED_HOSTS_DEFAULT: tuple[str, ...] = ()
# Browser origins allowed to call the API cross-origin (CORS); none by default.
CORS_ORIGINS_DEFAULT: tuple[str, ...] = ()
DB_WAIT_S_DEFAULT = 30.0
# The longest an agent's claim may long-poll (`POST /agent/claim` waitMs), seconds.
AGENT_MAX_WAIT_S_DEFAULT = 30.0
# The worker supervisor (``python -m workers --processes N``, `workers.supervisor`): a child
# that exits is restarted after RESTART_BACKOFF_FIRST_S, doubling per restart up to
# RESTART_BACKOFF_MAX_S, and back to the first once a child stayed up RESTART_RESET_S.
RESTART_BACKOFF_FIRST_S_DEFAULT = 1.0
RESTART_BACKOFF_MAX_S_DEFAULT = 60.0
RESTART_RESET_S_DEFAULT = 60.0


def _parse_float(name: str, raw: str, minimum: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def check_interval(name: str, value: float, minimum: float = 0.01) -> float:
    """`value` (seconds) if it is a finite number >= `minimum`: the period of a loop that must
    run (``inf`` would never run it, NaN never compares). Raises `ConfigError` naming the
    variable `name`."""
    if math.isnan(value) or math.isinf(value) or value < minimum:
        raise ConfigError(
            f"{name} must be a finite number of seconds >= {minimum:g}, got {value!r}"
        )
    return value


def _parse_int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def parse_list(raw: str) -> tuple[str, ...]:
    """A comma-separated list (``PGDAG_ALLOWED_HOSTS``, ``PGDAG_CORS_ORIGINS`` and their
    flags); blanks around items and empty items are dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


AGENT_MAX_WAIT_S_LIMIT = 3600.0  # an hour: longer polls outlive every proxy's idle timeout


def _parse_agent_wait(raw: str) -> float:
    """``PGDAG_AGENT_MAX_WAIT``: seconds, 0 (no long-poll) to `AGENT_MAX_WAIT_S_LIMIT`.
    Raises `ConfigError`."""
    value = _parse_float("PGDAG_AGENT_MAX_WAIT", raw, 0)
    if value > AGENT_MAX_WAIT_S_LIMIT:
        raise ConfigError(
            f"PGDAG_AGENT_MAX_WAIT must be <= {AGENT_MAX_WAIT_S_LIMIT:g}, got {raw!r}"
        )
    return value


def _parse_optional_int(name: str, raw: str | None) -> int | None:
    """An integer of any sign, or None when unset or empty."""
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Everything a pgdag process is configured with.

    Durations carry their unit in the name (`_s` seconds, `_ms` milliseconds).
    `database_url` is None when the embedded cluster under `home` is to be used.
    `db_wait_s` is how long a process waits at start-up for Postgres to answer before it
    exits naming the problem (``PGDAG_DB_WAIT``; ``inf`` waits for ever); errors that
    waiting cannot cure (a wrong password, an unknown database) end it at once.
    """

    database_url: str | None = None
    home: Path = field(default_factory=lambda: Path(HOME_DEFAULT))
    # The embedded cluster's server binaries (PGDAG_PG_BINDIR); None: the wheel's, else the
    # system's (see engine/embedded.py).
    pg_bindir: Path | None = None
    lease_ttl_s: float = LEASE_TTL_S_DEFAULT
    api_token: str | None = None
    http_allow_private: bool = False
    backoff_base_ms: int = BACKOFF_BASE_MS_DEFAULT
    backoff_cap_ms: int = BACKOFF_CAP_MS_DEFAULT
    max_steps_per_run: int = MAX_STEPS_PER_RUN_DEFAULT
    max_map_width: int = MAX_MAP_WIDTH_DEFAULT
    max_body_bytes: int = MAX_BODY_BYTES_DEFAULT
    max_output_bytes: int = MAX_OUTPUT_BYTES_DEFAULT
    poll_interval_s: float = POLL_INTERVAL_S_DEFAULT
    reaper_interval_s: float = REAPER_INTERVAL_S_DEFAULT
    # engine.maintenance: PGDAG_MAINTENANCE_STANDBY_S, PGDAG_PRUNE_INTERVAL_S,
    # PGDAG_AUDIT_UPKEEP_INTERVAL_S, PGDAG_LIVENESS_INTERVAL_S (seconds, finite, > 0; see
    # `check_interval`).
    maintenance_standby_s: float = MAINTENANCE_STANDBY_S_DEFAULT
    prune_interval_s: float = PRUNE_INTERVAL_S_DEFAULT
    audit_upkeep_interval_s: float = AUDIT_UPKEEP_INTERVAL_S_DEFAULT
    liveness_interval_s: float = LIVENESS_INTERVAL_S_DEFAULT
    scheduler_interval_s: float = SCHEDULER_INTERVAL_S_DEFAULT  # PGDAG_SCHEDULER_INTERVAL_S
    shutdown_grace_s: float = SHUTDOWN_GRACE_S_DEFAULT
    retention_days: float = RETENTION_DAYS_DEFAULT
    # Modules named by PGDAG_TOOLS. The engine ships no tools: the program that runs it adds
    # its own (`python -m engine serve` and `python -m workers` add `workers.tools`'s
    # built-ins, DELAY and HTTP_GET_JSON) before these.
    tool_modules: tuple[str, ...] = ()
    live_queue_max_events: int = LIVE_QUEUE_MAX_EVENTS_DEFAULT
    live_stall_s: float = LIVE_STALL_S_DEFAULT
    allowed_hosts: tuple[str, ...] = ALLOWED_HOSTS_DEFAULT
    cors_origins: tuple[str, ...] = CORS_ORIGINS_DEFAULT
    db_wait_s: float = DB_WAIT_S_DEFAULT
    # The cap on an agent's long-poll (``POST /agent/claim`` ``waitMs``), seconds;
    # PGDAG_AGENT_MAX_WAIT, ``serve --agent-max-wait``.
    agent_max_wait_s: float = AGENT_MAX_WAIT_S_DEFAULT
    # The supervisor's restart schedule (seconds): PGDAG_RESTART_BACKOFF_FIRST,
    # PGDAG_RESTART_BACKOFF_MAX, PGDAG_RESTART_RESET.
    restart_backoff_first_s: float = RESTART_BACKOFF_FIRST_S_DEFAULT
    restart_backoff_max_s: float = RESTART_BACKOFF_MAX_S_DEFAULT
    restart_reset_s: float = RESTART_RESET_S_DEFAULT
    # Set by the supervisor in its child's environment: how many times this worker slot was
    # restarted (PGDAG_RESTARTS) and how its previous process ended (PGDAG_LAST_EXIT_CODE;
    # negative: the signal that killed it). The worker puts both in its workers row.
    restarts: int = 0
    last_exit_code: int | None = None
    # How log lines are written: "console" (for people) or "json" (one object per line);
    # PGDAG_LOG_FORMAT, --log-format (engine.logs).
    log_format: str = LOG_FORMAT_DEFAULT

    def __post_init__(self) -> None:
        """Check the host and origin lists, whether they came from the environment or a flag,
        and that the restart backoff's cap is not below its first pause.

        Raises `ConfigError` naming the variable and the bad item.
        """
        check_log_format(self.log_format)
        if math.isinf(self.restart_backoff_max_s):
            raise ConfigError("PGDAG_RESTART_BACKOFF_MAX must be a finite number of seconds")
        if self.restart_backoff_max_s < self.restart_backoff_first_s:
            raise ConfigError(
                f"PGDAG_RESTART_BACKOFF_MAX ({self.restart_backoff_max_s:g} s) must be >= "
                f"PGDAG_RESTART_BACKOFF_FIRST ({self.restart_backoff_first_s:g} s)"
            )
        for entry in self.allowed_hosts:
            try:
                parse_host_entry(entry)
            except ValueError as exc:
                raise ConfigError(f"PGDAG_ALLOWED_HOSTS: {exc}") from None
        for origin in self.cors_origins:
            try:
                check_cors_origin(origin)
            except ValueError as exc:
                raise ConfigError(f"PGDAG_CORS_ORIGINS: {exc}") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read settings from `env` (default `os.environ`); keyword `overrides` that are not
        None win (they come from command-line flags).

        Raises `ConfigError` naming the variable when a value cannot be parsed.
        """
        env = os.environ if env is None else env
        get = env.get
        extra_tools = tuple(m.strip() for m in get("PGDAG_TOOLS", "").split(",") if m.strip())
        settings = cls(
            database_url=get("DATABASE_URL") or None,
            home=Path(get("PGDAG_HOME") or HOME_DEFAULT),
            pg_bindir=Path(get("PGDAG_PG_BINDIR", "")) if get("PGDAG_PG_BINDIR") else None,
            lease_ttl_s=_parse_float(
                "PGDAG_LEASE_TTL", get("PGDAG_LEASE_TTL", str(LEASE_TTL_S_DEFAULT)), 0.1
            ),
            api_token=get("PGDAG_API_TOKEN") or None,
            http_allow_private=_parse_bool(
                "PGDAG_HTTP_ALLOW_PRIVATE", get("PGDAG_HTTP_ALLOW_PRIVATE", "0")
            ),
            backoff_base_ms=_parse_int(
                "PGDAG_BACKOFF_BASE_MS",
                get("PGDAG_BACKOFF_BASE_MS", str(BACKOFF_BASE_MS_DEFAULT)),
                0,
            ),
            backoff_cap_ms=_parse_int(
                "PGDAG_BACKOFF_CAP_MS", get("PGDAG_BACKOFF_CAP_MS", str(BACKOFF_CAP_MS_DEFAULT)), 0
            ),
            max_steps_per_run=_parse_int(
                "PGDAG_MAX_STEPS",
                get("PGDAG_MAX_STEPS", str(MAX_STEPS_PER_RUN_DEFAULT)),
                1,
            ),
            max_map_width=_parse_int(
                "PGDAG_MAX_MAP_WIDTH",
                get("PGDAG_MAX_MAP_WIDTH", str(MAX_MAP_WIDTH_DEFAULT)),
                1,
            ),
            max_body_bytes=_parse_int(
                "PGDAG_MAX_BODY_BYTES", get("PGDAG_MAX_BODY_BYTES", str(MAX_BODY_BYTES_DEFAULT)), 1
            ),
            max_output_bytes=_parse_int(
                "PGDAG_MAX_OUTPUT_BYTES",
                get("PGDAG_MAX_OUTPUT_BYTES", str(MAX_OUTPUT_BYTES_DEFAULT)),
                16,
            ),
            poll_interval_s=_parse_float(
                "PGDAG_POLL_INTERVAL",
                get("PGDAG_POLL_INTERVAL", str(POLL_INTERVAL_S_DEFAULT)),
                0.01,
            ),
            reaper_interval_s=_parse_float(
                "PGDAG_REAPER_INTERVAL",
                get("PGDAG_REAPER_INTERVAL", str(REAPER_INTERVAL_S_DEFAULT)),
                0.01,
            ),
            maintenance_standby_s=_parse_float(
                "PGDAG_MAINTENANCE_STANDBY_S",
                get("PGDAG_MAINTENANCE_STANDBY_S", str(MAINTENANCE_STANDBY_S_DEFAULT)),
                0.01,
            ),
            prune_interval_s=_parse_float(
                "PGDAG_PRUNE_INTERVAL_S",
                get("PGDAG_PRUNE_INTERVAL_S", str(PRUNE_INTERVAL_S_DEFAULT)),
                0.01,
            ),
            audit_upkeep_interval_s=_parse_float(
                "PGDAG_AUDIT_UPKEEP_INTERVAL_S",
                get("PGDAG_AUDIT_UPKEEP_INTERVAL_S", str(AUDIT_UPKEEP_INTERVAL_S_DEFAULT)),
                0.01,
            ),
            liveness_interval_s=_parse_float(
                "PGDAG_LIVENESS_INTERVAL_S",
                get("PGDAG_LIVENESS_INTERVAL_S", str(LIVENESS_INTERVAL_S_DEFAULT)),
                0.01,
            ),
            scheduler_interval_s=_parse_float(
                "PGDAG_SCHEDULER_INTERVAL_S",
                get("PGDAG_SCHEDULER_INTERVAL_S", str(SCHEDULER_INTERVAL_S_DEFAULT)),
                0.01,
            ),
            shutdown_grace_s=_parse_float(
                "PGDAG_SHUTDOWN_GRACE",
                get("PGDAG_SHUTDOWN_GRACE", str(SHUTDOWN_GRACE_S_DEFAULT)),
                0,
            ),
            retention_days=_parse_float(
                "PGDAG_RETENTION_DAYS",
                get("PGDAG_RETENTION_DAYS", str(RETENTION_DAYS_DEFAULT)),
                0,
            ),
            tool_modules=extra_tools,
            live_queue_max_events=_parse_int(
                "PGDAG_LIVE_QUEUE",
                get("PGDAG_LIVE_QUEUE", str(LIVE_QUEUE_MAX_EVENTS_DEFAULT)),
                1,
            ),
            live_stall_s=_parse_float(
                "PGDAG_LIVE_STALL", get("PGDAG_LIVE_STALL", str(LIVE_STALL_S_DEFAULT)), 0.05
            ),
            allowed_hosts=parse_list(get("PGDAG_ALLOWED_HOSTS", "")),
            cors_origins=parse_list(get("PGDAG_CORS_ORIGINS", "")),
            # Seconds a process waits at start-up for Postgres to answer; "inf": for ever.
            db_wait_s=_parse_float(
                "PGDAG_DB_WAIT", get("PGDAG_DB_WAIT", str(DB_WAIT_S_DEFAULT)), 0
            ),
            agent_max_wait_s=_parse_agent_wait(
                get("PGDAG_AGENT_MAX_WAIT", str(AGENT_MAX_WAIT_S_DEFAULT))
            ),
            restart_backoff_first_s=_parse_float(
                "PGDAG_RESTART_BACKOFF_FIRST",
                get("PGDAG_RESTART_BACKOFF_FIRST", str(RESTART_BACKOFF_FIRST_S_DEFAULT)),
                0.01,
            ),
            restart_backoff_max_s=_parse_float(
                "PGDAG_RESTART_BACKOFF_MAX",
                get("PGDAG_RESTART_BACKOFF_MAX", str(RESTART_BACKOFF_MAX_S_DEFAULT)),
                0.01,
            ),
            restart_reset_s=_parse_float(
                "PGDAG_RESTART_RESET",
                get("PGDAG_RESTART_RESET", str(RESTART_RESET_S_DEFAULT)),
                0.01,
            ),
            restarts=_parse_int("PGDAG_RESTARTS", get("PGDAG_RESTARTS", "0"), 0),
            last_exit_code=_parse_optional_int("PGDAG_LAST_EXIT_CODE", get("PGDAG_LAST_EXIT_CODE")),
            log_format=check_log_format(get("PGDAG_LOG_FORMAT") or LOG_FORMAT_DEFAULT),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **given) if given else settings  # type: ignore[arg-type]
