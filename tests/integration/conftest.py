"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import api_server


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    """An `httpx.Client` on a real `engine serve` (log: ``tmp_path / "api.log"``) on `db_url`;
    one client, so requests reuse its keep-alive connection."""
    with api_server(db_url, tmp_path) as base, httpx.Client(base_url=base, timeout=60) as c:
        yield c
