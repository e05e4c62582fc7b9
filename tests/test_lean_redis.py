"""The group commit's lean RESP pipe (``gateway.pipeline.resp``) keeps everything redis-py's
client did for the buffer: Unix sockets, passwords and users, a database number, TLS,
WAIT and WAITAOF, reloading a script the server lost, and LOADING and out-of-memory
answered as BufferUnavailable (503). Redis Cluster keeps redis-py's connections, and its
writes follow MOVED and ASK redirects (tests/test_cluster.py). Every server here is a
private one."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.pipeline.buffer import BufferUnavailable, RedisBuffer
from gateway.pipeline.client import connect_redis
from gateway.pipeline.keyspace import entry_values, stream_key
from gateway.pipeline.resp import LeanPool
from gateway.run.embedded import RedisProcess

from .fixtures_servers import PrivateRedisFactory
from .servers import server_binary

SHARDS = 2


@contextlib.asynccontextmanager
async def buffer_at(url: str, **options: Any) -> AsyncIterator[RedisBuffer]:
    client = connect_redis(url)
    buffer = RedisBuffer(client, SHARDS, retry_memory_s=600, **options)
    try:
        yield buffer
    finally:
        buffer.close()
        await client.aclose()


async def append(buffer: RedisBuffer, *identities: bytes) -> dict[int, list[bool]]:
    return await buffer.append_encoded({0: [(i, b"event " + i) for i in identities]}, 0)


def stored(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return sum(len(entry_values(f)) for _id, f in client.xrange(stream_key(0)))


async def test_a_unix_socket(private_redis: PrivateRedisFactory) -> None:
    server = private_redis("valkey", unix_socket=True, appendonly=False)
    assert server.url.startswith("unix://")
    async with buffer_at(server.url) as buffer:
        assert await append(buffer, b"a", b"b") == {0: [True, True]}
        assert await append(buffer, b"b", b"c") == {0: [False, True]}  # de-duplicated
    assert stored(server.url) == 3


async def test_a_password_a_user_and_a_database_number(
    private_redis: PrivateRedisFactory,
) -> None:
    server = private_redis("redis", appendonly=False)
    with redis.Redis.from_url(server.url) as admin:  # set after start: it pings without
        admin.acl_setuser("door", enabled=True, passwords=["+d00r"], keys="*", commands=["+@all"])
        admin.config_set("requirepass", "s3cret")
    base = f"127.0.0.1:{server.port}"
    async with buffer_at(f"redis://:s3cret@{base}/3") as buffer:
        assert await append(buffer, b"a") == {0: [True]}
    async with buffer_at(f"redis://door:d00r@{base}/0") as buffer:
        assert await append(buffer, b"a") == {0: [True]}  # another database: new there
    assert stored(f"redis://:s3cret@{base}/3") == 1
    assert stored(f"redis://:s3cret@{base}/0") == 1
    for wrong in (f"redis://:guess@{base}/0", f"redis://{base}/0"):
        async with buffer_at(wrong) as buffer:
            with pytest.raises(BufferUnavailable, match="Redis unavailable"):
                await append(buffer, b"x")


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 it signed: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("scangate test CA"))
        .issuer_name(name("scangate test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_tls_verified_against_the_urls_ca(
    private_redis: PrivateRedisFactory, tmp_path: Path
) -> None:
    ca, cert, key = _certificates(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        tls_port = probe.getsockname()[1]
    private_redis(
        "redis",
        appendonly=False,
        extra_args=[
            "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file",
            str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
        ],
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"
    async with buffer_at(url) as buffer:
        assert await append(buffer, b"a", b"b") == {0: [True, True]}
    # The server's certificate is checked: a client trusting another CA refuses it.
    (tmp_path / "other").mkdir()
    other_ca, _, _ = _certificates(tmp_path / "other")
    async with buffer_at(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={other_ca}") as buffer:
        with pytest.raises(BufferUnavailable, match="Redis unavailable"):
            await append(buffer, b"c")


async def test_a_script_the_server_lost_is_loaded_again(redis_url: str) -> None:
    async with buffer_at(redis_url) as buffer:
        assert await append(buffer, b"a") == {0: [True]}
        with redis.Redis.from_url(redis_url) as client:
            client.script_flush()
        assert await append(buffer, b"a", b"b") == {0: [False, True]}


async def test_wait_holds_the_answer_until_replicas_confirm(redis_url: str) -> None:
    """No replica: WAIT times out with none, and the group is refused (a 503)."""
    async with buffer_at(redis_url, wait_replicas=1) as buffer:
        with pytest.raises(BufferUnavailable, match="only 0 of 1 replicas"):
            await append(buffer, b"a")


async def test_wait_answers_once_a_replica_has_the_write(
    private_redis: PrivateRedisFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a live replica the group's WAIT 1 is met: the write is answered, the replica
    holds it, and it went on a lean connection (not through redis-py's client)."""
    primary = private_redis("valkey", appendonly=False)
    replica = private_redis(
        "valkey", appendonly=False, extra_args=["--replicaof", "127.0.0.1", str(primary.port)]
    )
    with redis.Redis.from_url(replica.url) as client:
        for _ in range(100):
            if client.info("replication").get("master_link_status") == "up":
                break
            await asyncio.sleep(0.1)
        assert client.info("replication")["master_link_status"] == "up"
    exchanges: list[int] = []
    real_exchange = LeanPool.exchange

    async def counted(pool: LeanPool, commands: Any) -> list[Any]:
        exchanges.append(len(commands))
        return await real_exchange(pool, commands)

    monkeypatch.setattr(LeanPool, "exchange", counted)
    async with buffer_at(primary.url, wait_replicas=1) as buffer:
        assert await append(buffer, b"a") == {0: [True]}
    # Every exchange is the script call and its WAIT (the first also finds the script
    # not loaded yet on this new server, and is sent again once it is).
    assert exchanges and set(exchanges) == {2}
    assert stored(replica.url) == 1


async def test_waitaof_where_the_server_has_it(private_redis: PrivateRedisFactory) -> None:
    valkey = private_redis("valkey", appendonly=True, appendfsync="everysec")
    async with buffer_at(valkey.url, fsync_always=True) as buffer:
        assert await append(buffer, b"a") == {0: [True]}
        assert buffer.durability.mode == "waitaof"
    redis_70 = private_redis("redis", appendonly=True, appendfsync="everysec")
    async with buffer_at(redis_70.url, fsync_always=True) as buffer:
        with pytest.raises(BufferUnavailable, match="neither fsyncs every write"):
            await append(buffer, b"a")


async def test_out_of_memory_is_unavailable_not_an_error(
    private_redis: PrivateRedisFactory,
) -> None:
    server = private_redis(
        "valkey",
        appendonly=False,
        extra_args=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"],
    )
    async with (
        buffer_at(server.url) as buffer,
        # Open until the end: its buffers count towards the memory in use, too.
        redis.asyncio.Redis.from_url(server.url) as ballast,
    ):
        assert await append(buffer, b"first") == {0: [True]}
        # Filled until even a small write is refused (a big one is refused earlier, by
        # its own size).
        for size in (10_000, 1_000, 100, 1):
            with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                for i in range(100_000):
                    await ballast.set(f"ballast{size}-{i}", b"x" * size)
        with pytest.raises(BufferUnavailable, match="out of memory"):
            await append(buffer, b"second")


async def test_loading_is_unavailable_until_the_data_is_back(
    private_redis: PrivateRedisFactory, tmp_path: Path
) -> None:
    """A server replaying its data answers LOADING: the buffer says unavailable (503), and
    writes go through once it is loaded, on the same buffer."""
    first = private_redis("redis", appendonly=False)
    with redis.Redis.from_url(first.url) as client:
        with client.pipeline(transaction=False) as pipe:
            for i in range(2000):
                pipe.set(f"key{i}", i)
            pipe.execute()
        client.save()
    first.stop()
    # The same files and port, loading slowly: 2,000 keys at 1 ms each.
    slow = RedisProcess(
        server_binary("redis"),
        first.workdir,
        port=first.port,
        appendonly=False,
        # Events (and so LOADING answers) every KiB loaded, not every 2 MB.
        extra_args=["--key-load-delay", "1000", "--loading-process-events-interval-bytes", "1024"],
    )
    starting = threading.Thread(target=slow.start, kwargs={"timeout_s": 60})
    starting.start()
    try:
        async with buffer_at(slow.url) as buffer:
            refusals: set[str] = set()
            while starting.is_alive():  # until the server answers PING with PONG
                try:
                    await append(buffer, b"early")
                    break  # loaded, a moment before the starter saw it
                except BufferUnavailable as exc:
                    refusals.add(str(exc))  # refused connections first, then LOADING
                await asyncio.sleep(0.05)
            await asyncio.to_thread(starting.join)
            assert "Redis unavailable: BusyLoadingError" in refusals, refusals
            assert await append(buffer, b"later") == {0: [True]}
    finally:
        starting.join()
        slow.stop()


async def test_a_restarted_server_is_reconnected_to(private_redis: PrivateRedisFactory) -> None:
    server = private_redis("valkey", appendonly=True)
    async with buffer_at(server.url) as buffer:
        assert await append(buffer, b"a") == {0: [True]}
        server.stop()
        with pytest.raises(BufferUnavailable, match="Redis unavailable"):
            await append(buffer, b"b")
        server.start()
        assert await append(buffer, b"b", b"a") == {0: [True, False]}


async def test_a_connection_the_server_closed_while_idle_costs_no_failed_write(
    private_redis: PrivateRedisFactory,
) -> None:
    """A restart between two writes: once the event loop has seen the idle connection
    end, the next write opens a new one instead of failing on the old (a 503)."""
    server = private_redis("valkey", appendonly=True)
    async with buffer_at(server.url) as buffer:
        assert await append(buffer, b"a") == {0: [True]}
        server.restart()  # between two writes: the idle connection is closed
        await asyncio.sleep(0.2)  # the loop sees the connection end
        assert await append(buffer, b"b", b"a") == {0: [True, False]}


async def test_big_writes_sent_at_once_keep_every_rule(redis_url: str) -> None:
    """Writes of SEND_AT_ONCE_EVENTS or more go to Redis from their request's own turn
    (``RedisBuffer._send_at_once``): concurrent ones are each stored once, a lost script is
    loaded again on that path too, and duplicates are still told apart."""
    from gateway.pipeline.buffer import SEND_AT_ONCE_EVENTS

    size = SEND_AT_ONCE_EVENTS + 10

    def batch(name: str) -> list[bytes]:
        return [f"{name}-{i}".encode() for i in range(size)]

    async with buffer_at(redis_url) as buffer:
        received = 0
        original = buffer._receive

        async def counting(sent: Any) -> Any:
            nonlocal received
            received += 1
            return await original(sent)

        buffer._receive = counting  # type: ignore[method-assign]
        assert await append(buffer, b"warm-up") == {0: [True]}  # opens a lean connection
        firsts = await asyncio.gather(*(append(buffer, *batch(f"r{r}")) for r in range(6)))
        assert all(result == {0: [True] * size} for result in firsts)
        assert received >= 1  # at least the first went at once
        with redis.Redis.from_url(redis_url) as client:
            client.script_flush()
        again = await append(buffer, *batch("r0")[:5], *batch("fresh")[: size - 5])
        assert again == {0: [False] * 5 + [True] * (size - 5)}
    assert stored(redis_url) == 1 + 6 * size + size - 5


async def test_small_writes_of_one_turn_go_in_groups_from_their_own_turn(
    redis_url: str,
) -> None:
    """Single events queued in one turn of the loop go to Redis SEND_AT_ONCE_EVENTS at a
    time from their own turn while a group slot is free (not all after the turn, from the
    committer); the committer sends only what is left."""
    from gateway.pipeline.buffer import SEND_AT_ONCE_EVENTS

    async with buffer_at(redis_url) as buffer:
        assert await append(buffer, b"warm-up") == {0: [True]}  # opens a lean connection
        received, groups = 0, []
        original_receive, original_commit = buffer._receive, buffer._commit

        async def counting(sent: Any) -> Any:
            nonlocal received
            received += 1
            return await original_receive(sent)

        async def watching(group: Any, *args: Any) -> Any:
            groups.append(len(group))
            return await original_commit(group, *args)

        buffer._receive = counting  # type: ignore[method-assign]
        buffer._commit = watching  # type: ignore[method-assign]
        n = 5 * SEND_AT_ONCE_EVENTS
        writes = [append(buffer, f"one-{i}".encode()) for i in range(n)]
        assert await asyncio.gather(*writes) == [{0: [True]}] * n
        assert received >= 1  # at least one group went from a request's own turn
        assert 0 not in groups and sum(groups) == n
        again = await asyncio.gather(*(append(buffer, f"one-{i}".encode()) for i in range(n)))
        assert again == [{0: [False]}] * n
    assert stored(redis_url) == 1 + n


async def test_the_committer_sends_no_empty_group_when_a_request_sent_its_queue(
    redis_url: str,
) -> None:
    """The committer waits for a group slot; when one frees, a request of that same turn can
    send the whole queue from its own turn. The committer then finds nothing to send and
    stops, rather than committing an empty group."""
    from gateway.pipeline.buffer import MAX_IN_FLIGHT, SEND_AT_ONCE_EVENTS

    async with buffer_at(redis_url) as buffer:
        assert await append(buffer, b"warm-up") == {0: [True]}  # opens a lean connection
        groups: list[int] = []
        original_commit = buffer._commit

        async def watching(group: Any, *args: Any) -> Any:
            groups.append(len(group))
            return await original_commit(group, *args)

        buffer._commit = watching  # type: ignore[method-assign]
        # Hold every group slot with a stand-in group that waits.
        gates = [asyncio.Event() for _ in range(MAX_IN_FLIGHT)]
        holders = [asyncio.create_task(gate.wait()) for gate in gates]
        for holder in holders:
            buffer._in_flight.add(holder)
            holder.add_done_callback(buffer._in_flight.discard)
        first = asyncio.ensure_future(append(buffer, b"first"))
        for _ in range(5):  # the committer starts and waits for a slot
            await asyncio.sleep(0)
        assert not first.done() and groups == []
        gates[0].set()
        # Resumed in the turn the slot frees, before the committer is: queue enough to
        # send at once from this turn (_enqueue, as a request's own turn does).
        await holders[0]
        identities = [f"rest-{i}".encode() for i in range(SEND_AT_ONCE_EVENTS - 1)]
        rest = [buffer._enqueue({0: ([i], b"event " + i)}, 0) for i in identities]
        assert buffer._queue == []  # sent from this turn, "first" with them
        answers = await asyncio.gather(first, *rest)
        assert answers == [{0: [True]}] * SEND_AT_ONCE_EVENTS
        for _ in range(5):
            await asyncio.sleep(0)
        assert groups == [SEND_AT_ONCE_EVENTS]  # one group; no empty one after it
        assert buffer._committer is not None and buffer._committer.done()
        gates[1].set()
        await holders[1]
    assert stored(redis_url) == 1 + SEND_AT_ONCE_EVENTS


async def test_a_failure_while_sending_at_once_leaves_no_request_unanswered(
    redis_url: str,
) -> None:
    from gateway.pipeline.buffer import SEND_AT_ONCE_EVENTS

    async with buffer_at(redis_url) as buffer:
        assert await append(buffer, b"warm-up") == {0: [True]}
        original_calls, failures = buffer._calls, 0

        def failing_once(merged: Any) -> Any:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise RuntimeError("a bug while building the calls")
            return original_calls(merged)

        buffer._calls = failing_once  # type: ignore[method-assign]
        identities = [f"e-{i}".encode() for i in range(SEND_AT_ONCE_EVENTS)]
        answer = await asyncio.wait_for(append(buffer, *identities), 10)
        assert failures == 1
        assert answer == {0: [True] * SEND_AT_ONCE_EVENTS}  # the usual path wrote it
    assert stored(redis_url) == 1 + SEND_AT_ONCE_EVENTS
