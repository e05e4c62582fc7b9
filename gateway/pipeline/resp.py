"""A lean RESP pipe for the group commit: hiredis parses the replies inside an asyncio
Protocol, so a group's replies cost one callback per socket read instead of redis-py's
per-reply path (an awaited read, a timeout context and a parser call for each).

Only the buffer's writes to a single server take it. Everything else (polls, script
loads, the flusher, and Redis Cluster, whose writes follow MOVED and ASK redirects in
``gateway.pipeline.cluster_writes``) keeps redis-py's client. The connection is made as
that client would make it, from the same pool's arguments: a Unix socket, TCP or TLS
(redis-py's own TLS context, so ``rediss://`` options mean the same), AUTH with the URL's
user and password, SELECT of its database.

Error replies come back as redis-py's exception classes (``NoScriptError``,
``OutOfMemoryError``, ``BusyLoadingError``, ``ResponseError``) in the place of their reply,
so the buffer handles them as it does redis-py's; a lost connection or a timeout raises
redis-py's ``ConnectionError`` / ``TimeoutError``, which the buffer answers as it does redis-py's.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, Final

import hiredis
from redis.asyncio.connection import ConnectionPool, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The error replies the buffer tells apart, by their first word.
ERRORS: Final[dict[str, type[RedisError]]] = {
    "NOSCRIPT": NoScriptError,
    "OOM": OutOfMemoryError,
    "LOADING": BusyLoadingError,
}
READ_TIMEOUT_S: Final = 5.0  # as the client's socket_timeout
CONNECT_TIMEOUT_S: Final = 2.0


def error_of(reply: hiredis.ReplyError) -> RedisError:
    message = str(reply)
    return ERRORS.get(message.split(" ", 1)[0], ResponseError)(message)


class _Replies(asyncio.Protocol):
    """Feeds what the server sends to hiredis and hands each waiting exchange its replies,
    in order: RESP answers commands in the order they were sent."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        # (future, replies wanted, replies so far) per exchange, oldest first.
        self.waiting: collections.deque[tuple[asyncio.Future[list[Any]], int, list[Any]]] = (
            collections.deque()
        )
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        try:
            reader.feed(data)
            while waiting:
                future, wanted, replies = waiting[0]
                while len(replies) < wanted:
                    reply = reader.gets()
                    if reply is False:
                        return
                    replies.append(reply)
                waiting.popleft()
                if not future.done():
                    future.set_result(replies)
        except hiredis.ProtocolError as exc:
            self._fail(RedisConnectionError(f"Redis sent what is not RESP: {exc}"))
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("Redis closed the connection"))

    def _fail(self, error: Exception) -> None:
        self.lost = error
        while self.waiting:
            future, _, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class LeanConnection:
    """One connection: ``exchange`` writes packed commands and returns their replies."""

    def __init__(self, protocol: _Replies) -> None:
        self._protocol = protocol

    @classmethod
    async def open(cls, pool: ConnectionPool) -> LeanConnection:
        """Connect as ``pool``'s connections do, then authenticate and select the
        database; raises redis-py's ``ConnectionError`` when that fails."""
        kwargs = pool.connection_kwargs
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(kwargs.get("socket_connect_timeout") or CONNECT_TIMEOUT_S):
                if issubclass(pool.connection_class, UnixDomainSocketConnection):
                    _, protocol = await loop.create_unix_connection(_Replies, kwargs["path"])
                else:
                    ssl = None
                    if issubclass(pool.connection_class, SSLConnection):
                        ssl = pool.connection_class(**kwargs).ssl_context.get()
                    _, protocol = await loop.create_connection(
                        _Replies, kwargs.get("host", "localhost"), kwargs.get("port", 6379), ssl=ssl
                    )
        except OSError as exc:  # refused, unreachable, TLS refused, timed out
            raise RedisConnectionError(f"cannot connect to Redis: {type(exc).__name__}") from exc
        connection = cls(protocol)
        hello: list[tuple[Any, ...]] = []
        if kwargs.get("password") is not None:
            user = kwargs.get("username")
            hello.append(
                ("AUTH", user, kwargs["password"]) if user else ("AUTH", kwargs["password"])
            )
        if int(kwargs.get("db") or 0):
            hello.append(("SELECT", int(kwargs["db"])))
        if hello:
            try:
                replies = await connection.exchange(hello)
            except BaseException:
                connection.close()
                raise
            for reply in replies:
                if isinstance(reply, RedisError):
                    connection.close()
                    raise RedisConnectionError(f"Redis refused the connection: {reply}")
        return connection

    @property
    def usable(self) -> bool:
        return self._protocol.lost is None and not self._protocol.waiting

    async def exchange(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and return one reply each, an error reply as its
        exception (not raised). Raises ``ConnectionError`` or ``TimeoutError`` when the
        connection fails or the replies do not come in time: the connection is then
        closed, since a reply left unread would answer the next exchange."""
        return await self.receive(self.send(commands))

    def send(self, commands: Sequence[tuple[Any, ...]]) -> asyncio.Future[list[Any]]:
        """Write ``commands`` now, in one write, from the caller's own turn of the loop (so
        the server starts on them before anything else runs); ``receive`` the future."""
        protocol = self._protocol
        if protocol.lost is not None:
            raise protocol.lost
        assert protocol.transport is not None
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        protocol.waiting.append((future, len(commands), []))
        protocol.transport.write(b"".join([hiredis.pack_command(c) for c in commands]))
        return future

    async def receive(self, future: asyncio.Future[list[Any]]) -> list[Any]:
        """The replies to what ``send`` wrote, as ``exchange`` returns them."""
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                replies = await future
        except TimeoutError:
            self.close()
            raise RedisTimeoutError("Redis did not answer in time") from None
        except BaseException:
            self.close()
            raise
        return [error_of(r) if isinstance(r, hiredis.ReplyError) else r for r in replies]

    def close(self) -> None:
        transport = self._protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._protocol._fail(RedisConnectionError("the connection was closed"))


class LeanPool:
    """Idle lean connections, opened as needed: the group commit holds at most one per
    group in flight, so the pool never grows past that."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._idle: list[LeanConnection] = []

    async def exchange(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        connection = self.take_idle() or await LeanConnection.open(self._pool)
        try:
            return await connection.exchange(commands)  # a failed connection is closed
        finally:
            self.give_back(connection)

    def take_idle(self) -> LeanConnection | None:
        """An open connection no exchange is using, if there is one (no waiting). One the
        server closed while it sat idle (a restart, an idle timeout) is dropped here, so
        that it costs no failed write."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    def give_back(self, connection: LeanConnection) -> None:
        if connection.usable:
            self._idle.append(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
