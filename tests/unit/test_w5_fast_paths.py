"""The fast paths of a large ``POST /runs`` (issue 14, W5) answer exactly what the slow
ones did: the one-pass text check against the per-value walk, the row builder against the
rows' documented shape, and the paused collector is turned back on."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import dag
from engine.dag import _all_text_storable, parse_run, unstorable_text
from engine.gcpause import gc_paused
from engine.tools import load_tool_modules

load_tool_modules(["workers.tools.builtin"])

# Text with what Postgres refuses (NUL, lone surrogates) and what it takes (escapes spelled
# out, pairs, controls, non-ASCII) mixed in.
_text = st.lists(
    st.sampled_from(["a", "\x00", "\ud800", "\udfff", "\\", "u0000", "é", "😀", "\n"])
    | st.characters(),
    max_size=6,
).map("".join)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # past 64 bits: orjson refuses
    | st.floats()
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)


def _walk_only(value: Any) -> list[tuple[list[str | int], str]]:
    """`unstorable_text` with its fast path switched off: the walk alone."""
    original = dag._all_text_storable
    dag._all_text_storable = lambda _value: False
    try:
        return unstorable_text(value)
    finally:
        dag._all_text_storable = original


@settings(max_examples=400, deadline=None)
@given(_json)
def test_the_one_pass_check_agrees_with_the_walk(value: Any) -> None:
    walked = _walk_only(value)
    assert unstorable_text(value) == walked
    if _all_text_storable(value):
        assert walked == []


@pytest.mark.parametrize(
    ("value", "storable"),
    [
        ({"a": "x\x00"}, False),
        ({"a\x00": 1}, False),
        ({"\ud800": 1}, False),
        (["\udc00"], False),
        (["\\u0000"], False),  # a backslash and u0000: the walk decides (it finds nothing)
        ([2**64], False),  # orjson refuses; the walk decides
        ([[[[[]]]]] * 2, True),
        ({"é": ["😀", "\n", 1.5, None, True, 2**63 - 1]}, True),
    ],
)
def test_the_one_pass_check_says_false_whenever_in_doubt(value: Any, storable: bool) -> None:
    assert _all_text_storable(value) is storable
    assert unstorable_text(value) == _walk_only(value)


def _reference_row(step: dag.StepSpec, parsed: dag.StepRefs | None) -> dict[str, Any]:
    """The row as `StepSpec.to_row` built it before issue 14 (a dict of optional values,
    the None ones left out)."""
    refs = parsed.refs if parsed is not None else []
    map_path = parsed.map_path if parsed is not None else None
    ref_steps = sorted({r["path"][1] for r in refs if r["path"][0] == "steps"})
    if map_path is not None:
        ref_steps = sorted({*ref_steps, map_path[1]})
    row: dict[str, Any] = {
        "name": step.name,
        "tool": step.tool,
        "input": step.input,
        "dependsOn": step.depends_on,
        "maxAttempts": step.max_attempts,
        "idempotent": step.idempotent,
    }
    optional = {
        "timeoutMs": step.timeout_ms,
        "runIf": None if step.run_if == "all_succeeded" else step.run_if,
        "refs": refs or None,
        "refSteps": ref_steps or None,
        "map": step.map["$ref"] if step.map is not None else None,
        "mapPath": map_path,
        "concurrencyKey": step.concurrency_key,
        "maxConcurrency": step.max_concurrency,
    }
    row.update((k, v) for k, v in optional.items() if v is not None)
    return row


def test_rows_are_built_as_before() -> None:
    spec = parse_run(
        {
            "steps": [
                {"name": "a", "tool": "DELAY", "input": {"ms": 1}, "timeoutMs": 5},
                {
                    "name": "b",
                    "tool": "DELAY",
                    "input": {"ms": {"$ref": "steps.a.output.tookMs"}},
                    "dependsOn": ["a"],
                    "runIf": "all_done",
                    "concurrencyKey": "k",
                    "maxConcurrency": 2,
                },
                {
                    "name": "m",
                    "tool": "DELAY",
                    "input": {"ms": {"$ref": "item"}},
                    "map": {"$ref": "steps.a.output.list"},
                    "dependsOn": ["a"],
                },
                {"name": "c", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["b"]},
                {
                    "name": "f",
                    "tool": "DELAY",
                    "input": {"ms": 0},
                    "dependsOn": ["c"],
                    "runIf": "any_failed",
                    "idempotent": False,
                },
            ]
        },
        max_steps=10,
    )
    rows = spec.rows()
    expected = [_reference_row(s, spec.refs_of(s.name)) for s in spec.steps]
    expected[3]["maySkipChildren"] = True  # c: f waits for it with any_failed
    assert rows == expected
    assert [list(r) for r in rows] == [list(r) for r in expected]  # same key order


def test_gc_paused_turns_the_collector_back_on_even_after_an_error() -> None:
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        assert not gc.isenabled()
        raise ValueError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off: left off
    finally:
        gc.enable()
