"""The side-effect ledger: a small local HTTP server that records every request it gets with
its ``Idempotency-Key`` header and arrival time, and answers JSON.

The chaos demo points HTTP_GET_JSON steps at it; afterwards `requests()` is compared with the
audit log to count duplicate side effects (see `chaos.checker.ledger_duplicates`).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Ledger:
    """Run with `start()` (returns the base URL) and `stop()`; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[tuple[str, datetime, str]] = []
        ledger = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                key = self.headers.get("Idempotency-Key") or ""
                with ledger._lock:
                    ledger._requests.append((key, datetime.now(UTC), self.path))
                    seen = sum(1 for k, _, _ in ledger._requests if k == key)
                body = json.dumps({"recorded": True, "key": key, "timesSeen": seen}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: ARG002
                return  # quiet: the demo prints its own progress

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> str:
        """Start serving; returns ``http://127.0.0.1:<port>``."""
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def requests_with_paths(self) -> list[tuple[str, datetime, str]]:
        """Every request so far as ``(idempotency_key, arrival time UTC, path)``."""
        with self._lock:
            return list(self._requests)

    def requests(self) -> list[tuple[str, datetime]]:
        """Every request so far as ``(idempotency_key, arrival time UTC)``."""
        with self._lock:
            return [(k, t) for k, t, _ in self._requests]
