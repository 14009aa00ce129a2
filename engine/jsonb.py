"""What a Postgres ``jsonb`` column can store: values checked before they are written.

`dumps` turns a tool's output into the JSON text that ``complete_steps`` casts to jsonb, or
raises `UnstorableJson` naming the problem and where it is
(``output.body.items[3].name: lone surrogate \\ud800 cannot be stored in Postgres jsonb``).
It refuses exactly what Postgres refuses, and what pgdag's own readers could not read back:

- NUL (``\\u0000``) in a string or key: jsonb stores text, which cannot hold NUL
  (Postgres docs 8.14, "JSON Types": "\\u0000 is disallowed");
- a lone UTF-16 surrogate (U+D800..U+DFFF not in a high-low pair) in a string or key:
  Python's json writes it as a ``\\udXXX`` escape and Postgres refuses the escape
  ("Unicode low surrogate must follow a high surrogate"); a pair written as two code
  points is a valid escape pair, which Postgres reads as the one character it encodes;
- NaN and Infinity: not JSON (RFC 8259 section 6), though Python's json writes them;
- an integer with more than `MAX_INT_DIGITS` digits: jsonb numbers are ``numeric``, at
  most `PG_MAX_INT_DIGITS` digits before the point (Postgres docs 8.1.2), but every reader
  of outputs (psycopg's jsonb loader on the claim of a dependent step, the API) parses them
  with Python's json, which refuses more than 4300 digits (``sys.int_info``);
- nesting deeper than `MAX_DEPTH` containers: Postgres parses jsonb recursively and stops
  at ``max_stack_depth`` (about 13,000 levels at the default 2 MB, measured by
  tests/integration/test_jsonb_postgres.py), and Python's json, which reads it back, at
  about 1,000 minus the caller's stack;
- a document larger than the configured cap (`MAX_BYTES_DEFAULT`, ``PGDAG_MAX_OUTPUT_BYTES``;
  jsonb itself stops near 256 MB);
- anything Python's json cannot write: other types (sets, bytes, datetimes...), keys that
  are not str, int, float, bool or None, and cycles.

The walk is iterative, so no input raises RecursionError. `storable_text` is the
counterpart for free text (error messages) bound for text and jsonb columns, and `loads`
decodes a request body refusing the numbers no jsonb column takes (NaN, Infinity, a literal
too large for a float).
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from engine.errors import UnstorableJson

MAX_DEPTH = 512
PG_MAX_INT_DIGITS = 131_072
MAX_INT_DIGITS = min(PG_MAX_INT_DIGITS, sys.int_info.default_max_str_digits)
MAX_BYTES_DEFAULT = 8 * 1024 * 1024
_STORE = "cannot be stored in Postgres jsonb"

_INT_BOUND = 10**MAX_INT_DIGITS
# A well-formed surrogate pair, or (group 1) a surrogate that is not part of one.
_SURROGATES = re.compile("[\ud800-\udbff][\udc00-\udfff]|([\ud800-\udfff])")
_FIRST_SURROGATE = re.compile("[\ud800-\udfff]")
# In Python's ASCII JSON text: an escape of NUL or of a surrogate (maybe only a backslash
# followed by "u0000": the walk decides), a string literal, a bracket.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|d[89a-f])")
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_EMPTY_CONTAINERS = re.compile(r"\[\]|\{\}")
_QUICK_PASSES = 16
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHOWN_KEY_CHARS = 40
_SHOWN_PATH_PARTS = 8

# A path is a linked list ``(parent, part)``: built for free, rendered only on error.
_Path = tuple[Any, str | int] | None


def dumps(
    value: Any, *, path: str = "output", depth: int = 0, max_bytes: int = MAX_BYTES_DEFAULT
) -> str:
    """`value` as compact ASCII JSON text that Postgres jsonb accepts.

    `path` names `value` in errors (``output``); `depth` is how many containers enclose it
    in the stored document (see `check`); `max_bytes` caps the text's length in bytes (it
    is ASCII: ``\\uXXXX`` escapes for the rest). Raises `UnstorableJson` naming the first
    problem found and where it is; never RecursionError.

    Fast path: Python's C encoder writes the text and refuses most problems itself (NaN,
    non-JSON types and keys, cycles, long integers, deep nesting); what it lets through is
    visible in its text (a ``\\u0000`` or ``\\udXXX`` escape, more than `MAX_DEPTH`
    brackets), and only then is the value walked by `check`, for the verdict and the path.
    """
    text: str | None = None
    if 0 < sys.get_int_max_str_digits() <= MAX_INT_DIGITS:  # else it writes longer integers
        try:
            text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            text = None
    if text is None or _SUSPECT_ESCAPE.search(text) or _deeper_than(text, MAX_DEPTH - depth):
        check(value, path=path, depth=depth)
        if text is None:
            try:
                text = json.dumps(
                    value, allow_nan=False, separators=(",", ":"), check_circular=False
                )
            except (TypeError, ValueError, RecursionError) as exc:  # this process's limits
                raise UnstorableJson(path, f"cannot be serialised here: {exc}") from None
    if len(text) > max_bytes:
        raise UnstorableJson(
            path,
            f"{len(text)} bytes of JSON, over the {max_bytes}-byte cap on a step's output "
            "(PGDAG_MAX_OUTPUT_BYTES)",
        )
    return text


def _deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON `text` nests containers more than `limit` deep (strings skipped)."""
    if text.count("[") + text.count("{") <= limit:  # cannot be: one bracket per level
        return False
    skeleton = _NOT_BRACKET.sub("", _STRINGS.sub("", text))
    if not skeleton:
        return False
    # Each pass drops the empty containers, so a document of depth d is gone after d
    # passes; a few passes (at C speed) settle the usual shallow document.
    for _ in range(min(limit, _QUICK_PASSES)):
        skeleton = _EMPTY_CONTAINERS.sub("", skeleton)
        if not skeleton:
            return False
    if limit <= _QUICK_PASSES:
        return True
    level = deepest = 0
    for bracket in skeleton:
        if bracket in "[{":
            level += 1
            deepest = max(deepest, level)
        else:
            level -= 1
    return deepest + _QUICK_PASSES > limit


def check(value: Any, *, path: str = "output", depth: int = 0) -> None:
    """Raise `UnstorableJson` when `value` cannot be stored as jsonb (see the module doc).

    `path` names `value` in the error; `depth` is how many containers already enclose it
    in the document it will be stored in (for the `MAX_DEPTH` cap). Size is not checked
    here (`dumps` does, on the text).
    """
    # Work items: (value, path, depth); an int item marks leaving the container of that id.
    todo: list[tuple[Any, _Path, int] | int] = [(value, None, depth)]
    open_ids: set[int] = set()
    while todo:
        item = todo.pop()
        if isinstance(item, int):
            open_ids.discard(item)
            continue
        node, where, level = item
        if isinstance(node, str):
            problem = _string_problem(node)
            if problem is not None:
                raise UnstorableJson(_render(path, where), problem)
        elif node is None or isinstance(node, bool):
            continue
        elif isinstance(node, int):
            if not -_INT_BOUND < node < _INT_BOUND:
                raise UnstorableJson(_render(path, where), _INT_PROBLEM)
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise UnstorableJson(_render(path, where), _float_problem(node))
        elif isinstance(node, dict | list | tuple):
            if level + 1 > MAX_DEPTH:
                raise UnstorableJson(
                    _render(path, where),
                    f"nested deeper than {MAX_DEPTH} levels, the most pgdag stores "
                    "(Postgres jsonb and Python's json, which reads it back, stop not far "
                    "beyond)",
                )
            if id(node) in open_ids:
                raise UnstorableJson(
                    _render(path, where), "a cycle: it contains itself, and JSON cannot"
                )
            open_ids.add(id(node))
            todo.append(id(node))
            if isinstance(node, dict):
                children = []
                for key, child in node.items():
                    name = _key_name(key, path, where)
                    children.append((child, (where, name), level + 1))
                todo.extend(reversed(children))
            else:
                todo.extend(
                    (child, (where, i), level + 1) for i, child in reversed(list(enumerate(node)))
                )
        else:
            raise UnstorableJson(
                _render(path, where),
                f"{type(node).__name__} is not JSON "
                "(a dict, list, tuple, str, int, float, bool or None)",
            )


def storable_text(text: str) -> str:
    """`text` with what text and jsonb columns refuse written as visible escapes: NUL as
    ``\\u0000``, a lone surrogate as ``\\udXXX``. Anything else is returned unchanged."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    if _FIRST_SURROGATE.search(text) is None:
        return text
    return _SURROGATES.sub(
        lambda m: m.group(0) if m.group(1) is None else f"\\u{ord(m.group(1)):04x}", text
    )


_INT_PROBLEM = (
    f"integer with more than {MAX_INT_DIGITS} digits {_STORE} as pgdag reads it back "
    f"(Python's json stops at {MAX_INT_DIGITS} digits; Postgres numeric at {PG_MAX_INT_DIGITS})"
)


class _NotFinite(ValueError):
    """A NaN, an Infinity or a number past the float range met while decoding."""


def _refuse_constant(token: str) -> Any:
    raise _NotFinite(token)


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise _NotFinite(text)
    return number


def loads(raw: str | bytes, *, path: str = "body") -> Any:
    """Decode the JSON text `raw` like `json.loads`, refusing what Python's json accepts
    but neither JSON (RFC 8259, section 6) nor a jsonb column does: the tokens ``NaN``,
    ``Infinity`` and ``-Infinity``, and number literals too large for a float (``1e400``,
    which json reads as Infinity). Raises `UnstorableJson` naming where the first one is
    (``body.steps[0].input.ratio``, below `path`), and ValueError (json's own) for text that
    is not JSON at all. The hooks cost nothing for integers and strings, and one Python call
    per float literal."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotFinite:
        pass
    check(json.loads(raw), path=path)  # decoded as json would, to say where it is
    raise UnstorableJson(path, "a NaN or Infinity " + _STORE)  # pragma: no cover - check raised


def _float_problem(number: float) -> str:
    if math.isnan(number):
        return f"NaN {_STORE}"
    sign = "-" if number < 0 else ""
    return f"{sign}Infinity (a number out of range) {_STORE}"


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return f"NUL character (\\u0000) {_STORE}"
    if _FIRST_SURROGATE.search(text) is None:
        return None
    for match in _SURROGATES.finditer(text):
        lone = match.group(1)
        if lone is not None:
            return f"lone surrogate \\u{ord(lone):04x} {_STORE}"
    return None


def _key_name(key: object, path: str, where: _Path) -> str:
    """The key as the JSON text will have it (json.dumps' conversions), or raise."""
    if isinstance(key, str):
        problem = _string_problem(key)
        if problem is not None:
            raise UnstorableJson(f"{_render(path, where)} (key {_show_key(key)})", problem)
        return key
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        if not -_INT_BOUND < key < _INT_BOUND:
            raise UnstorableJson(f"{_render(path, where)} (a key)", _INT_PROBLEM)
        return str(key)
    if isinstance(key, float):
        if not math.isfinite(key):
            raise UnstorableJson(f"{_render(path, where)} (a key)", _float_problem(key))
        return repr(key)
    raise UnstorableJson(
        f"{_render(path, where)} (key of type {type(key).__name__})",
        "not a JSON key (keys are str, int, float, bool or None)",
    )


def _show_key(key: str) -> str:
    shown = json.dumps(key)  # ASCII, escapes visible
    if len(shown) > _SHOWN_KEY_CHARS:
        shown = shown[: _SHOWN_KEY_CHARS - 4] + '..."'
    return shown


def _render(root: str, where: _Path) -> str:
    """``output.body.items[3].name``; a long path keeps its first and last parts."""
    parts: list[str | int] = []
    while where is not None:
        where, part = where
        parts.append(part)
    parts.reverse()
    if len(parts) > 2 * _SHOWN_PATH_PARTS:
        hidden = len(parts) - 2 * _SHOWN_PATH_PARTS
        shown = [*map(_part, parts[:_SHOWN_PATH_PARTS]), f"[...{hidden} more...]"]
        shown += map(_part, parts[-_SHOWN_PATH_PARTS:])
        return root + "".join(shown)
    return root + "".join(map(_part, parts))


def _part(part: str | int) -> str:
    if isinstance(part, int):
        return f"[{part}]"
    if _IDENTIFIER.fullmatch(part):
        return f".{part}"
    return f"[{_show_key(part)}]"
