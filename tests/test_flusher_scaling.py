"""Scaling the flushers out and in under load (issue 15): adding a flusher process, removing
one gracefully (SIGTERM) or abruptly (SIGKILL) loses nothing and duplicates nothing.

Each test runs the fault suite's load and exact ledger (``tests/ledger.py``) against real
``scangate flush`` processes, then checks three things once the backlog has drained:

- the ledger: every accepted event stored exactly once, nothing rejected stored;
- the visits: for every person, the stored visits are ``derive_visits`` of that person's
  stored events, so flushers re-deriving the same person at once did not interleave;
- the sharing: Redis's consumer group shows every flusher process read entries, so the
  test cannot pass with one flusher doing all the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway import Settings
from gateway.pipeline.flusher import pairing_rules
from gateway.pipeline.keyspace import CONSUMER_GROUP, stream_key
from signing import Keyring
from storage import ScanEvent, Visit, connect_storage, derive_visits

from .harness import GatewayStarter
from .ledger import Load, phase_s
from .test_faults import SHARDS, Rig, rig, start_flusher_process, stored_ids, wait_drained

# A flusher told to stop finishes its batch and the one it read ahead, then exits.
STOP_DEADLINE_S: Final = 15.0
# A new flusher must have read entries by then (it starts a Python process first).
START_DEADLINE_S: Final = 30.0


# Persons the load scans here: far fewer than its default, so that concurrent flushers'
# batches often touch the same person (each comes round every 200 events). Not a multiple
# of 3 or 11, the load's cycles of kind and scan-time offset, so each person gets check-ins
# and check-outs at varied times.
PERSONS: Final = 200


class Consumer(NamedTuple):
    """A flusher as its consumer group sees it, over all shard streams."""

    pending: int  # entries it read and has not acknowledged
    has_read: bool  # it has read or claimed at least one entry


async def consumers(redis_url: str) -> dict[str, Consumer]:
    """XINFO CONSUMERS of every shard stream, by consumer name."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    pending: defaultdict[str, int] = defaultdict(int)
    has_read: defaultdict[str, bool] = defaultdict(bool)
    try:
        for shard in range(SHARDS):
            try:
                found = await client.xinfo_consumers(stream_key(shard), CONSUMER_GROUP)
            except ResponseError:  # no stream or no group yet: no consumer either
                continue
            for c in found:
                pending[c["name"]] += c["pending"]
                # "inactive": ms since its last read or claim that returned entries; -1 never.
                has_read[c["name"]] |= c["inactive"] >= 0
    finally:
        await client.aclose()
    return {name: Consumer(pending[name], has_read[name]) for name in pending}


def consumer_of(proc: Any) -> str:
    """A flusher process's consumer name (``gateway.pipeline.flusher.consumer_name``)."""
    return f"{socket.gethostname()}-{proc.pid}"


async def wait_consumer(
    redis_url: str, proc: Any, ready: Callable[[Consumer], bool], what: str, timeout_s: float
) -> Consumer:
    """Poll a running flusher process's consumer until ``ready(consumer)``; it, then."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.log.read_text()
        seen = (await consumers(redis_url)).get(consumer_of(proc))
        if seen is not None and ready(seen):
            return seen
        assert time.monotonic() < deadline, f"flusher {proc.pid}: {what}; {seen}"
        await asyncio.sleep(0.02)


async def add_flushers(settings: Settings, started: list[Any], n: int = 1) -> None:
    """Start ``n`` more ``scangate flush`` processes; wait until each has taken entries."""
    assert settings.redis_url is not None
    new = [start_flusher_process(settings) for _ in range(n)]
    started.extend(new)
    for proc in new:
        await wait_consumer(
            settings.redis_url, proc, lambda c: c.has_read, "never read an entry", START_DEADLINE_S
        )


async def stop_flusher(proc: Any) -> None:
    """SIGTERM: the flusher finishes what it holds and exits 0 within the deadline."""
    proc.send_signal(signal.SIGTERM)
    await exits_0(proc)


async def exits_0(proc: Any) -> None:
    """A flusher told to stop exits 0 within the deadline."""
    try:
        code = await asyncio.to_thread(proc.wait, STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"flusher {proc.pid} still running {STOP_DEADLINE_S}s after SIGTERM"
        ) from None
    assert code == 0, proc.log.read_text()


@contextlib.contextmanager
def flusher_processes() -> Iterator[list[Any]]:
    """The flusher processes a test starts; any still running at the end is killed."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def storage_for(backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    if backend == "postgresql":
        return {"storage_url": request.getfixturevalue("private_postgres")().url}
    return {}


async def stored_events(storage_url: str) -> list[ScanEvent]:
    """Every stored scan event, read straight from the backend's table (the storage
    interface has no such read: only tests want all of them at once)."""
    columns = "app_id, event_id, kind, venue_id, person_id, {}, {}, device_id"
    if storage_url.startswith("sqlite:///"):
        path = storage_url.removeprefix("sqlite:///")

        def read() -> list[Any]:
            with contextlib.closing(sqlite3.connect(path)) as db:
                query = columns.format("scanned_at", "received_at")
                return db.execute(f"SELECT {query} FROM scan_events").fetchall()

        rows = await asyncio.to_thread(read)
    else:
        ms = "(extract(epoch from {}) * 1000)::bigint"
        query = columns.format(ms.format("scanned_at"), ms.format("received_at"))
        conn = await asyncpg.connect(storage_url)
        try:
            rows = [tuple(r) for r in await conn.fetch(f"SELECT {query} FROM scan_events")]
        finally:
            await conn.close()
    return [ScanEvent(*row) for row in rows]


async def check_visits(settings: Settings) -> int:
    """The stored visits are, person by person, ``derive_visits`` of the stored events, as
    the flusher processes pair them (default pairing settings); the number of visits."""
    url = settings.resolved_storage_url
    by_person: defaultdict[str, list[ScanEvent]] = defaultdict(list)
    for event in await stored_events(url):
        by_person[event.person_id].append(event)
    rules = pairing_rules(settings)
    expected: defaultdict[str, list[Visit]] = defaultdict(list)
    for person, events in by_person.items():
        expected[person] = sorted(derive_visits(events, rules))
    storage = await connect_storage(url)
    try:
        stored: defaultdict[str, list[Visit]] = defaultdict(list)
        for visit in await storage.all_visits():
            stored[visit.person_id].append(visit)
    finally:
        await storage.close()
    wrong = sorted(p for p in expected.keys() | stored.keys() if sorted(stored[p]) != expected[p])
    if wrong:
        p = wrong[0]
        extra = sorted((Counter(stored[p]) - Counter(expected[p])).elements())
        lacking = sorted((Counter(expected[p]) - Counter(stored[p])).elements())
        raise AssertionError(
            f"{len(wrong)} of {len(by_person)} persons' stored visits are not derive_visits of "
            f"their stored events, e.g. {p}: stored, not derived {extra[:3]}; derived, not "
            f"stored {lacking[:3]}"
        )
    return sum(len(v) for v in expected.values())


async def finish(r: Rig, load: Load, running: list[Any]) -> None:
    """Stop the load, answer every failed batch, drain, stop every flusher (each exits 0),
    then check the ledger and the visits."""
    await load.stop()
    await load.settle()
    assert r.settings.redis_url is not None
    await wait_drained(r.settings.redis_url)
    for proc in running:  # all at once: they stop side by side, as a scale-in does
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        await exits_0(proc)
    load.ledger.check(await stored_ids(r.settings.resolved_storage_url))
    assert load.answered() > 200, f"the load hardly ran: {load.ledger.statuses}"
    # Pairing had work to do: check-outs closed visits and later check-ins opened new ones
    # (a person with only check-ins at one venue has one visit).
    visits = await check_visits(r.settings)
    assert visits > 2 * PERSONS, visits


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_adding_flushers_under_load_loses_nothing_and_duplicates_nothing(
    gateway_under_test: GatewayStarter,
    keyring: Keyring,
    private_redis: Any,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    server = private_redis("valkey", appendonly=False)
    storage = storage_for(backend, request)
    async with (
        rig(gateway_under_test, keyring, flusher=False, redis_url=server.url, **storage) as r,
        r.load(persons=PERSONS) as load,
    ):
        with flusher_processes() as started:
            # One flusher, then a second and a third join while the scans keep coming.
            await add_flushers(r.settings, started)
            for _ in range(2):
                await asyncio.sleep(phase_s(1.5))
                await add_flushers(r.settings, started)
            await asyncio.sleep(phase_s(1.5))
            await finish(r, load, started)
            # Each of the three took a share of the entries, and none left any unacknowledged.
            after = [(await consumers(server.url))[consumer_of(p)] for p in started]
            assert after == [Consumer(pending=0, has_read=True)] * 3, after


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_removing_flushers_under_load_loses_nothing_and_duplicates_nothing(
    gateway_under_test: GatewayStarter,
    keyring: Keyring,
    private_redis: Any,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """Three flushers, then two (one stopped with SIGTERM, as an orchestrator scales in),
    then one (one killed with SIGKILL, as a node dies), while the scans keep coming."""
    server = private_redis("valkey", appendonly=False)
    storage = storage_for(backend, request)
    async with (
        rig(gateway_under_test, keyring, flusher=False, redis_url=server.url, **storage) as r,
        r.load(persons=PERSONS) as load,
    ):
        with flusher_processes() as started:
            await add_flushers(r.settings, started, 3)  # each has read entries
            running = list(started)

            await asyncio.sleep(phase_s(1.5))
            stopped = running.pop(0)
            await stop_flusher(stopped)
            # It stored and acknowledged what it held: nothing left to claim.
            left = (await consumers(server.url))[consumer_of(stopped)]
            assert left.pending == 0, left

            await asyncio.sleep(phase_s(1.5))
            killed = running.pop(0)
            # Killed while it holds entries (read, maybe half stored, not acknowledged); the
            # survivor claims them once idle for 1 s, while the load goes on.
            await wait_consumer(
                server.url, killed, lambda c: c.pending > 0, "never held entries", 10
            )  # at once under this load: it holds a batch and the next nearly always
            killed.kill()
            await asyncio.to_thread(killed.wait, 10)
            held = (await consumers(server.url))[consumer_of(killed)].pending

            await asyncio.sleep(phase_s(1.5))
            await finish(r, load, running)  # drained: nothing is pending anywhere
            after = await consumers(server.url)
    # The claim path ran: the killed flusher died holding entries, and they were taken over
    # and acknowledged by the survivor.
    assert held > 0
    assert after[consumer_of(killed)].pending == 0, after
