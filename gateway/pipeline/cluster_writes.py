"""The group commit's writes on a Redis Cluster (``gateway.pipeline.buffer``): each script
call goes to the node that holds its shard's slot (a call's keys share one hash tag), each
node's calls pipelined on one of its connections, the nodes concurrently. Redirects are
followed as redis-py's own commands follow them:

- MOVED: the slot now lives on another node (a resharding finished, a replica took over).
  The layout is read again and the call sent to the node named.
- ASK: the slot is being migrated and its source holds none of the call's keys. The call
  goes to the node importing the slot, after ``ASKING``. That node runs the script only if
  it holds every key the script names; otherwise it answers TRYAGAIN.
- TRYAGAIN, CLUSTERDOWN, or a node that fails: the write fails, which the gateway answers
  with a 503 and Retry-After, and the layout is read again before the next write.

While a slot migrates, a call mostly gets TRYAGAIN: Redis runs a multi-key command there
only when every key it names exists on the node, and a call names the seen-bucket after
the current one, which exists only when a clock ran ahead. So a shard answers 503 from the
start of its slot's migration to its end (scanners retry), and MOVED is what carries the
writes to the new node afterwards. redis-py's own commands retry TRYAGAIN after 50 ms; a
migration takes longer than a request should wait, so the write fails at once instead.

A MOVED or ASK reply means the node ran nothing, so sending the call again is safe (and a
call is idempotent anyway: the script skips identities it has seen).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from gateway.pipeline.durability import BufferUnavailable, Durability

# A MOVED, then an ASK from the node named (a slot that moved and is moving again).
MAX_REDIRECTS: Final = 2
_ASKING: Final = ("ASKING",)


class ClusterWrites:
    """Sends a group's script calls (each an ``EVALSHA``'s arguments: sha, number of keys,
    keys, arguments) to the nodes of ``client``'s cluster."""

    def __init__(self, client: RedisCluster, durability: Durability) -> None:
        self.client: Any = client
        self.durability = durability

    async def send(self, calls: Sequence[Sequence[Any]], wait_aof: bool) -> list[Any]:
        """Every call's reply, in order (an error reply is returned, not raised)."""
        client = self.client
        await client.initialize()  # the slot map, read once (a no-op afterwards)
        replies: list[Any] = [None] * len(calls)
        # index of a call -> (the node to send it to, whether it goes after ASKING)
        targets = {i: (client.get_node_from_key(args[2]), False) for i, args in enumerate(calls)}
        for redirects in range(MAX_REDIRECTS + 1):
            by_node: dict[tuple[str, bool], tuple[Any, bool, list[int]]] = {}
            for i, (node, asking) in targets.items():
                by_node.setdefault((node.name, asking), (node, asking, []))[2].append(i)
            groups = list(by_node.values())
            try:
                got = await asyncio.gather(
                    *(
                        self._on_node(node, asking, [calls[i] for i in indexes], wait_aof)
                        for node, asking, indexes in groups
                    )
                )
            except (RedisError, RedisClusterException, OSError, BufferUnavailable):
                await self.refresh_layout()
                raise
            for (_node, _asking, indexes), node_replies in zip(groups, got, strict=True):
                for i, reply in zip(indexes, node_replies, strict=True):
                    replies[i] = reply
            redirected = [i for i in targets if isinstance(replies[i], AskError)]
            if not redirected or redirects == MAX_REDIRECTS:
                break
            if any(isinstance(replies[i], MovedError) for i in redirected):
                await self.refresh_layout()
            sent_to = targets
            targets = {}
            for i in redirected:
                error: AskError = replies[i]
                # A node may name itself with no host ("MOVED 3999 :6381"): the host it
                # was reached on, then, as redis-py reads it.
                host = error.host or sent_to[i][0].host
                node = client.get_node(host=host, port=error.port)
                if node is not None:  # a node the layout does not know: the error stands
                    targets[i] = (node, not isinstance(error, MovedError))
            if not targets:
                break
        if any(isinstance(r, ResponseError) and not isinstance(r, NoScriptError) for r in replies):
            await self.refresh_layout()  # TRYAGAIN, CLUSTERDOWN, a redirect left: re-read
        return replies

    async def refresh_layout(self) -> None:
        """Read the cluster's slots again. A failure to (no node answers, slots uncovered)
        leaves the old layout: the write that asked already fails, and the next asks again."""
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self.client.nodes_manager.initialize()

    async def _on_node(
        self, node: Any, asking: bool, calls: list[Sequence[Any]], wait_aof: bool
    ) -> list[Any]:
        conn = node.acquire_connection()
        try:
            return await self._pipelined(conn, calls, wait_aof, asking)
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)

    async def _pipelined(
        self, conn: Any, calls: list[Sequence[Any]], wait_aof: bool, asking: bool
    ) -> list[Any]:
        """The calls on one of redis-py's connections, in one write, then the durability
        mode's confirmations (``ASKING`` admits only the command after it, so with
        ``asking`` each call gets its own)."""
        commands = self.durability.commands(calls, wait_aof)
        if asking:
            n = len(calls)
            commands = [c for evalsha in commands[:n] for c in (_ASKING, evalsha)] + commands[n:]
        await conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        if asking:
            replies = replies[1 : 2 * n : 2] + replies[2 * n :]
        calls_replies = replies[: len(calls)]
        if all(isinstance(reply, AskError) for reply in calls_replies):
            # Every call was sent elsewhere: this node wrote nothing, so its WAIT / WAITAOF
            # confirms nothing (a primary that became a replica even refuses them), and
            # the nodes the calls go to next confirm them there.
            return calls_replies
        return self.durability.confirmed(replies, len(calls), wait_aof)
