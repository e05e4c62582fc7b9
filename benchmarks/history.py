"""Weeks of realistic scans, already stored, for the flusher benchmark (bench_flush.py).

A deployment in its third week holds every scan and visit of the last 21 days. This module
makes such a history, deterministically from a seed, and bulk-loads it into SQLite or
PostgreSQL through the tables the storage itself creates; bench_flush.py then drains a
morning rush into a copy of it.

The people (same seed, same people):

- ``persons`` persons ``P000000000``..., ``venues`` venues ``V0000000``...; venues differ in
  popularity (a market draws more than a shop), each person has four usual venues (70% of
  their visits) and a main app (``vhd`` 80%, ``bluezone`` and ``ncovi`` 10% each).
- Ordinary persons scan on their own rhythm (some a lot, most a little): visits mostly in
  the morning, at noon and in the evening of days in Asia/Ho_Chi_Minh, each a check-in and
  a check-out 3 min to 4 h later (75%), a check-in never closed (15%), an orphan check-out
  (5%) or a double scan at the door (5%), as bench_flush's make_events always did; half of
  the scans by the venue's scanner (a device id), half by the person's phone.
- A tenth of the persons are door staff, drivers and delivery workers: on a duty day their
  shift (8 to 12 h, starting 05:00 to 09:00) has a scan every 15 to 25 minutes, a check-in
  at the next venue of their round or, half the time after a check-in, the check-out.
  They are on duty 6 days in 7 when the history has room for that; their share of the
  history is capped at 60% (so a small history has them on duty fewer days).
- The history is the 21 days before the *anchor*, 06:00 of the day it was built (today's if
  built after 10:00, else yesterday's); the rush bench_flush drains is that day's 06:00 to
  10:00. Each person's visits are ``storage.pairing.derive_visits`` of their events with
  the flusher's rules (``pairing_rules(Settings())``): stored visits equal the derivation
  of the stored events, as the storage keeps them.

How it is built, fast enough for 20 million events on two cores: the persons are split in
``SHARDS`` shards, each generated day by day in a process of its own (numpy for the events,
``derive_visits`` per person, carrying to the next day only the persons whose last events
may still pair with the next day's: those within the pairing horizon of midnight). The
tables are made by the storage's own ``migrate()`` (and ``ensure_days`` for the day
partitions), so they have whatever indexes the storage gives them. PostgreSQL: binary COPY
(encoded with numpy in the generator processes) into the partitioned tables, the three
tables loading at once, in scan order, indexes in place (each day partition's indexes stay
small and are filled in time order: measured, that costs no more than building them after
the load), with ``BUILD_SETTINGS`` (no syncing, minimal WAL, no autovacuum) during the
load only; then ``VACUUM ANALYZE``, a sync to disk, and a restart with the deployment's
settings. SQLite: secondary indexes dropped, ``executemany`` in one transaction per
chunk, in key order, with ``journal_mode=OFF`` and ``synchronous=OFF`` during the load
only; then the indexes rebuilt from their own definitions, ``ANALYZE``, back to WAL.

Reset to the pre-built state before each drain: PostgreSQL builds into a database named
``history`` and each drain gets ``CREATE DATABASE ... TEMPLATE history STRATEGY FILE_COPY``
(a file copy, seconds), dropped afterwards; the copy's latest day partitions are then
loaded into shared buffers (``pg_prewarm``), as a running server would have them. SQLite:
the drain gets a copy of the file.

PostgreSQL is a private cluster (``initdb`` and ``pg_ctl`` from ``pg_config --bindir``, run
as the ``postgres`` user when we are root) on a free loopback port with the settings of
``deploy/postgresql/postgresql.conf``, never the machine's shared server. With a kept
directory the cluster (or the SQLite file) stays there with ``history.json`` saying what it
holds; a later run with the same specification reuses it, with another rebuilds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import hashlib
import json
import multiprocessing
import operator
import os
import queue
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

import asyncpg
import numpy as np

from gateway.pipeline.flusher import pairing_rules
from gateway.settings import Settings
from storage import CLOSED_BY, Kind, PairingRules, ScanEvent, Visit, derive_visits, migrations
from storage.postgres import PostgresStorage
from storage.sqlite import SqliteStorage

StorageKind = Literal["sqlite", "postgresql"]
Shape = Literal["rush", "dense"]

# Bump when the generated data changes, so kept histories are rebuilt.
GENERATOR_VERSION: Final = 1
TIMEZONE: Final = "Asia/Ho_Chi_Minh"
APPS: Final = ("vhd", "bluezone", "ncovi")
MAIN_APP_P: Final = (0.8, 0.1, 0.1)
OWN_APP_SHARE: Final = 0.95
HISTORY_DAYS: Final = 21
RUSH_START_H: Final = 6
RUSH_HOURS: Final = 4
SHARDS: Final = 2  # generator processes; part of the data's identity (see HistorySpec)
SCANNERS: Final = 5000

# Ordinary persons: when in the day they scan (hours; mean, sd, weight), and the rest
# spread evenly over 06:00-22:00.
DAY_PEAKS: Final = ((7.6, 1.0, 0.32), (12.0, 1.2, 0.18), (18.6, 1.4, 0.34))
HOME_VENUES: Final = 4
HOME_SHARE: Final = 0.7
STAY_MEDIAN_MIN: Final = 45.0
STAY_SIGMA: Final = 0.8
STAY_RANGE_MIN: Final = (3.0, 240.0)
# What an attempt at a venue leaves (cumulative): in+out, orphan out, double in, in only.
IN_OUT, ORPHAN, DOUBLE = 0.75, 0.80, 0.85
EVENTS_PER_ATTEMPT: Final = 0.75 * 2 + 0.05 + 0.05 * 2 + 0.15
RUSH_PEAK_H: Final = 1.6  # hours after the rush starts
RUSH_SD_H: Final = 0.9

# Door staff, drivers, delivery workers.
DENSE_FRACTION: Final = 0.1
ROUTE_VENUES: Final = 12
SHIFT_START_H: Final = (5.0, 9.0)
SHIFT_HOURS: Final = (8.0, 12.0)
SHIFT_JITTER_MIN: Final = 20
SCAN_GAP_MIN: Final = (15, 25)
MAX_SHIFT_SCANS: Final = 52
CHECKOUT_AFTER_CHECKIN_P: Final = 0.5
DENSE_EVENTS_PER_DUTY_DAY: Final = 0.5 + 10 * 60 / 20
DENSE_SHARE_CAP: Final = 0.6
MAX_DUTY: Final = 6 / 7

# Late uploads in a drain: scanned this long before the rush (exponential, clipped).
LATE_SHARE: Final = 0.03
LATE_MEAN_H: Final = 18.0
LATE_RANGE_H: Final = (1 / 6, 72.0)

DAY_MS: Final = 86_400_000
HOUR_MS: Final = 3_600_000
MINUTE_MS: Final = 60_000
PG_EPOCH_MS: Final = 946_684_800_000  # 2000-01-01, where PostgreSQL's binary times start
KINDS: Final = typing.get_args(Kind)  # ("checkin", "checkout"): codes in int8 arrays
EVENT_COLUMNS: Final = (
    "app_id",
    "event_id",
    "kind",
    "venue_id",
    "person_id",
    "scanned_at",
    "received_at",
    "device_id",
    "stored_at",
)
ID_COLUMNS: Final = ("app_id", "event_id", "scanned_at")
VISIT_COLUMNS: Final = (
    "person_id",
    "venue_id",
    "checkin_at",
    "checkout_at",
    "closed_by",
    "source_at",
)
LOADED_TABLES: Final = ("scan_events", "scan_event_ids", "visits")
DEPLOY_POSTGRES_CONF: Final = (
    Path(__file__).resolve().parent.parent / "deploy" / "postgresql" / "postgresql.conf"
)
POSTGRES_USER: Final = "postgres"
HISTORY_DB: Final = "history"
PG_CTL_TIMEOUT_S: Final = 120
PREWARM_DAYS: Final = 3
STORED_AFTER_MS: Final = 1500  # stored_at of history rows: received_at plus this
# The private cluster while it loads a history (a throwaway until history.json is written,
# so nothing needs to survive a crash): no WAL beyond the minimum, no syncing, no
# autovacuum (VACUUM ANALYZE runs at the end), few checkpoints. Drains run with the
# deployment's settings alone.
BUILD_SETTINGS: Final = {
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_compression": "off",
    "autovacuum": "off",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "1h",
}
# RNG stream tags, so each use of the seed draws its own numbers.
_HABITS, _ORDINARY, _DENSE, _IDS, _DRAIN = 1, 2, 3, 4, 5


@contextlib.contextmanager
def no_collector() -> Iterator[None]:
    """The cyclic garbage collector off while millions of events and visits are made:
    nothing here makes cycles, and its passes over them cost more than making them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def progress(text: str) -> None:
    """Progress goes to stderr: stdout is bench_flush's report alone."""
    print(text, file=sys.stderr, flush=True)


class Progress:
    """A progress line every few seconds: done / total, rate, time left."""

    def __init__(self, label: str, total: int, every_s: float = 5.0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.started = self.last = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            elapsed = now - self.started
            rate = self.done / elapsed if elapsed else 0.0
            left = (self.total - self.done) / rate if rate else float("nan")
            progress(
                f"{self.label}: {self.done:,} / ~{self.total:,} events, {rate:,.0f}/s, "
                f"{elapsed:.0f} s so far, about {max(0.0, left):.0f} s left"
            )


# -- what is generated ----------------------------------------------------------------------


@dataclass(frozen=True)
class HistorySpec:
    """What a history holds; two builds of equal specs hold the same people and habits
    (the anchor, the day it ends, is the build's)."""

    storage: StorageKind
    events: int  # about this many (the generator's draw decides the exact count)
    persons: int
    venues: int
    seed: int
    days: int = HISTORY_DAYS
    dense_fraction: float = DENSE_FRACTION
    shards: int = SHARDS
    version: int = GENERATOR_VERSION
    schema: str = ""  # the storage's migrations, hashed: a kept history of another is stale

    def __post_init__(self) -> None:
        if not self.schema:
            object.__setattr__(self, "schema", schema_of(self.storage))

    def record(self) -> dict[str, Any]:
        return asdict(self)


def schema_of(kind: StorageKind) -> str:
    """A digest of the storage's migrations (and PostgreSQL's day partitions)."""
    text = repr(migrations.SQLITE if kind == "sqlite" else migrations.POSTGRES)
    if kind == "postgresql":
        text += repr(migrations.POSTGRES_DAY_PARTITIONED)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Built:
    """A history as built: its spec, its anchor and what went in."""

    spec: HistorySpec
    anchor_ms: int  # the history ends here; the rush starts here
    events: int
    visits: int
    build_s: float
    ordinary_attempts_per_day: float
    dense_duty: float

    @property
    def rush_end_ms(self) -> int:
        return self.anchor_ms + RUSH_HOURS * HOUR_MS

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "spec": self.spec.record()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Built:
        return cls(**{**record, "spec": HistorySpec(**record["spec"])})


def anchor_for(now_ms: int) -> int:
    """06:00 local of today if the rush (06:00-10:00) is over, else of yesterday."""
    tz = ZoneInfo(TIMEZONE)
    local = dt.datetime.fromtimestamp(now_ms / 1000, tz)
    day = local.date()
    if local.hour < RUSH_START_H + RUSH_HOURS:
        day -= dt.timedelta(days=1)
    return _local_ms(day, RUSH_START_H)


def _local_ms(day: dt.date, hour: int = 0) -> int:
    moment = dt.datetime(day.year, day.month, day.day, hour, tzinfo=ZoneInfo(TIMEZONE))
    return int(moment.timestamp()) * 1000


def history_days(spec: HistorySpec, anchor_ms: int) -> list[dt.date]:
    """The local calendar days the history touches, the anchor's own (until 06:00) last."""
    tz = ZoneInfo(TIMEZONE)
    first = dt.datetime.fromtimestamp((anchor_ms - spec.days * DAY_MS) / 1000, tz).date()
    last = dt.datetime.fromtimestamp(anchor_ms / 1000, tz).date()
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


@dataclass(frozen=True)
class Rates:
    ordinary_attempts_per_day: float
    dense_duty: float  # probability a dense person is on duty on a given day


def rates(spec: HistorySpec) -> Rates:
    """Per-person activity that fills the history to about ``spec.events``."""
    dense = round(spec.persons * spec.dense_fraction)
    ordinary = spec.persons - dense
    duty = 0.0
    if dense:
        room = DENSE_SHARE_CAP * spec.events / (dense * spec.days * DENSE_EVENTS_PER_DUTY_DAY)
        duty = min(MAX_DUTY, room)
    dense_events = dense * spec.days * DENSE_EVENTS_PER_DUTY_DAY * duty
    per_day = (spec.events - dense_events) / (max(1, ordinary) * spec.days * EVENTS_PER_ATTEMPT)
    return Rates(per_day, duty)


@dataclass
class Habits:
    """Each person's and venue's habits, from the seed alone."""

    persons: int
    venues: int
    venue_cum: np.ndarray  # cumulative popularity, for sampling venues
    home: np.ndarray  # (persons, HOME_VENUES)
    route: np.ndarray  # (persons, ROUTE_VENUES)
    activity: np.ndarray  # mean 1
    app: np.ndarray
    dense: np.ndarray  # bool
    shift_start_ms: np.ndarray
    shift_ms: np.ndarray
    person_str: np.ndarray = field(repr=False)  # object arrays of the ids as text
    venue_str: np.ndarray = field(repr=False)
    device_str: np.ndarray = field(repr=False)  # index SCANNERS is None

    def popular_venues(self, rng: np.random.Generator, n: int) -> np.ndarray:
        picks = np.searchsorted(self.venue_cum, rng.random(n) * self.venue_cum[-1])
        venues: np.ndarray = np.minimum(picks, self.venues - 1).astype(np.int32)
        return venues

    def shard(self, shard: int, shards: int) -> np.ndarray:
        return np.arange(shard, self.persons, shards, dtype=np.int32)


@functools.lru_cache(maxsize=4)
def habits(persons: int, venues: int, seed: int, dense_fraction: float) -> Habits:
    rng = np.random.default_rng([seed, _HABITS])
    popularity = 1.0 / (np.arange(venues) + 20.0) ** 0.9
    rng.shuffle(popularity)
    h = Habits(
        persons=persons,
        venues=venues,
        venue_cum=np.cumsum(popularity),
        home=np.empty(0),
        route=np.empty(0),
        activity=rng.lognormal(0.0, 0.6, persons),
        app=rng.choice(len(APPS), persons, p=MAIN_APP_P).astype(np.int8),
        dense=np.zeros(persons, bool),
        shift_start_ms=(rng.uniform(*SHIFT_START_H, persons) * HOUR_MS).astype(np.int64),
        shift_ms=(rng.uniform(*SHIFT_HOURS, persons) * HOUR_MS).astype(np.int64),
        person_str=np.array([f"P{i:09d}" for i in range(persons)], dtype=object),
        venue_str=np.array([f"V{i:07d}" for i in range(venues)], dtype=object),
        device_str=np.array([f"SCANNER-{i:04d}" for i in range(SCANNERS)] + [None], object),
    )
    h.activity /= h.activity.mean()
    h.home = h.popular_venues(rng, persons * HOME_VENUES).reshape(persons, HOME_VENUES)
    h.route = h.popular_venues(rng, persons * ROUTE_VENUES).reshape(persons, ROUTE_VENUES)
    h.dense[rng.permutation(persons)[: round(persons * dense_fraction)]] = True
    return h


@dataclass
class Events:
    """Scan events as columns (one row per event)."""

    person: np.ndarray  # int32
    venue: np.ndarray  # int32
    app: np.ndarray  # int8, index in APPS
    kind: np.ndarray  # int8, index in KINDS
    scanned: np.ndarray  # int64 epoch ms
    device: np.ndarray  # int32, index in Habits.device_str (SCANNERS: none)
    received: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ids: np.ndarray = field(default_factory=lambda: np.empty((0, 26), np.uint8))

    def __len__(self) -> int:
        return len(self.person)

    def take(self, rows: np.ndarray) -> Events:
        return Events(
            self.person[rows],
            self.venue[rows],
            self.app[rows],
            self.kind[rows],
            self.scanned[rows],
            self.device[rows],
            self.received[rows] if len(self.received) else self.received,
            self.ids[rows] if len(self.ids) else self.ids,
        )

    @staticmethod
    def concat(parts: Sequence[Events]) -> Events:
        names = ["person", "venue", "app", "kind", "scanned", "device"]
        if all(len(p.ids) == len(p) for p in parts):  # finished: with receipts and ids
            names += ["received", "ids"]
        return Events(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in names})

    def finish(self, rng: np.random.Generator, received: np.ndarray | None = None) -> None:
        """Give the events their receipt times (default: 0-5 s after the scan) and ids."""
        n = len(self)
        self.received = (
            self.scanned + rng.integers(0, 5000, n) if received is None else received
        ).astype(np.int64)
        self.ids = ulids(self.scanned, rng)

    def scan_events(self, h: Habits) -> list[ScanEvent]:
        """As ScanEvent records, in row order."""
        apps = np.array(APPS, dtype=object)[self.app].tolist()
        kinds = np.array(KINDS, dtype=object)[self.kind].tolist()
        ids = self.ids.view("S26").ravel().astype("U26").tolist()
        # tuple.__new__ directly: the named tuple's own __new__ is a Python function, and
        # this runs for every one of millions of events.
        make = functools.partial(tuple.__new__, ScanEvent)
        return list(
            map(
                make,
                zip(
                    apps,
                    ids,
                    kinds,
                    h.venue_str[self.venue].tolist(),
                    h.person_str[self.person].tolist(),
                    self.scanned.tolist(),
                    self.received.tolist(),
                    h.device_str[self.device].tolist(),
                    strict=True,
                ),
            )
        )


_CROCKFORD: Final = np.frombuffer(b"0123456789ABCDEFGHJKMNPQRSTVWXYZ", np.uint8)


def ulids(at_ms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ULIDs as the apps make them (bench_flush.event_id): 10 characters of scan time, then
    80 random bits, in Crockford's base 32; an (n, 26) array of ASCII bytes."""
    n = len(at_ms)
    t = at_ms.astype(np.uint64)
    hi = rng.integers(0, 1 << 16, n, dtype=np.uint64)
    lo = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    digits = np.empty((n, 26), np.uint8)
    for i in range(10):
        digits[:, i] = (t >> np.uint64(45 - 5 * i)) & np.uint64(31)
    for i in range(16):
        shift = 75 - 5 * i
        if shift >= 64:
            part = hi >> np.uint64(shift - 64)
        elif shift > 59:  # the digit straddles the two words
            part = (lo >> np.uint64(shift)) | (hi << np.uint64(64 - shift))
        else:
            part = lo >> np.uint64(shift)
        digits[:, 10 + i] = part & np.uint64(31)
    return _CROCKFORD[digits]


def visit_attempts(
    rng: np.random.Generator, h: Habits, person: np.ndarray, at_ms: np.ndarray
) -> Events:
    """What persons leave when they come to a venue at these times: see the module doc."""
    n = len(person)
    roll = rng.random(n)
    home = h.home[person, rng.integers(0, HOME_VENUES, n)]
    venue = np.where(rng.random(n) < HOME_SHARE, home, h.popular_venues(rng, n))
    app = np.where(
        rng.random(n) < OWN_APP_SHARE, h.app[person], rng.integers(0, len(APPS), n)
    ).astype(np.int8)
    device = np.where(rng.random(n) < 0.5, venue % SCANNERS, SCANNERS).astype(np.int32)
    stay_min = np.clip(rng.lognormal(np.log(STAY_MEDIAN_MIN), STAY_SIGMA, n), *STAY_RANGE_MIN)
    stay = (stay_min * MINUTE_MS).astype(np.int64)
    first_kind = ((roll >= IN_OUT) & (roll < ORPHAN)).astype(np.int8)
    second = (roll < IN_OUT) | ((roll >= ORPHAN) & (roll < DOUBLE))
    second_at = np.where(roll < IN_OUT, at_ms + stay, at_ms + rng.integers(1000, 120_000, n))
    second_kind = (roll < IN_OUT).astype(np.int8)
    return Events(
        np.concatenate([person, person[second]]).astype(np.int32),
        np.concatenate([venue, venue[second]]).astype(np.int32),
        np.concatenate([app, app[second]]),
        np.concatenate([first_kind, second_kind[second]]),
        np.concatenate([at_ms, second_at[second]]).astype(np.int64),
        np.concatenate([device, device[second]]),
    )


def day_times(rng: np.random.Generator, n: int, day_ms: int) -> np.ndarray:
    """Scan times of ordinary visits over a day: the peaks, and the rest spread out."""
    weights = [w for _m, _s, w in DAY_PEAKS]
    component = rng.choice(len(DAY_PEAKS) + 1, n, p=[*weights, 1 - sum(weights)])
    means = np.array([m for m, _s, _w in DAY_PEAKS] + [14.0])
    sds = np.array([s for _m, s, _w in DAY_PEAKS] + [1.0])
    hours = rng.normal(means[component], sds[component])
    spread = component == len(DAY_PEAKS)
    hours[spread] = rng.uniform(6.0, 22.0, int(spread.sum()))
    hours = np.clip(hours, 0.0, 23.999)
    return day_ms + (hours * HOUR_MS).astype(np.int64)


def ordinary_day(
    rng: np.random.Generator, h: Habits, who: np.ndarray, per_day: float, day_ms: int
) -> Events:
    counts = rng.poisson(per_day * h.activity[who])
    person = np.repeat(who, counts)
    return visit_attempts(rng, h, person, day_times(rng, len(person), day_ms))


def dense_day(
    rng: np.random.Generator, h: Habits, who: np.ndarray, duty: float, day_ms: int
) -> Events:
    """The shifts of dense persons on one day (``duty`` 1: all of them work)."""
    m = len(who)
    on_duty = rng.random(m) < duty
    jitter = SHIFT_JITTER_MIN * MINUTE_MS
    start = day_ms + h.shift_start_ms[who] + rng.integers(-jitter, jitter, m)
    end = start + h.shift_ms[who] + rng.integers(-jitter, jitter, m)
    gaps = rng.integers(
        SCAN_GAP_MIN[0] * MINUTE_MS, SCAN_GAP_MIN[1] * MINUTE_MS, (m, MAX_SHIFT_SCANS)
    )
    gaps[:, 0] = 0
    times = start[:, None] + np.cumsum(gaps, axis=1)
    coins = rng.random((m, MAX_SHIFT_SCANS))
    hops = rng.integers(1, ROUTE_VENUES, (m, MAX_SHIFT_SCANS))
    kind = np.zeros((m, MAX_SHIFT_SCANS), np.int8)
    stop = np.zeros((m, MAX_SHIFT_SCANS), np.int64)
    current = rng.integers(0, ROUTE_VENUES, m)
    stop[:, 0] = current
    for j in range(1, MAX_SHIFT_SCANS):
        out = (kind[:, j - 1] == 0) & (coins[:, j] < CHECKOUT_AFTER_CHECKIN_P)
        kind[:, j] = out
        current = np.where(out, current, (current + hops[:, j]) % ROUTE_VENUES)
        stop[:, j] = current
    keep = (times < end[:, None]) & on_duty[:, None]
    person = np.broadcast_to(who[:, None], keep.shape)[keep]
    venue = h.route[person, stop[keep]]
    app = h.app[person]
    device = np.where(rng.random(len(person)) < 0.5, venue % SCANNERS, SCANNERS)
    return Events(
        person.astype(np.int32),
        venue.astype(np.int32),
        app,
        kind[keep],
        times[keep].astype(np.int64),
        device.astype(np.int32),
    )


def _rng(spec: HistorySpec, tag: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, tag, *more])


# -- one shard, day by day -----------------------------------------------------------------


@dataclass
class VisitRows:
    """Visits as columns."""

    person: np.ndarray  # (n, 10) ASCII
    venue: np.ndarray  # (n, 8) ASCII
    checkin: np.ndarray
    checkout: np.ndarray
    closed_by: np.ndarray  # int8 index in CLOSED_BY
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.checkin)

    @staticmethod
    def of(visits: Sequence[Visit]) -> VisitRows:
        if not visits:
            empty = np.empty(0, np.int64)
            return VisitRows(
                np.empty((0, 10), np.uint8),
                np.empty((0, 8), np.uint8),
                empty,
                empty,
                np.empty(0, np.int8),
                empty,
            )
        person, venue, checkin, checkout, closed, source = zip(*visits, strict=True)
        code = {c: i for i, c in enumerate(CLOSED_BY)}
        return VisitRows(
            np.array(person, dtype="S10").view(np.uint8).reshape(-1, 10),
            np.array(venue, dtype="S8").view(np.uint8).reshape(-1, 8),
            np.array(checkin, np.int64),
            np.array(checkout, np.int64),
            np.array([code[c] for c in closed], np.int8),
            np.array(source, np.int64),
        )


_SCAN_TIME: Final = operator.attrgetter("scanned_at_ms")


class ShardHistory:
    """The history of one shard of the persons, generated a day at a time."""

    def __init__(self, spec: HistorySpec, anchor_ms: int, shard: int) -> None:
        self.spec, self.anchor_ms, self.shard = spec, anchor_ms, shard
        self.h = habits(spec.persons, spec.venues, spec.seed, spec.dense_fraction)
        self.rates = rates(spec)
        self.rules = pairing_rules(Settings())
        self.horizon_ms = self.rules.horizon_ms
        who = self.h.shard(shard, spec.shards)
        self.ordinary = who[~self.h.dense[who]]
        self.dense = who[self.h.dense[who]]
        self.days = history_days(spec, anchor_ms)
        self.start_ms = anchor_ms - spec.days * DAY_MS
        # Per person, the events that may still pair with the next day's.
        self.carry: dict[int, list[ScanEvent]] = {}

    def day(self, index: int) -> tuple[Events, list[Visit]]:
        """The events of one local day (in scan order) and the visits now complete."""
        day = self.days[index]
        day_ms, end_ms = _local_ms(day), _local_ms(day + dt.timedelta(days=1))
        events = day_events(
            self.spec,
            self.h,
            self.rates,
            self.ordinary,
            self.dense,
            self.shard,
            index,
            day_ms,
            anchor=index == len(self.days) - 1,
        )
        inside = (events.scanned >= self.start_ms) & (events.scanned < self.anchor_ms)
        events = events.take(np.flatnonzero(inside))
        events.finish(_rng(self.spec, _IDS, index, self.shard))
        order = np.lexsort((events.scanned, events.person))
        by_person = events.take(order)
        visits = self._pair(by_person, end_ms)
        return events.take(np.argsort(events.scanned, kind="stable")), visits

    def finish(self) -> list[Visit]:
        """The visits of what is still carried at the end of the history."""
        visits: list[Visit] = []
        for pending in self.carry.values():
            visits += derive_visits(pending, self.rules)
        self.carry = {}
        return visits

    def _pair(self, events: Events, day_end_ms: int) -> list[Visit]:
        records = events.scan_events(self.h)
        persons = events.person
        cuts = np.flatnonzero(np.diff(persons)) + 1
        starts = [0, *cuts.tolist()]
        ends = [*cuts.tolist(), len(records)]
        carried, self.carry = self.carry, {}
        visits: list[Visit] = []
        derive, rules, horizon = derive_visits, self.rules, self.horizon_ms
        quiet_before = day_end_ms - horizon
        for a, b in zip(starts, ends, strict=True):
            if a == b:
                continue
            p = int(persons[a])
            mine = records[a:b]
            earlier = carried.pop(p, None)
            if earlier:
                # Yesterday's late check-outs may fall after today's first scans.
                mine = sorted(earlier + mine, key=_SCAN_TIME)
            if mine[-1].scanned_at_ms < quiet_before:
                # Tomorrow's first event is more than the horizon away: complete.
                visits += derive(mine, rules)
                continue
            # Split at the last gap longer than the horizon: nothing before it can change.
            i = len(mine) - 1
            while i > 0 and mine[i].scanned_at_ms - mine[i - 1].scanned_at_ms <= horizon:
                i -= 1
            if i > 0:
                visits += derive(mine[:i], rules)
            self.carry[p] = mine[i:]
        # Carried from yesterday with nothing today: tomorrow is beyond the horizon.
        for pending in carried.values():
            visits += derive(pending, rules)
        return visits


def day_events(
    spec: HistorySpec,
    h: Habits,
    r: Rates,
    ordinary: np.ndarray,
    dense: np.ndarray,
    shard: int,
    index: int,
    day_ms: int,
    *,
    anchor: bool,
) -> Events:
    """A day of one shard's scans, before trimming to the history's window. On the
    anchor's day every dense person is on duty (the drain continues their shift)."""
    parts = [
        ordinary_day(
            _rng(spec, _ORDINARY, index, shard), h, ordinary, r.ordinary_attempts_per_day, day_ms
        )
    ]
    if len(dense):
        duty = 1.0 if anchor else r.dense_duty
        parts.append(dense_day(_rng(spec, _DENSE, index, shard), h, dense, duty, day_ms))
    return Events.concat(parts)


# -- binary COPY, encoded with numpy -----------------------------------------------------------


@dataclass(frozen=True)
class Text:
    data: np.ndarray  # (n, width) ASCII, every row as wide


@dataclass(frozen=True)
class Stamp:
    ms: np.ndarray  # epoch ms, as timestamptz


@dataclass(frozen=True)
class Choice:
    codes: np.ndarray  # index in options
    options: tuple[bytes, ...]


@dataclass(frozen=True)
class MaybeText:
    data: np.ndarray  # (n, width) ASCII, every row as wide
    null: np.ndarray  # bool: NULL instead


_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER: Final = b"\xff\xff"


def copy_binary(n: int, fields: Sequence[Text | Stamp | Choice | MaybeText]) -> bytes:
    """A whole binary COPY stream (header, rows, trailer) of ``n`` rows.

    Rows are grouped by their choices (each group has one row layout, so it is a 2-D byte
    array built column block by column block); order within a group is kept.
    """
    key = np.zeros(n, np.int64)
    for f in fields:
        if isinstance(f, Choice):
            key = key * len(f.options) + f.codes
        elif isinstance(f, MaybeText):
            key = key * 2 + f.null
    order = np.argsort(key, kind="stable")
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    parts = [_COPY_HEADER]
    for rows in np.split(order, cuts):
        m = len(rows)
        if not m:
            continue

        def const(raw: bytes, m: int = m) -> np.ndarray:
            return np.broadcast_to(np.frombuffer(raw, np.uint8), (m, len(raw)))

        blocks = [const(struct.pack(">h", len(fields)))]
        for f in fields:
            if isinstance(f, Text):
                blocks += [const(struct.pack(">i", f.data.shape[1])), f.data[rows]]
            elif isinstance(f, Stamp):
                us = (f.ms[rows] - PG_EPOCH_MS) * 1000
                blocks += [
                    const(b"\x00\x00\x00\x08"),
                    us.astype(">i8").view(np.uint8).reshape(m, 8),
                ]
            elif isinstance(f, MaybeText):
                if f.null[rows[0]]:
                    blocks.append(const(b"\xff\xff\xff\xff"))
                else:
                    blocks += [const(struct.pack(">i", f.data.shape[1])), f.data[rows]]
            else:
                option = f.options[int(f.codes[rows[0]])]
                blocks.append(const(struct.pack(">i", len(option)) + option))
        parts.append(np.hstack(blocks).tobytes())
    parts.append(_COPY_TRAILER)
    return b"".join(parts)


def _ascii_ids(prefix: bytes, numbers: np.ndarray, digits: int) -> np.ndarray:
    """``prefix`` and zero-padded decimal numbers, as an (n, len(prefix) + digits) array."""
    powers = 10 ** np.arange(digits - 1, -1, -1, dtype=np.int64)
    out = np.empty((len(numbers), len(prefix) + digits), np.uint8)
    out[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    out[:, len(prefix) :] = (numbers.astype(np.int64)[:, None] // powers) % 10 + ord("0")
    return out


def postgres_payloads(events: Events, visits: VisitRows) -> dict[str, bytes]:
    """Binary COPY streams for scan_events, scan_event_ids and visits."""
    apps = tuple(a.encode() for a in APPS)
    n = len(events)
    app = Choice(events.app, apps)
    ids = Text(events.ids)
    scanned = Stamp(events.scanned)
    return {
        "scan_events": copy_binary(
            n,
            [
                app,
                ids,
                Choice(events.kind, tuple(k.encode() for k in KINDS)),
                Text(_ascii_ids(b"V", events.venue, 7)),
                Text(_ascii_ids(b"P", events.person, 9)),
                scanned,
                Stamp(events.received),
                MaybeText(_ascii_ids(b"SCANNER-", events.device, 4), events.device == SCANNERS),
                Stamp(events.received + STORED_AFTER_MS),
            ],
        ),
        "scan_event_ids": copy_binary(n, [app, ids, scanned]),
        "visits": copy_binary(
            len(visits),
            [
                Text(visits.person),
                Text(visits.venue),
                Stamp(visits.checkin),
                Stamp(visits.checkout),
                Choice(visits.closed_by, tuple(c.encode() for c in CLOSED_BY)),
                Stamp(visits.source),
            ],
        ),
    }


# -- generator processes ---------------------------------------------------------------------


@dataclass
class Chunk:
    """What a generator process hands over for one day of its shard."""

    shard: int
    events: int
    visits: int
    payload: Any  # PostgreSQL: {table: COPY bytes}; SQLite: (Events, VisitRows)


def _generate(
    spec_record: dict[str, Any], anchor_ms: int, shard: int, out: Any, encode_for: str
) -> None:
    """A generator process: every day of one shard, then the carried visits, then None."""
    gc.disable()  # see no_collector
    try:
        spec = HistorySpec(**spec_record)
        shard_history = ShardHistory(spec, anchor_ms, shard)
        for index in range(len(shard_history.days)):
            events, visits = shard_history.day(index)
            if index == len(shard_history.days) - 1:
                visits += shard_history.finish()
            rows = VisitRows.of(visits)
            payload: Any = (
                postgres_payloads(events, rows) if encode_for == "postgresql" else (events, rows)
            )
            out.put(Chunk(shard, len(events), len(rows), payload))
        out.put(None)
    except BaseException:
        out.put(RuntimeError(f"history shard {shard} failed:\n{traceback.format_exc()}"))


def generated_chunks(
    spec: HistorySpec, anchor_ms: int, encode_for: str
) -> Generator[Chunk, None, None]:
    """Chunks from ``spec.shards`` generator processes, as they come."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue(maxsize=2 * spec.shards)
    procs = [
        ctx.Process(
            target=_generate,
            args=(spec.record(), anchor_ms, shard, out, encode_for),
            name=f"history-{shard}",
            daemon=True,
        )
        for shard in range(spec.shards)
    ]
    for p in procs:
        p.start()
    try:
        running = len(procs)
        while running:
            try:
                item = out.get(timeout=5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("the history generator processes died") from None
                continue
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)


# -- PostgreSQL --------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        raise RuntimeError(
            "a private PostgreSQL cluster needs initdb and pg_ctl (pg_config not found: "
            "apt-get install postgresql), or pass --postgres-url"
        )
    out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
    bindir = Path(out.stdout.strip())
    if not (bindir / "initdb").is_file():
        raise RuntimeError(f"no initdb in {bindir}: apt-get install postgresql")
    return bindir


def deployment_locale() -> str | None:
    """The deployment's collation (the postgres image's en_US.utf8) where it is installed,
    else another glibc UTF-8 one: text keys compare with strcoll, as in production, not
    byte by byte as under "C"."""
    out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False).stdout
    have = {name.lower().replace("-", "") for name in out.split()}
    return next(
        (name for name in ("en_US.UTF-8", "C.UTF-8") if name.lower().replace("-", "") in have), None
    )


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateCluster:
    """A PostgreSQL cluster of our own in ``base``, with the deployment's settings.

    As root, every tool runs as the ``postgres`` user (PostgreSQL refuses root), so ``base``
    and its parents must be enterable by that user.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.conf = base / "postgresql.conf"
        self.log = base / "postgres.log"
        self.bindir = postgres_bindir()
        self.port = 0
        self.as_postgres = os.geteuid() == 0

    @property
    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            shutil.chown(self.base, POSTGRES_USER, POSTGRES_USER)
            probe = ["runuser", "-u", POSTGRES_USER, "--", "test", "-w", str(self.base)]
            if subprocess.run(probe, check=False).returncode != 0:
                raise RuntimeError(
                    f"the postgres user cannot write to {self.base}: choose a directory "
                    "whose parents it may enter (e.g. under /var/tmp)"
                )
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            POSTGRES_USER,
            "-E",
            "UTF8",
            *(["--locale", locale] if (locale := deployment_locale()) else []),
            "--no-sync",
        )

    def start(self, settings: dict[str, str] | None = None) -> None:
        """Start on a free loopback port with deploy/postgresql/postgresql.conf (and
        ``settings`` over it)."""
        self.stop()  # a server a killed run left behind
        self.port = free_loopback_port()
        overrides = {
            **(settings or {}),
            "data_directory": str(self.data),
            "hba_file": str(self.data / "pg_hba.conf"),
            "ident_file": str(self.data / "pg_ident.conf"),
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.base),
            "logging_collector": "off",
        }
        text = DEPLOY_POSTGRES_CONF.read_text() + "\n# bench_flush.py: a private cluster\n"
        text += "".join(f"{k} = '{v}'\n" for k, v in overrides.items())
        self.conf.write_text(text)
        if self.as_postgres:
            shutil.chown(self.conf, POSTGRES_USER, POSTGRES_USER)
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT_S),
            "-o",
            f"-c config_file={self.conf}",
            "start",
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-m",
                "fast",
                "-w",
                "-t",
                str(PG_CTL_TIMEOUT_S),
                "stop",
                check=False,
            )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{database}"

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        command = [str(self.bindir / tool), *args]
        if self.as_postgres:
            command = ["runuser", "-u", POSTGRES_USER, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.base,
            capture_output=True,
            text=True,
            check=False,
            timeout=PG_CTL_TIMEOUT_S + 30,
        )
        if check and result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{log}"
            )


async def build_postgres(url: str, spec: HistorySpec, anchor_ms: int) -> tuple[int, int]:
    """Make the schema in the (empty) database at ``url`` and load the history; the events
    and visits loaded."""
    storage = await PostgresStorage.connect(url, timezone=TIMEZONE)
    try:
        await storage.migrate()
        days = history_days(spec, anchor_ms)
        ahead = [days[-1] + dt.timedelta(days=i) for i in range(1, 4)]
        await storage.ensure_days([*days, *ahead])
    finally:
        await storage.close()
    conns = [await asyncpg.connect(url) for _ in LOADED_TABLES]
    try:
        with contextlib.suppress(asyncpg.PostgresError):  # optional: prewarming copies
            await conns[0].execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        queues: dict[str, asyncio.Queue[bytes | None]] = {
            t: asyncio.Queue(maxsize=2) for t in LOADED_TABLES
        }
        columns = {
            "scan_events": EVENT_COLUMNS,
            "scan_event_ids": ID_COLUMNS,
            "visits": VISIT_COLUMNS,
        }

        async def copier(conn: asyncpg.Connection, table: str) -> None:
            while (payload := await queues[table].get()) is not None:
                # A memoryview: asyncpg takes bytes for a file name.
                await conn.copy_to_table(
                    table, source=memoryview(payload), columns=list(columns[table]), format="binary"
                )

        copiers = [
            asyncio.create_task(copier(c, t)) for c, t in zip(conns, LOADED_TABLES, strict=True)
        ]
        events = visits = 0
        bar = Progress("postgresql history", spec.events)
        chunks = generated_chunks(spec, anchor_ms, "postgresql")
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                for table, payload in chunk.payload.items():
                    await _put(queues[table], payload, copiers)
                events += chunk.events
                visits += chunk.visits
                bar.add(chunk.events)
            for q in queues.values():
                await _put(q, None, copiers)
            await asyncio.gather(*copiers)
        finally:
            for task in copiers:
                task.cancel()
            # (A next() still running in its thread keeps the generator busy; the generator
            # processes are daemons then, ended with this one.)
            with contextlib.suppress(ValueError):
                chunks.close()
        progress(
            f"postgresql history: {events:,} events and {visits:,} visits loaded in "
            f"{time.monotonic() - bar.started:.0f} s; VACUUM ANALYZE"
        )
        started = time.monotonic()
        await asyncio.gather(
            *(c.execute(f"VACUUM (ANALYZE) {t}") for c, t in zip(conns, LOADED_TABLES, strict=True))
        )
        await conns[0].execute("CHECKPOINT")
        progress(f"postgresql history: VACUUM ANALYZE in {time.monotonic() - started:.0f} s")
    finally:
        for c in conns:
            await c.close()
    return events, visits


async def _put(
    q: asyncio.Queue[bytes | None], item: bytes | None, tasks: list[asyncio.Task[None]]
) -> None:
    """Queue for a copier, surfacing a copier's failure instead of waiting on it forever."""
    while True:
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        try:
            await asyncio.wait_for(q.put(item), 1.0)
            return
        except TimeoutError:
            continue


async def prewarm(url: str, anchor_ms: int) -> None:
    """Load the latest days' partitions (tables and indexes) into shared buffers, as a
    server that has been taking scans for days has them."""
    since = anchor_ms - PREWARM_DAYS * DAY_MS
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_prewarm'"
        ):
            return
        rows = await conn.fetch(
            "SELECT c.oid::regclass::text, pg_get_expr(c.relpartbound, c.oid) "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = ANY($1::regclass[])",
            ["scan_events", "visits"],
        )
        for name, bound in rows:
            upper = bound.split("TO ('", 1)[-1].split("')", 1)[0]
            try:
                ends = dt.datetime.fromisoformat(upper)
            except ValueError:
                continue
            if ends.timestamp() * 1000 <= since:
                continue
            await conn.execute(
                "SELECT pg_prewarm(x) FROM (SELECT $1::regclass AS x UNION ALL "
                "SELECT indexrelid::regclass FROM pg_index WHERE indrelid = $1::regclass) s",
                name,
            )
    finally:
        await conn.close()


# -- SQLite ------------------------------------------------------------------------------------


def build_sqlite(path: Path, spec: HistorySpec, anchor_ms: int) -> tuple[int, int]:
    """Make the schema in a new SQLite file and load the history into it."""

    async def migrate() -> None:
        storage = SqliteStorage(str(path))
        try:
            await storage.migrate()
        finally:
            await storage.close()

    asyncio.run(migrate())
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # The file is thrown away if the load fails: no journal, no syncing until the end.
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1048576")
        db.execute("PRAGMA temp_store=MEMORY")
        indexes = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            "AND tbl_name IN ('scan_events', 'visits')"
        ).fetchall()
        for name, _sql in indexes:
            db.execute(f"DROP INDEX {name}")
        h = habits(spec.persons, spec.venues, spec.seed, spec.dense_fraction)
        apps = np.array(APPS, dtype=object)
        kinds = np.array(KINDS, dtype=object)
        closed = np.array(CLOSED_BY, dtype=object)
        events = visits = 0
        bar = Progress("sqlite history", spec.events)
        insert_event = (
            f"INSERT INTO scan_events ({', '.join(EVENT_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"
        )
        insert_visit = (
            f"INSERT INTO visits ({', '.join(VISIT_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(VISIT_COLUMNS))})"
        )
        with no_collector():
            for chunk in generated_chunks(spec, anchor_ms, "sqlite"):
                ev, vi = chunk.payload
                # In key order (app, event id: ULIDs start with the scan time), for the B-tree.
                order = np.lexsort((ev.scanned, ev.app))
                ev = ev.take(order)
                db.execute("BEGIN")
                db.executemany(
                    insert_event,
                    zip(
                        apps[ev.app].tolist(),
                        ev.ids.view("S26").ravel().astype("U26").tolist(),
                        kinds[ev.kind].tolist(),
                        h.venue_str[ev.venue].tolist(),
                        h.person_str[ev.person].tolist(),
                        ev.scanned.tolist(),
                        ev.received.tolist(),
                        h.device_str[ev.device].tolist(),
                        (ev.received + STORED_AFTER_MS).tolist(),
                        strict=True,
                    ),
                )
                db.executemany(
                    insert_visit,
                    zip(
                        vi.person.view("S10").ravel().astype("U10").tolist(),
                        vi.venue.view("S8").ravel().astype("U8").tolist(),
                        vi.checkin.tolist(),
                        vi.checkout.tolist(),
                        closed[vi.closed_by].tolist(),
                        vi.source.tolist(),
                        strict=True,
                    ),
                )
                db.execute("COMMIT")
                events += chunk.events
                visits += chunk.visits
                bar.add(chunk.events)
        progress(
            f"sqlite history: {events:,} events and {visits:,} visits loaded in "
            f"{time.monotonic() - bar.started:.0f} s; building indexes, ANALYZE"
        )
        started = time.monotonic()
        for _name, sql in indexes:
            db.execute(sql)
        db.execute("ANALYZE")
        db.execute("PRAGMA journal_mode=WAL")
        progress(f"sqlite history: indexes and ANALYZE in {time.monotonic() - started:.0f} s")
    finally:
        db.close()
    return events, visits


# -- kept or temporary, and fresh copies for each drain ------------------------------------


@dataclass
class Target:
    """One copy of the history that a drain writes into."""

    kind: StorageKind
    name: str
    sqlite_path: Path | None = None
    postgres_url: str | None = None


class History:
    """A built history of one storage, and fresh copies of it for drains."""

    def __init__(self, built: Built, workdir: Path, *, reused: bool) -> None:
        self.built = built
        self.workdir = workdir
        self.reused = reused
        self.cluster: PrivateCluster | None = None
        self.server_url: str | None = None  # PostgreSQL: the server's maintenance database
        self.history_db = HISTORY_DB
        self.sqlite_path: Path | None = None

    @property
    def kind(self) -> StorageKind:
        return self.built.spec.storage

    async def copy(self, name: str) -> Target:
        """A fresh copy of the pre-built state."""
        if self.kind == "sqlite":
            assert self.sqlite_path is not None
            path = self.workdir / f"drain-{name}.db"
            await asyncio.to_thread(shutil.copyfile, self.sqlite_path, path)
            return Target("sqlite", name, sqlite_path=path)
        assert self.server_url is not None
        database = f"drain_{name}"
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            await conn.execute(
                f"CREATE DATABASE {database} TEMPLATE {self.history_db} STRATEGY FILE_COPY"
            )
        finally:
            await conn.close()
        url = _with_database(self.server_url, database)
        await prewarm(url, self.built.anchor_ms)
        return Target("postgresql", name, postgres_url=url)

    async def discard(self, target: Target) -> None:
        if target.sqlite_path is not None:
            _remove_sqlite(target.sqlite_path)
            return
        assert self.server_url is not None
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS drain_{target.name} WITH (FORCE)")
        finally:
            await conn.close()

    def postmaster_pid(self) -> int | None:
        """The private cluster's postmaster (None on a server given by URL)."""
        return self.cluster.postmaster_pid() if self.cluster else None


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _with_database(url: str, database: str) -> str:
    base, _, _old = url.rpartition("/")
    return f"{base}/{database}"


RECORD: Final = "history.json"


def _kept(record_path: Path, spec: HistorySpec) -> Built | None:
    """What ``record_path`` says was built, if it was built to ``spec``."""
    try:
        record = json.loads(record_path.read_text())
        if record["spec"] != spec.record():
            return None
        return Built.from_record(record)
    except (OSError, ValueError, TypeError, KeyError):
        return None


@contextlib.asynccontextmanager
async def open_history(
    spec: HistorySpec,
    *,
    workdir: Path,
    keep_dir: Path | None = None,
    postgres_url: str | None = None,
    now_ms: int | None = None,
    server_settings: dict[str, str] | None = None,
) -> AsyncIterator[History]:
    """The history ``spec`` describes: reused from ``keep_dir`` when it holds the same
    spec, else built (into ``keep_dir`` to keep, or a temporary place). PostgreSQL runs in
    a private cluster (with ``server_settings`` over the deployment's once built), or with
    ``postgres_url`` in a database of that server, built each time and dropped at the
    end."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if spec.storage == "sqlite":
        base = (keep_dir / "sqlite") if keep_dir else workdir
        base.mkdir(parents=True, exist_ok=True)
        path = base / "history.db"
        built = _kept(base / RECORD, spec) if keep_dir and path.exists() else None
        reused = built is not None
        if built is None:
            (base / RECORD).unlink(missing_ok=True)
            _remove_sqlite(path)
            anchor_ms = anchor_for(now_ms)
            started = time.monotonic()
            events, visits = await asyncio.to_thread(build_sqlite, path, spec, anchor_ms)
            built = _built(spec, anchor_ms, events, visits, started)
            if keep_dir:
                (base / RECORD).write_text(json.dumps(built.record(), indent=2) + "\n")
        else:
            progress(f"sqlite history: reusing {path} ({built.events:,} events)")
        history = History(built, workdir, reused=reused)
        history.sqlite_path = path
        yield history
        return

    if postgres_url is not None:
        database = f"scangate_bench_{HISTORY_DB}"
        await _execute(
            postgres_url,
            f"DROP DATABASE IF EXISTS {database} WITH (FORCE)",
            f"CREATE DATABASE {database}",
        )
        try:
            anchor_ms = anchor_for(now_ms)
            started = time.monotonic()
            counts = await build_postgres(_with_database(postgres_url, database), spec, anchor_ms)
            history = History(_built(spec, anchor_ms, *counts, started), workdir, reused=False)
            history.server_url = postgres_url
            history.history_db = database
            yield history
        finally:
            await _execute(postgres_url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        return

    # A temporary cluster lives under the system's temporary directory (never our workdir:
    # the postgres user may not enter it).
    base = keep_dir / "postgresql" if keep_dir else Path(tempfile.mkdtemp(prefix="scangate-pg-"))
    cluster = PrivateCluster(base)
    built = _kept(base / RECORD, spec) if keep_dir and cluster.initialised else None
    reused = built is not None
    try:
        if built is None:
            if keep_dir is not None and base.exists():
                cluster.stop()
                shutil.rmtree(base)
            anchor_ms = anchor_for(now_ms)
            started = time.monotonic()
            cluster.init()
            cluster.start(BUILD_SETTINGS)
            await _execute(cluster.url(), f"CREATE DATABASE {HISTORY_DB}")
            counts = await build_postgres(cluster.url(HISTORY_DB), spec, anchor_ms)
            # Back to the deployment's settings, everything on disk (the load ran unsynced).
            cluster.stop()
            os.sync()
            cluster.start(server_settings)
            built = _built(spec, anchor_ms, *counts, started)
            if keep_dir:
                (base / RECORD).write_text(json.dumps(built.record(), indent=2) + "\n")
        else:
            progress(f"postgresql history: reusing {base} ({built.events:,} events)")
            cluster.start(server_settings)
        history = History(built, workdir, reused=reused)
        history.cluster = cluster
        history.server_url = cluster.url()
        yield history
    finally:
        cluster.stop()
        if keep_dir is None:
            shutil.rmtree(base, ignore_errors=True)


async def _execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _built(spec: HistorySpec, anchor_ms: int, events: int, visits: int, started: float) -> Built:
    r = rates(spec)
    return Built(
        spec,
        anchor_ms,
        events,
        visits,
        time.monotonic() - started,
        r.ordinary_attempts_per_day,
        r.dense_duty,
    )


# -- the drain -----------------------------------------------------------------------------


def drain_events(built: Built, shape: Shape, n: int, seed: int) -> list[ScanEvent]:
    """``n`` fresh events of the rush after the history, in arrival order (see
    ``_drain_events``)."""
    with no_collector():
        return _drain_events(built, shape, n, seed)


def _drain_events(built: Built, shape: Shape, n: int, seed: int) -> list[ScanEvent]:
    """The drain's events.

    rush: ordinary visits of anyone, 06:00-10:00 (a peak at 07:36), 3% of the events late
    uploads scanned 10 min to 3 days before the rush (received during it, so interleaved
    anywhere). dense: the same, but the dense tenth work their shifts (they all work on
    the rush day: their shifts began in the history, before 06:00), and the ordinary visits
    are the other persons'.
    """
    spec = built.spec
    h = habits(spec.persons, spec.venues, spec.seed, spec.dense_fraction)
    rng = np.random.default_rng([spec.seed, _DRAIN, seed, 0 if shape == "rush" else 1])
    anchor, rush_end = built.anchor_ms, built.rush_end_ms
    days = history_days(spec, anchor)
    parts: list[Events] = []
    if shape == "dense":
        day_ms = _local_ms(days[-1])
        for shard in range(spec.shards):
            who = h.shard(shard, spec.shards)
            dense = who[h.dense[who]]
            if len(dense):
                shift = dense_day(_rng(spec, _DENSE, len(days) - 1, shard), h, dense, 1.0, day_ms)
                keep = (shift.scanned >= anchor) & (shift.scanned < rush_end)
                parts.append(shift.take(np.flatnonzero(keep)))
    dense_n = sum(len(p) for p in parts)
    late_n = round(n * LATE_SHARE)
    rush_n = max(0, n - late_n - dense_n)
    if dense_n > n - late_n:  # a tiny drain: fewer shifts
        keep_rows = np.sort(rng.choice(dense_n, n - late_n, replace=False))
        parts = [Events.concat(parts).take(keep_rows)]
    who = np.arange(spec.persons, dtype=np.int32)
    if shape == "dense":
        who = who[~h.dense]
    weights = h.activity[who] / h.activity[who].sum()

    def attempts(count: int, late: bool) -> Events:
        got: list[Events] = [visit_attempts(rng, h, who[:0], np.empty(0, np.int64))]
        have = 0
        while have < count:
            a = int((count - have) / EVENTS_PER_ATTEMPT * 1.2) + 10
            if late:
                person = rng.integers(0, spec.persons, a).astype(np.int32)
                age_h = np.clip(rng.exponential(LATE_MEAN_H, a), *LATE_RANGE_H)
                at = anchor - (age_h * HOUR_MS).astype(np.int64)
            else:
                person = rng.choice(who, a, p=weights)
                offset_h = np.clip(rng.normal(RUSH_PEAK_H, RUSH_SD_H, a), 0.0, RUSH_HOURS - 1e-6)
                at = anchor + (offset_h * HOUR_MS).astype(np.int64)
            ev = visit_attempts(rng, h, person, at)
            ev = ev.take(np.flatnonzero(ev.scanned < rush_end))
            got.append(ev)
            have += len(ev)
        ev = Events.concat(got)
        return ev.take(np.sort(rng.choice(len(ev), count, replace=False)))

    parts.append(attempts(rush_n, late=False))
    on_time = Events.concat(parts)
    on_time.finish(rng)
    late = attempts(late_n, late=True)
    arrival = np.maximum(late.scanned, anchor) + (
        rng.random(late_n) * (rush_end - np.maximum(late.scanned, anchor))
    ).astype(np.int64)
    late.finish(rng, received=arrival)
    every = Events.concat([on_time, late])
    return every.take(np.argsort(every.received, kind="stable")).scan_events(h)


# -- reading back, for the correctness check -------------------------------------------------


async def stored_of_persons(
    target: Target, persons: Sequence[str]
) -> tuple[dict[str, list[ScanEvent]], dict[str, list[Visit]]]:
    """Every stored event and visit of these persons, read from the tables directly."""
    events: dict[str, list[ScanEvent]] = {p: [] for p in persons}
    visits: dict[str, list[Visit]] = {p: [] for p in persons}
    if (path := target.sqlite_path) is not None:

        def read() -> None:
            db = sqlite3.connect(path)
            try:
                db.execute("CREATE TEMP TABLE wanted (p TEXT PRIMARY KEY)")
                db.executemany("INSERT INTO temp.wanted VALUES (?)", [(p,) for p in persons])
                for row in db.execute(
                    "SELECT app_id, event_id, kind, venue_id, person_id, scanned_at, "
                    "received_at, device_id FROM temp.wanted CROSS JOIN scan_events "
                    "ON person_id = p"
                ):
                    events[row[4]].append(ScanEvent._make(row))
                for row in db.execute(
                    f"SELECT {', '.join(VISIT_COLUMNS)} FROM temp.wanted CROSS JOIN visits "
                    "ON person_id = p"
                ):
                    visits[row[0]].append(Visit._make(row))
            finally:
                db.close()

        await asyncio.to_thread(read)
        return events, visits
    ms = "(extract(epoch FROM {}) * 1000)::bigint"
    conn = await asyncpg.connect(target.postgres_url)
    try:
        for row in await conn.fetch(
            "SELECT app_id, event_id, kind, venue_id, person_id, "
            f"{ms.format('scanned_at')}, {ms.format('received_at')}, device_id "
            "FROM scan_events WHERE person_id = ANY($1::text[])",
            list(persons),
        ):
            events[row[4]].append(ScanEvent._make(row))
        for row in await conn.fetch(
            f"SELECT person_id, venue_id, {ms.format('checkin_at')}, {ms.format('checkout_at')}, "
            f"closed_by, {ms.format('source_at')} FROM visits WHERE person_id = ANY($1::text[])",
            list(persons),
        ):
            visits[row[0]].append(Visit._make(row))
    finally:
        await conn.close()
    return events, visits


def mismatched_persons(
    events: dict[str, list[ScanEvent]], visits: dict[str, list[Visit]], rules: PairingRules
) -> list[str]:
    """Persons whose stored visits differ from derive_visits of their stored events."""
    return [
        p
        for p, evs in events.items()
        if sorted(derive_visits(evs, rules)) != sorted(visits.get(p, []))
    ]
