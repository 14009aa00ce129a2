"""The agent protocol's request models (engine/agents.py) and PGDAG_AGENT_MAX_WAIT: what a
body may hold, and that a refusal names the field. No database."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from engine.agents import (
    ClaimRequest,
    Failed,
    HeartbeatRequest,
    RegisterRequest,
    ReportRequest,
    Succeeded,
    _without_outputs,
)
from engine.config import AGENT_MAX_WAIT_S_DEFAULT, Settings
from engine.errors import ConfigError


def _fields(model: Any, body: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]


def test_register_accepts_the_documented_body() -> None:
    body = RegisterRequest.model_validate(
        {
            "agentId": "host-1.example:agent@2",
            "tools": ["DELAY", "text.upper"],
            "concurrency": 8,
            "hostname": "h",
            "pid": 12,
            "restarts": 3,
            "lastExitCode": -9,
        }
    )
    assert (body.agent_id, body.concurrency, body.restarts, body.last_exit_code) == (
        "host-1.example:agent@2",
        8,
        3,
        -9,
    )
    bare = RegisterRequest.model_validate({"agentId": "a", "tools": ["X"], "concurrency": 1})
    assert (bare.hostname, bare.pid, bare.restarts, bare.last_exit_code) == (None, None, 0, None)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"agentId": ""}, "agentId"),
        ({"agentId": "has space"}, "agentId"),
        ({"agentId": "x" * 201}, "agentId"),
        ({"tools": []}, "tools"),
        ({"tools": ["t"] * 101}, "tools"),
        ({"tools": [""]}, "tools.0"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 1001}, "concurrency"),
        ({"concurrency": "4"}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"restarts": -1}, "restarts"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_register_refusals_name_the_field(patch: dict[str, Any], field: str) -> None:
    body = {"agentId": "a", "tools": ["X"], "concurrency": 1, **patch}
    assert _fields(RegisterRequest, body) == [field]


def test_claim_bounds() -> None:
    ok = ClaimRequest.model_validate({"agentId": "a", "tools": ["X"], "max": 100})
    assert ok.wait_ms == 0
    base = {"agentId": "a", "tools": ["X"], "max": 1}
    assert _fields(ClaimRequest, {**base, "max": 0}) == ["max"]
    assert _fields(ClaimRequest, {**base, "max": 101}) == ["max"]
    assert _fields(ClaimRequest, {**base, "waitMs": -1}) == ["waitMs"]
    assert _fields(ClaimRequest, {**base, "waitMs": 1.5}) == ["waitMs"]


def test_heartbeat_leases() -> None:
    lease = {"stepId": 1, "leaseToken": 2**63 - 1}
    assert len(HeartbeatRequest.model_validate({"agentId": "a", "leases": [lease]}).leases) == 1
    assert HeartbeatRequest.model_validate({"agentId": "a", "leases": []}).leases == []
    assert _fields(HeartbeatRequest, {"agentId": "a", "leases": [lease] * 1001}) == ["leases"]
    assert _fields(
        HeartbeatRequest, {"agentId": "a", "leases": [{"stepId": 0, "leaseToken": 1}]}
    ) == ["leases.0.stepId"]
    assert _fields(
        HeartbeatRequest, {"agentId": "a", "leases": [{"stepId": 1, "leaseToken": 2**63}]}
    ) == ["leases.0.leaseToken"]


def test_report_outcomes_by_status() -> None:
    body = ReportRequest.model_validate(
        {
            "agentId": "a",
            "outcomes": [
                {"stepId": 1, "leaseToken": 1, "status": "succeeded", "output": [1, {"x": None}]},
                {"stepId": 2, "leaseToken": 2, "status": "succeeded"},
                {
                    "stepId": 3,
                    "leaseToken": 3,
                    "status": "failed",
                    "error": "e",
                    "retryable": False,
                },
            ],
        }
    )
    first, second, third = body.outcomes
    assert isinstance(first, Succeeded) and first.output == [1, {"x": None}]
    assert isinstance(second, Succeeded) and second.output is None
    assert isinstance(third, Failed) and third.retryable is False
    lease = {"stepId": 1, "leaseToken": 1}
    assert _fields(ReportRequest, {"agentId": "a", "outcomes": []}) == ["outcomes"]
    assert _fields(
        ReportRequest,
        {"agentId": "a", "outcomes": [{**lease, "status": "failed", "error": "", "retryable": 1}]},
    ) == ["outcomes.0.failed.error", "outcomes.0.failed.retryable"]
    assert _fields(
        ReportRequest,
        {"agentId": "a", "outcomes": [{**lease, "status": "succeeded", "error": "x"}]},
    ) == ["outcomes.0.succeeded.error"]


def test_outputs_are_left_out_of_the_text_check() -> None:
    body = {
        "agentId": "a",
        "outcomes": [
            {"stepId": 1, "output": "\u0000", "status": "succeeded"},
            {"stepId": 2, "error": "\u0000", "status": "failed"},
            "junk",
        ],
    }
    assert _without_outputs(body) == {
        "agentId": "a",
        "outcomes": [
            {"stepId": 1, "status": "succeeded"},
            {"stepId": 2, "status": "failed"},
            "junk",
        ],
    }
    assert _without_outputs([1]) == [1]


def test_agent_max_wait_setting() -> None:
    assert Settings.from_env({}).agent_max_wait_s == AGENT_MAX_WAIT_S_DEFAULT == 30
    assert Settings.from_env({"PGDAG_AGENT_MAX_WAIT": "2.5"}).agent_max_wait_s == 2.5
    assert Settings.from_env({}, agent_max_wait_s=7.0).agent_max_wait_s == 7.0
    for bad in ("-1", "soon", "nan", "3601"):
        with pytest.raises(ConfigError, match="PGDAG_AGENT_MAX_WAIT"):
            Settings.from_env({"PGDAG_AGENT_MAX_WAIT": bad})
