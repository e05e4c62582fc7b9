"""scangate on a Redis Cluster of 3 masters and 3 replicas (``SCANGATE_REDIS_CLUSTER``):
ingest and flush, a coordinated failover and a killed master under load, each checked
against the exact ledger of the fault suite."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from gateway.pipeline.buffer import BufferUnavailable, RedisBuffer
from gateway.pipeline.keyspace import (
    CONSUMER_GROUP,
    backlog_key,
    entry_values,
    seen_key,
    stream_key,
)
from signing import Keyring

from .harness import GatewayStarter
from .ledger import events_in_streams, phase_s, until
from .servers import LocalCluster
from .test_faults import rig


async def cluster_backlog(cluster: LocalCluster) -> int:
    """Events in the streams of every master (``backlog`` asks one node: not enough)."""
    client: Any = RedisCluster.from_url(cluster.url)
    try:
        return await events_in_streams(client, 4)
    finally:
        await client.aclose()


def cluster_rig(
    gateway_under_test: GatewayStarter, keyring: Keyring, cluster: LocalCluster, **over: Any
) -> Any:
    """The fault suite's gateway and flusher, on the cluster."""
    return rig(gateway_under_test, keyring, redis_url=cluster.url, redis_cluster=True, **over)


async def test_scans_flow_through_a_cluster_exactly_once(
    gateway_under_test: GatewayStarter, keyring: Keyring, redis_cluster: LocalCluster
) -> None:
    async with (
        cluster_rig(gateway_under_test, keyring, redis_cluster) as r,
        r.load() as load,
    ):
        await asyncio.sleep(phase_s(2))
        await r.finish(load, drained=lambda: cluster_backlog(redis_cluster))
    assert load.ledger.statuses.get(503, 0) == 0, load.ledger.statuses


async def test_a_coordinated_failover_under_load_loses_nothing(
    gateway_under_test: GatewayStarter, keyring: Keyring, redis_cluster: LocalCluster
) -> None:
    async with (
        cluster_rig(gateway_under_test, keyring, redis_cluster) as r,
        r.load() as load,
    ):
        await asyncio.sleep(phase_s(1.5))
        replica = next(p for p, role in redis_cluster.roles().items() if role == "slave")
        await asyncio.to_thread(redis_cluster.failover, replica)
        promoted = await until(lambda: redis_cluster.roles()[replica] == "master", 20, 0.2)
        assert promoted, redis_cluster.roles()
        await asyncio.sleep(phase_s(1.5))  # the load goes on against the new master
        await r.finish(load, drained=lambda: cluster_backlog(redis_cluster))


async def test_kill_9_a_master_with_wait_replicas_loses_nothing_accepted(
    gateway_under_test: GatewayStarter, keyring: Keyring, redis_cluster: LocalCluster
) -> None:
    async with (
        cluster_rig(gateway_under_test, keyring, redis_cluster, redis_wait_replicas=1) as r,
        r.load() as load,
    ):
        await asyncio.sleep(phase_s(1.5))
        # A master other than the node the clients were first pointed at.
        victim = next(
            p
            for p, role in redis_cluster.roles().items()
            if role == "master" and p != redis_cluster.nodes[0].port
        )
        redis_cluster.node(victim).kill()
        # Node timeout 2 s: its replica is elected and takes over the slots.
        promoted = await until(
            lambda: list(redis_cluster.roles().values()).count("master") == 3, 30, 0.2
        )
        assert promoted, redis_cluster.roles()
        # The promoted master has no replica now, so with WAIT 1 its shards answer 503
        # (nothing is promised that a second failure could lose) until the old master
        # comes back and rejoins as its replica.
        await asyncio.sleep(1)
        await asyncio.to_thread(redis_cluster.node(victim).start)
        await asyncio.to_thread(redis_cluster.wait_ok)
        accepted = len(load.ledger.accepted)
        assert await until(lambda: len(load.ledger.accepted) > accepted + 100, 30)
        await r.finish(load, drained=lambda: cluster_backlog(redis_cluster))
    assert load.ledger.statuses.get(503, 0) + sum(load.ledger.failures.values()) > 0


# -- redirects: a slot moved, or being moved, under the buffer's feet ----------------------


def node_of_slot(nodes: dict[int, redis.Redis], slot: int) -> int:
    """The port of the primary that serves ``slot``, as the cluster says now."""
    any_node = next(iter(nodes.values()))
    for first, last, primary, *_replicas in any_node.execute_command("CLUSTER", "SLOTS"):
        if first <= slot <= last:
            return int(primary[1])
    raise AssertionError(f"no node serves slot {slot}")


class SlotMove:
    """Moving one shard's slot from the primary that holds it to another, by hand, in the
    steps ``redis-cli --cluster reshard`` takes (each step a test may stop after)."""

    def __init__(self, cluster: LocalCluster, shard: int) -> None:
        self.key = stream_key(shard)
        self.nodes = {n.port: redis.Redis(port=n.port) for n in cluster.nodes if n.port}
        self.slot = int(next(iter(self.nodes.values())).cluster("keyslot", self.key))
        self.source_port = node_of_slot(self.nodes, self.slot)
        self.masters = [p for p, role in cluster.roles().items() if role == "master"]
        self.target_port = next(p for p in self.masters if p != self.source_port)
        self.source, self.target = self.nodes[self.source_port], self.nodes[self.target_port]

    def node_id(self, port: int) -> str:
        return str(self.nodes[port].execute_command("CLUSTER", "MYID").decode())

    def open(self) -> None:
        """The slot marked IMPORTING on the target and MIGRATING on the source."""
        slot = self.slot
        self.target.execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(self.source_port)
        )
        self.source.execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(self.target_port)
        )

    def move_keys(self) -> None:
        keys = self.source.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 1000)
        if keys:
            self.source.execute_command(
                "MIGRATE", "127.0.0.1", self.target_port, "", 0, 5000, "KEYS", *keys
            )

    def finish(self) -> None:
        """Every primary told the slot is the target's."""
        target_id = self.node_id(self.target_port)
        for port in [self.target_port, self.source_port, *self.masters]:
            self.nodes[port].execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)

    def on_target(self, *command: Any) -> Any:
        """A command on the target while it imports the slot (after ASKING, on the same
        connection)."""
        pipe = self.target.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.execute_command(*command)
        return pipe.execute()[1]

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


def entry_events(entries: list[Any]) -> list[bytes]:
    return [line for _id, fields in entries for line in entry_values(fields)]


@contextlib.asynccontextmanager
async def cluster_buffer(cluster: LocalCluster, **options: Any) -> AsyncIterator[RedisBuffer]:
    client: Any = RedisCluster.from_url(cluster.url)
    try:
        yield RedisBuffer(client, 4, retry_memory_s=600, **options)
    finally:
        await client.aclose()


NOW_MS = 1_800_000_000_000


async def test_writes_follow_a_slot_that_moved_to_another_node(
    redis_cluster: LocalCluster,
) -> None:
    """A resharding finished behind the buffer's back: its next write is answered MOVED,
    and goes to the new node at once instead of failing (a 503)."""
    async with cluster_buffer(redis_cluster) as buffer:
        move = SlotMove(redis_cluster, shard=1)
        try:
            assert await buffer.append_encoded({1: [(b"id-1", b"first")]}, NOW_MS) == {1: [True]}
            move.open()
            move.move_keys()
            move.finish()
            # The seen-bucket moved with the stream: the retry of id-1 is still a duplicate.
            got = await buffer.append_encoded(
                {1: [(b"id-2", b"second"), (b"id-1", b"first")]}, NOW_MS
            )
            assert got == {1: [True, False]}
            assert entry_events(move.target.xrange(move.key)) == [b"first", b"second"]
            assert move.source.execute_command("CLUSTER", "COUNTKEYSINSLOT", move.slot) == 0
        finally:
            move.close()


async def test_with_wait_replicas_writes_follow_a_failover(redis_cluster: LocalCluster) -> None:
    """A replica took over its primary's slots (a coordinated failover) and the buffer has
    not read the layout since. The old primary, now a replica, answers the script MOVED and
    refuses the group's WAIT 1: the write still goes to the new primary, and is confirmed
    there by its own WAIT, instead of failing with a 503."""
    async with cluster_buffer(redis_cluster, wait_replicas=1) as buffer:
        nodes = {n.port: redis.Redis(port=n.port) for n in redis_cluster.nodes if n.port}
        try:
            assert await buffer.append_encoded({3: [(b"id-1", b"first")]}, NOW_MS) == {3: [True]}
            slot = int(next(iter(nodes.values())).cluster("keyslot", stream_key(3)))
            primary = node_of_slot(nodes, slot)
            replica = int(nodes[primary].info("replication")["slave0"]["port"])
            await asyncio.to_thread(redis_cluster.failover, replica)

            def taken_over() -> bool:
                return (
                    redis_cluster.roles()[replica] == "master"
                    and nodes[replica].info("replication")["connected_slaves"] >= 1
                )

            assert await until(taken_over, 20, 0.2)
            got = await buffer.append_encoded(
                {3: [(b"id-2", b"second"), (b"id-1", b"first")]}, NOW_MS
            )
            assert got == {3: [True, False]}
            assert entry_events(nodes[replica].xrange(stream_key(3))) == [b"first", b"second"]
        finally:
            for node in nodes.values():
                node.close()


@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_writes_follow_ask_to_the_importing_node_when_it_holds_the_keys(
    redis_cluster: LocalCluster, wait_replicas: int
) -> None:
    """A slot being migrated. Its source holds none of a call's keys, so it answers ASK,
    and the call goes to the importing node after ASKING. That node runs the script only
    if every key the script names exists there: until then it answers TRYAGAIN, and the
    write fails as unavailable (a 503 the scanner retries), with nothing written. (A call
    names the seen-bucket after the current one, which rarely exists, so in practice a
    migrating slot answers TRYAGAIN until it has moved.)"""
    async with cluster_buffer(redis_cluster, wait_replicas=wait_replicas) as buffer:
        move = SlotMove(redis_cluster, shard=2)
        bucket = NOW_MS // buffer.bucket_ms
        try:
            move.open()
            with pytest.raises(BufferUnavailable, match="TryAgainError"):
                await buffer.append_encoded({2: [(b"id-1", b"first")]}, NOW_MS)
            assert move.on_target("EXISTS", move.key) == 0
            # The importing node is given every key the script names (its stream with the
            # flushers' group, the backlog counter, the seen-buckets it reads).
            move.on_target("XGROUP", "CREATE", move.key, CONSUMER_GROUP, "$", "MKSTREAM")
            move.on_target("SET", backlog_key(2), 0)
            for b in (bucket, bucket + 1, bucket - 1, bucket - 2):
                move.on_target("HSET", seen_key(2, b), "placeholder", 1)
            assert await buffer.append_encoded({2: [(b"id-1", b"first")]}, NOW_MS) == {2: [True]}
            assert entry_events(move.on_target("XRANGE", move.key, "-", "+")) == [b"first"]
            # The migration ends: the next write is answered MOVED and follows it.
            move.finish()
            got = await buffer.append_encoded({2: [(b"id-1", b"first")]}, NOW_MS)
            assert got == {2: [False]}
            assert move.target.get(backlog_key(2)) == b"1"
        finally:
            move.close()
