"""The flusher against real Redis/Valkey and both storage backends."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import OutOfMemoryError

from gateway import Settings
from gateway.metrics import FlusherMetrics
from gateway.pipeline.events import encode_event
from gateway.pipeline.flusher import Flusher, pairing_rules
from gateway.pipeline.keyspace import (
    CONSUMER_GROUP,
    EVENT_FIELD,
    EVENTS_FIELD,
    backlog_key,
    dead_letter_key,
    shard_of,
    stream_key,
)
from storage import ScanEvent, Storage, derive_visits
from tests.fixtures_servers import open_test_storage

SHARDS = 4
BASE_MS = 1_795_000_000_000


def flusher_settings(**over: Any) -> Settings:
    return Settings(
        shards=SHARDS,
        flush_batch=over.pop("flush_batch", 50),
        flush_max_age_s=over.pop("flush_max_age_s", 0.01),
        **over,
    )


async def push(client: aioredis.Redis, events: list[ScanEvent], per_entry: int = 3) -> None:
    """Put events straight into their shard streams as the gateway's script does: up to
    ``per_entry`` in an entry, one per line, counted in the shard's backlog."""
    by_shard: dict[int, list[bytes]] = {}
    for e in events:
        by_shard.setdefault(shard_of(e.app_id, e.event_id, SHARDS), []).append(encode_event(e))
    pipe = client.pipeline(transaction=False)
    for shard, values in by_shard.items():
        for at in range(0, len(values), per_entry):
            lines = values[at : at + per_entry]
            pipe.xadd(stream_key(shard), {EVENTS_FIELD: b"\n".join(lines)})
            pipe.incrby(backlog_key(shard), len(lines))
    await pipe.execute()


async def push_one_per_entry(client: aioredis.Redis, events: list[ScanEvent]) -> None:
    """Events as versions before packed entries wrote them: one per entry, not counted."""
    pipe = client.pipeline(transaction=False)
    for e in events:
        pipe.xadd(
            stream_key(shard_of(e.app_id, e.event_id, SHARDS)), {EVENT_FIELD: encode_event(e)}
        )
    await pipe.execute()


async def backlogs(client: aioredis.Redis) -> list[int]:
    return [int(await client.get(backlog_key(s)) or 0) for s in range(SHARDS)]


async def drain(flusher: Flusher, client: aioredis.Redis, rounds: int = 200) -> None:
    """Step the flusher until every stream is empty and nothing is pending."""
    for _ in range(rounds):
        await flusher.step()
        lengths = [await client.xlen(stream_key(s)) for s in range(SHARDS)]
        if not any(lengths):
            return
    raise AssertionError(f"streams not drained: {lengths}")


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushall()
        yield client
    finally:
        await client.aclose()


def expected_visits(events: list[ScanEvent], settings_: Settings) -> list[Any]:
    rules = pairing_rules(settings_)
    persons = {e.person_id for e in events}
    return sorted(
        v for p in persons for v in derive_visits([e for e in events if e.person_id == p], rules)
    )


# A small world where the pairing windows are hit often: 3 persons, 3 venues, times on a
# grid of 1, 3 and 5 minutes and whole hours across two days.
minutes = st.one_of(
    st.integers(0, 48 * 60),
    st.integers(0, 48 * 12).map(lambda x: x * 5),
    st.integers(0, 48).map(lambda x: x * 60),
    st.integers(0, 48 * 20).map(lambda x: x * 3),
)
event_specs = st.lists(
    st.tuples(
        st.sampled_from(["P1", "P2", "P3"]),
        st.sampled_from(["checkin", "checkout"]),
        st.sampled_from(["V1", "V2", "V3"]),
        minutes,
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(specs=event_specs, data=st.data())
def test_any_order_duplication_and_batch_split_gives_the_same_visits_on_both_backends(
    specs: list[tuple[str, str, str, int]],
    data: st.DataObject,
    redis_url: str,
    tmp_path: Path,
    postgres_url: str,
) -> None:
    events = [
        ScanEvent(
            "vhd",
            f"EV{i:08d}",
            kind,
            venue,
            person,
            BASE_MS + m * 60_000,  # type: ignore[arg-type]
            BASE_MS + m * 60_000,
            None,
        )
        for i, (person, kind, venue, m) in enumerate(specs)
    ]
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    # Redelivery: some events arrive twice or three times, in any order.
    feed = events + [e for e in events if rnd.random() < 0.3] * rnd.randint(1, 2)
    rnd.shuffle(feed)
    batch = data.draw(st.integers(1, 10), label="flush batch size")
    splits = (
        sorted(rnd.sample(range(1, len(feed)), k=min(3, len(feed) - 1))) if len(feed) > 1 else []
    )
    s = flusher_settings(flush_batch=batch)

    async def scenario() -> None:
        results = []
        for kind in ("sqlite", "postgresql"):
            async with (
                redis_client(redis_url) as client,
                open_test_storage(kind, tmp_path, postgres_url) as storage,
            ):
                flusher = Flusher(client, storage, s, FlusherMetrics(), consumer="prop")
                start = 0
                for end in [*splits, len(feed)]:
                    await push(client, feed[start:end])
                    await drain(flusher, client)
                    start = end
                results.append(sorted(await storage.all_visits()))
                assert await storage.count_events() == len(events)
        assert results[0] == results[1] == expected_visits(events, s)

    asyncio.run(scenario())


StorageOpener = Callable[[], contextlib.AbstractAsyncContextManager[Storage]]


async def test_undecodable_entries_go_to_dead_letters_and_never_block(
    redis_url: str, storage: Storage
) -> None:
    s = flusher_settings()
    good = [
        ScanEvent("vhd", f"GOOD{i:06d}", "checkin", "V1", f"P{i}", BASE_MS, BASE_MS, None)
        for i in range(6)
    ]
    metrics = FlusherMetrics()
    async with redis_client(redis_url) as client:
        await push(client, good[:2])
        await client.xadd(stream_key(0), {EVENT_FIELD: b"not json"})
        await client.xadd(stream_key(1), {b"other": b"field"})
        await client.xadd(stream_key(2), {EVENT_FIELD: b'["vhd", 1]'})
        await push(client, good[2:4])
        # One bad line among good ones: the good ones are stored, the bad one kept.
        mixed = b"\n".join([encode_event(good[4]), b"{broken", encode_event(good[5])])
        mixed_id = await client.xadd(stream_key(3), {EVENTS_FIELD: mixed})
        await client.incrby(backlog_key(3), 3)
        flusher = Flusher(client, storage, s, metrics, consumer="c1")
        await drain(flusher, client)
        dead = sum([await client.xlen(dead_letter_key(sh)) for sh in range(SHARDS)])
        assert dead == 4
        entry = (await client.xrange(dead_letter_key(0)))[0][1]
        assert entry[EVENT_FIELD] == b"not json" and entry[b"reason"]
        ((_id, line),) = await client.xrange(dead_letter_key(3))
        assert line[EVENTS_FIELD] == b"{broken" and line[b"id"] == mixed_id and line[b"reason"]
        assert await backlogs(client) == [0] * SHARDS
    assert await storage.count_events() == 6
    assert metrics.dead_letters._value.get() == 4


async def test_entries_a_dead_consumer_left_pending_are_claimed_and_stored_once(
    redis_url: str, storage: Storage
) -> None:
    s = flusher_settings(flush_claim_idle_s=0.2)
    events = [
        ScanEvent("vhd", f"PEND{i:06d}", "checkin", "V1", f"P{i % 3}", BASE_MS + i, BASE_MS, None)
        for i in range(30)
    ]
    async with redis_client(redis_url) as client:
        await push(client, events)
        dead = Flusher(client, storage, s, FlusherMetrics(), consumer="dead")
        await dead.ensure_groups()
        # The dead consumer read a batch and stored half of it, then died before acking.
        batch = await dead.collect()
        assert batch
        await storage.store_batch([e for e in events[:15]], pairing_rules(s))
        pending = await client.xpending(stream_key(0), CONSUMER_GROUP)
        assert pending["pending"] > 0
        await asyncio.sleep(0.3)
        alive = Flusher(client, storage, s, FlusherMetrics(), consumer="alive")
        await drain(alive, client)
        for shard in range(SHARDS):
            assert (await client.xpending(stream_key(shard), CONSUMER_GROUP))["pending"] == 0
        assert await backlogs(client) == [0] * SHARDS
    ids = await storage.event_identities()
    assert len(ids) == len(set(ids)) == 30
    assert sorted(await storage.all_visits()) == expected_visits(events, s)


async def test_storage_down_keeps_the_batch_until_it_commits(
    redis_url: str, private_postgres: Any
) -> None:
    from storage import connect_storage

    pg = private_postgres()
    storage = await connect_storage(pg.url)
    s = flusher_settings()
    events = [
        ScanEvent(
            "vhd", f"DOWN{i:06d}", "checkout", "V1", "P1", BASE_MS + i * 60_000, BASE_MS, None
        )
        for i in range(10)
    ]
    metrics = FlusherMetrics()
    try:
        async with redis_client(redis_url) as client:
            await push(client, events)
            flusher = Flusher(client, storage, s, metrics, consumer="c1")
            pg.stop()
            task = asyncio.create_task(drain(flusher, client))
            await asyncio.sleep(1.5)
            assert not task.done()
            assert metrics.flush_errors._value.get() >= 1
            pg.start()
            await asyncio.wait_for(task, 30)
        assert await storage.count_events() == 10
    finally:
        await storage.close()


async def test_concurrent_flushers_store_each_event_once_with_the_right_visits(
    redis_url: str, storage_opener: StorageOpener
) -> None:
    s = flusher_settings(flush_batch=7)
    rnd = random.Random(7)
    # Few persons, many events each: the two flushers keep touching the same persons.
    events = [
        ScanEvent(
            "vhd",
            f"CC{i:06d}",
            rnd.choice(["checkin", "checkout"]),  # type: ignore[arg-type]
            rnd.choice(["V1", "V2"]),
            f"P{i % 4}",
            BASE_MS + rnd.randrange(0, 2 * 86_400_000),
            BASE_MS,
            None,
        )
        for i in range(300)
    ]
    async with redis_client(redis_url) as client, storage_opener() as one:
        await push(client, events)
        # On PostgreSQL each flusher's transaction takes its own pool connection: they run
        # concurrently and meet on the person locks. SQLite serialises writers anyway.
        flushers = [
            Flusher(client, one, s, FlusherMetrics(), consumer="a"),
            Flusher(client, one, s, FlusherMetrics(), consumer="b"),
        ]
        await asyncio.gather(*(drain(f, client) for f in flushers))
        handled = [f.metrics.flushed_events._value.get() for f in flushers]
        assert sum(handled) == 300 and all(handled), handled
        ids = await one.event_identities()
        assert len(ids) == len(set(ids)) == 300
        assert sorted(await one.all_visits()) == expected_visits(events, s)


def scans(prefix: str, n: int) -> list[ScanEvent]:
    return [
        ScanEvent("vhd", f"{prefix}{i:06d}", "checkin", "V1", f"P{i}", BASE_MS + i, BASE_MS, None)
        for i in range(n)
    ]


async def test_entries_of_several_events_are_stored_whole_and_counted_off(
    redis_url: str, storage: Storage
) -> None:
    events = scans("MANY", 40)
    metrics = FlusherMetrics()
    async with redis_client(redis_url) as client:
        await push(client, events, per_entry=7)
        assert sum(await backlogs(client)) == 40
        await drain(Flusher(client, storage, flusher_settings(), metrics), client)
        assert await backlogs(client) == [0] * SHARDS
        assert metrics.flushed_events._value.get() == 40
    assert sorted(await storage.event_identities()) == sorted(("vhd", e.event_id) for e in events)


async def test_an_entry_acknowledged_twice_is_counted_off_once(
    redis_url: str, storage: Storage
) -> None:
    """Two flushers can store one entry (one claimed it from the other while it was slow):
    only the one whose delete took it lowers the backlog."""
    async with redis_client(redis_url) as client:
        await push(client, scans("TWICE", 12), per_entry=4)
        slow = Flusher(client, storage, flusher_settings(), FlusherMetrics(), consumer="slow")
        await slow.ensure_groups()
        batch = await slow.collect()
        assert sum(entry.events for entry in batch) == 12
        await slow.flush(batch)
        await slow.flush(batch)
        assert await backlogs(client) == [0] * SHARDS
    assert await storage.count_events() == 12


async def test_entries_of_one_event_each_from_before_the_counter_still_drain(
    redis_url: str, storage: Storage
) -> None:
    """A backlog an upgrade left behind (an entry per event, not counted) drains with the
    new entries, and the counter keeps counting only the new ones."""
    async with redis_client(redis_url) as client:
        await push_one_per_entry(client, scans("OLD", 6))
        await push(client, scans("NEW", 6))
        assert sum(await backlogs(client)) == 6
        await drain(Flusher(client, storage, flusher_settings(), FlusherMetrics()), client)
        assert await backlogs(client) == [0] * SHARDS
    assert await storage.count_events() == 12


async def test_a_batch_is_sized_in_events_not_entries(redis_url: str, storage: Storage) -> None:
    """A batch closes once it holds flush_batch events: read in entries, it could hold
    EVENTS_PER_ENTRY times more persons than storage is sized to lock."""
    async with redis_client(redis_url) as client:
        await push(client, scans("SIZE", 120), per_entry=3)
        flusher = Flusher(client, storage, flusher_settings(flush_batch=10), FlusherMetrics())
        await flusher.ensure_groups()
        batch = await flusher.collect()
        held = sum(entry.events for entry in batch)
        # Each read takes at most one entry (3 events) per stream until 10 are held.
        assert 10 <= held < 10 + SHARDS * 3, held


async def test_at_maxmemory_the_flusher_still_counts_what_it_drains(
    private_redis: Any, storage: Storage
) -> None:
    """A full Redis refuses writes that grow it; lowering the backlog counter and keeping an
    undecodable event must not be among them, or the backlog would read high forever after
    and the event would be lost with its entry."""
    server = private_redis("valkey", appendonly=False)
    async with redis_client(server.url) as client:
        flusher = Flusher(client, storage, flusher_settings(), FlusherMetrics())
        await flusher.ensure_groups()  # as the gateway's script does with a new stream
        await push(client, scans("FULL", 30))
        await client.xadd(stream_key(1), {EVENTS_FIELD: b"{broken"})
        await client.incrby(backlog_key(1), 1)
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", used // 2)
        with pytest.raises(OutOfMemoryError):
            await client.incrby(backlog_key(0), 1)
        await drain(flusher, client)
        assert await backlogs(client) == [0] * SHARDS
        assert await client.xlen(dead_letter_key(1)) == 1  # kept, not lost with its entry
    assert await storage.count_events() == 30


async def test_an_entry_acknowledged_twice_keeps_its_dead_letter_once(
    redis_url: str, storage: Storage
) -> None:
    async with redis_client(redis_url) as client:
        mixed = b"\n".join([encode_event(scans("ONCE", 1)[0]), b"{broken"])
        await client.xadd(stream_key(0), {EVENTS_FIELD: mixed})
        await client.incrby(backlog_key(0), 2)
        metrics = FlusherMetrics()
        slow = Flusher(client, storage, flusher_settings(), metrics, consumer="slow")
        await slow.ensure_groups()
        batch = await slow.collect()
        await slow.flush(batch)
        await slow.flush(batch)
        assert await client.xlen(dead_letter_key(0)) == 1
        assert metrics.dead_letters._value.get() == 1
        assert await backlogs(client) == [0] * SHARDS
    assert await storage.count_events() == 1


async def test_a_counter_that_drifted_is_put_right_when_its_shard_drains(
    redis_url: str, storage: Storage
) -> None:
    """An older flusher during an upgrade deletes counted entries without counting them off,
    and an operator may delete a stream by hand: once the shard drains, its counter is 0."""
    async with redis_client(redis_url) as client:
        await client.incrby(backlog_key(1), 500)  # events no longer in any stream
        await push(client, scans("DRIFT", 20))
        await drain(Flusher(client, storage, flusher_settings(), FlusherMetrics()), client)
        assert await backlogs(client) == [0] * SHARDS
