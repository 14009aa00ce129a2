"""The OpenAPI document served at ``GET /openapi.json``: a valid OpenAPI 3.1 document (checked
by openapi-spec-validator), generated from the models the API validates with, covering every
HTTP route of `engine.api` exactly once. No database: the route needs none, and the app's
lifespan (which opens the pool) is not run."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from engine.__main__ import create_server
from engine.api import routes
from engine.config import Settings


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    # the app `python -m engine serve` runs: the API with the built-in tools
    app = create_server(Settings(database_url="postgresql://unused/none"))

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # no lifespan: no pool, no database
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.get("/openapi.json")

    r = asyncio.run(get())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc: dict[str, Any] = r.json()
    return doc


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises OpenAPIValidationError naming the bad node


def test_every_http_route_is_documented_once(document: dict[str, Any]) -> None:
    served = {
        (method.lower(), r.path.replace("{run_id}", "{runId}").replace("{step_name}", "{stepName}"))
        for r in routes
        if isinstance(r, Route)
        for method in (r.methods or ()) - {"HEAD"}
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == served


def test_request_bodies_come_from_the_validating_models(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    body = document["paths"]["/runs"]["post"]["requestBody"]["content"]["application/json"]
    run_spec = schemas[body["schema"]["$ref"].rsplit("/", 1)[-1]]
    # RunSpec's own limits, by alias, with extra keys refused (extra="forbid")
    assert run_spec["additionalProperties"] is False
    assert run_spec["properties"]["steps"]["minItems"] == 1
    assert "idempotencyKey" in run_spec["properties"]
    # each registered tool with its own input model (an unknown tool or input is a 422)
    steps = run_spec["properties"]["steps"]["items"]
    assert steps["discriminator"]["propertyName"] == "tool"
    assert set(steps["discriminator"]["mapping"]) >= {"DELAY", "HTTP_GET_JSON"}
    step = schemas["Step_DELAY"]
    assert step["properties"]["tool"]["const"] == "DELAY"
    assert schemas["DelayInput"]["properties"]["ms"]["minimum"] == 0
    assert step["properties"]["name"]["pattern"].startswith("^[A-Za-z0-9]")
    assert step["properties"]["maxAttempts"]["maximum"] == 100
    replay = document["paths"]["/runs/{runId}/replay"]["post"]["requestBody"]
    assert replay["required"] is True
    replay_schema = schemas[replay["content"]["application/json"]["schema"]["$ref"].split("/")[-1]]
    assert replay_schema["required"] == ["from"]
    bulk = document["paths"]["/runs/retry-dead-letters"]["post"]["requestBody"]
    assert bulk["required"] is False  # an empty body retries every dead letter


def test_query_and_path_parameters(document: dict[str, Any]) -> None:
    params = {p["name"]: p for p in document["paths"]["/runs"]["get"]["parameters"]}
    assert set(params) == {"status", "limit", "cursor"}
    assert all(p["in"] == "query" and p["required"] is False for p in params.values())
    limit = params["limit"]["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 500)
    events = {p["name"]: p for p in document["paths"]["/runs/{runId}/events"]["get"]["parameters"]}
    assert set(events) == {"runId", "after", "limit"}
    assert events["runId"]["in"] == "path" and events["runId"]["required"] is True
    retry = document["paths"]["/runs/{runId}/steps/{stepName}/retry"]["post"]["parameters"]
    assert [(p["name"], p["in"]) for p in retry] == [("runId", "path"), ("stepName", "path")]


def test_error_responses_share_one_shape(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "message"}
    assert "problems" in error["properties"]
    create = document["paths"]["/runs"]["post"]["responses"]
    assert {"200", "201", "401", "413", "415", "421", "422", "500", "503"} <= set(create)
    for code in ("401", "413", "415", "421", "422", "500", "503"):
        ref = create[code]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/Error"
    get_run = document["paths"]["/runs/{runId}"]["get"]["responses"]
    assert {"200", "404"} <= set(get_run)
    assert "409" in document["paths"]["/runs/{runId}/cancel"]["post"]["responses"]


def test_run_response_describes_the_sql_built_steps(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    run = schemas["Run"]
    assert run["additionalProperties"] is False
    assert {"id", "status", "stepCounts", "steps", "createdAt"} <= set(run["required"])
    step = schemas["Step"]
    # every key select_run_steps_json builds, each always present (null when unset)
    assert set(step["required"]) == set(step["properties"])
    assert {"idempotencyKey", "resolvedInput", "waitingFor", "mapOf"} <= set(step["required"])


def test_tools_whose_names_clash_as_identifiers_stay_two_steps() -> None:
    from engine.openapi import run_spec_for_tools
    from engine.tools import get_tool, load_tool_modules

    load_tool_modules(["workers.tools.builtin"])
    delay = get_tool("DELAY")
    spec = run_spec_for_tools({"a.b": delay, "a_b": delay})
    schema = spec.model_json_schema(mode="validation")
    mapping = schema["properties"]["steps"]["items"]["discriminator"]["mapping"]
    # two components, with names a reader of the document can use
    assert {name: ref.rsplit("/", 1)[-1] for name, ref in mapping.items()} == {
        "a.b": "Step_a_b",
        "a_b": "Step_a_b_1",
    }
