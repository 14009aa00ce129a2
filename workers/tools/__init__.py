"""Built-in tools. Importing `workers.tools.builtin` registers DELAY and HTTP_GET_JSON."""

# The modules that register the built-in tools: the worker loads them before those
# PGDAG_TOOLS names, and so does the API `python -m engine serve` runs
# (`engine.__main__.create_server`), which checks submitted steps against them.
BUILTIN_TOOL_MODULES: tuple[str, ...] = ("workers.tools.builtin",)
