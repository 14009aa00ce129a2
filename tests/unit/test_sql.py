"""Every named query the code asks for exists in engine/sql/queries.sql, and every query
there is used (a renamed or deleted query fails here, not in production)."""

from __future__ import annotations

import re

from engine.sql import queries
from tests.support import ROOT

USE = re.compile(r"""queries\[\s*["']([a-z_0-9]+)["']\s*\]""")


def test_named_queries_used_and_defined() -> None:
    used: set[str] = set()
    for folder in ("engine", "workers", "chaos", "benchmarks", "dashboard"):
        for path in (ROOT / folder).rglob("*.py"):
            used |= set(USE.findall(path.read_text()))
    defined = set(queries)
    assert used - defined == set(), "asked for but not in queries.sql"
    assert defined - used == set(), "in queries.sql but never used"
