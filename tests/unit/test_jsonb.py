"""engine.jsonb without a database: the messages, the paths, and the fast path's blind spots.

Whether the verdicts agree with Postgres is tests/integration/test_jsonb_postgres.py.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest

from engine.errors import UnstorableJson
from engine.jsonb import MAX_DEPTH, check, dumps, storable_text


def refused(value: Any, **kwargs: Any) -> UnstorableJson:
    with pytest.raises(UnstorableJson) as info:
        dumps(value, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"body": {"items": [0, 1, 2, {"name": "x\ud800y"}]}},
            "output.body.items[3].name: lone surrogate \\ud800 cannot be stored in Postgres jsonb",
        ),
        ({"a": ["\udfff"]}, "output.a[0]: lone surrogate \\udfff cannot be stored"),
        ({"a": "ok\ud83d\ude00\udc00"}, "output.a: lone surrogate \\udc00"),
        ({"a b": {"x\x00": 1}}, 'output["a b"] (key "x\\u0000"): NUL character (\\u0000)'),
        ({"k": [math.inf]}, "output.k[0]: Infinity (a number out of range) cannot be stored"),
        ({"k": -math.inf}, "output.k: -Infinity"),
        ({"k": math.nan}, "output.k: NaN cannot be stored in Postgres jsonb"),
        ({math.nan: 1}, "output (a key): NaN"),
        ({"k": {(1, 2): 3}}, "output.k (key of type tuple): not a JSON key"),
        ({"k": b"x"}, "output.k: bytes is not JSON"),
        ({"k": 10**4300}, "output.k: integer with more than 4300 digits"),
        ({1: {"2": [None, object()]}}, 'output["1"]["2"][1]: object is not JSON'),
    ],
    ids=lambda value: str(value)[:60] if isinstance(value, str) else None,
)
def test_problem_and_path_are_named(value: Any, message: str) -> None:
    error = refused(value)
    assert str(error).startswith(message), str(error)
    assert str(error) == f"{error.path}: {error.problem}"
    assert storable_text(str(error)) == str(error)  # the message itself can be stored


def test_a_cycle_is_named_and_shared_values_are_not_cycles() -> None:
    shared = [1, 2]
    assert dumps({"a": shared, "b": shared}) == '{"a":[1,2],"b":[1,2]}'
    looped: dict[str, Any] = {"a": [1]}
    looped["a"].append(looped)
    assert str(refused(looped)).startswith("output.a[1]: a cycle")


def test_depth_is_capped_without_recursion_error_and_the_path_is_abbreviated() -> None:
    value: list[Any] = []
    for _ in range(200_000):
        value = [value]
    error = refused(value)
    assert error.problem.startswith(f"nested deeper than {MAX_DEPTH} levels")
    assert error.path == "output" + "[0]" * 8 + f"[...{MAX_DEPTH - 16} more...]" + "[0]" * 8


def test_depth_counts_the_enclosing_levels() -> None:
    value: list[Any] = []
    for _ in range(MAX_DEPTH - 2):
        value = [value]
    dumps(value, depth=1)
    assert "nested deeper" in str(refused(value, depth=3))
    with pytest.raises(UnstorableJson, match="nested deeper"):
        check(value, depth=3)


def test_fast_path_text_with_brackets_and_escapes_inside_strings() -> None:
    """Brackets inside strings are not nesting; a backslash then "u0000" is not a NUL."""
    text = dumps({"s": "[" * 1000 + '\\"{', "t": "\\u0000 \\ud800"})
    assert text == '{"s":"' + "[" * 1000 + '\\\\\\"{","t":"\\\\u0000 \\\\ud800"}'


def test_longer_integers_are_refused_even_where_python_writes_them() -> None:
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        assert "integer with more than 4300 digits" in str(refused([int("9" * 4301)]))
    finally:
        sys.set_int_max_str_digits(limit)


def test_storable_text_escapes_only_what_text_columns_refuse() -> None:
    assert storable_text("a\x00b\ud800c\ud83d\ude00d\U0001f600é") == (
        "a\\u0000b\\ud800c\ud83d\ude00d\U0001f600é"
    )
    assert storable_text("plain") == "plain"
