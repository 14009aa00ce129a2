"""docs/grafana/pgdag.json against Grafana's own dashboard types.

There is no Grafana on the machines this project is built on (no Docker engine, no
download but the package registries), so the dashboard is checked with the types Grafana
generates from its dashboard schema (the grafana-foundation-sdk package, "models.dashboard"):
it is read into them and written back, and nothing may be lost on the way but
``__requires`` (import metadata that the model does not hold). A field the schema does not
know (a typo such as ``gridPoss``, ``exprr``) would be dropped, and fail here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "pgdag.json"
ALLOWED_DROPS = {"/__requires"}

register_default_plugins()  # panel and query types (prometheus, timeseries, ...) by name


def _plain(value: Any) -> Any:
    """The SDK's objects as plain JSON values."""
    return json.loads(json.dumps(value, default=lambda o: o.to_json()))


def _dropped(original: Any, written: Any, path: str = "") -> list[str]:
    """Paths of `original` missing or changed in `written`."""
    lost: list[str] = []
    if isinstance(original, dict):
        for key, value in original.items():
            if not isinstance(written, dict) or key not in written:
                lost.append(f"{path}/{key}")
            else:
                lost += _dropped(value, written[key], f"{path}/{key}")
    elif isinstance(original, list):
        if not isinstance(written, list) or len(written) != len(original):
            return [path]
        for i, (a, b) in enumerate(zip(original, written, strict=True)):
            lost += _dropped(a, b, f"{path}[{i}]")
    elif original != written:
        lost.append(path)
    return lost


def _round_trip(doc: dict[str, Any]) -> list[str]:
    written = _plain(dashboard.Dashboard.from_json(copy.deepcopy(doc)).to_json())
    return [p for p in _dropped(doc, written) if p not in ALLOWED_DROPS]


def test_the_dashboard_round_trips_through_grafanas_dashboard_types() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert _round_trip(doc) == []
    assert len(dashboard.Dashboard.from_json(doc).panels or []) == len(doc["panels"])


@pytest.mark.parametrize(
    ("where", "typo"),
    [(("panels", 1), "gridPos"), (("panels", 2, "targets", 0), "expr")],
)
def test_a_field_the_schema_does_not_know_is_caught(where: tuple[Any, ...], typo: str) -> None:
    doc = json.loads(DASHBOARD.read_text())
    node: Any = doc
    for key in where:
        node = node[key]
    node[typo + "x"] = node.pop(typo)
    assert any(p.endswith("/" + typo + "x") for p in _round_trip(doc))
