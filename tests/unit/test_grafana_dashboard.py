"""docs/grafana/pgdag.json against the structure Grafana needs to import a dashboard, and
against the metrics this project exports (no Grafana server is available to load it: see
docs/operations.md, "Grafana").

Checked: the top-level keys of a dashboard model (``schemaVersion`` of Grafana 10+, a
``uid``, ``panels``), each panel's ``id`` (unique), ``type``, ``gridPos`` (inside the
24-column grid, no two panels overlapping), the Prometheus datasource variable, and each
target's ``refId`` (unique in its panel) and ``expr``, whose every ``pgdag_*`` name must be
a sample `engine.metrics` exports (a counter's ``_total``, a histogram's ``_bucket``,
``_sum``, ``_count``, a gauge's own name), with labels that metric has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from engine import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "pgdag.json"
PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "bargauge", "row"}
WANTED_TITLES = (
    "Backlog by tool",
    "Oldest ready age",
    "Ready-to-start latency p50 / p99",
    "Attempts per second by outcome",
    "Dead letters",
    "Lease expiries",
    "Dead tuples by table",
    "Oldest transaction",
    "WebSocket clients",
)


def exported() -> dict[str, set[str]]:
    """Sample name -> the labels it carries (``le`` on a histogram's buckets), of everything
    `engine.metrics` exports: the counters, histograms and gauges of its module (by their
    label names), and the `QueueCollector` gauges (collected from a made-up snapshot with
    a tool, a table and a connection state, so that every family has a sample)."""
    names: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, metrics.TallyCounter):
            name, kind, labels = obj.name, "counter", set(obj.labelnames)
        elif isinstance(obj, metrics.TallyHistogram):
            name, kind = obj.name, "histogram"
            labels = {obj.labelname} if obj.labelname is not None else set()
        elif isinstance(obj, MetricWrapperBase):
            name, kind, labels = obj._name, obj._type, set(obj._labelnames)
        else:
            continue
        if kind == "counter":
            names[name + "_total"] = labels
        elif kind == "histogram":
            names[name + "_bucket"] = labels | {"le"}
            names[name + "_sum"] = labels
            names[name + "_count"] = labels
        else:
            names[name] = labels
    collector = metrics.QueueCollector(None, lease_ttl_s=30, tools=["T"])  # type: ignore[arg-type]
    row = {
        "table_name": "steps",
        "dead_tuples": 1,
        "live_tuples": 1,
        "size_bytes": 1,
        "last_autovacuum_s": 1.0,
    }
    collector.snapshot = metrics.Snapshot(
        read_at=0.0,
        tables=[row],  # type: ignore[list-item]
        connections={"active": 1.0},
    )
    for family in collector.collect():
        assert family.samples, family.name
        names[family.name] = {label for s in family.samples for label in s.labels}
    return names


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def test_dashboard_model_has_what_grafana_imports() -> None:
    d = load()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36  # Grafana 9.3+
    assert d["uid"] == "pgdag-overview" and len(d["uid"]) <= 40
    assert d["title"] and isinstance(d["panels"], list) and d["panels"]
    assert d["time"] == {"from": "now-1h", "to": "now"}
    (ds,) = d["templating"]["list"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES, p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
    titles = [p["title"] for p in d["panels"]]
    for wanted in WANTED_TITLES:
        assert any(t.startswith(wanted) for t in titles), f"no panel {wanted!r}"


def test_every_expression_names_only_exported_metrics_and_their_labels() -> None:
    names = exported()
    used: set[str] = set()
    for p in load()["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            found = re.findall(r"\bpgdag_[a-z_]+\b", expr)
            assert found, expr
            for name in found:
                assert name in names, f"{name} (in {expr!r}) is not exported by engine.metrics"
                used.add(name)
                for group in re.findall(r"by \(([^)]*)\)", expr):
                    for label in (s.strip() for s in group.split(",")):
                        assert label in names[name], f"{name} has no label {label!r}: {expr!r}"
            legend_labels = set(re.findall(r"\{\{(\w+)\}\}", t["legendFormat"]))
            by = {s.strip() for g in re.findall(r"by \(([^)]*)\)", expr) for s in g.split(",")}
            assert legend_labels <= by, f"legend {t['legendFormat']!r} names a label not kept"
    # The checker itself sees the metrics of both kinds.
    assert "pgdag_attempts_total" in used and "pgdag_steps_ready" in used
    assert "pgdag_ready_to_start_seconds_bucket" in used


def test_checker_refuses_a_metric_engine_metrics_does_not_define() -> None:
    names = exported()
    assert "pgdag_steps_ready" in names and "pgdag_attempts_total" in names
    assert "pgdag_attempts" not in names  # a counter is exported as _total
    assert "pgdag_steps_total" not in names
    assert names["pgdag_attempts_total"] == {"tool", "outcome"}
