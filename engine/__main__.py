"""``python -m engine`` and the ``pgdag`` console script: the program, where pgdag is composed.

The engine is the core and imports neither ``workers`` nor ``dashboard`` (the arrows point
down: tests/unit/test_layers.py). This module is the program built on all three, and the
one place that sees them together: `create_server` is the API with the dashboard's routes
and the built-in tools, which `engine.cli`'s ``serve`` runs. Nothing imports this module
but the ``pgdag`` script and ``python -m engine``, so the engine's modules still never
reach the layers above them.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.cli import main as cli_main
from engine.cli import program_name
from engine.config import Settings

if TYPE_CHECKING:
    from starlette.types import ASGIApp


def create_server(
    settings: Settings,
    *,
    database_url: str | None = None,
    bound: tuple[str, int] | None = None,
) -> ASGIApp:
    """The app ``pgdag serve`` runs: `engine.api.create_app` with the dashboard (the page at
    ``/``, its assets, ``GET /dashboard/runs``) and the built-in tools (DELAY,
    HTTP_GET_JSON) imported before those ``PGDAG_TOOLS`` names.

    `database_url` and `bound` are `create_app`'s. Raises `ConfigError` for a tool module
    that cannot be imported, `ValueError` for a `bound` host that is not a host name or
    address.
    """
    from dashboard.routes import routes as dashboard_routes
    from engine.api import create_app
    from workers.tools import BUILTIN_TOOL_MODULES

    composed = replace(settings, tool_modules=(*BUILTIN_TOOL_MODULES, *settings.tool_modules))
    return create_app(
        composed, database_url=database_url, bound=bound, extra_routes=dashboard_routes
    )


def main(argv: list[str] | None = None) -> int:
    """The ``pgdag`` console script and ``python -m engine``: `engine.cli.main` serving
    `create_server`. Returns the exit code."""
    return cli_main(argv, app_factory=create_server, prog=program_name("engine"))


if __name__ == "__main__":
    sys.exit(main())
