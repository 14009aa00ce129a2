"""The run builder (`engine.builder`): what it compiles to, byte for byte the ``POST /runs``
body, and that the API's own validator (`engine.dag.parse_run`) takes it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from engine.builder import Ref, Run, index, item
from engine.dag import parse_run
from engine.errors import ValidationFailed
from engine.tools import load_tool_modules

load_tool_modules(["workers.tools.builtin", "tests.testtools"])
EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def parsed(run: Run) -> Any:
    """The run's JSON text, decoded, through the API's validator."""
    return parse_run(json.loads(run.to_json()), max_steps=10_000)


def test_the_data_flow_example_of_the_docs_is_what_the_builder_makes() -> None:
    run = Run(goal="Fetch a feed, then every page it lists, then clean up", priority=5)
    feed = run.step("feed", "HTTP_GET_JSON", url="http://127.0.0.1:8000/feed.json")
    pages = run.step(
        "pages",
        "HTTP_GET_JSON",
        map=feed.output["body"]["pages"],
        url=item["url"],
        concurrency_key="127.0.0.1:8000",
        max_concurrency=2,
    )
    nxt = run.step("next", "HTTP_GET_JSON", url=feed.output["body"]["next"])
    # feed is an ancestor of pause through pages: the reference adds no edge
    pause = run.step("pause", "DELAY", ms=feed.output["body"]["pauseMs"], depends_on=[pages])
    run.step("on-failure", "DELAY", ms=1, depends_on=[pages, nxt], run_if="any_failed")
    run.step("cleanup", "DELAY", ms=1, depends_on=[pause, nxt], run_if="all_done")
    assert run.to_dict() == json.loads((EXAMPLES / "data-flow.json").read_text())
    spec = parsed(run)
    names = ["feed", "pages", "next", "pause", "on-failure", "cleanup"]
    assert [s.name for s in spec.steps] == names
    assert spec.refs_of("pages").map_path == ["steps", "feed", "output", "body", "pages"]


def test_the_research_example_with_string_dependencies() -> None:
    run = Run(goal="Research and summarize a topic")
    run.step("fetch", "DELAY", ms=200)
    for name, ms in (("read-a", 400), ("read-b", 500), ("read-c", 300)):
        run.step(name, "DELAY", ms=ms, depends_on=["fetch"])
    run.step("summarize", "DELAY", ms=300, depends_on=["read-a", "read-b", "read-c"])
    assert run.to_dict() == json.loads((EXAMPLES / "research.json").read_text())


def test_a_reference_adds_its_step_to_depends_on_only_when_not_an_ancestor() -> None:
    run = Run()
    a = run.step("a", "DELAY", ms=1)
    b = run.step("b", "DELAY", ms=1)
    c = run.step("c", "DELAY", ms=a.output["tookMs"], depends_on=[b])
    d = run.step("d", "DELAY", ms=a.output["tookMs"], depends_on=[c])
    body = run.to_dict()["steps"]
    assert body[2]["dependsOn"] == ["b", "a"]  # given first, then the referred one
    assert body[3]["dependsOn"] == ["c"]  # a is an ancestor of d through c
    assert d.ancestors == {"a", "b", "c"}
    parsed(run)  # the API agrees every reference names an ancestor


def test_every_step_and_run_option_reaches_the_json() -> None:
    start = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    run = Run(goal="all", idempotency_key="k", priority=-3, start_at=start)
    a = run.step("a", "DELAY", input={"ms": 5})
    run.step(
        "b",
        "DELAY",
        ms=1,
        depends_on=["a"],
        run_if="all_done",
        max_attempts=7,
        timeout_ms=2500,
        idempotent=False,
        concurrency_key="key",
        max_concurrency=3,
    )
    run.step(
        "c", "TEST_ECHO", map=a.output["list"], ms=item["ms"], depends_on=[a], input={"x": index}
    )
    body = run.to_dict()
    assert (body["goal"], body["idempotencyKey"], body["priority"]) == ("all", "k", -3)
    assert body["startAt"] == "2030-01-02T03:04:05+02:00"
    assert body["steps"][1] == {
        "name": "b",
        "tool": "DELAY",
        "input": {"ms": 1},
        "dependsOn": ["a"],
        "runIf": "all_done",
        "maxAttempts": 7,
        "timeoutMs": 2500,
        "idempotent": False,
        "concurrencyKey": "key",
        "maxConcurrency": 3,
    }
    assert body["steps"][2]["input"] == {"x": {"$ref": "index"}, "ms": {"$ref": "item.ms"}}
    step = parsed(run).steps[1]
    assert (step.max_attempts, step.timeout_ms, step.idempotent, step.run_if) == (
        7,
        2500,
        False,
        "all_done",
    )
    assert (step.concurrency_key, step.max_concurrency) == ("key", 3)


def test_references_at_any_depth_and_negative_indexes() -> None:
    run = Run()
    src = run.step("src", "DELAY", ms=1)
    ref = src.output["body"]["items"][-1]["url"]
    assert ref.to_json() == {"$ref": "steps.src.output.body.items.-1.url"}
    use = run.step("use", "HTTP_GET_JSON", url=ref)
    assert use.spec["input"] == {"url": {"$ref": "steps.src.output.body.items.-1.url"}}
    nested = run.step("nested", "TEST_ECHO", input={"ms": {"deep": [src.status, {"e": src.error}]}})
    assert nested.spec["input"]["ms"] == {
        "deep": [{"$ref": "steps.src.status"}, {"e": {"$ref": "steps.src.error"}}]
    }


def test_to_json_is_the_dict_as_text_and_a_fresh_copy() -> None:
    run = Run(goal="g")
    run.step("a", "DELAY", ms=1)
    first = run.to_dict()
    first["steps"][0]["input"]["ms"] = 99
    assert run.to_dict()["steps"][0]["input"]["ms"] == 1
    assert json.loads(run.to_json()) == run.to_dict()


def problem_of(call: Any) -> dict[str, Any]:
    with pytest.raises(ValidationFailed) as info:
        call()
    [problem] = info.value.problems
    return problem


def test_bad_values_are_refused_where_they_are_written_naming_step_and_field() -> None:
    run = Run()
    a = run.step("a", "DELAY", ms=1)
    assert problem_of(lambda: run.step("a", "DELAY", ms=1)) == {
        "step": "a",
        "field": "name",
        "problem": "duplicate step name",
    }
    p = problem_of(lambda: run.step("b", "DELAY", ms=1, max_attempts=0))
    assert (p["step"], p["field"]) == ("b", "maxAttempts") and "greater than or equal" in p[
        "problem"
    ]
    p = problem_of(lambda: run.step("bad name!", "DELAY", ms=1))
    assert (p["step"], p["field"]) == ("bad name!", "name")
    p = problem_of(lambda: run.step("c", "DELAY", ms=1, run_if="sometimes"))
    assert p["field"] == "runIf"
    p = problem_of(lambda: run.step("d", "DELAY", ms=item["ms"]))
    assert (p["field"], p["problem"]) == (
        "input.ms",
        "item.ms exists only in a map step (pass map=...)",
    )
    p = problem_of(lambda: run.step("e", "DELAY", ms=1, depends_on=["ghost"]))
    assert p["field"] == "dependsOn" and "no step 'ghost'" in p["problem"]
    other = Run().step("x", "DELAY", ms=1)
    p = problem_of(lambda: run.step("f", "DELAY", ms=other.output))
    assert (p["field"], p["problem"]) == ("input.ms", "step 'x' belongs to another Run")
    p = problem_of(lambda: run.step("g", "DELAY", ms={1, 2}))
    assert p["field"] == "input.ms" and "a set is not JSON" in p["problem"]
    p = problem_of(lambda: run.step("t", "DELAY", ms=1, input={"ms": 2}))
    assert p == {
        "step": "t",
        "field": "input.ms",
        "problem": "given both in input= and as a keyword",
    }
    p = problem_of(lambda: run.step("h", "DELAY", ms=float("nan")))
    assert p["field"] == "input.ms" and "not a JSON number" in p["problem"]
    p = problem_of(lambda: run.step("i", "DELAY", map=a.status, ms=1))
    assert p["field"] == "map"
    p = problem_of(lambda: Run(priority=2_000_000))
    assert p["field"] == "priority"
    p = problem_of(lambda: Run(start_at=datetime(2030, 1, 1)))  # noqa: DTZ001  (the point)
    assert p["field"] == "startAt" and "time zone" in p["problem"]
    with pytest.raises(TypeError, match="takes Step objects or step names"):
        run.step("j", "DELAY", ms=1, depends_on=[42])  # type: ignore[list-item]
    assert list(run.steps) == ["a"]  # nothing refused was added


def test_reference_keys_the_path_syntax_cannot_spell_are_refused() -> None:
    run = Run()
    a = run.step("a", "DELAY", ms=1)
    with pytest.raises(ValueError, match="contains a dot"):
        a.output["a.b"]
    with pytest.raises(ValueError, match="empty"):
        a.output[""]
    with pytest.raises(TypeError, match="has no fields"):
        a.status["x"]
    with pytest.raises(TypeError, match="has no fields"):
        index["x"]
    with pytest.raises(TypeError, match="str or an int"):
        a.output[1.5]  # type: ignore[index]
    assert isinstance(item[0], Ref) and item[0].path == "item.0"


def test_a_run_of_utc_start_and_steps_is_accepted_whole() -> None:
    run = Run(goal="later", start_at=datetime(2031, 5, 6, tzinfo=UTC))
    prev = run.step("s0", "DELAY", ms=0)
    for i in range(1, 50):
        prev = run.step(f"s{i}", "DELAY", ms=prev.output["tookMs"])
    spec = parsed(run)
    assert spec.start_at == datetime(2031, 5, 6, tzinfo=UTC)
    assert spec.steps[-1].depends_on == ["s48"]
