"""The agent protocol (``POST /agent/*``, docs/agents.md) driven with raw HTTP calls only:
no pgdag worker code. The "agent" here is this test: it registers the tool ``agent.echo``,
which the API process has not loaded, claims, heartbeats and reports.

Each test runs a real `engine serve` on a real Postgres (lease TTL 2 s, reaper every 0.2 s:
tests/support.base_env)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.support import Proc, api_server, base_env, free_port, query, wait_for

ECHO = "agent.echo"


class RawAgent:
    """An agent written against the protocol alone: JSON over HTTP."""

    def __init__(self, client: httpx.Client, agent_id: str, tools: list[str]) -> None:
        self.client = client
        self.agent_id = agent_id
        self.tools = tools

    def post(self, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        r = self.client.post(path, json=body)
        assert r.status_code == status, (path, r.status_code, r.text)
        answer: dict[str, Any] = r.json()
        return answer

    def register(self, **extra: Any) -> dict[str, Any]:
        return self.post(
            "/agent/register",
            {"agentId": self.agent_id, "tools": self.tools, "concurrency": 4, **extra},
        )

    def claim(self, n: int = 10, wait_ms: int = 0) -> list[dict[str, Any]]:
        answer = self.post(
            "/agent/claim",
            {"agentId": self.agent_id, "tools": self.tools, "max": n, "waitMs": wait_ms},
        )
        steps: list[dict[str, Any]] = answer["steps"]
        return steps

    def heartbeat(self, *leases: tuple[int, int]) -> dict[str, Any]:
        return self.post(
            "/agent/heartbeat",
            {
                "agentId": self.agent_id,
                "leases": [{"stepId": s, "leaseToken": t} for s, t in leases],
            },
        )

    def report(self, *outcomes: dict[str, Any]) -> list[dict[str, Any]]:
        answer = self.post("/agent/report", {"agentId": self.agent_id, "outcomes": list(outcomes)})
        results: list[dict[str, Any]] = answer["results"]
        return results


def success(step: dict[str, Any], output: Any) -> dict[str, Any]:
    return {
        "stepId": step["stepId"],
        "leaseToken": step["leaseToken"],
        "status": "succeeded",
        "output": output,
    }


def submit(client: httpx.Client, steps: list[dict[str, Any]]) -> str:
    r = client.post("/runs", json={"steps": steps})
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def get_run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    r = client.get(f"/runs/{run_id}")
    assert r.status_code == 200, r.text
    run: dict[str, Any] = r.json()
    return run


def step_of(client: httpx.Client, run_id: str, name: str) -> dict[str, Any]:
    return next(s for s in get_run(client, run_id)["steps"] if s["name"] == name)


def drive(agent: RawAgent, client: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    """Claim and echo (``{"echo": input}``) until the run ends; returns what was claimed."""
    handed: list[dict[str, Any]] = []

    def finished() -> bool:
        for step in agent.claim(wait_ms=200):
            handed.append(step)
            [result] = agent.report(success(step, {"echo": step["input"]}))
            assert result["result"] == "recorded", result
        return get_run(client, run_id)["status"] in ("completed", "failed")

    wait_for(finished, timeout_s=30, interval_s=0, what=f"run {run_id} to end")
    return handed


def test_agent_only_pool_completes_a_dag_with_data_flow(client: httpx.Client) -> None:
    # Nobody has agent.echo yet: the API cannot check it, so it refuses the step.
    refused = client.post("/runs", json={"steps": [{"name": "a", "tool": ECHO, "input": {}}]})
    assert refused.status_code == 422
    assert refused.json()["problems"][0]["field"] == "tool"

    agent = RawAgent(client, "raw-agent-1", [ECHO])
    registered = agent.register(hostname="far-away", pid=42)
    assert registered == {
        "agentId": "raw-agent-1",
        "leaseTtlMs": 2000,
        "heartbeatIntervalMs": 667,
        "maxWaitMs": 30000,
    }
    run_id = submit(
        client,
        [
            {"name": "first", "tool": ECHO, "input": {"n": 1}},
            {
                "name": "second",
                "tool": ECHO,
                "dependsOn": ["first"],
                "input": {"got": {"$ref": "steps.first.output.echo.n"}},
            },
            {
                "name": "third",
                "tool": ECHO,
                "dependsOn": ["second"],
                "input": {"twice": {"$ref": "steps.second.output.echo"}},
            },
        ],
    )
    handed = drive(agent, client, run_id)
    run = get_run(client, run_id)
    assert run["status"] == "completed"
    assert [s["name"] for s in handed] == ["first", "second", "third"]
    first = handed[0]
    assert first["runId"] == run_id and first["tool"] == ECHO and first["attempt"] == 1
    assert first["idempotencyKey"] == f"{run_id}:first" and first["idempotent"] is True
    assert first["maxAttempts"] == 3 and first["timeoutMs"] is None
    assert {"stepId", "leaseToken", "leaseExpiresAt"} <= first.keys()
    assert handed[2]["input"] == {"twice": {"got": 1}}
    third = next(s for s in run["steps"] if s["name"] == "third")
    assert third["output"] == {"echo": {"twice": {"got": 1}}}
    events = client.get(f"/runs/{run_id}/events").json()["events"]
    assert {e["workerId"] for e in events if e["event"] == "step_succeeded"} == {"raw-agent-1"}

    [row] = [w for w in client.get("/workers").json()["workers"] if w["id"] == "raw-agent-1"]
    assert row["kind"] == "agent" and row["tools"] == [ECHO] and row["alive"] is True
    assert row["hostname"] == "far-away" and row["pid"] == 42

    # Shutdown: a lease handed back is ready again at once; a stopped agent claims nothing.
    run2 = submit(client, [{"name": "only", "tool": ECHO, "input": {}}])
    [step] = agent.claim()
    released = agent.post(
        "/agent/release",
        {
            "agentId": agent.agent_id,
            "leases": [{"stepId": step["stepId"], "leaseToken": step["leaseToken"]}],
        },
    )
    assert released == {"released": 1}
    assert step_of(client, run2, "only")["status"] == "ready"
    assert agent.post("/agent/stopped", {"agentId": agent.agent_id}) == {}
    refused_claim = agent.post(
        "/agent/claim", {"agentId": agent.agent_id, "tools": [ECHO], "max": 1}, status=409
    )
    assert refused_claim["error"] == "agent_not_registered"
    [row] = [w for w in client.get("/workers").json()["workers"] if w["id"] == "raw-agent-1"]
    assert row["status"] == "stopped"


def test_long_poll_wakes_on_notify(db_url: str, tmp_path: Path) -> None:
    # Re-polls every 30 s (and every third of a 60 s lease TTL): an answer within seconds can
    # only come from the NOTIFY.
    with (
        api_server(db_url, tmp_path, PGDAG_POLL_INTERVAL="30", PGDAG_LEASE_TTL="60") as base,
        httpx.Client(base_url=base, timeout=60) as client,
    ):
        agent = RawAgent(client, "poller", [ECHO])
        agent.register()
        started = time.monotonic()
        assert agent.claim(wait_ms=300) == []  # nothing ready: empty after waitMs
        assert time.monotonic() - started >= 0.3

        query(db_url, "UPDATE workers SET last_heartbeat_at = now() - interval '1 hour'")
        got: list[list[dict[str, Any]]] = []
        answered_at: list[float] = []

        def long_poll() -> None:
            with httpx.Client(base_url=base, timeout=60) as own:
                got.append(RawAgent(own, "poller", [ECHO]).claim(wait_ms=20_000))
                answered_at.append(time.monotonic())

        thread = threading.Thread(target=long_poll)
        thread.start()
        try:
            # The claim refreshed the agent's heartbeat: it is in the API, about to wait.
            wait_for(
                lambda: query(
                    db_url,
                    "SELECT 1 FROM workers WHERE id = 'poller' "
                    "AND last_heartbeat_at > now() - interval '1 minute'",
                ),
                what="the long-poll to reach the API",
            )
            submitted_at = time.monotonic()
            run_id = submit(client, [{"name": "wake", "tool": ECHO, "input": {}}])
        finally:
            thread.join(timeout=30)
        assert not thread.is_alive()
        [[step]] = got
        assert step["runId"] == run_id and step["name"] == "wake"
        assert answered_at[0] - submitted_at < 5, "woken by NOTIFY, not at waitMs (20 s)"


def test_heartbeat_fencing_duplicates_and_retry(client: httpx.Client, db_url: str) -> None:
    agent = RawAgent(client, "fenced", [ECHO])
    agent.register()
    run_id = submit(
        client,
        [{"name": "a", "tool": ECHO, "input": {}}, {"name": "b", "tool": ECHO, "input": {}}],
    )
    a, b = sorted(agent.claim(n=2), key=lambda s: s["name"])
    assert (a["name"], b["name"]) == ("a", "b")

    beat = agent.heartbeat((a["stepId"], a["leaseToken"]), (b["stepId"], b["leaseToken"]))
    assert [h["stepId"] for h in beat["held"]] == [a["stepId"], b["stepId"]]
    assert beat["held"][0]["leaseExpiresAt"] >= a["leaseExpiresAt"]
    assert beat["lost"] == []
    stale = agent.heartbeat((b["stepId"], b["leaseToken"] + 1000))
    assert stale == {
        "held": [],
        "lost": [{"stepId": b["stepId"], "leaseToken": b["leaseToken"] + 1000}],
    }

    # Keep b alive; let a's lease run out (2 s) until the reaper requeues it.
    def a_reaped() -> bool:
        assert agent.heartbeat((b["stepId"], b["leaseToken"]))["lost"] == []
        return step_of(client, run_id, "a")["status"] == "ready"

    wait_for(a_reaped, timeout_s=20, interval_s=0.2, what="a's lease to expire and be reaped")

    late, on_time = agent.report(success(a, {"late": True}), success(b, {"on": "time"}))
    assert late["result"] == "refused" and late["code"] == "lease_lost", late
    assert late["stepId"] == a["stepId"] and "message" in late
    assert on_time == {"stepId": b["stepId"], "leaseToken": b["leaseToken"], "result": "recorded"}
    assert agent.heartbeat((a["stepId"], a["leaseToken"]))["held"] == []

    # b's answer was "lost": the agent reports it again, and nothing is written twice.
    [again] = agent.report(success(b, {"on": "time"}))
    assert again["result"] == "recorded" and again["duplicate"] is True
    succeeded = query(
        db_url,
        "SELECT count(*) AS n FROM audit_log WHERE step_name = 'b' AND event = 'step_succeeded'",
    )
    assert succeeded[0]["n"] == 1
    assert step_of(client, run_id, "b")["output"] == {"on": "time"}

    # a again, attempt 2: a retryable failure goes back to ready with a later availableAt.
    [a2] = wait_for(lambda: agent.claim(wait_ms=200), what="a to be claimed again")
    assert a2["name"] == "a" and a2["attempt"] == 2 and a2["leaseToken"] > a["leaseToken"]
    failure = {
        "stepId": a2["stepId"],
        "leaseToken": a2["leaseToken"],
        "status": "failed",
        "error": "upstream said 503",
        "retryable": True,
    }
    [failed] = agent.report(failure)
    assert failed["result"] == "recorded" and failed["deadLetter"] is False, failed
    assert "retryAt" in failed
    after = step_of(client, run_id, "a")
    assert after["status"] == "ready" and after["attempt"] == 2
    assert after["error"] == "upstream said 503"
    assert after["availableAt"] is not None
    # The same failure again (its answer was lost): recorded before, nothing written twice.
    [twice] = agent.report(failure)
    assert twice.pop("duplicate") is True
    assert datetime.fromisoformat(twice.pop("retryAt")) == datetime.fromisoformat(failed["retryAt"])
    assert twice == {k: v for k, v in failed.items() if k != "retryAt"}
    # Under a token this agent never failed with: refused.
    [other] = agent.report({**failure, "leaseToken": a["leaseToken"]})
    assert other["result"] == "refused" and other["code"] == "lease_lost"
    scheduled = query(
        db_url,
        "SELECT count(*) AS n FROM audit_log WHERE step_name = 'a' "
        "AND event = 'step_retry_scheduled'",
    )
    assert scheduled[0]["n"] == 1

    # The last attempt fails for good: dead letter, and the run fails.
    [a3] = wait_for(lambda: agent.claim(wait_ms=200), what="a's third attempt")
    [dead] = agent.report({**failure, "stepId": a3["stepId"], "leaseToken": a3["leaseToken"]})
    assert dead["result"] == "recorded" and dead["deadLetter"] is True and "retryAt" not in dead
    assert get_run(client, run_id)["status"] == "failed"


def test_api_finishes_input_errors_and_map_steps_itself(client: httpx.Client) -> None:
    agent = RawAgent(client, "mapper", [ECHO])
    agent.register()
    run_id = submit(
        client,
        [
            {"name": "src", "tool": ECHO, "input": {"items": [10, 20]}},
            {
                "name": "fan",
                "tool": ECHO,
                "dependsOn": ["src"],
                "map": {"$ref": "steps.src.output.echo.items"},
                "input": {"n": {"$ref": "item"}, "i": {"$ref": "index"}},
            },
            {
                "name": "bad",
                "tool": ECHO,
                "dependsOn": ["src"],
                "input": {"v": {"$ref": "steps.src.output.nope"}},
            },
        ],
    )
    handed = drive(agent, client, run_id)
    assert sorted(s["name"] for s in handed) == ["fan[0]", "fan[1]", "src"]
    assert sorted((s["input"]["i"], s["input"]["n"]) for s in handed if s["name"] != "src") == [
        (0, 10),
        (1, 20),
    ]
    run = get_run(client, run_id)
    steps = {s["name"]: s for s in run["steps"]}
    assert run["status"] == "failed"  # bad is a dead letter
    assert steps["bad"]["status"] == "dead_letter" and steps["bad"]["attempt"] == 1
    assert "cannot be resolved" in steps["bad"]["error"]
    assert steps["fan"]["status"] == "succeeded"
    assert steps["fan"]["output"] == [{"echo": {"n": 10, "i": 0}}, {"echo": {"n": 20, "i": 1}}]


def test_output_refused_fails_that_outcome_only(client: httpx.Client) -> None:
    agent = RawAgent(client, "nul-agent", [ECHO])
    agent.register()
    run_id = submit(
        client,
        [
            {"name": "x", "tool": ECHO, "input": {}},
            {"name": "y", "tool": ECHO, "input": {}},
            {"name": "z", "tool": ECHO, "input": {}},
        ],
    )
    x, y, z = sorted(agent.claim(n=3), key=lambda s: s["name"])
    bad, good, failed = agent.report(
        success(x, {"text": "a\u0000b"}),
        success(y, {"fine": 1}),
        {
            "stepId": z["stepId"],
            "leaseToken": z["leaseToken"],
            "status": "failed",
            "error": "nul\u0000in the error",
            "retryable": False,
        },
    )
    assert bad["result"] == "refused" and bad["code"] == "output_refused", bad
    assert good["result"] == "recorded"
    assert failed["result"] == "recorded" and failed["deadLetter"] is True
    steps = {s["name"]: s for s in get_run(client, run_id)["steps"]}
    assert steps["x"]["status"] == "dead_letter" and "output.text" in steps["x"]["error"]
    assert steps["y"]["status"] == "succeeded"
    assert steps["z"]["status"] == "dead_letter" and steps["z"]["error"].startswith("nul")


def test_malformed_bodies_and_unknown_agents(db_url: str, tmp_path: Path) -> None:
    with (
        api_server(db_url, tmp_path, PGDAG_AGENT_MAX_WAIT="1") as base,
        httpx.Client(base_url=base, timeout=60) as client,
    ):

        def fields(path: str, body: Any) -> list[str]:
            r = client.post(path, json=body)
            assert r.status_code == 422, (path, body, r.status_code, r.text)
            assert r.json()["error"] == "invalid_request"
            return [p["field"] for p in r.json()["problems"]]

        claim = {"agentId": "ok", "tools": [ECHO], "max": 1}
        assert fields(
            "/agent/register", {"agentId": "bad id!", "tools": [ECHO], "concurrency": 1}
        ) == ["agentId"]
        assert fields("/agent/register", {"agentId": "a", "tools": [], "concurrency": 1}) == [
            "tools"
        ]
        assert fields("/agent/register", {"agentId": "a", "tools": [ECHO], "concurrency": 0}) == [
            "concurrency"
        ]
        assert fields("/agent/claim", {**claim, "max": 0}) == ["max"]
        assert fields("/agent/claim", {**claim, "max": "3"}) == ["max"]
        assert fields("/agent/claim", {**claim, "waitMs": 5000}) == ["waitMs"]
        assert fields("/agent/claim", {**claim, "extra": 1}) == ["extra"]
        assert fields("/agent/claim", {"tools": [ECHO], "max": 1}) == ["agentId"]
        assert fields("/agent/heartbeat", {"agentId": "ok", "leases": {}}) == ["leases"]
        lease = {"stepId": 1, "leaseToken": 1}
        assert fields("/agent/heartbeat", {"agentId": "ok", "leases": [lease, lease]}) == [
            "leases.1.stepId"
        ]
        assert fields("/agent/report", {"agentId": "ok", "outcomes": []}) == ["outcomes"]
        assert fields(
            "/agent/report", {"agentId": "ok", "outcomes": [{**lease, "status": "done"}]}
        ) == ["outcomes.0"]
        problems = fields(
            "/agent/report", {"agentId": "ok", "outcomes": [{**lease, "status": "failed"}]}
        )
        assert sorted(problems) == ["outcomes.0.failed.error", "outcomes.0.failed.retryable"]
        assert fields("/agent/release", {"agentId": "ok"}) == ["leases"]
        r = client.post(
            "/agent/claim", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["problems"][0]["field"] == "body"

        r = client.post("/agent/claim", json={**claim, "agentId": "never-registered"})
        assert r.status_code == 409 and r.json()["error"] == "agent_not_registered"
        r = client.post("/agent/heartbeat", json={"agentId": "never-registered", "leases": []})
        assert r.status_code == 409
        assert (
            client.post(
                "/agent/register", json={"agentId": "ok", "tools": [ECHO], "concurrency": 1}
            ).json()["maxWaitMs"]
            == 1000
        )
        doc = client.get("/openapi.json").json()
        assert {"/agent/register", "/agent/claim", "/agent/heartbeat", "/agent/report"} <= set(
            doc["paths"]
        )


def test_sigterm_cuts_a_long_poll_after_the_grace(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    proc = Proc(
        ["-m", "engine", "serve", "--port", str(port)],
        base_env(db_url, PGDAG_SHUTDOWN_GRACE="1", PGDAG_POLL_INTERVAL="30"),
        tmp_path / "api.log",
    )
    base = f"http://127.0.0.1:{port}"
    outcome: list[object] = []
    try:
        wait_for(lambda: _healthy(base, proc), what="API health")
        with httpx.Client(base_url=base, timeout=60) as client:
            RawAgent(client, "sleeper", [ECHO]).register()
        query(db_url, "UPDATE workers SET last_heartbeat_at = now() - interval '1 hour'")

        def long_poll() -> None:
            with httpx.Client(base_url=base, timeout=60) as own:
                try:
                    outcome.append(RawAgent(own, "sleeper", [ECHO]).claim(wait_ms=25_000))
                except httpx.HTTPError as exc:  # the connection closed under it
                    outcome.append(exc)

        thread = threading.Thread(target=long_poll)
        thread.start()
        wait_for(
            lambda: query(
                db_url,
                "SELECT 1 FROM workers WHERE id = 'sleeper' "
                "AND last_heartbeat_at > now() - interval '1 minute'",
            ),
            what="the long-poll to reach the API",
        )
        stopping = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.popen.wait(timeout=15)
        assert time.monotonic() - stopping < 10, "SIGTERM waited out the 25 s long-poll"
        thread.join(timeout=15)
        assert outcome == [[]], outcome  # an empty claim, as if its wait had run out
    finally:
        proc.stop()


def _healthy(base: str, proc: Proc) -> bool:
    if proc.popen.poll() is not None:
        raise AssertionError("API exited:\n" + proc.output())
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_an_agent_waiting_longer_than_the_lease_ttl_stays_alive(
    client: httpx.Client, db_url: str
) -> None:
    agent = RawAgent(client, "patient", [ECHO])
    agent.register()
    assert agent.claim(wait_ms=3000) == []  # 1.5 lease TTLs
    [row] = query(
        db_url,
        "SELECT now() - last_heartbeat_at < interval '1.5 seconds' AS fresh "
        "FROM workers WHERE id = 'patient'",
    )
    assert row["fresh"], "the row was not refreshed during the wait"
    [seen] = [w for w in client.get("/workers").json()["workers"] if w["id"] == "patient"]
    assert seen["alive"] is True
    # Its tool is still accepted by POST /runs.
    submit(client, [{"name": "later", "tool": ECHO, "input": {}}])


def test_a_silent_agents_step_goes_to_another_agent(client: httpx.Client) -> None:
    """An agent that dies mid-step stops heartbeating: its lease expires, the reaper
    requeues the step, another agent's long-poll gets it (a new attempt and token), and
    the dead one's late report is refused."""
    dead, alive = RawAgent(client, "dies", [ECHO]), RawAgent(client, "lives", [ECHO])
    dead.register()
    alive.register()
    run_id = submit(client, [{"name": "job", "tool": ECHO, "input": {"n": 7}}])
    [first] = dead.claim()
    [second] = wait_for(lambda: alive.claim(wait_ms=1000), what="the step to be handed over")
    assert second["stepId"] == first["stepId"] and second["attempt"] == 2
    assert second["leaseToken"] > first["leaseToken"]
    assert second["idempotencyKey"] == first["idempotencyKey"]
    [late] = dead.report(success(first, {"from": "the dead"}))
    assert late["result"] == "refused" and late["code"] == "lease_lost"
    [ok] = alive.report(success(second, {"from": "the living"}))
    assert ok["result"] == "recorded"
    run = get_run(client, run_id)
    assert run["status"] == "completed"
    assert run["steps"][0]["output"] == {"from": "the living"}
    events = [e["event"] for e in client.get(f"/runs/{run_id}/events").json()["events"]]
    assert events.count("step_succeeded") == 1


def _token(db_url: str, name: str, scope: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "engine", "token", "create", name, "--scope", scope],
        env=base_env(db_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_an_agent_token_runs_the_protocol_and_nothing_else(db_url: str, tmp_path: Path) -> None:
    agent_token = _token(db_url, "laptop", "agent")
    submit_token = _token(db_url, "ci", "submit")
    with api_server(db_url, tmp_path) as base:
        agent_client = httpx.Client(
            base_url=base, timeout=60, headers={"Authorization": f"Bearer {agent_token}"}
        )
        submit_client = httpx.Client(
            base_url=base, timeout=60, headers={"Authorization": f"Bearer {submit_token}"}
        )
        with agent_client, submit_client:
            agent = RawAgent(agent_client, "tokened", [ECHO])
            agent.register()
            run_id = submit(submit_client, [{"name": "t", "tool": ECHO, "input": {"x": 1}}])
            [step] = agent.claim(wait_ms=2000)
            beat = agent.heartbeat((step["stepId"], step["leaseToken"]))
            assert beat["lost"] == []
            [result] = agent.report(success(step, {"ok": True}))
            assert result["result"] == "recorded"
            assert get_run(submit_client, run_id)["status"] == "completed"
            # Outside their scopes: an agent token submits nothing, a submit token claims
            # nothing; without a token, nothing at all.
            r = agent_client.post("/runs", json={"steps": [{"name": "x", "tool": ECHO}]})
            assert r.status_code == 403 and r.json()["error"] == "forbidden"
            r = submit_client.post(
                "/agent/claim", json={"agentId": "tokened", "tools": [ECHO], "max": 1}
            )
            assert r.status_code == 403 and r.json()["error"] == "forbidden"
            r = httpx.post(f"{base}/agent/register", json={}, timeout=10)
            assert r.status_code == 401


def test_an_agent_cannot_touch_another_agents_lease(client: httpx.Client, db_url: str) -> None:
    """Lease tokens are sequential, so knowing one proves nothing: only the agent that
    claimed an attempt may heartbeat, end or release it, and a success recorded by one
    agent is not a "duplicate" for another."""
    owner = RawAgent(client, "owner", [ECHO])
    thief = RawAgent(client, "thief", [ECHO])
    owner.register()
    thief.register()
    run_id = submit(
        client,
        [{"name": "a", "tool": ECHO, "input": {}}, {"name": "b", "tool": ECHO, "input": {}}],
    )
    a, b = sorted(owner.claim(n=2), key=lambda s: s["name"])
    lease_a = (a["stepId"], a["leaseToken"])

    beat = thief.heartbeat(lease_a)
    assert beat == {"held": [], "lost": [{"stepId": a["stepId"], "leaseToken": a["leaseToken"]}]}
    stolen_success, stolen_failure = thief.report(
        success(a, {"stolen": True}),
        {
            "stepId": b["stepId"],
            "leaseToken": b["leaseToken"],
            "status": "failed",
            "error": "sabotage",
            "retryable": False,
        },
    )
    for result, step in ((stolen_success, a), (stolen_failure, b)):
        assert result["result"] == "refused" and result["code"] == "not_owner", result
        assert result["stepId"] == step["stepId"]
    released = thief.post(
        "/agent/release",
        {
            "agentId": thief.agent_id,
            "leases": [{"stepId": a["stepId"], "leaseToken": a["leaseToken"]}],
        },
    )
    assert released == {"released": 0}
    # Nothing was written: both still run under the owner's leases.
    rows = query(
        db_url,
        "SELECT name, status, lease_owner FROM steps WHERE run_id = %(r)s ORDER BY name",
        {"r": run_id},
    )
    assert [(r["name"], r["status"], r["lease_owner"]) for r in rows] == [
        ("a", "running", "owner"),
        ("b", "running", "owner"),
    ]
    assert owner.heartbeat(lease_a)["lost"] == []

    # The owner records a; the thief's "re-send" of it is no duplicate of its own.
    [mine] = owner.report(success(a, {"mine": True}))
    assert mine["result"] == "recorded", mine
    [late_thief] = thief.report(success(a, {"mine": True}))
    assert late_thief["result"] == "refused" and late_thief["code"] == "not_owner", late_thief
    [again] = owner.report(success(a, {"mine": True}))
    assert again["result"] == "recorded" and again["duplicate"] is True
    assert step_of(client, run_id, "a")["output"] == {"mine": True}
    events = query(
        db_url,
        "SELECT count(*) AS n FROM audit_log WHERE run_id = %(r)s AND worker_id = 'thief'",
        {"r": run_id},
    )
    assert events[0]["n"] == 0
