"""engine/logs.py: both formats, context from contextvars and ``extra``, PGDAG_LOG_FORMAT
checked by name; and engine/tracing.py's no-op fallback without opentelemetry."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from engine import logs
from engine.config import Settings
from engine.errors import ConfigError
from tests.support import ROOT

CONSOLE_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<rest>.*)$"
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers (pytest's capture among them): put
    them back, and structlog's defaults and context."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_carry_the_fixed_keys_and_the_context() -> None:
    out = io.StringIO()
    logs.configure_logging("INFO", "json", stream=out)
    log = logging.getLogger("workers.worker")
    log.info("worker %s started", "w0")
    with logs.bound(run_id="r1", step="fetch", attempt=2, worker="w0", lease_token=17):
        log.warning("attempt failed (%s)", "boom", extra={"tool": "DELAY"})
        structlog.get_logger("pgdag.native").info("native line", rows=3)
    log.debug("below the level: not written")
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("cannot record")
    parsed = [json.loads(line) for line in lines(out)]
    assert len(parsed) == 4
    first, failed, native, error = parsed
    assert list(first) == ["timestamp", "level", "logger", "event"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
    assert first["level"] == "info" and first["logger"] == "workers.worker"
    assert first["event"] == "worker w0 started"
    assert failed == {
        "timestamp": failed["timestamp"],
        "level": "warning",
        "logger": "workers.worker",
        "event": "attempt failed (boom)",
        "run_id": "r1",
        "step": "fetch",
        "attempt": 2,
        "worker": "w0",
        "lease_token": 17,
        "tool": "DELAY",
    }
    assert native["logger"] == "pgdag.native" and native["event"] == "native line"
    assert native["rows"] == 3 and native["run_id"] == "r1"
    assert "run_id" not in error  # the block ended: its context with it
    assert error["level"] == "error" and "ValueError: bad" in error["exception"]


def test_console_keeps_the_old_line_and_appends_the_context() -> None:
    out = io.StringIO()
    logs.configure_logging("DEBUG", "console", stream=out)
    log = logging.getLogger("workers.worker")
    log.info("worker %s started: concurrency %d", "w0", 4)
    with logs.bound(lease_token=17, run_id="r1", step="two words"):
        log.debug("attempt started: %s", "DELAY")
    first, second = lines(out)
    m = CONSOLE_LINE.match(first)
    assert m and m["level"] == "INFO" and m["logger"] == "workers.worker"
    assert m["rest"] == "worker w0 started: concurrency 4"  # exactly the old form
    m = CONSOLE_LINE.match(second)
    assert m and m["level"] == "DEBUG"
    assert m["rest"] == "attempt started: DELAY [run_id=r1 step='two words' lease_token=17]"


def test_configuring_again_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure_logging("INFO", "console", stream=first)
    logs.configure_logging("WARNING", "json", stream=second)
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("x").info("dropped: below WARNING")
    logging.getLogger("x").warning("kept")
    assert first.getvalue() == ""
    assert [json.loads(line)["event"] for line in lines(second)] == ["kept"]


def test_scoped_undoes_what_was_bound_inside() -> None:
    out = io.StringIO()
    logs.configure_logging("INFO", "json", stream=out)
    logs.bind(outer=1)
    with logs.scoped():
        logs.bind(agent="a1")
        logging.getLogger("x").info("inside")
    logging.getLogger("x").info("after")
    inside, after = (json.loads(line) for line in lines(out))
    assert inside["agent"] == "a1" and inside["outer"] == 1
    assert "agent" not in after and after["outer"] == 1


def test_bad_format_and_level_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="PGDAG_LOG_FORMAT must be one of console, json"):
        Settings.from_env({"PGDAG_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="PGDAG_LOG_FORMAT"):
        logs.configure_logging("INFO", "yaml")
    with pytest.raises(ConfigError, match="--log-level"):
        logs.configure_logging("LOUD", "json")
    assert Settings.from_env({"PGDAG_LOG_FORMAT": "JSON"}).log_format == "json"
    assert Settings.from_env({}).log_format == "console"


@pytest.mark.parametrize("module", ["workers", "engine"])
def test_a_process_with_a_bad_format_exits_naming_the_variable(module: str) -> None:
    argv = [sys.executable, "-m", module] + (["migrate"] if module == "engine" else [])
    proc = subprocess.run(
        argv,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PGDAG_LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "PGDAG_LOG_FORMAT must be one of console, json, got 'xml'" in proc.stderr


def test_tracing_is_a_no_op_without_opentelemetry() -> None:
    """engine.tracing with opentelemetry absent (an import of it fails): spans do nothing,
    a run gets no context, an attempt passes its run's on unchanged, and the worker module
    still imports."""
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"  # `import opentelemetry` now raises
        "from engine import tracing\n"
        "import workers.worker\n"
        "assert not tracing.enabled()\n"
        "with tracing.run_span({'traceparent': '00-' + '1' * 32 + '-' + '2' * 16 + '-01'},"
        " steps=1) as s:\n"
        "    s.set(run_id='x'); s.fail('no'); assert s.carrier() == {}\n"
        "tp = {'traceparent': '00-' + '3' * 32 + '-' + '4' * 16 + '-01'}\n"
        "with tracing.attempt_span(tp, tool='DELAY') as a:\n"
        "    assert a.carrier() == tp\n"  # the run's context is passed on as it is
        "with tracing.attempt_span(None, tool='DELAY') as a:\n"
        "    assert a.carrier() == {}\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
