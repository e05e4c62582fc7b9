"""The append script and its calls (``gateway.pipeline.append_script``): on a single server a
group commit is one script call however many shards and time buckets it spans, and every
verdict stays what a call per shard gave. Run against Valkey and Redis (``redis_url``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis

from gateway.pipeline.append_script import append_call, split_reply
from gateway.pipeline.buffer import BufferUnavailable, RedisBuffer
from gateway.pipeline.client import connect_redis
from gateway.pipeline.keyspace import (
    CONSUMER_GROUP,
    EVENTS_FIELD,
    EVENTS_PER_ENTRY,
    backlog_key,
    entry_values,
    stream_key,
)

SHARDS = 16


@contextlib.asynccontextmanager
async def buffer_at(url: str, shards: int = SHARDS) -> AsyncIterator[RedisBuffer]:
    client = connect_redis(url)
    buffer = RedisBuffer(client, shards, retry_memory_s=600)
    try:
        yield buffer
    finally:
        buffer.close()
        await client.aclose()


def pairs(name: str, n: int) -> list[tuple[bytes, bytes]]:
    return [(f"{name}-{i}".encode(), f"value of {name}-{i}".encode()) for i in range(n)]


def script_calls(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def stream(url: str, shard: int) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return [v for _id, fields in client.xrange(stream_key(shard)) for v in entry_values(fields)]


def entry_sizes(url: str, shard: int) -> list[int]:
    with redis.Redis.from_url(url) as client:
        return [len(entry_values(fields)) for _id, fields in client.xrange(stream_key(shard))]


def backlog(url: str, shard: int) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.get(backlog_key(shard)) or 0)


async def test_a_section_s_new_events_are_one_entry_and_counted_in_the_backlog(
    redis_url: str,
) -> None:
    """A shard's new events of one call go in one stream entry, one per line, and raise the
    backlog counter by their number; a duplicate is cut out of the entry."""
    async with buffer_at(redis_url, shards=1) as buffer:
        assert await buffer.append_encoded({0: pairs("a", 5)}, 0) == {0: [True] * 5}
        assert entry_sizes(redis_url, 0) == [5]
        assert backlog(redis_url, 0) == 5 and buffer.lengths == [5]
        mixed = [pairs("a", 5)[2], *pairs("b", 2), pairs("a", 5)[4]]
        assert await buffer.append_encoded({0: mixed}, 0) == {0: [False, True, True, False]}
        assert entry_sizes(redis_url, 0) == [5, 2]
        assert stream(redis_url, 0)[5:] == [b"value of b-0", b"value of b-1"]
        assert await buffer.append_encoded({0: pairs("a", 5)}, 0) == {0: [False] * 5}
        assert entry_sizes(redis_url, 0) == [5, 2]
        assert backlog(redis_url, 0) == 7 and buffer.lengths == [7]
        # Over EVENTS_PER_ENTRY new events, with a duplicate among them: full entries, then
        # the rest.
        many = [pairs("b", 1)[0], *pairs("c", 2 * EVENTS_PER_ENTRY + 3)]
        answer = await buffer.append_encoded({0: many}, 0)
        assert answer == {0: [False] + [True] * (2 * EVENTS_PER_ENTRY + 3)}
        assert entry_sizes(redis_url, 0) == [5, 2, EVENTS_PER_ENTRY, EVENTS_PER_ENTRY, 3]
        assert stream(redis_url, 0)[7:] == [v for _i, v in pairs("c", 2 * EVENTS_PER_ENTRY + 3)]
        assert backlog(redis_url, 0) == 2 * EVENTS_PER_ENTRY + 10


async def test_a_group_over_every_shard_is_one_script_call_not_one_per_shard(
    redis_url: str,
) -> None:
    async with buffer_at(redis_url) as buffer:
        await buffer.append_encoded({0: pairs("warm", 1)}, 0)
        with redis.Redis.from_url(redis_url) as client:
            client.config_resetstat()
        # Concurrent requests, each over all 16 shards: they share group commits.
        requests = [{s: pairs(f"r{r}s{s}", 3) for s in range(SHARDS)} for r in range(8)]
        answers = await asyncio.gather(*(buffer.append_encoded(w, 0) for w in requests))
        assert all(a == {s: [True] * 3 for s in range(SHARDS)} for a in answers)
        # Groups, not shards, make the calls: 8 requests over 16 shards took at most one
        # call each (a call per shard would have taken 16 or more).
        assert 1 <= script_calls(redis_url) <= 8
        for s in range(SHARDS):
            expected = [v for r in range(8) for _i, v in pairs(f"r{r}s{s}", 3)]
            expected += [b"value of warm-0"] if s == 0 else []
            assert sorted(stream(redis_url, s)) == sorted(expected)
        again = await buffer.append_encoded(requests[3], 0)
        assert again == {s: [False] * 3 for s in range(SHARDS)}


async def test_every_new_stream_gets_its_consumer_group(redis_url: str) -> None:
    async with buffer_at(redis_url) as buffer:
        await buffer.append_encoded({s: pairs(f"s{s}", 1) for s in range(SHARDS)}, 0)
    with redis.Redis.from_url(redis_url) as client:
        for s in range(SHARDS):
            groups = client.xinfo_groups(stream_key(s))
            assert [g["name"] for g in groups] == [CONSUMER_GROUP.encode()]


async def test_a_section_over_the_lua_stack_limit_is_looked_up_in_chunks(
    redis_url: str,
) -> None:
    """Lua's unpack() fails past 8000 values: one shard's 9,001 events (18,002 arguments,
    9,001 ids to look up, 18,002 values to record, the last chunk a partial one) still go in
    one call."""
    many = pairs("many", 9_001)
    async with buffer_at(redis_url, shards=1) as buffer:
        await buffer.append_encoded({0: pairs("warm", 1)}, 0)
        with redis.Redis.from_url(redis_url) as client:
            client.config_resetstat()
        first = await buffer.append_encoded({0: many}, 0)
        assert first == {0: [True] * 9_001}
        assert script_calls(redis_url) == 1
        mixed = many[8_999:9_001] + pairs("new", 2)
        assert await buffer.append_encoded({0: mixed}, 0) == {0: [False, False, True, True]}
        assert await buffer.append_encoded({0: many}, 0) == {0: [False] * 9_001}
        assert buffer.lengths == [9_004]
    assert len(stream(redis_url, 0)) == 9_004
    # In entries of at most EVENTS_PER_ENTRY events: 91 for the 9,001, one for the 2 new.
    assert entry_sizes(redis_url, 0) == [1] + [EVENTS_PER_ENTRY] * 90 + [1, 2]


async def test_duplicates_inside_one_call_are_told_apart(redis_url: str) -> None:
    """The same identity twice in one group (two requests, or twice in one) is appended once,
    including across the two sections of a shard whose group spans a bucket boundary."""
    async with buffer_at(redis_url, shards=1) as buffer:
        bucket_ms = buffer.bucket_ms
        twice = [(b"same", b"first"), (b"other", b"x"), (b"same", b"second")]
        assert await buffer.append_encoded({0: twice}, 0) == {0: [True, True, False]}
        # Two requests in one group, in consecutive buckets: two sections of one call.
        with redis.Redis.from_url(redis_url) as client:
            client.config_resetstat()
        early = buffer.append_encoded({0: [(b"edge", b"early"), (b"a", b"1")]}, bucket_ms - 1)
        late = buffer.append_encoded({0: [(b"edge", b"late"), (b"b", b"2")]}, bucket_ms)
        assert await asyncio.gather(early, late) == [{0: [True, True]}, {0: [False, True]}]
        assert script_calls(redis_url) == 1
    values = stream(redis_url, 0)
    assert values.count(b"first") == 1 and b"second" not in values
    assert b"early" in values and b"late" not in values


async def test_an_empty_write_is_answered_empty(redis_url: str) -> None:
    async with buffer_at(redis_url) as buffer:
        assert await buffer.append_encoded({}, 0) == {}
        assert await buffer.append_encoded({3: []}, 0) == {3: []}
        assert await buffer.append_encoded({3: pairs("after", 1)}, 0) == {3: [True]}
    # Nothing was appended for the empty writes: an empty entry would be a dead letter.
    assert entry_sizes(redis_url, 3) == [1] and backlog(redis_url, 3) == 1


def test_the_call_and_its_reply_line_up() -> None:
    keys = [["s0", "b0", "c0", "o0", "p0"], ["s1", "b1", "c1", "o1", "p1"]]
    # Section 0's lines came from two requests: joined with a newline between them.
    sections = [([b"i1", b"i2"], [b"v1", b"v2"]), ([b"i3"], [b"v3"])]
    call = append_call(keys, sections, b"900")
    assert call[1:12] == [10, "s0", "b0", "c0", "o0", "p0", "s1", "b1", "c1", "o1", "p1"]
    head = [b"900", EVENTS_FIELD, 5, EVENTS_PER_ENTRY]
    assert call[12:] == [*head, 2, b"i1", b"i2", b"v1\nv2", 1, b"i3", b"v3"]
    assert split_reply([7, 1, 0, 3, 1], [2, 1]) == [[7, 1, 0], [3, 1]]
    with pytest.raises(ValueError, match="answered 4 values, expected 5"):
        split_reply([7, 1, 0, 3], [2, 1])


async def test_a_reply_of_the_wrong_shape_is_unavailable_not_a_wrong_verdict(
    redis_url: str,
) -> None:
    """A server whose script answered otherwise (another version loaded under the same
    SHA cannot happen, but a proxy could mangle it) fails the group as a 503."""
    async with buffer_at(redis_url) as buffer:
        await buffer.append_encoded({0: pairs("warm", 1)}, 0)
        original = buffer._sort_replies

        def truncated(calls, replies, done, reload):  # type: ignore[no-untyped-def]
            return original(calls, [r[:-1] for r in replies], done, reload)

        buffer._sort_replies = truncated  # type: ignore[method-assign]
        with pytest.raises(BufferUnavailable, match="oddly"):
            await buffer.append_encoded({0: pairs("next", 2)}, 0)


async def test_a_retry_recorded_in_the_next_bucket_is_still_a_duplicate(redis_url: str) -> None:
    """A retry's first attempt can sit in the bucket after the current one: another
    gateway's clock ran ahead, or a later group reached Redis first. It is found there."""
    async with buffer_at(redis_url, shards=1) as buffer:
        later = buffer.bucket_ms + 5  # in bucket 1
        assert await buffer.append_encoded({0: [(b"retry", b"first try")]}, later) == {0: [True]}
        earlier = await buffer.append_encoded({0: [(b"retry", b"again"), (b"new", b"n")]}, 5)
        assert earlier == {0: [False, True]}
    assert stream(redis_url, 0) == [b"first try", b"n"]


async def test_a_value_that_is_not_one_line_is_refused_before_redis(redis_url: str) -> None:
    """Events travel one per line: an empty value or one holding a newline would shift the
    lines against their identities."""
    async with buffer_at(redis_url, shards=1) as buffer:
        for bad in (b"", b"two\nlines"):
            with pytest.raises(ValueError, match="one non-empty line"):
                await buffer.append_encoded({0: [(b"a", b"fine"), (b"b", bad)]}, 0)
    assert entry_sizes(redis_url, 0) == [] and backlog(redis_url, 0) == 0
