"""The OpenAPI 3.1 document of the HTTP API, generated, never written by hand.

`engine.api` keeps a table of `Operation` rows next to its routes (routes as data); each row
names the pydantic models the route validates its input with (the run body of
`engine.dag.RunSpec`, the query and path parameters, the bodies of replay and bulk retry) and
the models of what it answers (`engine.responses`). `document` turns that table into the
OpenAPI document served at ``GET /openapi.json``.

Schemas come from pydantic (`pydantic.json_schema.models_json_schema`): request bodies and
parameters in ``validation`` mode, responses in ``serialization`` mode, all under
``#/components/schemas``. Pydantic emits JSON Schema draft 2020-12, which is the schema
dialect of OpenAPI 3.1 (OpenAPI 3.1.0, "Schema Object"), so the schemas are
used as they are. WebSocket routes and the dashboard are not HTTP JSON operations and are
not described.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from engine.dag import MAX_CONCURRENCY_LIMIT, RunSpec, StepSpec
from engine.responses import Error
from engine.tools import Tool

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
JSON = "application/json"

# Answered by every operation: 401 and 403 only when a token is configured (PGDAG_API_TOKEN
# or a live scoped token, engine.tokens); 421 when the Host is not one the API serves; 500
# never on purpose (the fuzz test fails on it); 503 while Postgres does not answer or its
# schema is not at this version's head (engine.schema).
COMMON_ERRORS: Mapping[int, str] = {
    401: "missing or wrong bearer token (only when a token is configured: PGDAG_API_TOKEN "
    "or a live token of `python -m engine token create`)",
    403: "the token's scope does not allow this operation (`forbidden`, naming the token "
    "and its scope)",
    421: "the Host header names a host this API does not serve",
    500: "an unexpected error (a bug): the error code and a message, never a traceback",
    503: "Postgres is not answering, or its schema needs `python -m engine migrate`",
}
# Answered by every state-changing operation, body or not (engine.guards.JsonOnly).
STATE_CHANGE_ERRORS: Mapping[int, str] = {
    415: "the request is not sent as application/json (required even without a body)",
}
# Answered by every operation with a JSON request body.
BODY_ERRORS: Mapping[int, str] = {
    413: "the body is larger than PGDAG_MAX_BODY_BYTES",
    415: "the body is not sent as application/json",
    422: "the body is not valid JSON or not valid for the operation: each problem named",
}


@dataclass(frozen=True)
class Reply:
    """One documented answer: its JSON body `model` (None: the body is described in words
    only) and a `description`."""

    model: type[BaseModel] | None
    description: str


@dataclass(frozen=True)
class Operation:
    """One HTTP operation of the API, as data.

    `path` is the Starlette route path (``/runs/{run_id}``); the document spells each path
    parameter by its alias in `path_params` (``{runId}``). `path_params` and `query` are
    models whose fields (by alias) are the parameters; `body` is the request body's model,
    required unless `body_required` is False. `responses` maps a status code to its `Reply`;
    `errors` lists the error status codes answered with the `Error` body, each with its
    description, besides `COMMON_ERRORS` (and `BODY_ERRORS` when there is a body).
    `body_example` is an example body (a valid one, which fuzzers start from).
    """

    method: Literal["GET", "POST", "DELETE"]
    path: str
    operation_id: str
    summary: str
    responses: Mapping[int, Reply]
    errors: Mapping[int, str] = field(default_factory=dict)
    path_params: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    body_example: Any = None
    links: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)


def _models(operations: Sequence[Operation]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(Error, "serialization")]
    for op in operations:
        wanted.extend((m, "validation") for m in (op.path_params, op.query, op.body) if m)
        wanted.extend((r.model, "serialization") for r in op.responses.values() if r.model)
    return list(dict.fromkeys(wanted))  # unique, in order


def _ref_name(ref_or_schema: Mapping[str, Any]) -> str:
    ref = str(ref_or_schema["$ref"])
    return ref.rsplit("/", 1)[-1]


def _json_content(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": dict(schema)}}


def openapi_path(op: Operation) -> str:
    """`op.path` with each Starlette path parameter spelled by its alias in `op.path_params`
    (``{run_id}`` -> ``{runId}``)."""
    path = op.path
    if op.path_params is None:
        return path
    for name, info in op.path_params.model_fields.items():
        path = path.replace("{" + name + "}", "{" + (info.alias or name) + "}")
    return path


def document(
    operations: Sequence[Operation],
    *,
    title: str,
    version: str,
    description: str = "",
) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-ready dict) of `operations`.

    Raises `ValueError` when two operations share a method and path, or an operationId.
    """
    seen_ids: set[str] = set()
    keys, defs = models_json_schema(_models(operations), ref_template=REF_TEMPLATE)
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(keys[(model, mode)])

    paths: dict[str, dict[str, Any]] = {}
    param_models = {m for op in operations for m in (op.path_params, op.query) if m is not None}
    # Parameter schemas are read before any is removed from the components.
    params_of: dict[type[BaseModel], dict[str, Any]] = {
        m: schemas[_ref_name(ref(m, "validation"))] for m in param_models
    }
    for op in operations:
        if op.operation_id in seen_ids:
            raise ValueError(f"operationId {op.operation_id!r} used twice")
        seen_ids.add(op.operation_id)
        path = openapi_path(op)
        item = paths.setdefault(path, {})
        method = op.method.lower()
        if method in item:
            raise ValueError(f"{op.method} {path} documented twice")
        entry: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
        parameters = []
        if op.path_params is not None:
            parameters += _parameters_from(params_of[op.path_params], "path")
        if op.query is not None:
            parameters += _parameters_from(params_of[op.query], "query")
        if parameters:
            entry["parameters"] = parameters
        if op.body is not None:
            content = _json_content(ref(op.body, "validation"))
            if op.body_example is not None:
                content[JSON]["example"] = op.body_example
            entry["requestBody"] = {"required": op.body_required, "content": content}
        responses: dict[str, Any] = {}
        for status, reply in sorted(op.responses.items()):
            answer: dict[str, Any] = {"description": reply.description}
            if reply.model is not None:
                answer["content"] = _json_content(ref(reply.model, "serialization"))
            if status in op.links:
                answer["links"] = dict(op.links[status])
            responses[str(status)] = answer
        errors = {
            **COMMON_ERRORS,
            **(STATE_CHANGE_ERRORS if op.method != "GET" else {}),
            **(BODY_ERRORS if op.body is not None else {}),
            **op.errors,
        }
        for status, description in sorted(errors.items()):
            if status in op.responses:  # a documented body of its own (/health's 503)
                continue
            responses[str(status)] = {
                "description": description,
                "content": _json_content(ref(Error, "serialization")),
            }
        entry["responses"] = responses
        item[method] = entry
    for model in param_models:  # inlined as parameters, not components of their own
        schemas.pop(_ref_name(ref(model, "validation")), None)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "tokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
        # The token is optional (none configured: no security); browsers use ?token=.
        "security": [{}, {"bearer": []}, {"tokenQuery": []}],
    }


def _parameters_from(obj: Mapping[str, Any], where: Literal["path", "query"]) -> list[Any]:
    """Each property of the object schema `obj` (a parameter model's) as a parameter: its
    alias, its schema, whether required (a path parameter always is: OpenAPI 3.1.0, Parameter
    Object, "required": for location path it "MUST be true")."""
    required = set(obj.get("required", ()))
    params = []
    for name, schema in obj.get("properties", {}).items():
        param: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": _not_null(schema),
        }
        if "description" in schema:
            param["description"] = schema["description"]
        params.append(param)
    return params


def _not_null(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter's schema without the ``null`` of an optional field (``X | None``): a
    parameter is a string on the wire, and an absent one is the None; without title and
    description (the parameter carries the description) and without a null default."""
    out = {k: v for k, v in schema.items() if k not in ("title", "description")}
    if out.get("default", ...) is None:
        del out["default"]
    options = out.get("anyOf")
    if options is not None:
        rest = [o for o in options if o != {"type": "null"}]
        if len(rest) == 1:
            del out["anyOf"]
            out = {**rest[0], **out}
    return out


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class MapSource(BaseModel):
    """A map step's source: the output (or a part of it) of an ancestor, an array."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    ref: str = Field(alias="$ref", pattern=r"^steps\.", examples=["steps.fetch.output.items"])


class DocumentedStep(StepSpec):
    """`StepSpec` as the document describes it: the rules `engine.dag.parse_run` checks
    across fields that JSON Schema can state too (so a generated request is refused less
    often for them): ``concurrencyKey`` and ``maxConcurrency`` come together (an absent one
    is what ``null`` means), ``dependsOn`` names a dependency once, ``map`` is a reference."""

    model_config = ConfigDict(
        json_schema_extra={
            "dependentRequired": {
                "concurrencyKey": ["maxConcurrency"],
                "maxConcurrency": ["concurrencyKey"],
            }
        }
    )

    depends_on: list[str] = Field(
        default_factory=list,
        alias="dependsOn",
        max_length=1000,
        json_schema_extra={"uniqueItems": True},
    )
    # The API also takes null for these three; the document says "leave it out" instead
    # (and has no default: null is not a string).
    map: MapSource = Field(default=None, json_schema_extra=_no_default)  # type: ignore[assignment]
    concurrency_key: str = Field(  # type: ignore[assignment]
        default=None,
        min_length=1,
        max_length=200,
        alias="concurrencyKey",
        json_schema_extra=_no_default,
    )
    max_concurrency: int = Field(  # type: ignore[assignment]
        default=None,
        ge=1,
        le=MAX_CONCURRENCY_LIMIT,
        alias="maxConcurrency",
        json_schema_extra=_no_default,
    )


def run_spec_for_tools(tools: Mapping[str, Tool]) -> type[BaseModel]:
    """`engine.dag.RunSpec` with each step's ``tool`` one of `tools` (name -> `Tool`) and its
    ``input`` that tool's input model: the document then says which tools this API accepts
    and what each takes, as `engine.dag.parse_run` checks them (an unknown tool or an input
    the tool's model refuses is a 422). A ``{"$ref": ...}`` reference may stand for any input
    value (see `engine.dag`); JSON Schema cannot say that without losing the tools' schemas,
    so the document shows inputs without references. Steps are `DocumentedStep`s. With no
    tools, `RunSpec` itself."""
    if not tools:
        return RunSpec
    variants: list[Any] = []
    taken: set[str] = set()
    for i, (name, tool) in enumerate(sorted(tools.items())):
        model_name = f"Step_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}"
        if model_name in taken:  # "a.b" and "a_b" are two tools: two components
            model_name = f"{model_name}_{i}"
        taken.add(model_name)
        # Any: a Literal of a runtime value is no type form to a checker (pydantic >= 2.14
        # types create_model's fields as TypeForm).
        tool_literal: Any = Literal[name]
        variants.append(
            create_model(
                model_name,
                __base__=DocumentedStep,
                __doc__=f"A step running tool {name}.",
                tool=(tool_literal, Field()),
                input=(tool.input_model, Field()),
            )
        )
    step: Any = variants[0] if len(variants) == 1 else Union[tuple(variants)]  # noqa: UP007
    return create_model(
        "RunSpec",
        __base__=RunSpec,
        __doc__=RunSpec.__doc__,
        steps=(list[Annotated[step, Field(discriminator="tool")]], Field(min_length=1)),
    )
