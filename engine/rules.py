"""Trigger rules, and what a reset (manual retry or replay) does to the steps it touches.

A step's ``runIf`` decides what it does once its dependencies end (Airflow calls these
trigger rules):

- ``all_succeeded`` (the default): run when every dependency succeeded; skipped as soon as
  one ends without succeeding (dead_letter, skipped or cancelled).
- ``all_done``: run once every dependency has ended, however (a cleanup or notifier step).
- ``any_failed``: run once every dependency has ended and at least one did not succeed;
  skipped when all of them succeeded.

A skipped dependency counts as one that did not succeed. A map step, once expanded, waits
for its children as ``all_succeeded``. The SQL statements that end steps
(``complete_steps``, ``fail_dependents`` in engine/sql/queries.sql) apply the same rule to
the counters ``deps_remaining`` and ``deps_failed``; `decide` is the one statement of it in
Python, used by `plan_reset` and checked against the SQL by the tests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

UNFINISHED = frozenset({"pending", "ready", "running"})
RULES = ("all_succeeded", "all_done", "any_failed")


def decide(rule: str, *, remaining: int, failed: int) -> str:
    """The status of a step whose rule is `rule` (one of `RULES`), with `remaining`
    dependencies unfinished and `failed` ended without succeeding: ``pending`` (wait),
    ``ready`` or ``skipped``. Raises `ValueError` for an unknown rule."""
    if rule not in RULES:
        raise ValueError(f"unknown runIf {rule!r}; one of {', '.join(RULES)}")
    if rule == "all_succeeded" and failed > 0:
        return "skipped"
    if remaining > 0:
        return "pending"
    if rule == "any_failed" and failed == 0:
        return "skipped"
    return "ready"


@dataclass(frozen=True)
class GraphStep:
    """One step of a run as `plan_reset` sees it (ids are steps.id)."""

    id: int
    name: str
    status: str
    run_if: str
    is_map: bool
    map_width: int | None
    map_parent_id: int | None
    delay_ms: int | None = None  # delayMs: milliseconds it sleeps, parked, before ready
    waits: bool = False  # a wait step (migration 0010): parked until its signal, never ready


@dataclass(frozen=True)
class ResetStep:
    """What a reset sets one step to: status and recounted dependency counters; `unexpand`
    is True for a map step that forgets its children (they are deleted and it expands
    again)."""

    id: int
    name: str
    status: str
    remaining: int
    failed: int
    unexpand: bool


def plan_reset(
    steps: Iterable[GraphStep],
    edges: Iterable[tuple[int, int]],
    seeds: Iterable[int],
    *,
    follow: frozenset[str] | None,
    force_ready: bool,
    delayed: bool,
    reexpand: bool = True,
) -> tuple[list[ResetStep], list[int]]:
    """Plan a reset from `seeds` (step ids) downstream; nothing is written here.

    `edges` are ``(parent_id, child_id)`` pairs. The reset set is the seeds plus every
    descendant reached through steps whose status is in `follow` (None: through any step,
    which is a replay). Each step in the set is decided by `decide` from its dependencies,
    those inside the set counted with their new status, in topological order. With
    `force_ready` the seeds become ``ready`` whatever their rule says (a manual retry of a
    dead letter). With `delayed` (the run's start time is still ahead), a root that would be
    ready waits as ``pending`` instead. A step with a ``delayMs`` that would be ready is
    parked as ``pending`` with nothing left to wait for (its sleep starts again; SQL
    ``reset_steps`` sets its wake time), except a seed forced ready (a manual retry runs the
    dead letter at once: it slept before its first attempt) and an expanded map step kept
    (its join: a map step sleeps once, before it expands). A wait step that would be ready,
    a retried seed too, is parked: it waits for its signal again, with a new deadline.

    With `reexpand` (a replay), a map step in the set whose children are not themselves
    seeds is reset to expand again (a retry never re-expands: a map step dead-lettered at its
    join keeps its children and joins again):
    its children are returned as the second element, to delete, and its dependencies are its
    declared ones again. Returns ``(reset steps in topological order, child ids to delete)``.
    """
    by_id = {s.id: s for s in steps}
    parents: dict[int, list[int]] = {i: [] for i in by_id}
    children: dict[int, list[int]] = {i: [] for i in by_id}
    for parent, child in edges:
        parents[child].append(parent)
        children[parent].append(child)
    seed_ids = list(dict.fromkeys(seeds))
    chosen: set[int] = set(seed_ids)
    queue = deque(seed_ids)
    while queue:
        current = queue.popleft()
        for child in children[current]:
            if child in chosen:
                continue
            if follow is not None and by_id[child].status not in follow:
                continue
            chosen.add(child)
            queue.append(child)
    # A map step in the set expands again, unless the reset started from one of its children.
    unexpand = {
        i
        for i in chosen
        if reexpand
        and by_id[i].is_map
        and by_id[i].map_width is not None
        and not any(by_id[s].map_parent_id == i for s in seed_ids)
    }
    dropped = {c for c in by_id if by_id[c].map_parent_id in unexpand}
    chosen -= dropped

    def deps_of(i: int) -> list[int]:
        # An expanded map step (kept) waits for its children only; any other step for its
        # declared dependencies.
        if by_id[i].map_width is not None and i not in unexpand:
            return [p for p in parents[i] if by_id[p].map_parent_id == i]
        return [p for p in parents[i] if by_id[p].map_parent_id != i]

    # Kahn's algorithm over the chosen sub-graph.
    deps = {i: deps_of(i) for i in chosen}
    indegree = {i: sum(1 for p in deps[i] if p in chosen) for i in chosen}
    order: deque[int] = deque(sorted(i for i, n in indegree.items() if n == 0))
    new_status: dict[int, str] = {}
    plan: list[ResetStep] = []
    while order:
        current = order.popleft()
        step = by_id[current]
        remaining = failed = 0
        for p in deps[current]:
            status = new_status.get(p, by_id[p].status)
            if status in UNFINISHED:
                remaining += 1
            elif status != "succeeded":
                failed += 1
        expanded = step.map_width is not None and current not in unexpand
        rule = "all_succeeded" if expanded else step.run_if
        if force_ready and current in seed_ids:
            status = "ready"
        else:
            status = decide(rule, remaining=remaining, failed=failed)
        if status == "ready" and delayed and not deps[current]:
            status = "pending"
        forced = force_ready and current in seed_ids
        if status == "ready" and step.delay_ms and not forced and not expanded:
            status = "pending"  # parked: remaining is 0
        if status == "ready" and step.waits:
            status = "pending"  # a wait step waits again, even a retried one: never ready
        new_status[current] = status
        plan.append(
            ResetStep(
                id=current,
                name=step.name,
                status=status,
                remaining=remaining,
                failed=failed,
                unexpand=current in unexpand,
            )
        )
        for child in children[current]:
            if child in indegree and current in deps[child]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    order.append(child)
    return plan, sorted(dropped)
