"""Traces end to end, in this test's event loop: the API app (under uvicorn) and a Worker on a
real Postgres, the SDK's InMemorySpanExporter, and a local HTTP server that records the
``traceparent`` header HTTP_GET_JSON sends (engine/tracing.py)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode

from engine.api import create_app
from engine.config import Settings
from engine.dag import parse_run
from engine.db import open_pool
from engine.store import Store
from engine.tools import load_tool_modules
from tests.support import free_port, query
from workers.agent import AgentBackend
from workers.agent_log import AgentLog
from workers.database import DatabaseBackend
from workers.worker import Worker

load_tool_modules(["workers.tools.builtin"])
DEADLINE_S = 60.0


class _Switch(Sampler):
    """Samples everything while `on`, nothing after: the provider outlives this module (one
    per process), and later tests in the process should not pay for recorded spans."""

    on = True

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return (ALWAYS_ON if self.on else ALWAYS_OFF).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "on while test_traces runs"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider (set once: OpenTelemetry allows no second one) with an
    in-memory exporter of this module's own, shut down after it."""
    switch = _Switch()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(sampler=switch)
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    switch.on = False
    memory.shutdown()  # exports nothing more


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []  # noqa: RUF012 - (path, traceparent), one test

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("traceparent")))
        status, body = (503, b"{}") if self.path == "/fail" else (200, b'{"ok": true}')
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    """A local HTTP server recording each request's path and traceparent; yields its URL."""
    _Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


async def _until(condition: Any, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while loop.time() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {DEADLINE_S}s waiting for {what}")


async def _run_through_api_and_worker(
    db_url: str, body: dict[str, Any], kind: str, tmp_path: Path
) -> tuple[str, Any]:
    """Serve the API, run a Worker (`kind`: ``database``, or ``agent`` of the API), submit
    `body` under a client span; returns the run id and the client span's context once the
    run has finished."""
    settings = Settings(
        database_url=db_url, http_allow_private=True, poll_interval_s=0.2, backoff_base_ms=10
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, database_url=db_url, bound=("127.0.0.1", port)),
            host="127.0.0.1",
            port=port,
            log_config=None,
            lifespan="on",
        )
    )
    serving = asyncio.create_task(server.serve())
    pool = await open_pool(db_url, min_size=1, max_size=4)
    store = Store(pool, lease_ttl_s=settings.lease_ttl_s)
    backend: DatabaseBackend | AgentBackend
    if kind == "database":
        backend = DatabaseBackend(store, settings, database_url=db_url, worker_id="w-trace")
    else:
        log = AgentLog(tmp_path / "agent.sqlite3")
        backend = AgentBackend(f"http://127.0.0.1:{port}", worker_id="w-trace", log=log)
    worker = Worker(backend, settings, concurrency=2)
    working: asyncio.Task[None] | None = None
    try:

        async def started() -> bool:
            if serving.done():
                serving.result()  # raises what ended it
            return server.started

        await _until(started, "the API to start")
        working = asyncio.create_task(worker.run())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            with trace.get_tracer("test").start_as_current_span("client") as span:
                headers: dict[str, str] = {}
                propagate.inject(headers)  # the client's traceparent
                resp = await client.post("/runs", json=body, headers=headers)
            assert resp.status_code == 201, resp.text
            run_id: str = resp.json()["id"]

            async def finished() -> str | None:
                status: str = (await client.get(f"/runs/{run_id}")).json()["status"]
                return status if status in ("completed", "failed") else None

            assert await _until(finished, "the run to finish") == "failed"
        return run_id, span.get_span_context()
    finally:
        worker.stop()
        if working is not None:
            await asyncio.wait_for(working, DEADLINE_S)
        if isinstance(backend, AgentBackend):
            await backend.close()
        server.should_exit = True
        await asyncio.wait_for(serving, DEADLINE_S)
        await pool.close()


def _ids(traceparent: str | None) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent (its flags vary by SDK version:
    sampled, and random-trace-id in newer ones)."""
    assert traceparent is not None
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


@pytest.mark.parametrize("kind", ["database", "agent"])
def test_run_and_attempt_spans_link_api_worker_and_the_called_service(
    db_url: str, exporter: InMemorySpanExporter, recorder: str, kind: str, tmp_path: Path
) -> None:
    """The same with a database worker and with an agent (which gets the run's context as
    the claimed step's ``traceContext``)."""
    exporter.clear()
    body = {
        "goal": "traced",
        "steps": [
            {"name": "fetch", "tool": "HTTP_GET_JSON", "input": {"url": f"{recorder}/data"}},
            {"name": "after", "tool": "DELAY", "input": {"ms": 1}, "dependsOn": ["fetch"]},
            {
                "name": "flaky",
                "tool": "HTTP_GET_JSON",
                "input": {"url": f"{recorder}/fail"},
                "maxAttempts": 1,
            },
        ],
    }
    run_id, client = asyncio.run(_run_through_api_and_worker(db_url, body, kind, tmp_path))
    spans = exporter.get_finished_spans()

    # The run's span: a child of the client's, stored with the run.
    (run,) = _by_name(spans, "pgdag.run")
    assert run.kind == SpanKind.PRODUCER
    assert run.context.trace_id == client.trace_id
    assert run.parent is not None and run.parent.span_id == client.span_id
    assert run.attributes is not None
    assert run.attributes["pgdag.run_id"] == run_id and run.attributes["pgdag.steps"] == 3
    (row,) = query(db_url, "SELECT trace_context FROM runs WHERE id = %(id)s", {"id": run_id})
    trace_id = f"{client.trace_id:032x}"
    assert set(row["trace_context"]) == {"traceparent"}
    assert _ids(row["trace_context"]["traceparent"]) == (trace_id, f"{run.context.span_id:016x}")

    # One span per attempt, each a child of the run's, with what it was and came to.
    attempts = {s.attributes["pgdag.step"]: s for s in _by_name(spans, "pgdag.attempt")}  # type: ignore[index]
    assert set(attempts) == {"fetch", "after", "flaky"}
    for name, span in attempts.items():
        assert span.kind == SpanKind.CONSUMER
        assert span.context.trace_id == client.trace_id
        assert span.parent is not None and span.parent.span_id == run.context.span_id
        attributes = dict(span.attributes or {})
        assert attributes["pgdag.run_id"] == run_id and attributes["pgdag.attempt"] == 1
        assert attributes["pgdag.worker"] == "w-trace"
        assert attributes["pgdag.tool"] == ("DELAY" if name == "after" else "HTTP_GET_JSON")
    assert attempts["fetch"].attributes["pgdag.outcome"] == "succeeded"  # type: ignore[index]
    assert attempts["after"].attributes["pgdag.outcome"] == "succeeded"  # type: ignore[index]
    flaky = attempts["flaky"]
    assert flaky.attributes["pgdag.outcome"] == "failed"  # type: ignore[index]
    assert flaky.attributes["pgdag.dead_letter"] is True  # type: ignore[index]
    assert flaky.status.status_code == StatusCode.ERROR and "503" in (
        flaky.status.description or ""
    )
    assert attempts["fetch"].status.status_code == StatusCode.UNSET

    # HTTP_GET_JSON sent its attempt's span as the traceparent.
    sent = dict(_Recorder.seen)
    assert _ids(sent["/data"]) == (trace_id, f"{attempts['fetch'].context.span_id:016x}")
    assert _ids(sent["/fail"]) == (trace_id, f"{flaky.context.span_id:016x}")
    # and the run's events say nothing of it: tracing writes no audit rows
    kinds = [
        e["event"]
        for e in query(db_url, "SELECT event FROM audit_log WHERE run_id = %(id)s", {"id": run_id})
    ]
    assert json.dumps(kinds).count("trace") == 0


def test_lost_and_cancelled_attempts_end_their_spans_so(
    db_url: str, exporter: InMemorySpanExporter
) -> None:
    """An attempt whose lease went (re-claimed meanwhile) ends ``lease_lost``; one stopped
    by the worker ends ``cancelled``; both children of the context stored with the run."""
    exporter.clear()
    parent_trace, parent_span = "5" * 32, "6" * 16
    stored = {"traceparent": f"00-{parent_trace}-{parent_span}-01"}

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=4)
        store = Store(pool, lease_ttl_s=30)
        try:
            spec = parse_run(
                {"steps": [{"name": "slow", "tool": "DELAY", "input": {"ms": 60_000}}]},
                max_steps=10,
            )
            await store.create_run(spec, trace_context=stored)
            settings = Settings(database_url=db_url)
            worker = Worker(
                DatabaseBackend(store, settings, database_url=db_url, worker_id="w-lost"),
                settings,
                concurrency=2,
            )
            (old,) = await store.claim("w-lost", 10)
            assert old.trace_context == stored
            worker._start_attempt(old)
            old_task = worker._attempts[old.id].task
            assert old_task is not None
            await store.release([(old.id, old.lease_token)], worker_id="w-lost")
            (new,) = await store.claim("w-lost", 10)
            worker._start_attempt(new)  # the old attempt is dead: cancelled as lease_lost
            await asyncio.wait_for(asyncio.gather(old_task, return_exceptions=True), 10)
            new_task = worker._attempts[new.id].task
            assert new_task is not None
            new_task.cancel()  # what a shutdown does to an attempt past its grace
            await asyncio.gather(new_task, return_exceptions=True)
        finally:
            await pool.close()

    asyncio.run(go())
    attempts = sorted(
        _by_name(exporter.get_finished_spans(), "pgdag.attempt"),
        key=lambda s: s.attributes["pgdag.lease_token"],  # type: ignore[index]
    )
    assert [s.attributes["pgdag.outcome"] for s in attempts] == ["lease_lost", "cancelled"]  # type: ignore[index]
    for span in attempts:
        assert f"{span.context.trace_id:032x}" == parent_trace
        assert span.parent is not None and f"{span.parent.span_id:016x}" == parent_span
        assert span.status.status_code == StatusCode.ERROR
