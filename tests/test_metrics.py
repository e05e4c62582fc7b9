"""The metrics helpers that bypass prometheus_client's per-value path."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import observe_many

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def exposition(fill: Callable[[Histogram], None]) -> list[bytes]:
    """The exported lines of a fresh histogram after ``fill``, without its creation time
    (two histograms never share that)."""
    registry = CollectorRegistry()
    histogram = Histogram("latency_seconds", "test", buckets=BUCKETS, registry=registry)
    fill(histogram)
    return [ln for ln in generate_latest(registry).splitlines() if b"_created" not in ln]


def test_observe_many_exports_what_observe_one_by_one_does() -> None:
    # Values on bucket bounds (le is inclusive), between them, beyond the last, and zero.
    values = [0.0, 0.05, 0.05000001, 0.1, 0.3, 1.0, 1.5, 2.0, 2.5, 60.0, 0.25, 0.25]

    def one_by_one(h: Histogram) -> None:
        for v in values:
            h.observe(v)

    got = exposition(lambda h: observe_many(h, values))
    assert b'latency_seconds_bucket{le="0.05"} 2.0' in got
    assert b'latency_seconds_bucket{le="+Inf"} 12.0' in got
    assert got == exposition(one_by_one)


def test_observe_many_of_nothing_changes_nothing() -> None:
    assert b"latency_seconds_count 0.0" in exposition(lambda h: observe_many(h, []))
