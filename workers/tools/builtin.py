"""Registers the built-in tools by importing their modules."""

from workers.tools import delay, http_get_json  # noqa: F401  (import registers the tools)
