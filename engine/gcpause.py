"""Pausing Python's cyclic garbage collector around synchronous work that builds many
objects and no reference cycles: decoding, checking and encoding a submitted run."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a synchronous block that builds many
    objects and no reference cycles (decoding and validating a large request body), and
    turn it back on at the end if it was on.

    The collector runs every few hundred allocations, and a full collection walks every
    live object: a 10,000-step run builds some 100,000 containers (the decoded body, a
    model per step, the rows), which the collector walked again and again while they were
    being built and could free none of. Measured in the API with `gc.callbacks`: about
    270 ms of collection per such ``POST /runs``, 20 to 35 ms with these blocks paused
    (docs/benchmarks.md, W5). Reference counting still frees what the block drops; a
    cycle made inside it (an exception's traceback) waits for the next collection after
    it. No await may sit inside the block: other requests' work would run with the
    collector off."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
