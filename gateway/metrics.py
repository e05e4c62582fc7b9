"""Prometheus metrics of the gateway.

Each app gets its own registry (so tests and several apps in one process do not share
counters). Under ``scangate serve`` every process writes to the multiprocess directory
(``PROMETHEUS_MULTIPROC_DIR``, set before prometheus_client is first imported) and
``/metrics`` reports all of them together.
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS_S: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The gateway's metrics; labelled children are cached so the hot path only adds."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "scangate_http_requests_total",
            "HTTP requests answered.",
            ["route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "scangate_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.scan_events = Counter(
            "scangate_scan_events_total",
            "Scan events by verdict.",
            ["app", "kind", "outcome", "reason"],
            registry=r,
        )
        self.stream_backlog = Gauge(
            "scangate_stream_backlog",
            "Entries in a shard's stream not yet flushed.",
            ["shard"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.backpressure_rejections = Counter(
            "scangate_backpressure_rejections_total",
            "Scan requests answered 503 because the backlog is over its high-water mark.",
            registry=r,
        )
        self.redis_errors = Counter(
            "scangate_redis_errors_total", "Redis calls that failed.", registry=r
        )
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        child = self._request_children.get((route, status))
        if child is None:
            child = self._request_children[(route, status)] = self.http_requests.labels(
                route, str(status)
            )
        child.inc()
        timer = self._duration_children.get(route)
        if timer is None:
            timer = self._duration_children[route] = self.http_duration.labels(route)
        timer.observe(seconds)

    def count_events(self, tally: Tally[tuple[str, str, str, str]]) -> None:
        """Add a request's verdicts: (app, kind, outcome, reason) -> count."""
        for labels, n in tally.items():
            self.scan_events.labels(*labels).inc(n)

    def set_backlog(self, lengths: list[int]) -> None:
        for shard, n in enumerate(lengths):
            self.stream_backlog.labels(str(shard)).set(n)

    def exposition(self) -> bytes:
        if multiprocess_enabled():
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)


class FlusherMetrics:
    """The flusher's metrics (its own process; merged into /metrics under serve)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.flush_batch_size = Histogram(
            "scangate_flush_batch_size",
            "Entries per flushed batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.flush_duration = Histogram(
            "scangate_flush_duration_seconds",
            "Time to store and acknowledge a batch.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.flushed_events = Counter(
            "scangate_flushed_events", "Events written to storage (new rows).", registry=r
        )
        self.storage_duplicates = Counter(
            "scangate_storage_duplicates",
            "Events storage already had (redelivered or retried after the retry memory).",
            registry=r,
        )
        self.scan_to_storage = Histogram(
            "scangate_scan_to_storage_seconds",
            "From the gateway's receipt to the commit.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=r,
        )
        self.dead_letters = Counter(
            "scangate_dead_letters", "Stream entries that could not be decoded.", registry=r
        )
        self.flush_errors = Counter(
            "scangate_flush_errors",
            "Failed attempts to store, acknowledge or purge.",
            registry=r,
        )
        self.stream_backlog = Gauge(
            "scangate_stream_backlog",
            "Entries in a shard's stream not yet flushed.",
            ["shard"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
