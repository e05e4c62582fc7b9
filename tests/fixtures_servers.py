"""Fixtures for real Redis/Valkey and PostgreSQL servers (helpers in ``servers.py``).

Loaded by ``tests/conftest.py`` through ``pytest_plugins``. Nothing here touches the
machine's shared services: Redis and Valkey servers are private processes on free ports,
and the only shared PostgreSQL used is the one ``SCANGATE_TEST_POSTGRES_URL`` names.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from gateway.run.embedded import RedisProcess
from storage import Storage, connect_storage
from storage.postgres import PostgresStorage

from .servers import (
    SERVER_KINDS,
    LocalCluster,
    PrivatePostgres,
    ServerKind,
    missing,
    postgres_bindir,
    run_async_check,
    start_redis,
)

PrivateRedisFactory = Callable[..., RedisProcess]
PrivatePostgresFactory = Callable[[], PrivatePostgres]

POSTGRES_URL_VARIABLE = "SCANGATE_TEST_POSTGRES_URL"


@pytest.fixture(scope="session", params=SERVER_KINDS, ids=list(SERVER_KINDS))
def redis_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisProcess]:
    """A private server per kind for the whole session, on a free loopback port.

    Tests that use it run once against Valkey and once against Redis. No append-only file:
    nothing here outlives the session, and fsyncs would only slow the tests.
    """
    kind: ServerKind = request.param
    process = start_redis(kind, tmp_path_factory.mktemp(f"{kind}-session"), appendonly=False)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session server's URL, with its keyspace emptied for this test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedisFactory]:
    """Start servers of a test's own: ``private_redis("redis", unix_socket=True)``.

    For tests that stop, restart or kill a server. Keyword arguments go to
    :class:`~gateway.run.embedded.RedisProcess` (append-only file on by default, so data
    survives a restart). Every server started is stopped at teardown.
    """
    with contextlib.ExitStack() as cleanup:

        def start(binary: ServerKind = "valkey", **kwargs: Any) -> RedisProcess:
            # A short directory: a Unix socket path must stay under about 100 bytes.
            process = start_redis(binary, tmp_path_factory.mktemp(binary), **kwargs)
            cleanup.callback(process.stop)
            return process

        yield start


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The URL in ``SCANGATE_TEST_POSTGRES_URL``, once it answers ``SELECT 1``.

    Skips when the variable is unset (fails under ``CI=true``). The database is shared:
    tests must clean up what they create, and never stop the server.
    """
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not url:
        missing(
            f"PostgreSQL tests need {POSTGRES_URL_VARIABLE}, "
            "e.g. postgresql://postgres@127.0.0.1:5432/test"
        )
    try:
        run_async_check(url)
    except Exception as exc:
        pytest.fail(f"{POSTGRES_URL_VARIABLE}={url} does not answer: {exc!r}", pytrace=False)
    return url


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgresFactory]:
    """Start PostgreSQL clusters of a test's own: ``pg = private_postgres()``.

    For tests that stop or restart the server; each has ``.url``, ``.start()``,
    ``.stop()`` and ``.restart()``. Skips when initdb is missing (fails under ``CI=true``).
    Every cluster is stopped and its directory removed at teardown.
    """
    bindir = postgres_bindir()
    with contextlib.ExitStack() as cleanup:

        def start() -> PrivatePostgres:
            cluster = PrivatePostgres(bindir)
            cleanup.callback(cluster.remove)
            cluster.start()
            return cluster

        yield start


# -- storage on both backends ------------------------------------------------------------------

STORAGE_KINDS = ("sqlite", "postgresql")


@contextlib.asynccontextmanager
async def open_test_storage(
    kind: str, tmp_path: Path, postgres_url: str | None
) -> AsyncIterator[Storage]:
    """A fresh, migrated storage: a new SQLite file, or a new schema of the test database
    (dropped afterwards), so tests never see each other's rows."""
    if kind == "sqlite":
        storage = await connect_storage(f"sqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}")
        try:
            yield storage
        finally:
            await storage.close()
        return
    assert postgres_url is not None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        pg = await PostgresStorage.connect(
            postgres_url, timezone="Asia/Ho_Chi_Minh", search_path=schema
        )
        try:
            await pg.migrate()
            yield pg
        finally:
            await pg.close()
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


@pytest.fixture(params=STORAGE_KINDS)
def storage_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def storage_opener(
    storage_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[], contextlib.AbstractAsyncContextManager[Storage]]:
    """Opens fresh storages of this test's backend (PostgreSQL needs postgres_url)."""
    url = request.getfixturevalue("postgres_url") if storage_kind == "postgresql" else None
    return lambda: open_test_storage(storage_kind, tmp_path, url)


@pytest.fixture
async def storage(
    storage_opener: Callable[[], contextlib.AbstractAsyncContextManager[Storage]],
) -> AsyncIterator[Storage]:
    async with storage_opener() as opened:
        yield opened


@pytest.fixture
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of this test's own: 3 masters, 3 replicas, stopped at teardown."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()
