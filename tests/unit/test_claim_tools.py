"""The claim's tool list is checked before any database work (no database needed here)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine import transitions


def claim(tools: Any) -> list[transitions.ClaimedStep]:
    # No connection: a tool list that is refused or empty never reaches the database.
    return asyncio.run(
        transitions.claim_steps(None, worker_id="w", limit=5, lease_ttl_s=30, tools=tools)  # type: ignore[arg-type]
    )


def test_a_bare_string_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"tools must be a sequence of tool names.*'DELAY'"):
        claim("DELAY")


def test_no_tools_claims_nothing() -> None:
    assert claim([]) == []
    assert claim(()) == []
