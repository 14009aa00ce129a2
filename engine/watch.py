"""``python -m engine watch RUN_ID``: follow a run live in the terminal, over the WebSocket.

It follows ``WS /ws/runs/{runId}`` of a running API through `engine.client.Client.watch`,
draws the snapshot as a table of steps (rich, redrawn in place when stdout is a terminal;
one line per event otherwise), applies each event as it arrives, and ends with the run's
outcome. A dropped connection (an API restart) is reopened by the client for
`RECONNECT_FOR_S` seconds with ``?after=<last event id>``, so nothing is missed and nothing
shown twice.

Exit codes (`watch_run`): 0 the run completed, 1 it failed or was cancelled, 2 it could not
be followed (unknown run, refused token, API unreachable).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from engine.client import Client
from engine.transitions import TERMINAL_RUN_STATES

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
RECONNECT_FOR_S = 60.0
RECENT_EVENTS = 6
REDRAW_S = 0.1

STATUS_STYLE = {
    "pending": "dim",
    "ready": "cyan",
    "running": "bold yellow",
    "succeeded": "green",
    "dead_letter": "bold red",
    "skipped": "magenta",
    "cancelled": "red",
    "completed": "bold green",
    "failed": "bold red",
}
# Steps worth a row first when they do not all fit on the screen.
STATUS_ORDER = {"running": 0, "dead_letter": 1, "ready": 2, "pending": 3}


def describe(event: dict[str, Any]) -> str:
    """One line for an event: ``step  from -> to  attempt n, worker w, error: ...``."""
    who = event.get("stepName") or "run"
    if event.get("event") == "run_created":
        return f"{who:<14} created with {(event.get('detail') or {}).get('steps', '?')} steps"
    move = f"{event.get('fromStatus') or '-'} -> {event.get('toStatus')}"
    extra = []
    if event.get("attempt"):
        extra.append(f"attempt {event['attempt']}")
    if event.get("workerId"):
        extra.append(f"worker {event['workerId']}")
    detail = event.get("detail") or {}
    if isinstance(detail, dict) and detail.get("error"):
        extra.append(f"error: {detail['error']}")
    return f"{who:<14} {move:<24} {', '.join(extra)}".rstrip()


@dataclass
class RunView:
    """What the terminal shows: the run and its steps, updated by events."""

    run: dict[str, Any]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_event_id: int = 0
    recent: list[str] = field(default_factory=list)
    finished_at: str | None = None
    connection: str = "live"

    @classmethod
    def from_snapshot(cls, message: dict[str, Any]) -> RunView:
        """From a ``snapshot`` message."""
        run = message["run"]
        view = cls(run=run, last_event_id=int(message["lastEventId"]))
        view.steps = {s["name"]: dict(s) for s in run.get("steps", [])}
        view.finished_at = run.get("finishedAt")
        return view

    @property
    def status(self) -> str:
        status: str = self.run["status"]
        return status

    @property
    def done(self) -> bool:
        """The run reached a terminal state."""
        return self.status in TERMINAL_RUN_STATES

    def apply(self, event: dict[str, Any]) -> None:
        """Apply one event object (ids at or below `last_event_id` are ignored)."""
        if event["id"] <= self.last_event_id:
            return
        self.last_event_id = event["id"]
        self.recent = [*self.recent[-(RECENT_EVENTS - 1) :], describe(event)]
        name = event.get("stepName")
        if name is None:
            if event.get("toStatus"):
                self.run["status"] = event["toStatus"]
            if self.done:
                self.finished_at = event.get("at")
            return
        step = self.steps.setdefault(name, {"name": name, "attempt": 0})
        step["status"] = event["toStatus"]
        if event.get("attempt") is not None:
            step["attempt"] = event["attempt"]
        if event.get("workerId"):
            step["leaseOwner"] = event["workerId"]
        detail = event.get("detail") or {}
        if event["toStatus"] == "succeeded":
            step["error"] = None
        elif isinstance(detail, dict) and detail.get("error"):
            step["error"] = detail["error"]
        step["updatedAt"] = event.get("at")

    def counts(self) -> Counter[str]:
        """How many steps are in each status."""
        return Counter(s.get("status", "?") for s in self.steps.values())

    def took_s(self) -> float | None:
        """Seconds from the run's creation to its end (None while it runs)."""
        if not self.finished_at or not self.run.get("createdAt"):
            return None
        end = datetime.fromisoformat(self.finished_at)
        return (end - datetime.fromisoformat(self.run["createdAt"])).total_seconds()

    def outcome(self) -> str:
        """The last line: ``run <id> completed in 1.23s (5 steps: 5 succeeded)``."""
        took = self.took_s()
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.counts().items()))
        when = f" in {took:.2f}s" if took is not None else ""
        return f"run {self.run['id']} {self.status}{when} ({len(self.steps)} steps: {counts})"

    def render(self, max_rows: int, width: int = 100) -> Group:
        """The screen, `width` columns wide: a header, a table of at most `max_rows` steps,
        the latest events."""
        header = Text()
        header.append(f"run {self.run['id']}  ", style="bold")
        header.append(self.status, style=STATUS_STYLE.get(self.status, ""))
        if self.run.get("goal"):
            header.append(f"  {self.run['goal']}")
        if self.connection != "live":
            header.append(f"  ({self.connection})", style="bold red")
        summary = Text("  ")
        for status, n in sorted(self.counts().items(), key=lambda kv: kv[0]):
            summary.append(f"{status} {n}  ", style=STATUS_STYLE.get(status, ""))
        table = Table(box=None, pad_edge=False, expand=False)
        names = [s["name"] for s in self.steps.values()] or ["step"]
        workers = [s.get("leaseOwner") or "" for s in self.steps.values()] or [""]
        fixed = {
            "step": min(40, max(4, *map(len, names))),
            "status": 11,
            "attempt": 7,
            "worker": min(24, max(6, *map(len, workers))),
        }
        for column, column_width in fixed.items():
            table.add_column(column, no_wrap=True, min_width=column_width)
        error_width = max(10, width - sum(fixed.values()) - 2 * len(fixed))
        table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=error_width)
        steps = list(self.steps.values())
        if len(steps) > max_rows:
            steps.sort(key=lambda s: STATUS_ORDER.get(s.get("status", ""), 9))
        for step in steps[:max_rows]:
            status = step.get("status", "?")
            table.add_row(
                step["name"],
                Text(status, style=STATUS_STYLE.get(status, "")),
                str(step.get("attempt") or ""),
                step.get("leaseOwner") or "",
                (step.get("error") or "").replace("\n", " "),
            )
        if len(steps) > max_rows:
            table.add_row(f"... {len(steps) - max_rows} more", "", "", "", "")
        recent = Text("\n".join(self.recent), style="dim", no_wrap=True, overflow="ellipsis")
        return Group(header, summary, table, recent)


class Watcher:
    """Follows one run through `engine.client.Client.watch`; `run` returns the exit code.
    `out` is where it draws."""

    def __init__(
        self, api_url: str, run_id: str, *, token: str | None, out: TextIO | None = None
    ) -> None:
        self.api_url = api_url
        self.run_id = run_id
        self.token = token
        self.out = out or sys.stdout
        self.console = Console(file=self.out, highlight=False)
        self.live: Live | None = None
        self.view: RunView | None = None
        self._drawn_at = 0.0

    def _max_rows(self) -> int:
        return max(5, self.console.size.height - RECENT_EVENTS - 6)

    def _draw(self, *, force: bool = False) -> None:
        """Redraw, at most every `REDRAW_S` unless `force` (a busy run sends hundreds of
        events a second)."""
        now = time.monotonic()
        if self.live is None or self.view is None:
            return
        if not force and now - self._drawn_at < REDRAW_S:
            return
        self._drawn_at = now
        self.live.update(self.view.render(self._max_rows(), self.console.size.width), refresh=True)

    def _line(self, text: str) -> None:
        if self.live is None:
            print(text, file=self.out, flush=True)

    def _disconnected(self, exc: Exception) -> None:
        if self.view is not None:
            self.view.connection = "reconnecting"
            self._draw(force=True)
        self._line(f"  (connection lost: {exc}; reconnecting)")

    def _show(self, message: dict[str, Any]) -> None:
        """Apply one message of `Client.watch` to the view and draw it."""
        kind = message["type"]
        if kind == "snapshot":
            fresh = self.view is None
            self.view = RunView.from_snapshot(message)
            if fresh:
                counts = ", ".join(f"{n} {k}" for k, n in sorted(self.view.counts().items()))
                self._line(f"watching run {self.run_id}: {self.view.status}; steps {counts}")
        elif kind == "event" and self.view is not None:
            self.view.apply(message["event"])
            self._line(f"  {describe(message['event'])}")
        elif kind == "resync":
            self._line(f"  (resynchronising: {message.get('reason')})")
        if self.view is not None:
            self.view.connection = "live"
            self._draw(force=self.view.done or kind != "event")

    def run(self) -> int:
        """Follow the run to its end; the exit code (see the module docstring). Raises the
        client's errors (`engine.client`): `NotFound`, `Unauthorized`, `ApiUnreachable`."""
        with Client(self.api_url, self.token, reconnect_for_s=RECONNECT_FOR_S) as client:
            for message in client.watch(self.run_id, on_disconnect=self._disconnected):
                self._show(message)
        assert self.view is not None
        return EXIT_COMPLETED if self.view.status == "completed" else EXIT_FAILED


def watch_run(api_url: str, run_id: str, *, token: str | None, out: TextIO | None = None) -> int:
    """Follow `run_id` on the API at `api_url` until it ends, drawing to `out` (default
    stdout); returns 0 completed, 1 failed or cancelled. Raises the client's errors (exit 2
    in the CLI): `engine.client.NotFound` for an unknown run, `Unauthorized` for a refused
    token, `ApiUnreachable` for an API that cannot be reached."""
    watcher = Watcher(api_url, run_id, token=token, out=out)
    if not watcher.console.is_terminal:
        code = watcher.run()
    else:
        with Live(
            console=watcher.console,
            refresh_per_second=8,
            transient=False,
            auto_refresh=False,
            vertical_overflow="crop",
        ) as live:
            watcher.live = live
            code = watcher.run()
            watcher._draw(force=True)
    assert watcher.view is not None
    print(watcher.view.outcome(), file=watcher.out, flush=True)
    return code
