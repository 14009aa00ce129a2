"""The metric names of `engine.metrics` follow Prometheus conventions (prefix ``pgdag_``,
base units, ``_total`` on counters only, low-cardinality labels) and docs/operations.md's
"Metrics" section names every one of them. No database: the collector is fed a snapshot."""

from __future__ import annotations

import re
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from engine import metrics

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"pgdag_[a-z][a-z0-9_]*")
ALLOWED_LABELS = {"tool", "outcome", "status", "table", "state", "reason", "task"}
# Units in a name are base units, spelled out (Prometheus: seconds and bytes, not ms or kb).
BAD_UNITS = re.compile(r"_(ms|milliseconds|us|ns|minutes|hours|days|kb|mb|kilobytes)(_|$)")
SPEC_NAMES = {
    "pgdag_steps_ready",
    "pgdag_steps_running",
    "pgdag_oldest_ready_age_seconds",
    "pgdag_steps_dead_letter",
    "pgdag_runs",
    "pgdag_pg_table_dead_tuples",
    "pgdag_pg_table_live_tuples",
    "pgdag_pg_table_size_bytes",
    "pgdag_pg_last_autovacuum_timestamp_seconds",
    "pgdag_pg_oldest_transaction_age_seconds",
    "pgdag_pg_connections",
    "pgdag_live_listen_lag_seconds",
    "pgdag_websocket_clients",
    "pgdag_websocket_resyncs_total",
    "pgdag_attempts_total",
    "pgdag_retries_total",
    "pgdag_dead_letters_total",
    "pgdag_lease_expiries_total",
    "pgdag_fencing_refusals_total",
    "pgdag_cancellations_total",
    "pgdag_ready_to_start_seconds",
    "pgdag_attempt_duration_seconds",
}


def _snapshot() -> metrics.Snapshot:
    snap = metrics.Snapshot(read_at=time.monotonic())
    snap.ready = {"DELAY": 3.0}
    snap.oldest_ready_s = {"DELAY": 1.5}
    snap.running = {"HTTP_GET_JSON": 1.0}
    snap.dead_letter = {"DELAY": 2.0}
    snap.runs = {"running": 1.0}
    snap.workers = {"DELAY": 1.0}
    snap.tables = [
        {
            "table_name": t,
            "live_tuples": 10.0,
            "dead_tuples": 1.0,
            "size_bytes": 8192.0,
            "last_autovacuum_s": None,
        }
        for t in metrics.HEALTH_TABLES
    ]
    snap.connections = {"active": 1.0, "idle": 2.0}
    snap.oldest_xact_s = 0.25
    return snap


def _exported() -> dict[str, tuple[str, set[str]]]:
    """{exposed sample-family name: (type, label names)} of everything /metrics can show,
    with every labelled child made once so that its samples appear."""
    for outcome in metrics.OUTCOMES:
        metrics.ATTEMPTS.inc("X", outcome, amount=0)
    for family in (metrics.RETRIES, metrics.DEAD_LETTERS, metrics.FENCING_REFUSALS):
        family.inc("X", amount=0)
    metrics.READY_TO_START.observe("X", 0.0)
    metrics.ATTEMPT_DURATION.observe("X", 0.0)
    metrics.WEBSOCKET_RESYNCS.labels(reason="slow_client")
    collector = metrics.QueueCollector(None, lease_ttl_s=30, tools=["DELAY"])  # type: ignore[arg-type]
    collector.snapshot = _snapshot()
    own = CollectorRegistry()
    own.register(collector)
    text = (metrics.render() + metrics.render(own)).decode()
    found: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name not in found, f"{name} exported twice"
        found[name] = (family.type, labels)
    return found


def test_every_metric_of_the_spec_is_exported() -> None:
    assert set(_exported()) >= SPEC_NAMES


def test_names_follow_prometheus_conventions() -> None:
    for name, (kind, labels) in _exported().items():
        assert NAME.fullmatch(name), name
        assert not BAD_UNITS.search(name), f"{name}: use base units (seconds, bytes)"
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name} is a {kind}, not a counter"
        if kind == "histogram":
            assert name.endswith("_seconds"), f"{name}: histograms here measure seconds"
        if name.endswith("_timestamp_seconds"):
            assert kind == "gauge", name
        assert labels <= ALLOWED_LABELS, f"{name}: high-cardinality label in {labels}"


def test_the_collector_exports_nothing_before_its_first_read() -> None:
    collector = metrics.QueueCollector(None, lease_ttl_s=30)  # type: ignore[arg-type]
    assert list(collector.collect()) == []
    assert list(collector.describe()) == []


def test_idle_tools_are_exported_as_zero() -> None:
    collector = metrics.QueueCollector(None, lease_ttl_s=30, tools=["IDLE"])  # type: ignore[arg-type]
    collector.snapshot = _snapshot()
    ready = next(f for f in collector.collect() if f.name == "pgdag_steps_ready")
    assert {s.labels["tool"]: s.value for s in ready.samples} == {
        "DELAY": 3.0,
        "HTTP_GET_JSON": 0.0,
        "IDLE": 0.0,
    }


def test_operations_doc_names_every_metric() -> None:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    for name in _exported():
        assert f"`{name}" in section, f"docs/operations.md, Metrics: {name} missing"


def test_the_documented_alert_rules_parse_and_name_real_metrics() -> None:
    import yaml

    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    groups = [yaml.safe_load(b) for b in blocks if b.startswith("groups:")]
    assert len(groups) == 1
    rules = groups[0]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "PgdagBacklogGrowing",
        "PgdagDeadLettersIncreasing",
        "PgdagOldTransaction",
        "PgdagNoWorkerForTool",
    }
    exported = set(_exported())
    for rule in rules:
        names = set(re.findall(r"pgdag_[a-z0-9_]+", rule["expr"]))
        assert names and names <= exported, (rule["alert"], names - exported)


def test_only_admin_may_read_metrics() -> None:
    from engine.tokens import SCOPES, allows

    assert [s for s in SCOPES if allows(s, "GET", "/metrics")] == ["admin"]
