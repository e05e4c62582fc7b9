"""What a group commit's answer waits for after its script calls: the write on the server's
disk (``SCANGATE_REDIS_FSYNC=always``) and on replicas (``SCANGATE_REDIS_WAIT_REPLICAS``).

A 2xx promises that every accepted event is in Redis. With these settings it also promises
that the events survive the server's crash (on disk) or its loss (on replicas): the group's
pipeline ends with WAITAOF / WAIT, and the group is answered only once they confirm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final, Literal

from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

log = logging.getLogger(__name__)

WAITAOF_TIMEOUT_MS: Final = 2000
WAIT_TIMEOUT_MS: Final = 2000


class BufferUnavailable(Exception):
    """Redis did not take the write (down, loading, out of memory): answer 503."""


def describe(exc: BaseException) -> str:
    """A failure in words fit for a 503's detail (no addresses, no server text)."""
    text = str(exc).split("\n", 1)[0]
    if isinstance(exc, OutOfMemoryError) or text.startswith("OOM"):
        return "Redis is out of memory (maxmemory reached)"
    return f"Redis unavailable: {type(exc).__name__}"


class Durability:
    """The confirmations a group waits for, and how the server gives the fsync one."""

    def __init__(self, fsync_always: bool, wait_replicas: int) -> None:
        # With fsync_always a write is answered only once it is on the server's disk: the
        # server fsyncs every write itself (appendfsync always), or the group's pipeline
        # ends with WAITAOF 1 0 (Redis 7.2+, Valkey), which returns once the local
        # append-only file holds it. Which of the two is found out at the first write.
        self.fsync_always = fsync_always
        # With wait_replicas a write is answered only once that many replicas have it
        # (WAIT after the group's scripts, on the same connection): a master that dies then
        # loses nothing it answered for.
        self.wait_replicas = wait_replicas
        self.mode: Literal["server", "waitaof"] | None = None  # once known

    @property
    def known(self) -> bool:
        """Whether a group can be sent without asking the server first."""
        return not self.fsync_always or self.mode is not None

    @property
    def waits_for_aof(self) -> bool:
        return self.mode == "waitaof"

    def forget(self) -> None:
        """After a failed write: the server may come back configured otherwise."""
        self.mode = None

    async def needs_waitaof(self, client: Any) -> bool:
        """Whether a group must end with WAITAOF to be on disk when answered; raises
        BufferUnavailable when the server can promise neither way."""
        if not self.fsync_always:
            return False
        if self.mode is None:
            try:
                config: Any = await client.config_get("appendfsync")
                fsync = config.get(b"appendfsync", config.get("appendfsync", b""))
                if fsync in (b"always", "always"):
                    self.mode = "server"
                elif await _has_waitaof(client):
                    self.mode = "waitaof"
            except RedisError as exc:
                raise BufferUnavailable(describe(exc)) from exc
            if self.mode is None:
                raise BufferUnavailable(
                    "SCANGATE_REDIS_FSYNC=always, but the server neither fsyncs every write "
                    "(appendfsync always) nor has WAITAOF (Redis 7.2+, Valkey)"
                )
            log.info("durable writes: %s", self.mode)
        return self.mode == "waitaof"

    def commands(self, calls: Sequence[Sequence[Any]], wait_aof: bool) -> list[tuple[Any, ...]]:
        """EVALSHA each call's arguments, then WAITAOF / WAIT when asked for."""
        commands: list[tuple[Any, ...]] = [("EVALSHA", *args) for args in calls]
        if wait_aof:
            commands.append(("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS))
        if self.wait_replicas:
            commands.append(("WAIT", self.wait_replicas, WAIT_TIMEOUT_MS))
        return commands

    def confirmed(self, replies: list[Any], calls: int, wait_aof: bool) -> list[Any]:
        """The calls' replies, once the WAITAOF / WAIT replies after them say the group is
        as durable as promised (else BufferUnavailable)."""
        confirmations = replies[calls:]
        if wait_aof:
            confirmation = confirmations.pop(0)
            if isinstance(confirmation, BaseException):
                raise BufferUnavailable(describe(confirmation))
            if int(confirmation[0]) < 1:
                raise BufferUnavailable("Redis did not confirm the fsync in time")
        if self.wait_replicas:
            confirmation = confirmations.pop(0)
            if isinstance(confirmation, BaseException):
                raise BufferUnavailable(describe(confirmation))
            if int(confirmation) < self.wait_replicas:
                raise BufferUnavailable(
                    f"only {int(confirmation)} of {self.wait_replicas} replicas confirmed "
                    "the write in time"
                )
        return replies[:calls]


async def _has_waitaof(client: Any) -> bool:
    """Whether the server knows WAITAOF (Redis 7.2+, Valkey): asked by running it with
    nothing to wait for. (redis-py's COMMAND INFO reply parser fails on an unknown command
    with a TypeError, so a Redis 7.0 answered every write 503 as an error.)"""
    try:
        await client.execute_command("WAITAOF", 0, 0, 1)
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return False
        raise
    return True
