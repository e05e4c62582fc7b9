"""The Redis buffer: de-duplicate accepted events and append them to their shard's stream.

Concurrent requests' events go to Redis together (the group commit): on a single server
as one script call (``gateway.pipeline.append_script``), on a Redis Cluster as one call per
shard, pipelined (one round trip). The script checks each event's identity against its
shard's recent seen-buckets, records it, and appends the new events of each shard to its
stream as one entry (up to ``EVENTS_PER_ENTRY`` events), atomically; it answers per event
(appended or duplicate) and each shard's backlog counter, which keeps the backlog gauge
current for free.

De-duplication memory is bucketed by time: each bucket is a hash of identities, and a call
checks the current bucket and the two before it, each bucket lasting half the retry memory.
So an identity is remembered for at least the retry memory (at most 1.5 times it), for
about the memory of one hash field per event and no per-event key or expiry. A call also
checks the bucket after the current one when it exists: it does when another gateway's
clock runs ahead, or when a group of the next bucket reached Redis before this one, and a
retry recorded there must still be found.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.pipeline.append_script import APPEND_SCRIPT, append_call, split_reply
from gateway.pipeline.cluster_writes import ClusterWrites
from gateway.pipeline.durability import BufferUnavailable, Durability, describe
from gateway.pipeline.events import ScanEvent, encode_event, encode_lines
from gateway.pipeline.keyspace import (
    backlog_key,
    seen_field,
    seen_key,
    shard_of,
    stream_key,
)
from gateway.pipeline.resp import LeanConnection, LeanPool

__all__ = ["BufferState", "BufferUnavailable", "RedisBuffer"]

SEEN_BUCKETS_CHECKED: Final = 3
MIN_BUCKET_MS: Final = 1000
# With this many requests, or events, queued a group goes without waiting for the window:
# a batch of 100 already pays for its own round trip.
GROUP_TARGET: Final = 48
GROUP_EVENTS_TARGET: Final = 200
MAX_IN_FLIGHT: Final = 2
# Once this many events are queued they go to Redis from the queueing request's own turn of
# the loop when a group slot is free (RedisBuffer._send_at_once): Redis then works on them
# while the process checks the next requests, instead of the two taking turns. Fewer wait
# for the committer, which gathers small writes into one round trip (sending each single
# event at once cost 10% of the single-event rate; batches of 100 gained 13%; single events
# sent 32 at a time gained 13%: benchmarks/RESULTS.md).
SEND_AT_ONCE_EVENTS: Final = 32
# WAITAOF holds a group until the server's next fsync (up to its cron tick, ~100 ms): let
# more groups wait at once, or the fsync wait would cap throughput at 2 groups per tick.
MAX_IN_FLIGHT_WAITAOF: Final = 16


# A request's events of one shard: their identities, and their values one per line (the
# form a stream entry holds them in).
_Events = tuple[Sequence[bytes], bytes]


class _Write(NamedTuple):
    """One request's events waiting for the next group commit."""

    by_shard: Mapping[int, _Events]
    bucket: int
    done: asyncio.Future[dict[int, list[bool]]]


class _Call(NamedTuple):
    """One EVALSHA of the append script: the sections it carries (shard, bucket), their
    event counts, and its arguments."""

    sections: list[tuple[int, int]]
    sizes: list[int]
    args: list[Any]


class _Sent(NamedTuple):
    """A group ``_send_at_once`` wrote: its calls, and where their replies will come."""

    calls: list[_Call]
    connection: LeanConnection
    future: asyncio.Future[list[Any]]
    wait_aof: bool


class RedisBuffer:
    """Appends accepted events to the sharded streams, de-duplicated by identity.

    Group commit: the writes of concurrent requests are merged into one script call (one
    per shard on a cluster), sent as one pipelined write. While ``MAX_IN_FLIGHT`` groups
    are at Redis the next one gathers (it goes early once ``GROUP_TARGET`` requests or
    ``GROUP_EVENTS_TARGET`` events wait); when Redis is idle a write goes at once. Under
    load many requests share each round trip, and a lone request never waits for company.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        shards: int,
        retry_memory_s: float,
        fsync_always: bool = False,
        wait_replicas: int = 0,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.durability = Durability(fsync_always, wait_replicas)
        self._cluster_writes = (
            ClusterWrites(client, self.durability) if isinstance(client, RedisCluster) else None
        )
        self.shards = shards
        self.bucket_ms = max(MIN_BUCKET_MS, int(retry_memory_s * 1000) // 2)
        self._bucket_ttl_ms = str(self.bucket_ms * SEEN_BUCKETS_CHECKED).encode()
        # Last known backlog per shard (events not yet stored): updated by every append and
        # every poll.
        self.lengths: list[int] = [0] * shards
        self._queue: list[_Write] = []
        self._group_full = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._queued_events = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._section_keys: dict[tuple[int, int], list[str]] = {}
        self._lean: LeanPool | None = None  # single server: the group commit's connections

    async def append(self, events: Sequence[ScanEvent], now_ms: int) -> list[bool]:
        """Append checked events, each to its shard (a stable hash of its identity), in its
        stream format; in order, True where appended and False where a duplicate. Raises
        BufferUnavailable when Redis fails.

        If it raises, some shards may have been written: a retry then answers duplicate
        for those events, so nothing is stored twice.
        """
        shards = self.shards
        if len(events) == 1:  # a single scan, the most common request: no bookkeeping
            event = events[0]
            shard = shard_of(event.app_id, event.event_id, shards)
            identity = seen_field(event.app_id, event.event_id)
            return (await self._enqueue({shard: ((identity,), encode_event(event))}, now_ms))[shard]
        placed: list[int] = []
        identities: dict[int, list[bytes]] = {}
        members: dict[int, list[ScanEvent]] = {}
        for event in events:
            shard = shard_of(event.app_id, event.event_id, shards)
            identity = seen_field(event.app_id, event.event_id)
            if shard in members:
                members[shard].append(event)
                identities[shard].append(identity)
            else:
                members[shard] = [event]
                identities[shard] = [identity]
            placed.append(shard)
        if not members:
            return []
        by_shard = {
            shard: (identities[shard], encode_lines(group)) for shard, group in members.items()
        }
        appended = await self._enqueue(by_shard, now_ms)
        cursors = dict.fromkeys(appended, 0)
        fresh: list[bool] = []
        for shard in placed:
            fresh.append(appended[shard][cursors[shard]])
            cursors[shard] += 1
        return fresh

    async def append_encoded(
        self, by_shard: Mapping[int, Sequence[tuple[bytes, bytes]]], now_ms: int
    ) -> dict[int, list[bool]]:
        """``append`` below the stream format: (identity, value) pairs already sharded and
        encoded (a value holds no newline: an entry keeps one event per line); per shard,
        True where appended and False where a duplicate."""
        if any(not value or b"\n" in value for pairs in by_shard.values() for _i, value in pairs):
            raise ValueError("an encoded event is one non-empty line")
        events = {
            shard: ([identity for identity, _value in pairs], b"\n".join([v for _i, v in pairs]))
            for shard, pairs in by_shard.items()
            if pairs
        }
        appended = await self._enqueue(events, now_ms) if events else {}
        return {shard: appended.get(shard, []) for shard in by_shard}

    def _enqueue(
        self, by_shard: Mapping[int, _Events], now_ms: int
    ) -> asyncio.Future[dict[int, list[bool]]]:
        """Queue a write for the group commit (starting it if idle); its answer's future."""
        done: asyncio.Future[dict[int, list[bool]]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Write(by_shard, now_ms // self.bucket_ms, done))
        self._queued_events += sum(len(ids) for ids, _lines in by_shard.values())
        if len(self._queue) >= GROUP_TARGET or self._queued_events >= GROUP_EVENTS_TARGET:
            self._group_full.set()
        # Tried at every write, not only when the committer is idle: a turn of the loop that
        # reads many requests would otherwise queue them all for a committer that runs after
        # the last, and Redis and the client would wait for the whole turn, then the process
        # for them (a convoy: a fifth of the core idle, with 64 connections as with 192).
        if self._send_at_once():
            return done
        if self._committer is None or self._committer.done():
            # A context of its own: the committer serves many requests, so it must not
            # carry (and log under) the request id of the one that happened to start it.
            self._committer = asyncio.create_task(
                self._commit_queued(), name="group-commit", context=contextvars.Context()
            )
        return done

    async def _commit_queued(self) -> None:
        in_flight = self._in_flight
        while self._queue:
            # Requests that arrived in this turn of the event loop join first.
            await asyncio.sleep(0)
            # The group commit: while MAX_IN_FLIGHT groups are at Redis, what arrives
            # queues and goes together in the next group. When Redis is idle a write goes
            # at once, so a lone request never waits for company.
            limit = MAX_IN_FLIGHT_WAITAOF if self.durability.waits_for_aof else MAX_IN_FLIGHT
            while len(in_flight) >= limit and not self._group_full.is_set():
                await asyncio.wait(set(in_flight), return_when="FIRST_COMPLETED")
            if not self._queue:
                break  # a request sent what was queued from its own turn meanwhile
            self._group_full.clear()
            group, self._queue, self._queued_events = self._queue, [], 0
            task = asyncio.create_task(self._deliver(group))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        # Done when nothing is queued: groups still in flight answer their own requests,
        # and the next write starts a new committer.

    def _send_at_once(self) -> bool:
        """With a group slot free, write what is queued to Redis now, from the request's
        own turn of the loop, so Redis works on it while this process checks the requests
        that arrive next (a committer task would run only after all of them). Only on a
        single server, with an idle lean connection and the durability mode known; False
        leaves the queue to the committer."""
        limit = MAX_IN_FLIGHT_WAITAOF if self.durability.waits_for_aof else MAX_IN_FLIGHT
        if self._queued_events < SEND_AT_ONCE_EVENTS or len(self._in_flight) >= limit:
            return False
        if self.cluster or self._lean is None:
            return False
        if not self.durability.known:
            return False
        connection = self._lean.take_idle()
        if connection is None:
            return False
        group, self._queue, self._queued_events = self._queue, [], 0
        self._group_full.clear()
        sent: _Sent | None = None
        try:
            calls = self._calls(self._merge(group))
            wait_aof = self.durability.waits_for_aof
            future = connection.send(self._commands(calls, wait_aof))
            sent = _Sent(calls, connection, future, wait_aof)
        except Exception:
            # Whatever failed, the group is out of the queue: its task tries again through
            # the usual path, and answers every request of it, if only with a 503.
            connection.close()
        task = asyncio.create_task(
            self._deliver(group, sent, sent and sent.calls), context=contextvars.Context()
        )
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return True

    async def _deliver(
        self, group: list[_Write], sent: _Sent | None = None, calls: list[_Call] | None = None
    ) -> None:
        """Commit a group (already written when ``sent``) and answer each of its requests."""
        try:
            results = await self._commit(group, sent, calls)
        except Exception as exc:
            failure = (
                exc
                if isinstance(exc, BufferUnavailable)
                else BufferUnavailable(f"Redis write failed: {type(exc).__name__}")
            )
            for write in group:
                if not write.done.done():
                    write.done.set_exception(failure)
            return
        for write, result in zip(group, results, strict=True):
            if not write.done.done():
                write.done.set_result(result)

    async def _commit(
        self, group: list[_Write], sent: _Sent | None = None, calls: list[_Call] | None = None
    ) -> list[dict[int, list[bool]]]:
        """The whole group's script calls in one round trip; each request's verdicts."""
        if calls is None:
            calls = self._calls(self._merge(group))
        if not calls:  # nothing to write: every request of the group was empty
            return [{} for _write in group]
        replies = await (self._run(calls) if sent is None else self._receive(sent))
        cursors = dict.fromkeys(replies, 1)  # reply[0] is the shard's backlog
        results: list[dict[int, list[bool]]] = []
        for write in group:
            out: dict[int, list[bool]] = {}
            for shard, (ids, _lines) in write.by_shard.items():
                key = (shard, write.bucket)
                reply, at = replies[key], cursors[key]
                out[shard] = [flag == 1 for flag in reply[at : at + len(ids)]]
                cursors[key] = at + len(ids)
            results.append(out)
        for (shard, _bucket), reply in replies.items():
            self.lengths[shard] = int(reply[0])
        return results

    @staticmethod
    def _merge(group: list[_Write]) -> dict[tuple[int, int], tuple[list[bytes], list[bytes]]]:
        """The group's sections: per (shard, bucket), every request's identities, and their
        lines in one piece per request."""
        merged: dict[tuple[int, int], tuple[list[bytes], list[bytes]]] = {}
        for write in group:
            for shard, (ids, lines) in write.by_shard.items():
                key = (shard, write.bucket)
                section = merged.get(key)
                if section is None:
                    merged[key] = (list(ids), [lines])
                else:
                    section[0].extend(ids)
                    section[1].append(lines)
        return merged

    def _calls(self, merged: dict[tuple[int, int], tuple[list[bytes], list[bytes]]]) -> list[_Call]:
        """The script calls for a group's sections: one for all of them on a single server;
        one per section on a cluster, where a call's keys must share a slot."""
        if not merged:
            return []
        chunks = [[key] for key in merged] if self.cluster else [list(merged)]
        calls: list[_Call] = []
        for sections in chunks:
            parts = [merged[key] for key in sections]
            keys = [self._keys(*key) for key in sections]
            args = append_call(keys, parts, self._bucket_ttl_ms)
            calls.append(_Call(sections, [len(ids) for ids, _lines in parts], args))
        return calls

    async def _receive(self, sent: _Sent) -> dict[tuple[int, int], list[Any]]:
        """``_run``'s answer for a group ``_send_at_once`` wrote: its replies, and the calls
        whose script the server had lost run again through ``_run`` (which loads it)."""
        assert self._lean is not None
        try:
            raw = await sent.connection.receive(sent.future)
        except RedisError as exc:
            self.durability.forget()
            raise BufferUnavailable(describe(exc)) from exc
        finally:
            self._lean.give_back(sent.connection)
        replies = self.durability.confirmed(raw, len(sent.calls), sent.wait_aof)
        done: dict[tuple[int, int], list[Any]] = {}
        missing = self._sort_replies(sent.calls, replies, done, reload=True)
        if missing:
            done.update(await self._run(missing))
        return done

    def _keys(self, shard: int, bucket: int) -> list[str]:
        """A section's keys: the stream, its backlog counter, the current seen-bucket, the
        one after it, then the older ones (cached: they change once per bucket)."""
        keys = self._section_keys.get((shard, bucket))
        if keys is None:
            if len(self._section_keys) > 4 * self.shards:
                self._section_keys.clear()
            keys = [stream_key(shard), backlog_key(shard)]
            keys += [seen_key(shard, bucket), seen_key(shard, bucket + 1)]
            keys += [seen_key(shard, bucket - i) for i in range(1, SEEN_BUCKETS_CHECKED)]
            self._section_keys[(shard, bucket)] = keys
        return keys

    @staticmethod
    def _sort_replies(
        calls: list[_Call], replies: list[Any], done: dict[tuple[int, int], list[Any]],
        reload: bool,
    ) -> list[_Call]:  # fmt: skip
        """Each call's reply cut into ``done`` per section; the calls whose script the
        server had lost (NOSCRIPT), when ``reload``; any other error raised."""
        missing: list[_Call] = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError) and reload:
                missing.append(call)
            elif isinstance(reply, BaseException):
                raise BufferUnavailable(describe(reply))
            else:
                try:
                    done.update(zip(call.sections, split_reply(reply, call.sizes), strict=True))
                except (TypeError, ValueError) as exc:
                    raise BufferUnavailable("Redis answered the append script oddly") from exc
        return missing

    async def _run(self, calls: list[_Call]) -> dict[tuple[int, int], list[Any]]:
        """EVALSHA every call in one pipeline; load the script once if the server lost it
        (a restart empties the script cache) and rerun only the calls that missed it."""
        pending = calls
        done: dict[tuple[int, int], list[Any]] = {}
        wait_aof = await self.durability.needs_waitaof(self.client)
        for attempt in range(2):
            try:
                if self._cluster_writes is not None:
                    replies = await self._cluster_writes.send(
                        [call.args for call in pending], wait_aof
                    )
                else:
                    replies = await self._send(pending, wait_aof)
            except (RedisError, RedisClusterException) as exc:
                self.durability.forget()
                raise BufferUnavailable(describe(exc)) from exc
            missing = self._sort_replies(pending, replies, done, reload=attempt == 0)
            if not missing:
                break
            try:
                # On a cluster, SCRIPT LOAD goes to every primary.
                await self.client.script_load(APPEND_SCRIPT)
            except RedisError as exc:
                raise BufferUnavailable(describe(exc)) from exc
            pending = missing
        return done

    def _commands(self, calls: list[_Call], wait_aof: bool) -> list[tuple[Any, ...]]:
        """The group's EVALSHAs, then the confirmations its durability asks for."""
        return self.durability.commands([call.args for call in calls], wait_aof)

    async def _send(self, calls: list[_Call], wait_aof: bool = False) -> list[Any]:
        """EVALSHA each call, pipelined on one lean connection (``gateway.pipeline.resp``):
        one write, then the replies in order (an error reply is returned, not raised).
        With ``wait_aof`` the pipeline ends with WAITAOF, and an unconfirmed fsync fails
        the whole group. (Why not redis-py's Pipeline: ``gateway.pipeline.resp``.)"""
        if self._lean is None:
            self._lean = LeanPool(self.client.connection_pool)
        commands = self._commands(calls, wait_aof)
        replies = await self._lean.exchange(commands)
        return self.durability.confirmed(replies, len(calls), wait_aof)

    def close(self) -> None:
        """Close the lean connections (the client, which the caller owns, stays open)."""
        if self._lean is not None:
            self._lean.close()

    async def poll_lengths(self) -> list[int]:
        """Every shard's backlog (events not yet stored), in one round trip."""
        return (await self.poll()).lengths

    async def poll(self) -> BufferState:
        """Every shard's backlog and the server's memory, in one round trip."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for shard in range(self.shards):
                pipe.get(backlog_key(shard))
            if self.cluster:
                replies = await pipe.execute()
                memory = await self._fullest_primary()
            else:
                pipe.info("memory")
                *replies, memory = await pipe.execute()
        except RedisError as exc:
            raise BufferUnavailable(describe(exc)) from exc
        lengths = [int(n or 0) for n in replies]
        self.lengths = lengths
        return BufferState(
            lengths, int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
        )

    async def _fullest_primary(self) -> dict[str, Any]:
        """INFO memory of the cluster's primary nearest its maxmemory: the one that will
        refuse writes first."""
        client: Any = self.client
        per_node = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        infos = list(per_node.values()) if isinstance(per_node, dict) else [per_node]
        infos = [i for i in infos if isinstance(i, dict) and "used_memory" in i] or [per_node]

        def fullness(info: dict[str, Any]) -> float:
            limit = int(info.get("maxmemory", 0))
            return int(info.get("used_memory", 0)) / limit if limit else 0.0

        return max(infos, key=fullness)

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False


class BufferState(NamedTuple):
    """What a poll of the buffer reads (``RedisBuffer.poll``)."""

    lengths: list[int]  # events not yet stored, per shard
    memory_used_bytes: int
    maxmemory_bytes: int  # 0: no limit
