"""The last line of the API: an error nothing else handled becomes a JSON 500 (HTTP) or a
1011 close (WebSocket), logged here with its traceback and sent without it.

Starlette's own catch-all (``ServerErrorMiddleware``, also behind an ``Exception`` entry of
``exception_handlers``) answers and then re-raises, so uvicorn logs the error a second time
and closes the connection: a keep-alive client sees its connection reset. This middleware
answers and does not re-raise, so the connection stays usable for the next request.
"""

from __future__ import annotations

import contextlib
import json
import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

INTERNAL_ERROR = {"error": "internal", "message": "internal error; see the server log"}
CLOSE_INTERNAL_ERROR = 1011  # RFC 6455 7.4.1: an unexpected condition prevented the request


class InternalErrorGuard:
    """ASGI middleware: an exception escaping the app is logged (``logger.exception``, with
    the method or ``WS`` and the path) and answered with `INTERNAL_ERROR`:

    - HTTP, no response started: 500 with the JSON body; the connection stays open.
    - HTTP, response already started: nothing more can be said; the response ends there.
    - WebSocket, accepted: a text frame ``{"type": "error", **INTERNAL_ERROR}`` and close
      code 1011; not yet accepted: the handshake is refused (HTTP 403).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = {"started": False, "closed": False}

        async def tracked(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.accept"):
                state["started"] = True
            elif kind in ("websocket.close", "websocket.http.response.start"):
                state["closed"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            where = scope["method"] if scope["type"] == "http" else "WS"
            logger.exception("internal error on %s %s", where, scope.get("path", "?"))
            # The client may be gone, which is why the app failed: answer if we still can.
            with contextlib.suppress(Exception):
                await self._answer(scope, receive, send, state)

    @staticmethod
    async def _answer(scope: Scope, receive: Receive, send: Send, state: dict[str, bool]) -> None:
        if scope["type"] == "http":
            if not state["started"]:
                await JSONResponse(INTERNAL_ERROR, status_code=500)(scope, receive, send)
            return
        if state["closed"]:
            return
        if state["started"]:
            await send(
                {"type": "websocket.send", "text": json.dumps({"type": "error", **INTERNAL_ERROR})}
            )
            await send(
                {"type": "websocket.close", "code": CLOSE_INTERNAL_ERROR, "reason": "internal"}
            )
        else:
            await send({"type": "websocket.close", "code": CLOSE_INTERNAL_ERROR})
