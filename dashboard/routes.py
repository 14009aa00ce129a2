"""The dashboard's routes: the page at ``/`` and its assets under ``/dashboard/static/``.

`engine.api` mounts `routes`. Everything the page needs ships in this package (no CDN, no
build step): plain HTML, CSS and JavaScript, plus the vendored graph-layout library.

The page reads runs, steps, events and workers through the public HTTP API and WebSockets.
One extra read lives here, ``GET /dashboard/runs``: the runs list with each run's step
counts by status, which ``GET /runs`` does not carry. It reads through `engine.store.Store`
like every other route.

When ``PGDAG_API_TOKEN`` is set, the API's bearer middleware guards these routes too; a
browser opens ``/?token=...`` and the page passes the same query on every asset, HTTP and
WebSocket URL (the page is rendered with it, so its scripts and stylesheet load).

Caching: the page itself is ``no-store`` (it may hold the token); the page's own assets are
``no-cache`` with an ETag (revalidated, answered 304 when unchanged); vendored files carry
their version in their name and are cached for a year as immutable.
"""

from __future__ import annotations

import asyncio
import html
import os
from importlib import resources
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from engine.store import Store

STATIC_URL = "/dashboard/static"
RUNS_LIMIT_DEFAULT = 50
RUNS_LIMIT_MAX = 200
# Reads of one page of runs' step counts done at once (the API's pool holds 10 connections).
COUNTS_CONCURRENCY = 4

_PAGE_CACHE = "no-store"
# Everything comes from the API's own origin; inline style attributes size the run bars.
_PAGE_CSP = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; script-src 'self'; worker-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_ASSET_CACHE = "no-cache"
_VENDOR_CACHE = "public, max-age=31536000, immutable"


class _Assets(StaticFiles):
    """StaticFiles with the cache headers described in the module docstring."""

    def file_response(
        self,
        full_path: PathLike,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        path = scope.get("path", "")
        vendor = "/vendor/" in path
        response.headers["Cache-Control"] = _VENDOR_CACHE if vendor else _ASSET_CACHE
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _page_template() -> str:
    return resources.files("dashboard").joinpath("static", "index.html").read_text("utf-8")


_TEMPLATE = _page_template()


async def page(request: Request) -> Response:
    """The dashboard page; asset URLs carry ``?token=`` when the page was opened with one.

    That is the configured token, percent-encoded: the request got here past the bearer
    check, so the token it carried is that one however the address bar spelt it (a
    base64 token's ``+`` pasted as it is would read as a space in a form-decoded query).
    """
    configured: str | None = request.app.state.settings.api_token
    token = configured if configured and "token" in request.query_params else None
    query = f"?token={quote(token, safe='')}" if token else ""
    body = _TEMPLATE.replace("{{static}}", STATIC_URL).replace("{{query}}", html.escape(query))
    return HTMLResponse(
        body,
        headers={
            "Cache-Control": _PAGE_CACHE,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",  # the URL may hold the token
            "Content-Security-Policy": _PAGE_CSP,
        },
    )


async def runs_with_counts(request: Request) -> Response:
    """``GET /dashboard/runs?limit=&cursor=``: like ``GET /runs`` (newest first, same
    ``nextCursor``), each run with ``stepCounts`` ({status: n}). 422 for a bad parameter."""
    try:
        limit = int(request.query_params.get("limit") or RUNS_LIMIT_DEFAULT)
        raw_cursor = request.query_params.get("cursor")
        cursor = int(raw_cursor) if raw_cursor else None
    except ValueError:
        return JSONResponse(
            {"error": "invalid_request", "message": "limit and cursor must be integers"},
            status_code=422,
        )
    limit = max(1, min(limit, RUNS_LIMIT_MAX))
    store: Store = request.app.state.store
    runs, next_cursor = await store.list_runs(status=None, limit=limit, cursor=cursor)
    gate = asyncio.Semaphore(COUNTS_CONCURRENCY)

    async def counts(run: dict[str, Any]) -> None:
        async with gate:
            full = await store.get_run(run["id"], with_steps=False)
        run["stepCounts"] = full["stepCounts"]
        run["status"] = full["status"]

    await asyncio.gather(*(counts(r) for r in runs))
    return JSONResponse(
        {"runs": runs, "nextCursor": str(next_cursor) if next_cursor is not None else None}
    )


routes: list[BaseRoute] = [
    Route("/", page, methods=["GET"]),
    Route("/dashboard/runs", runs_with_counts, methods=["GET"]),
    Mount(STATIC_URL, app=_Assets(packages=[("dashboard", "static")]), name="dashboard-static"),
]
