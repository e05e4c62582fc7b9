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
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The gateway's metrics; labelled children are cached so the hot path only adds."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "scangate_http_requests_total", "HTTP requests answered.", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "scangate_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["route"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.scan_events = Counter(
            "scangate_scan_events_total", "Scan events by verdict.",
            ["app", "kind", "outcome", "reason"], registry=r,
        )  # fmt: skip
        self.stream_backlog = Gauge(
            "scangate_stream_backlog", "Entries in a shard's stream not yet flushed.", ["shard"],
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
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
