"""The Redis buffer: de-duplicate accepted events and append them to their shard's stream.

One script call per shard per request, all shards in one pipeline (one round trip). The
script checks the event's identity against the shard's recent seen-buckets, records it,
and appends the event to the stream, atomically; it answers per event (appended or
duplicate) and the stream's length, which keeps the backlog gauge current for free.

De-duplication memory is bucketed by time: each bucket is a hash of identities, and a call
checks the current bucket and the two before it, each bucket lasting half the retry memory.
So an identity is remembered for at least the retry memory (at most 1.5 times it), for
about the memory of one hash field per event and no per-event key or expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

from gateway.pipeline.append_script import APPEND_SCRIPT, APPEND_SHA
from gateway.pipeline.events import ScanEvent, encode_event
from gateway.pipeline.keyspace import (
    EVENT_FIELD,
    seen_field,
    seen_key,
    shard_of,
    stream_key,
)
from gateway.pipeline.resp import LeanConnection, LeanPool

log = logging.getLogger(__name__)

SEEN_BUCKETS_CHECKED: Final = 3
MIN_BUCKET_MS: Final = 1000
# With this many requests, or events, queued a group goes without waiting for the window:
# a batch of 100 already pays for its own round trip.
GROUP_TARGET: Final = 48
GROUP_EVENTS_TARGET: Final = 200
MAX_IN_FLIGHT: Final = 2
# A write of this many events goes to Redis from its request's own turn of the loop when a
# group slot is free (RedisBuffer._send_at_once): Redis then works on it while the process
# checks the next requests, instead of the two taking turns. Fewer wait for the committer,
# which gathers small writes into one round trip (sending single events at once cost 10%
# of the single-event rate; batches of 100 gained 13%: benchmarks/RESULTS.md).
SEND_AT_ONCE_EVENTS: Final = 50
# WAITAOF holds a group until the server's next fsync (up to its cron tick, ~100 ms): let
# more groups wait at once, or the fsync wait would cap throughput at 2 groups per tick.
MAX_IN_FLIGHT_WAITAOF: Final = 16
WAITAOF_TIMEOUT_MS: Final = 2000
WAIT_TIMEOUT_MS: Final = 2000


class BufferUnavailable(Exception):
    """Redis did not take the write (down, loading, out of memory): answer 503."""


class _Write(NamedTuple):
    """One request's events waiting for the next group commit."""

    by_shard: Mapping[int, Sequence[tuple[bytes, bytes]]]
    bucket: int
    done: asyncio.Future[dict[int, list[bool]]]


class _Sent(NamedTuple):
    """A group ``_send_at_once`` wrote: its calls, and where their replies will come."""

    merged: dict[tuple[int, int], list[Any]]
    connection: LeanConnection
    future: asyncio.Future[list[Any]]
    wait_aof: bool


class RedisBuffer:
    """Appends accepted events to the sharded streams, de-duplicated by identity.

    Group commit: the writes of concurrent requests are merged into one script call per
    shard, sent as one pipelined write. While ``MAX_IN_FLIGHT`` groups are at Redis the
    next one gathers (it goes early once ``GROUP_TARGET`` requests or
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
        # With wait_replicas a write is answered only once that many replicas have it
        # (WAIT after the group's scripts, on the same connection): a master that dies then
        # loses nothing it answered for.
        self.wait_replicas = wait_replicas
        # With fsync_always a write is answered only once it is on the server's disk: the
        # server fsyncs every write itself (appendfsync always), or the group's pipeline
        # ends with WAITAOF 1 0 (Redis 7.2+, Valkey), which returns once the local
        # append-only file holds it. Which of the two is found out at the first write.
        self.fsync_always = fsync_always
        self._fsync_mode: str | None = None  # "server" or "waitaof", once known
        self.shards = shards
        self.bucket_ms = max(MIN_BUCKET_MS, int(retry_memory_s * 1000) // 2)
        self._bucket_ttl_ms = str(self.bucket_ms * SEEN_BUCKETS_CHECKED).encode()
        # Last known stream length per shard: updated by every append and every poll.
        self.lengths: list[int] = [0] * shards
        self._queue: list[_Write] = []
        self._group_full = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._queued_events = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._heads: dict[tuple[int, int], list[Any]] = {}
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
            pair = (seen_field(event.app_id, event.event_id), encode_event(event))
            return (await self._enqueue({shard: (pair,)}, now_ms))[shard]
        placed: list[int] = []
        by_shard: dict[int, list[tuple[bytes, bytes]]] = {}
        for event in events:
            shard = shard_of(event.app_id, event.event_id, shards)
            by_shard.setdefault(shard, []).append(
                (seen_field(event.app_id, event.event_id), encode_event(event))
            )
            placed.append(shard)
        if not by_shard:
            return []
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
        encoded; per shard, True where appended and False where a duplicate."""
        return await self._enqueue(by_shard, now_ms)

    def _enqueue(
        self, by_shard: Mapping[int, Sequence[tuple[bytes, bytes]]], now_ms: int
    ) -> asyncio.Future[dict[int, list[bool]]]:
        """Queue a write for the group commit (starting it if idle); its answer's future."""
        done: asyncio.Future[dict[int, list[bool]]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Write(by_shard, now_ms // self.bucket_ms, done))
        self._queued_events += sum(len(pairs) for pairs in by_shard.values())
        if len(self._queue) >= GROUP_TARGET or self._queued_events >= GROUP_EVENTS_TARGET:
            self._group_full.set()
        if (self._committer is None or self._committer.done()) and not self._send_at_once():
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
            limit = MAX_IN_FLIGHT_WAITAOF if self._fsync_mode == "waitaof" else MAX_IN_FLIGHT
            while len(in_flight) >= limit and not self._group_full.is_set():
                await asyncio.wait(set(in_flight), return_when="FIRST_COMPLETED")
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
        limit = MAX_IN_FLIGHT_WAITAOF if self._fsync_mode == "waitaof" else MAX_IN_FLIGHT
        if self._queued_events < SEND_AT_ONCE_EVENTS or len(self._in_flight) >= limit:
            return False
        if self.cluster or self._lean is None:
            return False
        if self.fsync_always and self._fsync_mode is None:
            return False
        connection = self._lean.take_idle()
        if connection is None:
            return False
        group, self._queue, self._queued_events = self._queue, [], 0
        self._group_full.clear()
        merged = self._merge(group)
        wait_aof = self._fsync_mode == "waitaof"
        try:
            future = connection.send(self._commands(list(merged.values()), wait_aof))
        except RedisError:
            connection.close()
            sent = None  # the group's task tries again through the usual path
        else:
            sent = _Sent(merged, connection, future, wait_aof)
        task = asyncio.create_task(
            self._deliver(group, sent, merged), context=contextvars.Context()
        )
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return True

    async def _deliver(
        self,
        group: list[_Write],
        sent: _Sent | None = None,
        merged: dict[tuple[int, int], list[Any]] | None = None,
    ) -> None:
        """Commit a group (already written when ``sent``) and answer each of its requests."""
        try:
            results = await self._commit(group, sent, merged)
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
        self,
        group: list[_Write],
        sent: _Sent | None = None,
        merged: dict[tuple[int, int], list[Any]] | None = None,
    ) -> list[dict[int, list[bool]]]:
        """One script call per (shard, bucket) for the whole group, in one round trip."""
        if merged is None:
            merged = self._merge(group)
        replies = await (self._run(merged) if sent is None else self._receive(sent))
        cursors = dict.fromkeys(merged, 1)  # reply[0] is the stream length
        results: list[dict[int, list[bool]]] = []
        for write in group:
            out: dict[int, list[bool]] = {}
            for shard, pairs in write.by_shard.items():
                key = (shard, write.bucket)
                reply, at = replies[key], cursors[key]
                out[shard] = [flag == 1 for flag in reply[at : at + len(pairs)]]
                cursors[key] = at + len(pairs)
            results.append(out)
        for (shard, _bucket), reply in replies.items():
            self.lengths[shard] = int(reply[0])
        return results

    def _merge(self, group: list[_Write]) -> dict[tuple[int, int], list[Any]]:
        """The group's script calls: one per (shard, bucket), every request's pairs in it."""
        merged: dict[tuple[int, int], list[Any]] = {}
        for write in group:
            for shard, pairs in write.by_shard.items():
                key = (shard, write.bucket)
                args = merged.get(key)
                if args is None:
                    args = merged[key] = [*self._call_head(shard, write.bucket)]
                for identity, value in pairs:
                    args.append(identity)
                    args.append(value)
        return merged

    async def _receive(self, sent: _Sent) -> dict[Any, list[int]]:
        """``_run``'s answer for a group ``_send_at_once`` wrote: its replies, and the calls
        whose script the server had lost run again through ``_run`` (which loads it)."""
        assert self._lean is not None
        try:
            raw = await sent.connection.receive(sent.future)
        except RedisError as exc:
            self._fsync_mode = None  # the server may come back configured otherwise
            raise BufferUnavailable(_describe(exc)) from exc
        finally:
            self._lean.give_back(sent.connection)
        replies = self._confirmed(raw, len(sent.merged), sent.wait_aof)
        done: dict[Any, list[int]] = {}
        missing: dict[Any, list[Any]] = {}
        for (key, call), reply in zip(sent.merged.items(), replies, strict=True):
            if isinstance(reply, NoScriptError):
                missing[key] = call
            elif isinstance(reply, BaseException):
                raise BufferUnavailable(_describe(reply))
            else:
                done[key] = reply
        if missing:
            done.update(await self._run(missing))
        return done

    def _call_head(self, shard: int, bucket: int) -> list[Any]:
        """EVALSHA's arguments before the event pairs (cached: they change per bucket)."""
        head = self._heads.get((shard, bucket))
        if head is None:
            if len(self._heads) > 4 * self.shards:
                self._heads.clear()
            keys = [stream_key(shard)]
            keys += [seen_key(shard, bucket - i) for i in range(SEEN_BUCKETS_CHECKED)]
            head = [APPEND_SHA, len(keys), *keys, self._bucket_ttl_ms, EVENT_FIELD]
            self._heads[(shard, bucket)] = head
        return head

    async def _run(self, calls: dict[Any, list[Any]]) -> dict[Any, list[int]]:
        """EVALSHA every call in one pipeline; load the script once if the server lost it
        (a restart empties the script cache) and rerun only the calls that missed it."""
        pending = dict(calls)
        done: dict[Any, list[int]] = {}
        wait_aof = self.fsync_always and await self._needs_waitaof()
        for attempt in range(2):
            try:
                if self.cluster:
                    replies = await self._send_cluster(list(pending.values()), wait_aof)
                else:
                    replies = await self._send(list(pending.values()), wait_aof)
            except RedisError as exc:
                self._fsync_mode = None  # the server may come back configured otherwise
                raise BufferUnavailable(_describe(exc)) from exc
            missing: dict[Any, list[Any]] = {}
            for (key, call), reply in zip(pending.items(), replies, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing[key] = call
                elif isinstance(reply, BaseException):
                    raise BufferUnavailable(_describe(reply))
                else:
                    done[key] = reply
            if not missing:
                break
            try:
                # On a cluster, SCRIPT LOAD goes to every primary.
                await self.client.script_load(APPEND_SCRIPT)
            except RedisError as exc:
                raise BufferUnavailable(_describe(exc)) from exc
            pending = missing
        return done

    async def _needs_waitaof(self) -> bool:
        """Whether a group must end with WAITAOF to be on disk when answered; raises
        BufferUnavailable when the server can promise neither way."""
        if self._fsync_mode is None:
            try:
                config: Any = await self.client.config_get("appendfsync")
                fsync = config.get(b"appendfsync", config.get("appendfsync", b""))
                if fsync in (b"always", "always"):
                    self._fsync_mode = "server"
                elif await self._has_waitaof():
                    self._fsync_mode = "waitaof"
            except RedisError as exc:
                raise BufferUnavailable(_describe(exc)) from exc
            if self._fsync_mode is None:
                raise BufferUnavailable(
                    "SCANGATE_REDIS_FSYNC=always, but the server neither fsyncs every write "
                    "(appendfsync always) nor has WAITAOF (Redis 7.2+, Valkey)"
                )
            log.info("durable writes: %s", self._fsync_mode)
        return self._fsync_mode == "waitaof"

    async def _has_waitaof(self) -> bool:
        """Whether the server knows WAITAOF (Redis 7.2+, Valkey): asked by running it with
        nothing to wait for. (redis-py's COMMAND INFO reply parser fails on an unknown
        command with a TypeError, so a Redis 7.0 answered every write 503 as an error.)"""
        try:
            await self.client.execute_command("WAITAOF", 0, 0, 1)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            if "unknown command" in str(exc).lower():
                return False
            raise
        return True

    async def _send_cluster(self, calls: list[list[Any]], wait_aof: bool) -> list[Any]:
        """``_send`` for a Redis Cluster: the calls grouped by the node that holds their
        slot (each call's keys share one hash tag), every node's group pipelined on one of
        its connections, the nodes concurrently. A node that answers MOVED or fails makes
        the client re-read the cluster's layout before the next write."""
        client: Any = self.client
        await client.initialize()  # the slot map, read once (a no-op afterwards)
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, call in enumerate(calls):
            node = client.get_node_from_key(call[2])  # EVALSHA sha numkeys key ...
            by_node.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(calls)

        async def on_node(node: Any, indexes: list[int]) -> None:
            conn = node.acquire_connection()
            try:
                got = await self._pipelined(conn, [calls[i] for i in indexes], wait_aof)
            except BaseException:
                await conn.disconnect()
                raise
            finally:
                node.release(conn)
            for i, reply in zip(indexes, got, strict=True):
                replies[i] = reply

        try:
            await asyncio.gather(*(on_node(n, idx) for n, idx in by_node.values()))
        except (RedisError, OSError, BufferUnavailable):
            await self._refresh_layout()
            raise
        if any(isinstance(r, ResponseError) and not isinstance(r, NoScriptError) for r in replies):
            await self._refresh_layout()  # MOVED, ASK, CLUSTERDOWN: the layout changed
        return replies

    async def _refresh_layout(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.nodes_manager.initialize()  # type: ignore[attr-defined]

    def _commands(self, calls: list[list[Any]], wait_aof: bool) -> list[tuple[Any, ...]]:
        """EVALSHA each call, then WAITAOF / WAIT when asked for."""
        commands: list[tuple[Any, ...]] = [("EVALSHA", *c) for c in calls]
        if wait_aof:
            commands.append(("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS))
        if self.wait_replicas:
            commands.append(("WAIT", self.wait_replicas, WAIT_TIMEOUT_MS))
        return commands

    def _confirmed(self, replies: list[Any], calls: int, wait_aof: bool) -> list[Any]:
        """The calls' replies, once the WAITAOF / WAIT replies after them say the group is
        as durable as promised (else BufferUnavailable)."""
        confirmations = replies[calls:]
        if wait_aof:
            confirmation = confirmations.pop(0)
            if isinstance(confirmation, BaseException):
                raise BufferUnavailable(_describe(confirmation))
            if int(confirmation[0]) < 1:
                raise BufferUnavailable("Redis did not confirm the fsync in time")
        if self.wait_replicas:
            confirmation = confirmations.pop(0)
            if isinstance(confirmation, BaseException):
                raise BufferUnavailable(_describe(confirmation))
            if int(confirmation) < self.wait_replicas:
                raise BufferUnavailable(
                    f"only {int(confirmation)} of {self.wait_replicas} replicas confirmed "
                    "the write in time"
                )
        return replies[:calls]

    async def _pipelined(self, conn: Any, calls: list[list[Any]], wait_aof: bool) -> list[Any]:
        """The group on one of redis-py's connections (a cluster node's), in one write."""
        commands = self._commands(calls, wait_aof)
        await conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return self._confirmed(replies, len(calls), wait_aof)

    async def _send(self, calls: list[list[Any]], wait_aof: bool = False) -> list[Any]:
        """EVALSHA each call, pipelined on one lean connection (``gateway.pipeline.resp``):
        one write, then the replies in order (an error reply is returned, not raised).
        With ``wait_aof`` the pipeline ends with WAITAOF, and an unconfirmed fsync fails
        the whole group. (Why not redis-py's Pipeline: ``gateway.pipeline.resp``.)"""
        if self._lean is None:
            self._lean = LeanPool(self.client.connection_pool)
        replies = await self._lean.exchange(self._commands(calls, wait_aof))
        return self._confirmed(replies, len(calls), wait_aof)

    def close(self) -> None:
        """Close the lean connections (the client, which the caller owns, stays open)."""
        if self._lean is not None:
            self._lean.close()

    async def poll_lengths(self) -> list[int]:
        """Every shard's stream length (entries not yet flushed), in one round trip."""
        return (await self.poll()).lengths

    async def poll(self) -> BufferState:
        """Every shard's stream length and the server's memory, in one round trip."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for shard in range(self.shards):
                pipe.xlen(stream_key(shard))
            if self.cluster:
                replies = await pipe.execute()
                memory = await self._fullest_primary()
            else:
                pipe.info("memory")
                *replies, memory = await pipe.execute()
        except RedisError as exc:
            raise BufferUnavailable(_describe(exc)) from exc
        lengths = [int(n) for n in replies]
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

    lengths: list[int]  # entries not yet flushed, per shard
    memory_used_bytes: int
    maxmemory_bytes: int  # 0: no limit


def _describe(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0]
    if isinstance(exc, OutOfMemoryError) or text.startswith("OOM"):
        return "Redis is out of memory (maxmemory reached)"
    return f"Redis unavailable: {type(exc).__name__}"
