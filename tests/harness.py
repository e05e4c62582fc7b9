"""The gateway under test: what the ``gateway_under_test`` fixture (``conftest.py``) starts.

One harness for every test that talks HTTP to a gateway in its own process: the settings
come from the test (the rest are the defaults), the servers are real, and everything the
harness opened is closed again, the last opened first.
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import Settings
from gateway.http.app import create_app
from gateway.http.keys import SETTINGS
from gateway.http.protocol import ConnectionLimits, GuardedRunner

StorageKind = Literal["sqlite", "postgresql"]


@dataclass
class GatewayUnderTest:
    """A started gateway, and what a test needs to talk to it and look inside.

    ``app`` holds each of the gateway's resources under its key (``gateway.http.keys``):
    ``gateway.app[STORAGE]`` is the storage it writes to. ``redis`` is a client of the
    test's own on the gateway's Redis, for looking at what the gateway wrote.
    """

    app: web.Application
    client: TestClient[Any, Any]
    settings: Settings
    redis: aioredis.Redis
    # The schema made for it in the test database (storage="postgresql"), else None.
    postgres_schema: str | None
    _opened: contextlib.AsyncExitStack

    @property
    def url(self) -> str:
        """The server's base URL, ending in ``/``."""
        return str(self.client.make_url("/"))

    async def close(self) -> None:
        """Stop the gateway (its cleanup contexts run), close the test's Redis client and
        drop its schema. Closing again does nothing."""
        await self._opened.aclose()


GatewayStarter = Callable[..., Awaitable[GatewayUnderTest]]


class GuardedTestServer(TestServer):
    """aiohttp's test server running the gateway as ``scangate serve`` does: its
    connections keep the deadlines of the app's settings (``gateway.http.protocol``)."""

    async def _make_runner(self, **kwargs: Any) -> GuardedRunner:
        limits = ConnectionLimits.of(self.app[SETTINGS])
        return GuardedRunner(self.app, limits, **kwargs)


async def start_gateway(
    data_dir: Path,
    master_key: bytes,
    redis_url: str,
    storage: StorageKind,
    postgres_url: Callable[[], str],
    settings_over: dict[str, Any],
) -> GatewayUnderTest:
    """A gateway on a TestServer at 127.0.0.1 (a free port), started (see the fixture)."""
    opened = contextlib.AsyncExitStack()
    try:
        schema = None
        if storage == "postgresql":
            if "storage_url" in settings_over:
                raise TypeError('storage="postgresql" makes its own storage_url')
            url = postgres_url()
            schema = await opened.enter_async_context(_postgres_schema(url))
            settings_over = {**settings_over, "storage_url": f"{url}?search_path={schema}"}
        defaults = {
            "data_dir": data_dir,
            "redis_url": redis_url,
            "master_key": base64.b64encode(master_key).decode(),
        }
        settings = Settings(**{**defaults, **settings_over})
        # No connection until first used: a test that never looks costs nothing.
        redis = aioredis.Redis.from_url(redis_url)
        opened.push_async_callback(redis.aclose)
        app = create_app(settings)
        client: TestClient[Any, Any] = TestClient(GuardedTestServer(app, host="127.0.0.1"))
        opened.push_async_callback(client.close)
        await client.start_server()
    except BaseException:
        await opened.aclose()
        raise
    return GatewayUnderTest(app, client, settings, redis, schema, opened)


@contextlib.asynccontextmanager
async def _postgres_schema(postgres_url: str) -> AsyncIterator[str]:
    """A fresh schema of the test database, dropped (with everything in it) afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    await _execute(postgres_url, f"CREATE SCHEMA {schema}")
    try:
        yield schema
    finally:
        await _execute(postgres_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def _execute(postgres_url: str, statement: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
