"""scangate on a Redis Cluster of 3 masters and 3 replicas (``SCANGATE_REDIS_CLUSTER``):
ingest and flush, a coordinated failover and a killed master under load, each checked
against the exact ledger of the fault suite."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.cluster import RedisCluster

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
