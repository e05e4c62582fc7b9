"""Prometheus metrics of the gateway.

Each app gets its own registry (so tests and several apps in one process do not share
counters). Under ``scangate serve`` every process writes to the multiprocess directory
(``PROMETHEUS_MULTIPROC_DIR``, set before prometheus_client is first imported) and
``/metrics`` reports all of them together.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter as Tally
from collections.abc import Sequence
from typing import Final, Literal, get_args

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
# What asking for and checking a one-time code come to (gateway.http.otp): the label values of
# scangate_otp_sends_total and scangate_otp_checks_total, every one exported from the start.
SendOutcome = Literal["sent", "address_limit", "phone_address_limit", "phone_cap"]
CheckOutcome = Literal["ok", "invalid", "address_limit", "phone_address_limit"]
SEND_OUTCOMES: Final[tuple[SendOutcome, ...]] = get_args(SendOutcome)
CHECK_OUTCOMES: Final[tuple[CheckOutcome, ...]] = get_args(CheckOutcome)
_DURATION_BOUNDS: Final = (*LATENCY_BUCKETS_S, float("inf"))


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def stream_backlog_gauge(registry: CollectorRegistry) -> Gauge:
    """Events not yet stored, per shard (its backlog counter): set by the gateway's poll and
    by the flusher (the most recent value of any process wins under multiprocess mode)."""
    return Gauge(
        "scangate_stream_backlog",
        "Events in a shard's stream not yet stored.",
        ["shard"],
        registry=registry,
        multiprocess_mode="mostrecent",
    )


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
        self.stream_backlog = stream_backlog_gauge(r)
        self.backpressure_rejections = Counter(
            "scangate_backpressure_rejections_total",
            "Scan requests answered 503 because the backlog is over its high-water mark.",
            registry=r,
        )
        self.redis_errors = Counter(
            "scangate_redis_errors_total", "Redis calls that failed.", registry=r
        )
        # Set by the periodic poll (and by /readyz). Under serve the lowest value of the
        # live workers: one worker that cannot reach Redis or storage makes it 0.
        self.ready = Gauge(
            "scangate_ready",
            "1 when Redis and storage answer, else 0.",
            registry=r,
            multiprocess_mode="livemin",
        )
        # Every worker polls the same server: the most recent reading is the one to show.
        self.redis_memory_used = Gauge(
            "scangate_redis_memory_used_bytes",
            "Memory Redis uses (INFO memory used_memory).",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.redis_maxmemory = Gauge(
            "scangate_redis_maxmemory_bytes",
            "Redis's maxmemory (INFO memory maxmemory); 0 means unlimited.",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        # The door fallback (gateway.http.door): every person look-up by its outcome, refused
        # ones included, per app. Per app there is this and an alert, never a limit: a
        # limit there would let one leaked staff token stop every door of the app.
        self.door_lookups = Counter(
            "scangate_door_lookups_total",
            "Person look-ups at the door by outcome (recorded, unknown, ambiguous, "
            "refused_token, refused_venue).",
            ["app", "outcome"],
            registry=r,
        )
        # Exposure notices (gateway.outbox.notifier) and the cases that make them.
        self.notices = Counter(
            "scangate_notices_total",
            "Exposure notice delivery attempts by channel and outcome (delivered, retry, failed).",
            ["channel", "outcome"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "scangate_outbox_pending",
            "Exposure notices not yet delivered (nor given up).",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cases = Counter(
            "scangate_cases_total", "Confirmed cases recorded (not dry runs).", registry=r
        )
        # One-time codes. Every outcome's series exists from the start, at 0, so that an
        # alert's increase() sees the first refusal.
        self.otp_sends = Counter(
            "scangate_otp_sends_total",
            "One-time codes asked for: sent, or the limit that refused them "
            "(address_limit, phone_address_limit, phone_cap).",
            ["outcome"],
            registry=r,
        )
        self.otp_checks = Counter(
            "scangate_otp_checks_total",
            "One-time codes checked: ok, invalid, or the limit that refused them "
            "(address_limit, phone_address_limit).",
            ["outcome"],
            registry=r,
        )
        for send in SEND_OUTCOMES:
            self.otp_sends.labels(send)
        for check in CHECK_OUTCOMES:
            self.otp_checks.labels(check)
        # The hot path only adds to these plain counts; ``publish`` moves them into the
        # Prometheus values once a second and before every scrape. In multiprocess mode
        # each Prometheus increment is a locked write to a memory-mapped file, several per
        # request, which cost more than the rest of a single-event request's work.
        self._requests: Tally[tuple[str, int]] = Tally()
        self._durations: dict[str, list[float]] = {}  # per bucket counts, then the sum
        self._events: Tally[tuple[str, str, str, str]] = Tally()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._requests[(route, status)] += 1
        tally = self._durations.get(route)
        if tally is None:
            tally = self._durations[route] = [0.0] * (len(_DURATION_BOUNDS) + 1)
        tally[bisect.bisect_left(_DURATION_BOUNDS, seconds)] += 1
        tally[-1] += seconds

    def count_events(self, tally: Tally[tuple[str, str, str, str]]) -> None:
        """Add a request's verdicts: (app, kind, outcome, reason) -> count."""
        self._events.update(tally)

    def count_event(self, app: str, kind: str, outcome: str, n: int, reason: str = "") -> None:
        """Add ``n`` verdicts of one kind (``count_events`` for a single key)."""
        self._events[(app, kind, outcome, reason)] += n

    def publish(self) -> None:
        """Move the counts gathered since the last call into the Prometheus metrics."""
        requests, self._requests = self._requests, Tally()
        durations, self._durations = self._durations, {}
        events, self._events = self._events, Tally()
        for (route, status), n in requests.items():
            self.http_requests.labels(route, str(status)).inc(n)
        for route, tally in durations.items():
            child = self.http_duration.labels(route)
            # prometheus_client keeps a histogram child's per-bucket counts in ``_buckets``
            # (not cumulative) and the total in ``_sum``; it has no public bulk observe.
            for bucket, count in zip(child._buckets, tally, strict=False):
                if count:
                    bucket.inc(count)
            child._sum.inc(tally[-1])
        for labels, n in events.items():
            self.scan_events.labels(*labels).inc(n)

    def set_backlog(self, lengths: list[int]) -> None:
        for shard, n in enumerate(lengths):
            self.stream_backlog.labels(str(shard)).set(n)

    def set_redis_memory(self, used_bytes: int, max_bytes: int) -> None:
        self.redis_memory_used.set(used_bytes)
        self.redis_maxmemory.set(max_bytes)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def exposition(self) -> bytes:
        self.publish()
        if multiprocess_enabled():
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe`` for each value, with one increment per bucket instead of two
    per value: a flushed batch observes 10,000 latencies, and under ``serve`` each
    increment is a locked write to a memory-mapped file (1.6 us against 0.6 us in a single
    process). It reads the bucket bounds and values, which prometheus_client keeps private
    (a test compares it with ``observe``); for a histogram without labels, or one child.
    """
    bounds: Sequence[float] = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(sum(values))


class FlusherMetrics:
    """The flusher's metrics (its own process; merged into /metrics under serve)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.flush_batch_size = Histogram(
            "scangate_flush_batch_size",
            "Events per flushed batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000),
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
            "scangate_dead_letters", "Buffered events that could not be decoded.", registry=r
        )
        self.flush_errors = Counter(
            "scangate_flush_errors",
            "Failed attempts to store, acknowledge or purge.",
            registry=r,
        )
        self.stream_backlog = stream_backlog_gauge(r)
