"""The process's Redis client: fail fast, never retry a write behind the caller's back.

The buffer, the flusher, the status poll and the CLI use it; the buffer's group commit writes
on lean connections made from this client's pool arguments (``gateway.pipeline.resp``).
"""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

MAX_CONNECTIONS: Final = 32  # per process; group commit needs one at a time
POOL_WAIT_S: Final = 2.0


def connect_redis(url: str, cluster: bool = False) -> aioredis.Redis:
    """A client that fails fast: a scan request waits on Redis for seconds at most, and a
    write is never retried behind our back (the caller answers 503, the app retries).

    With ``cluster`` the URL names any node of a Redis Cluster and the client is redis-py's
    cluster client (typed as a plain client: callers use only what both offer, and the
    buffer and flusher take the cluster's own path where the two differ).
    """
    if cluster:
        client: Any = RedisCluster.from_url(
            url,
            socket_connect_timeout=2,
            socket_timeout=5,
            decode_responses=False,
            max_connections=MAX_CONNECTIONS,
        )
        return client  # type: ignore[no-any-return]
    # A blocking pool: when every connection is busy a caller waits (bounded) for one
    # instead of failing at once, as the default pool does past its size.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=2,
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
