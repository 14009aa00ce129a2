"""Request bodies of the API: read under a size cap, decoded, validated by a pydantic model.

Shared by the routes of `engine.api` and `engine.agents`. Every refusal is a
`ValidationFailed` (422) whose problems name the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from engine.config import Settings
from engine.dag import text_problems
from engine.errors import ValidationFailed


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes before reading them all.

    Raises `ValidationFailed` (field ``body``) for a body over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ValidationFailed(
            [
                {
                    "step": None,
                    "field": "body",
                    "problem": f"body too large: {declared} bytes > limit of {limit} bytes",
                }
            ]
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ValidationFailed(
                [
                    {
                        "step": None,
                        "field": "body",
                        "problem": f"body too large: over the limit of {limit} bytes",
                    }
                ]
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _whole(body: Any) -> Any:
    return body


async def json_body(
    request: Request,
    model: type[BaseModel],
    *,
    text_checked: Callable[[Any], Any] = _whole,
) -> Any:
    """The request body (capped at ``PGDAG_MAX_BODY_BYTES``) validated by `model`.

    The strings of ``text_checked(body)`` (default: the whole body) must be storable in
    Postgres text (no NUL, no lone surrogate); a route leaves out what it checks itself (an
    agent's outputs, refused one by one). Raises `ValidationFailed` naming each field."""
    settings: Settings = request.app.state.settings
    raw = await read_body(request, settings.max_body_bytes)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed(
            [{"step": None, "field": "body", "problem": f"not valid JSON: {exc}"}],
            subject="request",
        ) from None
    bad_text = text_problems(text_checked(body), runs=False)
    if bad_text:
        raise ValidationFailed(bad_text, subject="request")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(
            [
                {
                    "step": None,
                    "field": ".".join(str(p) for p in err["loc"]) or "body",
                    "problem": err["msg"],
                }
                for err in exc.errors(include_url=False)
            ],
            subject="request",
        ) from None
