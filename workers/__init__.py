"""pgdag workers: the claim loop, tool execution, lease heartbeats, and the built-in tools."""
