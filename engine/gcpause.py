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


def freeze_startup_heap() -> int:
    """Move every object alive now to the collector's permanent generation (`gc.freeze`,
    Python docs "gc"), so that later collections never walk them again; returns how many
    objects were frozen. Call it once a process has started (modules imported, tools
    loaded, pools open), before its hot loop.

    What start-up builds (modules, classes, functions, pydantic schemas: some 100,000
    containers in a worker) lives as long as the process, yet every full collection
    walked all of it: measured with `gc.callbacks` while two workers drained 20,000 steps
    in about 1.6 s, each spent 65 to 100 ms in full collections, some 5 % of its time;
    frozen, 8 to 11 ms (docs/benchmarks.md, issue 13). No collection first: at that point
    one frees some 20 objects and costs about 45 ms of start-up, so the few cyclic scraps
    start-up left stay (frozen objects are still freed by reference counting; only a
    reference cycle among them would stay)."""
    gc.freeze()
    return gc.get_freeze_count()
