"""The schedules' HTTP routes (`engine.schedules`; mounted by `engine.api`).

``POST /schedules`` (201 created, 200 the same definition again, 409 the name taken by
another definition, 422 naming every problem: ``cron``, ``timezone``, ``missed``,
``run.steps[0].tool``...), ``GET /schedules``, ``GET /schedules/{scheduleId}`` (with its
recent fires and their runs), ``POST /schedules/{scheduleId}/pause`` and ``/resume`` (409
when it already is), ``DELETE /schedules/{scheduleId}``. ``{scheduleId}`` is the schedule's
id or its name. The bearer-token rules are the other routes' (`engine.guards`,
`engine.tokens`: the ``submit`` scope may do all of this).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import jsonb, responses
from engine.bodies import read_body
from engine.config import Settings
from engine.errors import UnstorableJson, ValidationFailed
from engine.openapi import Operation, Reply
from engine.schedules import CATCH_UP_MAX, NAME_PATTERN, parse_schedule
from engine.store import Store
from engine.tools import registered_tools

LIST_LIMIT = 1000  # schedules listed at most
RECENT_FIRES = 20  # fires shown with one schedule


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def _remote_tools(store: Store, body: Any) -> frozenset[str]:
    """The live workers' and agents' tools, read only when the template names a tool this
    process has not loaded (as ``POST /runs`` does)."""
    run = body.get("run") if isinstance(body, dict) else None
    steps = run.get("steps") if isinstance(run, dict) else None
    if not isinstance(steps, list):
        return frozenset()
    named = {s.get("tool") for s in steps if isinstance(s, dict) and isinstance(s.get("tool"), str)}
    if named <= registered_tools().keys():
        return frozenset()
    return await store.live_worker_tools()


async def create_schedule(request: Request) -> Response:
    """Create a schedule: 201 with it, 200 with the existing one for a repeated name with
    the same definition, 409 ``schedule_name_taken`` for a name another definition has, 422
    naming every problem (nothing written)."""
    settings: Settings = request.app.state.settings
    raw = await read_body(request, settings.max_body_bytes)
    try:
        body = jsonb.loads(raw)
    except UnstorableJson as exc:
        raise ValidationFailed(
            [{"step": None, "field": exc.path, "problem": exc.problem}], subject="schedule"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed(
            [{"step": None, "field": "body", "problem": f"not valid JSON: {exc}"}],
            subject="schedule",
        ) from None
    store = _store(request)
    spec = parse_schedule(
        body,
        max_steps=settings.max_steps_per_run,
        remote_tools=await _remote_tools(store, body),
    )
    schedule_id, created = await store.create_schedule(spec)
    return JSONResponse(
        await store.get_schedule(schedule_id, fires=RECENT_FIRES),
        status_code=201 if created else 200,
    )


async def list_schedules(request: Request) -> Response:
    """Every schedule by name, each with its latest fire."""
    return JSONResponse({"schedules": await _store(request).list_schedules(limit=LIST_LIMIT)})


async def get_schedule(request: Request) -> Response:
    """One schedule (by id or name) with its latest fires, newest first; 404 unknown."""
    ref = request.path_params["scheduleId"]
    return JSONResponse(await _store(request).get_schedule(ref, fires=RECENT_FIRES))


async def pause_schedule(request: Request) -> Response:
    """Pause: the leader fires it no more. 404 unknown, 409 already paused."""
    store = _store(request)
    schedule_id = await store.pause_schedule(request.path_params["scheduleId"])
    return JSONResponse(await store.get_schedule(schedule_id, fires=RECENT_FIRES))


async def resume_schedule(request: Request) -> Response:
    """Resume: its next fire is the first fire time after now (the times that passed while
    it was paused are not fired). 404 unknown, 409 not paused."""
    store = _store(request)
    schedule_id = await store.resume_schedule(request.path_params["scheduleId"])
    return JSONResponse(await store.get_schedule(schedule_id, fires=RECENT_FIRES))


async def delete_schedule(request: Request) -> Response:
    """Delete a schedule and its fires; the runs it submitted stay. 404 unknown."""
    schedule_id = await _store(request).delete_schedule(request.path_params["scheduleId"])
    return JSONResponse({"id": schedule_id, "deleted": True})


routes = [
    Route("/schedules", create_schedule, methods=["POST"]),
    Route("/schedules", list_schedules, methods=["GET"]),
    Route("/schedules/{scheduleId}", get_schedule, methods=["GET"]),
    Route("/schedules/{scheduleId}", delete_schedule, methods=["DELETE"]),
    Route("/schedules/{scheduleId}/pause", pause_schedule, methods=["POST"]),
    Route("/schedules/{scheduleId}/resume", resume_schedule, methods=["POST"]),
]


# --- OpenAPI ---------------------------------------------------------------------------------


class ScheduleRequest(BaseModel):
    """``POST /schedules`` body (described here; `engine.schedules.parse_schedule` checks
    it, and the run template exactly as ``POST /runs`` checks a run)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="unique; not a UUID")
    cron: str = Field(description="5 fields (croniter), in the schedule's time zone")
    timezone: str = Field(default="UTC", description="an IANA name, e.g. Europe/Paris")
    run: dict[str, Any] = Field(
        description="a POST /runs body without idempotencyKey or startAt: each fire's run"
    )
    missed: Any = Field(
        default="skip",
        description=f'"skip", or {{"catchUp": N}} (1..{CATCH_UP_MAX}): the newest N due fire '
        "times fire, oldest first",
    )


class SchedulePath(BaseModel):
    """Path parameter of one schedule's routes: its id or its name."""

    schedule_id: str = Field(alias="scheduleId", min_length=1)


_ONE = Reply(responses.Schedule, "the schedule with its recent fires")
_NO = {404: "no such schedule", 503: "postgres is not answering"}
_EXAMPLE = {
    "name": "nightly-report",
    "cron": "0 3 * * *",
    "timezone": "Europe/Paris",
    "run": {"steps": [{"name": "wait", "tool": "DELAY", "input": {"ms": 10}}]},
    "missed": {"catchUp": 3},
}

OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/schedules",
        "createSchedule",
        "Create a schedule: a cron expression, a time zone and a run template",
        {
            201: Reply(responses.Schedule, "the schedule, created"),
            200: Reply(responses.Schedule, "the existing schedule of this name and definition"),
        },
        errors={
            409: "the name is taken by a schedule with another definition",
            422: "a bad schedule or template: every problem, named; nothing written",
            503: "postgres is not answering",
        },
        body=ScheduleRequest,
        body_example=_EXAMPLE,
    ),
    Operation(
        "GET",
        "/schedules",
        "listSchedules",
        "Every schedule, by name, with its latest fire",
        {200: Reply(responses.ScheduleList, "the schedules")},
        errors={503: "postgres is not answering"},
    ),
    Operation(
        "GET",
        "/schedules/{scheduleId}",
        "getSchedule",
        "A schedule (by id or name) with its recent fires and their runs",
        {200: _ONE},
        errors=_NO,
        path_params=SchedulePath,
    ),
    Operation(
        "POST",
        "/schedules/{scheduleId}/pause",
        "pauseSchedule",
        "Pause a schedule",
        {200: _ONE},
        errors={**_NO, 409: "already paused"},
        path_params=SchedulePath,
    ),
    Operation(
        "POST",
        "/schedules/{scheduleId}/resume",
        "resumeSchedule",
        "Resume a schedule from its next fire time after now",
        {200: _ONE},
        errors={**_NO, 409: "not paused"},
        path_params=SchedulePath,
    ),
    Operation(
        "DELETE",
        "/schedules/{scheduleId}",
        "deleteSchedule",
        "Delete a schedule and its fires (its runs stay)",
        {200: Reply(responses.ScheduleDeleted, "deleted")},
        errors=_NO,
        path_params=SchedulePath,
    ),
]
