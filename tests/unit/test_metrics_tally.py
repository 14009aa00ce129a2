"""The per-attempt tallies (engine.metrics.TallyCounter / TallyHistogram) scrape exactly
as prometheus_client's own Counter and Histogram would for the same observations."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from engine import metrics


def _scrape(*collectors: object) -> list[str]:
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)  # type: ignore[arg-type]
    return sorted(generate_latest(registry).decode().splitlines())


def test_a_tally_histogram_scrapes_like_a_prometheus_histogram() -> None:
    bounds = metrics.LATENCY_BUCKETS_S
    tally = metrics.TallyHistogram("t_seconds", "doc", "tool", bounds)
    reference_registry = CollectorRegistry()
    reference = Histogram("t_seconds", "doc", ["tool"], buckets=bounds, registry=reference_registry)
    rng = random.Random(5)
    # Values on the bounds themselves (le is inclusive), between them, above them, negative.
    values = [*bounds, 0.0, -0.5, 1e6, *(rng.uniform(0, 1000) for _ in range(500))]
    for i, v in enumerate(values):
        tool = ("A", "B")[i % 2]
        tally.observe(tool, v)
        reference.labels(tool=tool).observe(max(0.0, v))
    ours = _scrape(metrics.TallyCollector([tally]))
    theirs = sorted(generate_latest(reference_registry).decode().splitlines())
    assert ours == theirs
    assert tally.count("A") + tally.count("B") == len(values)


def test_a_tally_histogram_without_a_label_scrapes_like_a_prometheus_histogram() -> None:
    bounds = metrics.LAG_BUCKETS_S
    tally = metrics.TallyHistogram("lag_seconds", "doc", None, bounds)
    reference_registry = CollectorRegistry()
    reference = Histogram("lag_seconds", "doc", buckets=bounds, registry=reference_registry)
    for v in (*bounds, 0.0, 0.0004, 99.0):
        tally.observe("", v)
        reference.observe(v)
    ours = _scrape(metrics.TallyCollector([tally]))
    theirs = sorted(generate_latest(reference_registry).decode().splitlines())
    assert ours == theirs


def test_a_tally_counter_scrapes_like_a_prometheus_counter() -> None:
    tally = metrics.TallyCounter("t_attempts", "doc", ["tool", "outcome"])
    reference_registry = CollectorRegistry()
    reference = Counter("t_attempts", "doc", ["tool", "outcome"], registry=reference_registry)
    for tool, outcome, n in [("A", "succeeded", 3), ("A", "failed", 1), ("B", "succeeded", 2)]:
        for _ in range(n):
            tally.inc(tool, outcome)
            reference.labels(tool=tool, outcome=outcome).inc()
    assert tally.value("A", "succeeded") == 3
    assert tally.value("C", "failed") == 0
    ours = _scrape(metrics.TallyCollector([tally]))
    theirs = sorted(generate_latest(reference_registry).decode().splitlines())
    assert ours == theirs


def test_count_result_refuses_an_unknown_outcome_and_counts_the_rest() -> None:
    before = metrics.ATTEMPTS.value("TALLY", "succeeded")
    metrics.count_result("TALLY", "succeeded", duration_s=0.02, retried=True)
    assert metrics.ATTEMPTS.value("TALLY", "succeeded") == before + 1
    assert metrics.RETRIES.value("TALLY") >= 1
    assert metrics.ATTEMPT_DURATION.count("TALLY") >= 1
    try:
        metrics.count_result("TALLY", "exploded")
    except ValueError as exc:
        assert "outcome must be one of" in str(exc)
    else:
        raise AssertionError("an unknown outcome was counted")


def test_deferred_values_scrape_like_observed_ones_and_tell_on_fold() -> None:
    """Values appended to `pending` are counted by the scrape itself (it folds first), as if
    each had been observed, and `on_fold` hears how many per label."""
    bounds = metrics.DURATION_BUCKETS_S
    folded: list[tuple[str, int]] = []
    tally = metrics.TallyHistogram(
        "d_seconds", "doc", "tool", bounds, on_fold=lambda label, n: folded.append((label, n))
    )
    reference_registry = CollectorRegistry()
    reference = Histogram("d_seconds", "doc", ["tool"], buckets=bounds, registry=reference_registry)
    rng = random.Random(11)
    values = [*bounds, 0.0, -1.0, 1e9, *(rng.uniform(0, 100) for _ in range(300))]
    for i, v in enumerate(values):
        tool = ("A", "B")[i % 3 == 0]
        tally.pending(tool).append(v)
        reference.labels(tool=tool).observe(max(0.0, v))
    assert tally.pending_count() == len(values)
    assert tally.count("A") == 0  # nothing counted before a fold
    ours = _scrape(metrics.TallyCollector([tally]))
    theirs = sorted(generate_latest(reference_registry).decode().splitlines())
    assert ours == theirs
    assert tally.pending_count() == 0
    assert sorted(folded) == [("A", tally.count("A")), ("B", tally.count("B"))]
    assert tally.count("A") + tally.count("B") == len(values)


def test_a_scrape_thread_folding_while_the_loop_appends_loses_nothing() -> None:
    """prometheus_client serves a worker's /metrics from a thread of its own, whose scrape
    folds while the event loop appends and observes: every value is counted once."""
    import threading

    folded: list[int] = []
    tally = metrics.TallyHistogram(
        "r_seconds",
        "doc",
        "tool",
        metrics.DURATION_BUCKETS_S,
        on_fold=lambda _, n: folded.append(n),
    )
    collector = metrics.TallyCollector([tally])
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            list(collector.collect())

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(100_000):
            if i % 10:
                tally.pending("A").append(0.01)
            else:
                tally.observe("A", 0.5)
    finally:
        done.set()
        scraper.join()
    tally.fold()
    assert tally.count("A") == 100_000
    assert sum(folded) == 90_000
