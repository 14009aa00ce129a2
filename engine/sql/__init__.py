"""Named SQL queries, loaded once from the ``.sql`` files of this package (``queries.sql``,
``live.sql``); a name defined in two files is an error.

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


def _load_all(directory: Path) -> dict[str, LiteralString]:
    loaded: dict[str, LiteralString] = {}
    for path in sorted(directory.glob("*.sql")):
        for name, body in _load(path).items():
            if name in loaded:
                raise ValueError(f"query {name!r} is defined twice (again in {path})")
            loaded[name] = body
    return loaded


queries: dict[str, LiteralString] = _load_all(Path(__file__).parent)
