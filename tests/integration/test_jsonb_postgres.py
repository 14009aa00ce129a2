"""The output checker against the judge it stands in for: a real Postgres ``SELECT %s::jsonb``.

`output_json` must accept every value Postgres jsonb accepts and refuse every value it
refuses, within pgdag's own documented caps (nesting depth, integer digits, size), which
the last tests measure against the server's real limits.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.transitions import output_json

# --- the judge ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg(pg_server_url: str) -> Iterator[psycopg.Connection[Any]]:
    """One autocommit connection to the session's server (``::jsonb`` needs no schema)."""
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        yield conn


def postgres_verdict(pg: psycopg.Connection[Any], text: str) -> str | None:
    """None when Postgres takes `text` as jsonb, else its error."""
    try:
        pg.execute("SELECT %s::jsonb", (text,))
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def reference_text(value: Any) -> str | None:
    """`value` as JSON text the way a careless writer would send it (NaN and Infinity
    allowed, integers of any length), or None when it is not JSON at all: not writable by
    Python's json, or a NaN or Infinity dict key, which JSON has no text for (a careless
    writer turns it into the string "NaN"; pgdag refuses it like Python's strict json)."""
    if _nonfinite_key(value, set()):
        return None
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return None
    finally:
        sys.set_int_max_str_digits(limit)


def _nonfinite_key(value: Any, seen: set[int]) -> bool:
    if id(value) in seen:
        return False
    if isinstance(value, dict):
        seen.add(id(value))
        if any(isinstance(k, float) and not math.isfinite(k) for k in value):
            return True
        return any(_nonfinite_key(v, seen) for v in value.values())
    if isinstance(value, list | tuple):
        seen.add(id(value))
        return any(_nonfinite_key(v, seen) for v in value)
    return False


def checker_verdict(value: Any) -> tuple[str | None, str | None]:
    """``(text, None)`` when `output_json` accepts `value`, ``(None, reason)`` otherwise."""
    try:
        return output_json(value), None
    except ValueError as exc:
        return None, str(exc)


def assert_agrees(pg: psycopg.Connection[Any], value: Any) -> None:
    text, reason = checker_verdict(value)
    reference = reference_text(value)
    if reference is None:  # not JSON: Postgres cannot even be asked
        assert reason is not None, f"checker accepted non-JSON {value!r}"
        return
    refused_by_pg = postgres_verdict(pg, reference)
    if refused_by_pg is None:
        assert text is not None, f"Postgres accepts {reference!r}, checker says {reason}"
        assert postgres_verdict(pg, text) is None, text
        row = pg.execute("SELECT %s::jsonb = %s::jsonb", (text, reference)).fetchone()
        assert row is not None and row[0], (text, reference)
    else:
        assert reason is not None, f"checker accepted {text!r}; Postgres: {refused_by_pg}"


# --- the zoo ------------------------------------------------------------------------------

NASTY = [
    "\x00",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\ud83d\ude00",  # a surrogate pair as two code points: JSON text combines them
    "\ude00\ud83d",  # the same pair in the wrong order
    "\ud800\ud800",
    "\U0001f600",
    "\U0010ffff",
    "\uffff",
    "\ufffe",
    "\\",
    '"',
    "\\u0000",  # a backslash then "u0000": six plain characters, not a NUL
    "\\ud800",
    "u0000",
    "\x1f",
    "\x7f",
    "\x85",
    "é",
    "a",
    "",
]

strings = st.one_of(
    st.lists(st.sampled_from(NASTY), max_size=5).map("".join),
    st.text(st.characters(categories=["Cs", "Cc", "Lo", "So", "Ll"]), max_size=6),
)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**4299, -(10**4299), 0, -0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0, 1e16, 1.5]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
keys = st.one_of(
    strings, st.integers(-3, 3), st.sampled_from([True, None, 1.5, math.nan, math.inf])
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        st.tuples(children, children),
    ),
    max_leaves=10,
)


@settings(
    max_examples=800,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=values)
def test_checker_agrees_with_postgres_on_generated_values(
    pg: psycopg.Connection[Any], value: Any
) -> None:
    assert_agrees(pg, value)


class Opaque:
    pass


def _cycle() -> dict[str, Any]:
    looped: dict[str, Any] = {"a": [1]}
    looped["a"].append(looped)
    return looped


@pytest.mark.parametrize(
    "value",
    [
        *NASTY,
        *({ch: 1} for ch in NASTY),
        {"k": ["x", {"deeper": "\ud800"}]},
        math.nan,
        {"n": -math.inf},
        {math.nan: 1},
        {math.inf: 1},
        {1: "a", "1": "b"},  # one key twice in the text: Postgres keeps the last
        {True: 1, None: 2, 1.5: 3},
        (1, "two", None),
        10**4299,
        -(10**4299),
        1.7976931348623157e308,
        b"bytes",
        {1, 2},
        Opaque(),
        {(1, 2): "tuple key"},
        _cycle(),
        [[[[[]]]]],
    ],
    ids=repr,
)
def test_checker_agrees_with_postgres_on_known_cases(
    pg: psycopg.Connection[Any], value: Any
) -> None:
    assert_agrees(pg, value)


# --- the caps, against the server's real limits --------------------------------------------


def _nested(depth: int) -> tuple[list[Any], str]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value, "[" * depth + "]" * depth


def _deepest_accepted(pg: psycopg.Connection[Any], make: Any, hi: int) -> int:
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if postgres_verdict(pg, make(mid)) is None:
            lo = mid
        else:
            hi = mid - 1
    return lo


def test_depth_cap_is_below_the_real_postgres_limit(pg: psycopg.Connection[Any]) -> None:
    """jsonb parsing recurses once per level and stops at max_stack_depth ("stack depth
    limit exceeded"): found here by bisection, for arrays and for objects. The checker's cap
    sits below it (and below what Python's json, which reads outputs back, can parse)."""
    from engine.jsonb import MAX_DEPTH

    arrays = _deepest_accepted(pg, lambda n: "[" * n + "]" * n, 200_000)
    objects = _deepest_accepted(pg, lambda n: '{"a":' * n + "1" + "}" * n, 200_000)
    too_deep = "[" * (arrays + 1) + "]" * (arrays + 1)
    assert "stack depth limit exceeded" in (postgres_verdict(pg, too_deep) or "")
    assert min(arrays, objects) > MAX_DEPTH, (MAX_DEPTH, arrays, objects)

    at_cap, at_cap_text = _nested(MAX_DEPTH)
    assert output_json(at_cap) == at_cap_text
    assert postgres_verdict(pg, at_cap_text) is None
    for depth in (MAX_DEPTH + 1, arrays + 1, 100_000):  # no RecursionError, however deep
        with pytest.raises(ValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
            output_json(_nested(depth)[0])


def test_integer_cap_is_within_what_postgres_and_python_read(
    pg: psycopg.Connection[Any],
) -> None:
    """jsonb numbers are numeric: at most 131072 digits before the decimal point. pgdag caps
    integers at Python's int-string limit (4300 digits), since every reader of outputs (the
    API, the claim of a dependent step) parses them with Python's json."""
    from engine.jsonb import MAX_INT_DIGITS, PG_MAX_INT_DIGITS

    assert postgres_verdict(pg, "9" * PG_MAX_INT_DIGITS) is None
    assert "overflows numeric format" in (postgres_verdict(pg, "9" * (PG_MAX_INT_DIGITS + 1)) or "")
    assert MAX_INT_DIGITS <= PG_MAX_INT_DIGITS
    biggest = int("9" * MAX_INT_DIGITS)
    assert output_json([-biggest]) == f"[-{biggest}]"
    for digits in (MAX_INT_DIGITS + 1, PG_MAX_INT_DIGITS + 1):
        limit = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(0)
        try:
            value = int("9" * digits)
        finally:
            sys.set_int_max_str_digits(limit)
        with pytest.raises(ValueError, match=r"output\[0\]: integer with more than 4300 digits"):
            output_json([value])


def test_size_cap_is_configurable_and_names_its_setting() -> None:
    from engine.jsonb import MAX_BYTES_DEFAULT

    assert MAX_BYTES_DEFAULT == 8 * 1024 * 1024
    text = output_json("x" * 98, max_bytes=100)
    assert len(text) == 100
    with pytest.raises(ValueError, match=r"output: 101 bytes of JSON, over the 100-byte cap"):
        output_json("x" * 99, max_bytes=100)
