"""`engine.client` against a real API (`engine serve`), real workers and a real Postgres:
every method of `Client` and `AsyncClient`, `watch` resuming exactly after its connection is
cut (through `chaos.proxy.TcpProxy`), and every typed error from a real answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chaos.proxy import TcpProxy
from engine.client import (
    ApiUnreachable,
    AsyncClient,
    Client,
    Conflict,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    PgdagApiError,
    RequestRefused,
    Run,
    Unauthorized,
    Unavailable,
    WaitTimeout,
    index,
    item,
)
from tests.pgfixtures import Database, create_database, drop_database, unique_name
from tests.support import (
    Proc,
    api_server,
    base_env,
    free_port,
    wait_for,
    wait_run_finished,
    workers,
)

TOOLS = {"PGDAG_TOOLS": "tests.testtools"}
WAIT_S = 60


def chain(goal: str = "chain") -> Run:
    """first -> second, second's input from first's output."""
    run = Run(goal=goal)
    first = run.step("first", "DELAY", ms=20)
    run.step("second", "DELAY", ms=first.output["tookMs"])
    return run


def gated(gate: Path, *, max_attempts: int = 100) -> Run:
    """before -> gate (fails until the file `gate` exists) -> after."""
    run = Run(goal="gated")
    before = run.step("before", "DELAY", ms=0)
    g = run.step(
        "gate",
        "TEST_FAIL_UNTIL_FILE",
        path=str(gate),
        depends_on=[before],
        max_attempts=max_attempts,
    )
    run.step("after", "DELAY", ms=0, depends_on=[g])
    return run


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A real API with the test tools, and one worker, on `db_url`."""
    with api_server(db_url, tmp_path, **TOOLS) as base, workers(db_url, tmp_path, n=1, **TOOLS):
        yield base


# --- every method ---------------------------------------------------------------------------


def test_submit_get_wait_and_events(api: str) -> None:
    run = chain()
    run_with_key = Run(goal="keyed", idempotency_key="client-1")
    run_with_key.step("only", "DELAY", ms=1)
    with Client(api) as client:
        submitted = client.submit(run)
        assert submitted.created and submitted.run["stepsTotal"] == 2
        assert submitted.run["steps"][1]["input"] == {"ms": {"$ref": "steps.first.output.tookMs"}}
        done = client.wait(submitted.id, timeout_s=WAIT_S)
        assert done["status"] == "completed"
        assert [s["output"]["ok"] for s in done["steps"]] == [True, True]
        assert done == client.get(submitted.id)
        # the same key and payload: the same run, not created again
        first = client.submit(run_with_key)
        again = client.submit(run_with_key.to_dict())
        assert first.created and not again.created and again.id == first.id
        keyed = client.submit(chain(), idempotency_key="client-2")
        assert keyed.run["idempotencyKey"] == "client-2"

        events = client.events(submitted.id)
        assert events[0]["event"] == "run_created" and events[-1]["event"] == "run_completed"
        ids = [e["id"] for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert client.events(submitted.id, page_size=2) == events  # read 2 at a time
        assert client.events(submitted.id, after=ids[2], page_size=3) == events[3:]
        # a finished run: wait answers from the snapshot at once
        assert client.wait(submitted.id, timeout_s=5)["status"] == "completed"


def test_cancel_retry_replay_and_retry_dead_letters(api: str, tmp_path: Path) -> None:
    with Client(api) as client:
        # cancel: a run that waits for a long time
        slow = Run(goal="slow")
        slow.step("sleep", "DELAY", ms=60_000)
        slow_id = client.submit(slow).id
        cancelled = client.cancel(slow_id)
        assert cancelled["status"] == "cancelled" and cancelled["id"] == slow_id

        # retry: a step dead-lettered at its first failure, fixed, retried by hand
        gate = tmp_path / "gate-1"
        run_id = client.submit(gated(gate, max_attempts=1)).id
        failed = client.wait(run_id, timeout_s=WAIT_S)
        assert failed["status"] == "failed"
        assert {s["name"]: s["status"] for s in failed["steps"]}["gate"] == "dead_letter"
        gate.touch()
        retried = client.retry(run_id, "gate")
        assert {s["name"]: s["status"] for s in retried["steps"]}["gate"] in ("ready", "running")
        assert client.wait(run_id, timeout_s=WAIT_S)["status"] == "completed"

        # replay: from the middle; upstream kept, the rest run again
        replayed = client.replay(run_id, "gate", reason="the gate changed")
        assert replayed["status"] == "running"
        assert client.wait(run_id, timeout_s=WAIT_S)["status"] == "completed"
        replays = [e for e in client.events(run_id) if e["event"] == "step_replayed"]
        assert {e["stepName"] for e in replays} == {"gate", "after"}
        assert {e["detail"]["reason"] for e in replays} == {"the gate changed"}

        # retry_dead_letters: dry run lists, the real one retries
        gate2 = tmp_path / "gate-2"
        other = client.submit(gated(gate2, max_attempts=1)).id
        assert client.wait(other, timeout_s=WAIT_S)["status"] == "failed"
        dry = client.retry_dead_letters(tool="TEST_FAIL_UNTIL_FILE", dry_run=True)
        assert dry["dryRun"] is True and dry["retried"] == [{"runId": other, "stepName": "gate"}]
        assert client.get(other)["status"] == "failed"  # nothing changed
        gate2.touch()
        done = client.retry_dead_letters(
            tool="TEST_FAIL_UNTIL_FILE", run_status="failed", limit=10, reason="fixed"
        )
        assert done == {
            "dryRun": False,
            "matched": 1,
            "retried": [{"runId": other, "stepName": "gate"}],
            "refused": [],
        }
        assert client.wait(other, timeout_s=WAIT_S)["status"] == "completed"


def test_the_async_client_has_the_same_methods(api: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        async with AsyncClient(api) as client:
            submitted = await client.submit(chain("async"))
            assert submitted.created
            messages = [m async for m in client.watch(submitted.id)]
            assert messages[0]["type"] == "snapshot"
            assert messages[-1]["event"]["event"] == "run_completed"
            done = await client.wait(submitted.id, timeout_s=WAIT_S)
            assert done == await client.get(submitted.id)
            events = await client.events(submitted.id, page_size=2)
            watched = [m["event"]["id"] for m in messages[1:]]
            after = messages[0]["lastEventId"]
            assert watched == [e["id"] for e in events if e["id"] > after]

            run_id = (await client.submit(gated(gate, max_attempts=1))).id
            assert (await client.wait(run_id, timeout_s=WAIT_S))["status"] == "failed"
            listed = await client.retry_dead_letters(dry_run=True)
            assert listed["retried"] == [{"runId": run_id, "stepName": "gate"}]
            gate.touch()
            await client.retry(run_id, "gate")
            assert (await client.wait(run_id, timeout_s=WAIT_S))["status"] == "completed"
            await client.replay(run_id, "after")
            assert (await client.wait(run_id, timeout_s=WAIT_S))["status"] == "completed"

            slow = Run()
            slow.step("sleep", "DELAY", ms=60_000)
            slow_id = (await client.submit(slow)).id
            with pytest.raises(WaitTimeout) as info:
                await client.wait(slow_id, timeout_s=0.5)
            assert info.value.run_id == slow_id and info.value.last_status in ("pending", "running")
            assert (await client.cancel(slow_id))["status"] == "cancelled"
            with pytest.raises(Conflict):
                await client.cancel(slow_id)

    asyncio.run(scenario())


def test_a_map_run_built_in_python_runs(api: str) -> None:
    run = Run(goal="map")
    src = run.step("src", "TEST_EMIT", value=[{"ms": 1}, {"ms": 2}, {"ms": 3}])
    run.step("each", "TEST_ECHO", map=src.output, ms=item["ms"], at=index)
    with Client(api) as client:
        done = client.wait(client.submit(run).id, timeout_s=WAIT_S)
    assert done["status"] == "completed", done
    each = {s["name"]: s for s in done["steps"]}["each"]
    assert [o["got"] for o in each["output"]] == [
        {"ms": 1, "at": 0},
        {"ms": 2, "at": 1},
        {"ms": 3, "at": 2},
    ]


# --- watch resumes after a cut connection --------------------------------------------------


def test_watch_resumes_after_the_connection_is_cut_nothing_lost_or_repeated(
    db_url: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with (
        api_server(db_url, tmp_path, **TOOLS) as base,
        TcpProxy("127.0.0.1", int(base.rsplit(":", 1)[1])) as proxy,
        workers(db_url, tmp_path, n=1, **TOOLS),
        Client(f"http://127.0.0.1:{proxy.port}") as client,
    ):
        run_id = client.submit(gated(gate)).id
        drops: list[Exception] = []
        stream = client.watch(run_id, on_disconnect=drops.append)
        snapshot = next(stream)
        assert snapshot["type"] == "snapshot" and snapshot["run"]["id"] == run_id
        seen: list[dict[str, Any]] = []
        while not any(e["stepName"] == "gate" and e["toStatus"] == "ready" for e in seen[-1:]):
            message = next(stream)  # until the gate has failed once (it retries meanwhile)
            assert message["type"] == "event"
            seen.append(message["event"])
        assert proxy.drop_all() >= 1  # cut mid-stream
        before_cut = len(seen)
        gate.touch()  # the run goes on, and ends, while the watcher is cut off
        wait_run_finished(db_url, run_id)
        seen.extend(m["event"] for m in stream)  # reconnects with ?after= and reads to the end

        assert len(drops) == 1, drops
        assert seen[-1]["event"] == "run_completed"
        ids = [e["id"] for e in seen]
        logged = client.events(run_id, after=snapshot["lastEventId"])
        assert ids == [e["id"] for e in logged]  # every event once, in order
        assert len(ids) > before_cut + 3  # ... including those of the time it was cut off


def test_async_watch_resumes_after_the_connection_is_cut(db_url: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario(base: str, proxy: TcpProxy) -> tuple[list[int], list[int], int]:
        drops: list[Exception] = []
        async with AsyncClient(base) as client:
            run_id = (await client.submit(gated(gate))).id
            ids: list[int] = []
            last = 0
            async for message in client.watch(run_id, on_disconnect=drops.append):
                if message["type"] == "snapshot":
                    last = message["lastEventId"]
                    continue
                ids.append(message["event"]["id"])
                if message["event"]["toStatus"] == "ready" and not gate.exists():
                    await asyncio.to_thread(proxy.drop_all)
                    gate.touch()
            logged = await client.events(run_id, after=last)
        return ids, [e["id"] for e in logged], len(drops)

    with (
        api_server(db_url, tmp_path, **TOOLS) as base,
        TcpProxy("127.0.0.1", int(base.rsplit(":", 1)[1])) as proxy,
        workers(db_url, tmp_path, n=1, **TOOLS),
    ):
        ids, logged, drops = asyncio.run(scenario(f"http://127.0.0.1:{proxy.port}", proxy))
    assert drops == 1
    assert ids == logged


# --- every typed error, from a real answer -------------------------------------------------


def test_typed_errors_404_409_422(api: str) -> None:
    ghost = str(uuid.uuid4())
    with Client(api) as client:
        for call in (
            lambda: client.get(ghost),
            lambda: client.get("not-a-uuid"),
            lambda: client.events(ghost),
            lambda: client.cancel(ghost),
            lambda: client.retry(ghost, "x"),
            lambda: client.replay(ghost, "x"),
            lambda: client.wait(ghost, timeout_s=10),
            lambda: next(client.watch(ghost)),
        ):
            with pytest.raises(NotFound) as info:
                call()
            assert (info.value.status, info.value.code) == (404, "not_found")
            assert "no run" in info.value.message

        run_id = client.submit(chain()).id
        client.wait(run_id, timeout_s=WAIT_S)
        with pytest.raises(Conflict) as conflict:
            client.cancel(run_id)
        assert (conflict.value.status, conflict.value.code) == (409, "illegal_transition")
        assert "already completed" in str(conflict.value)
        with pytest.raises(Conflict, match="only dead-lettered steps can be retried"):
            client.retry(run_id, "second")
        with pytest.raises(NotFound):
            client.retry(run_id, "no-such-step")

        bad = {
            "steps": [
                {"name": "a", "tool": "DELAY", "input": {"ms": -1}},
                {"name": "b", "tool": "SEND_EMAIL", "input": {}, "dependsOn": ["a"]},
            ]
        }
        with pytest.raises(InvalidRequest) as invalid:
            client.submit(bad)
        assert type(invalid.value) is InvalidRequest
        assert (invalid.value.status, invalid.value.code) == (422, "invalid_request")
        assert [(p["step"], p["field"]) for p in invalid.value.problems] == [
            ("a", "input.ms"),
            ("b", "tool"),
        ]
        with pytest.raises(InvalidRequest) as bad_filter:
            client.retry_dead_letters(since="last tuesday")
        assert bad_filter.value.problems[0]["field"] == "since"
        with pytest.raises(InvalidRequest):
            client.events(run_id, page_size=0)

        key = Run(idempotency_key="reused")
        key.step("one", "DELAY", ms=1)
        client.submit(key)
        other = Run(idempotency_key="reused")
        other.step("two", "DELAY", ms=2)
        with pytest.raises(IdempotencyKeyReused) as reused:
            client.submit(other)
        assert isinstance(reused.value, InvalidRequest)
        assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
        assert reused.value.problems[0]["field"] == "idempotencyKey"

        with pytest.raises(WaitTimeout) as timeout:
            slow = Run()
            slow.step("sleep", "DELAY", ms=60_000)
            slow_id = client.submit(slow).id
            client.wait(slow_id, timeout_s=0.5)
        assert isinstance(timeout.value, TimeoutError)
        assert timeout.value.run_id == slow_id
        assert timeout.value.last_status in ("pending", "running")
        assert f"run {slow_id} did not finish within 0.5 s" in str(timeout.value)


def test_typed_errors_401_with_a_token_set(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path, PGDAG_API_TOKEN="s3cret") as base:
        for token in (None, "wrong"):
            with Client(base, token) as client:
                with pytest.raises(Unauthorized) as info:
                    client.get(str(uuid.uuid4()))
                assert (info.value.status, info.value.code) == (401, "unauthorized")
                with pytest.raises(Unauthorized):
                    client.submit(chain())
                with pytest.raises(Unauthorized):
                    next(client.watch(str(uuid.uuid4())))
        with Client(base, "s3cret") as client:
            run_id = client.submit(chain()).id  # the token goes on POSTs, GETs and the socket
            assert next(client.watch(run_id))["run"]["id"] == run_id
            assert client.get(run_id)["id"] == run_id


def test_typed_errors_415_and_421_from_what_sits_between(api: str) -> None:
    def plain_text(request: httpx.Request) -> None:  # a proxy that rewrites the type
        request.headers["Content-Type"] = "text/plain"

    with (
        httpx.Client(event_hooks={"request": [plain_text]}) as mangled,
        Client(api, http_client=mangled) as client,
        pytest.raises(RequestRefused) as info,
    ):
        client.submit(chain())
    assert (info.value.status, info.value.code) == (415, "unsupported_media_type")

    with (
        httpx.Client(headers={"Host": "pgdag.example.com"}) as elsewhere,
        Client(api, http_client=elsewhere) as client,
        pytest.raises(RequestRefused) as info,
    ):
        client.get(str(uuid.uuid4()))
    assert (info.value.status, info.value.code) == (421, "host_not_allowed")
    assert "PGDAG_ALLOWED_HOSTS" in info.value.message


@pytest.fixture
def empty_db(pg_server_url: str) -> Iterator[Database]:
    """A database with no pgdag schema at all."""
    db = create_database(pg_server_url, unique_name("unmigrated_"))
    try:
        yield db
    finally:
        drop_database(pg_server_url, db.name)


def test_typed_error_503_from_an_unmigrated_database(empty_db: Database, tmp_path: Path) -> None:
    port = free_port()
    proc = Proc(
        ["-m", "engine", "serve", "--port", str(port)], base_env(empty_db.url), tmp_path / "api.log"
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError("API exited:\n" + proc.output())
        try:
            return httpx.get(f"{base}/health", timeout=5).status_code == 503
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, timeout_s=30, what="the API to answer")
        with Client(base) as client:
            for call in (
                lambda: client.get(str(uuid.uuid4())),
                lambda: client.submit(chain()),
                lambda: next(client.watch(str(uuid.uuid4()))),  # refused handshake, explained
            ):
                with pytest.raises(Unavailable) as info:
                    call()
                assert (info.value.status, info.value.code) == (503, "schema_not_current")
                assert "python -m engine migrate" in info.value.message
    finally:
        proc.stop()


def test_an_api_that_does_not_answer_is_unreachable() -> None:
    base = f"http://127.0.0.1:{free_port()}"
    with Client(base) as client:
        with pytest.raises(ApiUnreachable, match=f"cannot reach the API at {base}"):
            client.get(str(uuid.uuid4()))
        with pytest.raises(ApiUnreachable, match=f"cannot reach the API at {base}"):
            next(client.watch(str(uuid.uuid4())))
    assert not issubclass(ApiUnreachable, PgdagApiError)


def test_a_bad_base_url_is_named() -> None:
    with pytest.raises(ValueError, match="base_url must be http"):
        Client("127.0.0.1:4000")
