"""Named SQL queries, loaded once from ``queries.sql``.

Each query starts with a ``-- name: <query_name>`` line; the text up to the next such
line is the query. Parameters use psycopg's ``%(name)s`` style. Runtime code never builds
SQL strings: it calls ``queries["claim_steps"]``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import LiteralString, cast

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load(path: Path) -> dict[str, LiteralString]:
    text = path.read_text(encoding="utf-8")
    parts = _NAME.split(text)
    loaded: dict[str, LiteralString] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in loaded:
            raise ValueError(f"query {name!r} is defined twice in {path}")
        loaded[name] = cast(LiteralString, body.strip())
    return loaded


queries: dict[str, LiteralString] = _load(Path(__file__).with_name("queries.sql"))
