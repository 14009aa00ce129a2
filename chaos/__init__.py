"""Chaos: fault injection, the invariant checker, and the `python -m chaos` demo."""
