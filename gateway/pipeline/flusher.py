"""The flusher: the sink that moves buffered events from the shard streams into storage.

One consumer group per shard stream; many flusher processes may read at once (each entry
goes to one of them). An entry holds one or more events, one per line. A batch closes at
``flush_batch`` events or ``flush_max_age`` after its first entry. It is written to storage
in one transaction (events plus re-derived visits); only after the commit are its entries
acknowledged and deleted from the stream, and the shard's backlog counter lowered by the
events they held, in one script, so an entry two flushers stored is counted off once. The
next batch is read while one is being
stored, but batches are stored one at a time, in order. A flusher that dies leaves its entries
pending; after ``flush_claim_idle`` another one claims them (XAUTOCLAIM) and stores them
again, which storage's unique key turns into exactly-once rows. An event that cannot be
decoded goes to the shard's dead-letter stream (the rest of its entry is stored) and never
blocks its shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from gateway.metrics import FlusherMetrics, observe_many
from gateway.pipeline.events import ScanEvent, decode_event
from gateway.pipeline.keyspace import (
    CONSUMER_GROUP,
    EVENT_FIELD,
    EVENTS_FIELD,
    EVENTS_PER_ENTRY,
    LAST_FLUSH_KEY,
    backlog_key,
    dead_letter_key,
    entry_values,
    stream_key,
)
from gateway.settings import Settings
from storage import Storage
from storage.models import PairingRules

log = logging.getLogger(__name__)

MAX_BLOCK_MS: Final = 1000  # wake at least this often to notice a stop request
# While a batch is being stored, poll for the next one this often until a first entry
# comes; the poll stops the moment the store is done.
READ_AHEAD_POLL_S: Final = 0.01
CLAIM_EVERY_S: Final = 5.0
PURGE_EVERY_S: Final = 24 * 3600.0
PREPARE_EVERY_S: Final = 3600.0
DAYS_AHEAD: Final = 7  # partitions made this far ahead, hourly
BACKLOG_EVERY_S: Final = 1.0
VENUE_KINDS_EVERY_S: Final = 30.0
RETRY_BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0, 5.0)
STORE_ATTEMPT_TIMEOUT_S: Final = 120.0

# Acknowledges and deletes a shard's stored entries, and lowers its backlog counter by the
# events of those this call deleted: an entry two flushers stored (one claimed it from the
# other) is counted off once, and its undecodable events go to the dead-letter stream once,
# by the call whose delete took it. A stream left empty sets its counter to zero: the append
# script counts in the same call that appends, so nothing can be uncounted then, and a
# counter that drifted (an older flusher deleting counted entries during an upgrade, an
# operator deleting by hand) is put right whenever its shard drains. allow-oom: at
# maxmemory a flusher must still drain, and deleting is what frees the memory.
ACK_SCRIPT: Final = b"""#!lua flags=allow-oom
-- KEYS: the stream, its backlog counter, its dead-letter stream. ARGV[1]: the consumer
--   group; then per entry: its id, the events it counts in the backlog, its number of dead
--   letters d, then each dead letter as its length k and k field and value arguments.
local a, gone, kept = 2, 0, 0
while a <= #ARGV do
  local id, counted, dead = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  redis.call('XACK', KEYS[1], ARGV[1], id)
  local deleted = redis.call('XDEL', KEYS[1], id) == 1
  if deleted then gone = gone + counted end
  for _ = 1, dead do
    local k = tonumber(ARGV[a])
    if deleted then
      redis.call('XADD', KEYS[3], '*', unpack(ARGV, a + 1, a + k))
      kept = kept + 1
    end
    a = a + k + 1
  end
end
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], 0)
elseif gone > 0 then
  redis.call('DECRBY', KEYS[2], gone)
end
return {gone, kept}
"""
# Shards acknowledged at once: each is a call of its own (its keys share one slot), and a
# cluster node's client holds a bounded number of connections.
ACK_CONCURRENCY: Final = 16


class Entry(NamedTuple):
    shard: int
    entry_id: bytes
    fields: dict[bytes, bytes]

    @property
    def events(self) -> int:
        """How many events it holds (an undecodable entry: one, for the dead-letter stream)."""
        packed = self.fields.get(EVENTS_FIELD)
        return 1 if packed is None else packed.count(b"\n") + 1

    @property
    def counted(self) -> int:
        """How many of its events the backlog counter holds: entries written before the
        counter (one event in ``EVENT_FIELD``) are not in it."""
        return 0 if EVENTS_FIELD not in self.fields else self.events


def pairing_rules(settings: Settings) -> PairingRules:
    return PairingRules(
        repeat_window_ms=int(settings.repeat_window_s * 1000),
        max_stay_ms=int(settings.max_stay_s * 1000),
        orphan_stay_ms=int(settings.orphan_stay_s * 1000),
    )


def with_venue_stays(
    rules: PairingRules, settings: Settings, kinds: dict[str, str]
) -> PairingRules:
    """``rules`` with the maximum stay of each registered venue (id -> kind) whose kind has
    its own (``SCANGATE_KIND_MAX_STAY``)."""
    stays_ms = {k: int(s * 1000) for k, s in settings.kind_max_stay_s.items()}
    by_venue = {v: stays_ms[k] for v, k in kinds.items() if k in stays_ms}
    if by_venue == rules.venue_max_stay_ms:
        return rules
    return dataclasses.replace(rules, venue_max_stay_ms=by_venue)


def consumer_name() -> str:
    """Unique per process: a restarted flusher is a new consumer, and what the old one left
    pending is claimed like any dead consumer's."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Flusher:
    def __init__(
        self,
        client: aioredis.Redis,
        storage: Storage,
        settings: Settings,
        metrics: FlusherMetrics,
        consumer: str | None = None,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.storage = storage
        self.settings = settings
        self.metrics = metrics
        self.consumer = consumer or consumer_name()
        self.rules = pairing_rules(settings)
        self._streams = {stream_key(s): s for s in range(settings.shards)}
        self._groups_ready = False
        # When each periodic job last ran, on the monotonic clock: never, so the first step
        # runs them all. (0.0 would mean "at boot": a host up for less than a day would
        # then not purge until it was.)
        never = float("-inf")
        self._last_claim = never
        self._last_purge = never
        self._last_prepare = never
        self._last_backlog = never
        self._last_venue_kinds = never
        # Entries read while the previous batch was being stored: the next batch.
        self._read_ahead: list[Entry] = []
        self._ack = client.register_script(ACK_SCRIPT)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Flush until ``stop`` is set; a batch being written is finished first."""
        log.info(
            "flusher %s: %d shards, batch %d / %.0f ms",
            self.consumer,
            self.settings.shards,
            self.settings.flush_batch,
            self.settings.flush_max_age_s * 1000,
        )
        while not stop.is_set():
            try:
                await self.step(stop)
            except RedisError as exc:
                self.metrics.flush_errors.inc()
                log.warning("flusher: Redis unavailable (%s); retrying", type(exc).__name__)
                self._groups_ready = False
                await _sleep_unless(stop, 1.0)
                if self.cluster:
                    # A master may have failed over: read the cluster's layout afresh.
                    with contextlib.suppress(RedisError, OSError):
                        await self.client.nodes_manager.initialize()  # type: ignore[attr-defined]
        # What was read ahead is pending on this consumer: store it now rather than leave it
        # to another flusher's claim, which waits flush_claim_idle first.
        batch, self._read_ahead = self._read_ahead, []
        if batch:
            try:
                await self.flush(batch, stop)
            except RedisError as exc:
                self.metrics.flush_errors.inc()
                log.warning(
                    "flusher: acknowledging the last batch failed (%s); it will be claimed",
                    type(exc).__name__,
                )

    async def step(self, stop: asyncio.Event | None = None) -> int:
        """One round: claim abandoned entries when due, read a batch, store it, purge when
        due. The number of events handled."""
        await self.ensure_groups()
        now = time.monotonic()
        handled = 0
        if now - self._last_venue_kinds >= VENUE_KINDS_EVERY_S:  # before the first batch too
            self._last_venue_kinds = now
            await self.refresh_venue_stays()
        if now - self._last_claim >= CLAIM_EVERY_S:
            self._last_claim = now
            claimed = await self.claim_abandoned()
            if claimed:
                await self.flush(claimed, stop)
                handled += sum(entry.events for entry in claimed)
        batch, self._read_ahead = self._read_ahead, []
        if not batch:
            batch = await self.collect(stop)
        if batch:
            # Read the next batch while this one is stored: reading and decoding overlap the
            # storage's own work (SQLite's C code on its thread, PostgreSQL's server), and
            # the next batch's age starts counting while it waits. Only one batch is stored
            # at a time, so batches still commit in the order they were read.
            storing = asyncio.ensure_future(self.flush(batch, stop))
            try:
                self._read_ahead = await self.collect(stop, until=storing)
            finally:
                await storing
            handled += sum(entry.events for entry in batch)
        if now - self._last_backlog >= BACKLOG_EVERY_S:
            self._last_backlog = now
            await self._report_backlog()
        if now - self._last_prepare >= PREPARE_EVERY_S:
            self._last_prepare = now
            try:
                await self.storage.prepare_days(DAYS_AHEAD)
            except Exception:
                self.metrics.flush_errors.inc()
                log.exception("flusher: preparing the next days failed; trying again in an hour")
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            await self.purge()
        return handled

    async def ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for key in self._streams:
            try:
                # From id 0: entries accepted before any flusher ran are flushed too.
                await self.client.xgroup_create(key, CONSUMER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                # BUSYGROUP: it exists. OOM: Redis at maxmemory refuses XGROUP CREATE even
                # for a group that exists; the gateway makes the group with the stream, so
                # carry on and drain (XREADGROUP, XACK and XDEL are still allowed).
                if "BUSYGROUP" not in str(exc) and not isinstance(exc, OutOfMemoryError):
                    raise
        self._groups_ready = True

    async def collect(
        self, stop: asyncio.Event | None = None, until: asyncio.Future[None] | None = None
    ) -> list[Entry]:
        """Read until the batch holds ``flush_batch`` events or ``flush_max_age`` has passed
        since its first entry.

        With ``until`` (the batch being stored) it reads ahead: until a first entry comes
        it polls without blocking, and gives up as soon as ``until`` is done, so the caller
        never waits on Redis for entries that are not coming.
        """
        size = self.settings.flush_batch
        max_age_s = self.settings.flush_max_age_s
        streams = len(self._streams)
        entries: list[Entry] = []
        events = 0
        deadline: float | None = None
        while events < size and not (stop is not None and stop.is_set()):
            block_ms: int | None
            if deadline is None:
                block_ms = MAX_BLOCK_MS if until is None else None  # None: do not block
            else:
                block_ms = int((deadline - time.monotonic()) * 1000)
                if block_ms <= 0:
                    break
            try:
                # COUNT is per stream, in entries of up to EVENTS_PER_ENTRY events: share
                # what is left of the batch among them, so a batch holds under flush_batch
                # + shards * EVENTS_PER_ENTRY events (not shards times flush_batch, which
                # can hold more persons than storage can lock).
                per_read = streams * EVENTS_PER_ENTRY
                reply = await self._read(-(-(size - events) // per_read), block_ms)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # the server lost its streams (restart, no AOF)
                    self._groups_ready = False
                    await self.ensure_groups()
                    continue
                raise
            for key, messages in reply or []:
                shard = self._streams[key.decode() if isinstance(key, bytes) else key]
                for eid, fields in messages:
                    entry = Entry(shard, eid, fields)
                    entries.append(entry)
                    events += entry.events
            if entries and deadline is None:
                deadline = time.monotonic() + max_age_s
            if not entries:
                if until is None or until.done():
                    break  # nothing within a block: let the caller do its periodic work
                await asyncio.wait({until}, timeout=READ_AHEAD_POLL_S)
        return entries

    async def _read(self, count: int, block_ms: int | None) -> Any:
        """XREADGROUP of every shard's stream: one command, or on a Redis Cluster (where
        one command cannot name keys of several slots) one per stream, concurrently."""
        if not self.cluster:
            return await self.client.xreadgroup(
                CONSUMER_GROUP,
                self.consumer,
                dict.fromkeys(self._streams, ">"),
                count=count,
                block=block_ms,
            )
        replies = await asyncio.gather(
            *(
                self.client.xreadgroup(
                    CONSUMER_GROUP, self.consumer, {key: ">"}, count=count, block=block_ms
                )
                for key in self._streams
            )
        )
        return [stream for reply in replies for stream in (reply or [])]

    async def claim_abandoned(self) -> list[Entry]:
        """Take over entries another (dead or stuck) consumer has held too long."""
        idle_ms = int(self.settings.flush_claim_idle_s * 1000)
        size = self.settings.flush_batch
        claimed: list[Entry] = []
        events = 0
        for key, shard in self._streams.items():
            start = "0-0"
            while True:
                reply: Any = await self.client.xautoclaim(
                    key,
                    CONSUMER_GROUP,
                    self.consumer,
                    idle_ms,
                    start_id=start,
                    count=-(-(size - events) // EVENTS_PER_ENTRY),
                )
                start, messages = reply[0], reply[1]
                for eid, fields in messages:
                    if fields is not None:  # None: deleted since it was read
                        claimed.append(Entry(shard, eid, fields))
                        events += claimed[-1].events
                if start in (b"0-0", "0-0") or events >= size:
                    break
            if events >= size:
                break
        if claimed:
            log.info("flusher %s: claimed %d abandoned entries", self.consumer, len(claimed))
        return claimed

    async def flush(self, batch: Sequence[Entry], stop: asyncio.Event | None = None) -> None:
        """Store a batch, retrying storage until it commits, then acknowledge it."""
        events: list[ScanEvent] = []
        dead: list[tuple[Entry, dict[bytes, bytes]]] = []
        for entry in batch:
            events_dead = _decode_entry(entry, events)
            dead.extend((entry, fields) for fields in events_dead)
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                # Bounded: a storage call that never returns must not stall the shards.
                async with asyncio.timeout(STORE_ATTEMPT_TIMEOUT_S):
                    result = await self.storage.store_batch(events, self.rules)
                break
            except Exception as exc:
                # Storage down or failing: keep the batch (its entries stay pending) and try
                # again; the backlog grows in Redis meanwhile, bounded by the high-water mark.
                self.metrics.flush_errors.inc()
                wait = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                log.warning(
                    "flusher: storing %d events failed (%s: %s); retry in %.1fs",
                    len(events),
                    type(exc).__name__,
                    exc,
                    wait,
                )
                attempt += 1
                if stop is not None and stop.is_set() and attempt > 3:
                    raise
                await asyncio.sleep(wait)
        committed_ms = time.time() * 1000
        await self._acknowledge(batch, dead, int(committed_ms))
        m = self.metrics
        m.flush_duration.observe(time.perf_counter() - started)
        m.flush_batch_size.observe(len(events) + len(dead))
        m.flushed_events.inc(result.inserted)
        m.storage_duplicates.inc(result.duplicates)
        observe_many(
            m.scan_to_storage,
            [max(0.0, (committed_ms - e.received_at_ms) / 1000) for e in events],
        )

    async def _acknowledge(
        self, batch: Sequence[Entry], dead: list[tuple[Entry, dict[bytes, bytes]]],
        committed_ms: int,
    ) -> None:  # fmt: skip
        """Per shard, one call of ``ACK_SCRIPT``, then the last flush's time. If this fails
        the entries stay pending and are stored again later: harmless."""
        letters: dict[tuple[int, bytes], list[Any]] = {}  # entry ids repeat across streams
        for entry, fields in dead:
            flat = [part for pair in fields.items() for part in pair]
            letters.setdefault((entry.shard, entry.entry_id), []).append((len(flat), *flat))
        acks: dict[int, list[Any]] = {}
        for entry in batch:
            own = letters.get((entry.shard, entry.entry_id), [])
            args = acks.setdefault(entry.shard, [CONSUMER_GROUP])
            args += (entry.entry_id, entry.counted, len(own))
            for letter in own:
                args += letter
        calls = list(acks.items())
        kept = 0
        for start in range(0, len(calls), ACK_CONCURRENCY):
            replies = await asyncio.gather(
                *(
                    self._ack(
                        keys=[stream_key(shard), backlog_key(shard), dead_letter_key(shard)],
                        args=args,
                    )
                    for shard, args in calls[start : start + ACK_CONCURRENCY]
                )
            )
            kept += sum(int(reply[1]) for reply in replies)
        # At maxmemory this write is refused until a delete frees room: the next batch's
        # sets it. (Each batch's acknowledgement above is what frees it.)
        with contextlib.suppress(OutOfMemoryError):
            await self.client.set(LAST_FLUSH_KEY, committed_ms)
        if kept:
            self.metrics.dead_letters.inc(kept)
            log.error("flusher: %d undecodable events moved to dead-letter streams", kept)

    async def _report_backlog(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for shard in self._streams.values():
            pipe.get(backlog_key(shard))
        for shard, n in enumerate(await pipe.execute()):
            self.metrics.stream_backlog.labels(str(shard)).set(int(n or 0))

    async def refresh_venue_stays(self) -> None:
        """Registered venues of a kind with its own maximum stay (a hospital, a hotel) pair
        with that stay. A venue registered later changes only the visits re-derived after
        that, like any change of the pairing settings."""
        try:
            kinds = await self.storage.venue_kinds()
        except Exception:
            log.exception("flusher: reading venue kinds failed; keeping the previous stays")
            return
        self.rules = with_venue_stays(self.rules, self.settings, kinds)

    async def purge(self) -> None:
        cutoff_ms = int((time.time() - self.settings.retention_s) * 1000)
        audit_cutoff_ms = int((time.time() - self.settings.audit_retention_s) * 1000)
        try:
            result = await self.storage.purge(cutoff_ms, self.rules)
            cases = await self.storage.purge_cases(cutoff_ms)
            audit_entries = await self.storage.purge_audit(audit_cutoff_ms)
        except Exception:
            self.metrics.flush_errors.inc()
            log.exception("flusher: retention purge failed; trying again tomorrow")
            return
        log.info(
            "retention: deleted %d events, %d visits, %d cases, %d audit entries, "
            "dropped %d partitions",
            result.events,
            result.visits,
            cases,
            audit_entries,
            result.partitions_dropped,
        )


def _decode_entry(entry: Entry, into: list[ScanEvent]) -> list[dict[bytes, bytes]]:
    """Decode an entry's events into ``into``; a dead-letter entry for each that fails (the
    value, the stream entry's id and why), or for the whole entry when it holds no events."""
    values = entry_values(entry.fields)
    if not values:
        return [{**entry.fields, b"id": entry.entry_id, b"reason": b"no event field"}]
    field = EVENTS_FIELD if EVENTS_FIELD in entry.fields else EVENT_FIELD
    dead: list[dict[bytes, bytes]] = []
    for value in values:
        try:
            into.append(decode_event(value))
        except ValueError as exc:
            reason = str(exc).encode()[:200]
            dead.append({field: value, b"id": entry.entry_id, b"reason": reason})
    return dead


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
