"""The fault suite: faults injected under load, then an exact ledger of every answer is
checked against storage (``tests/ledger.py``). Every server here is private to its test.

CI runs the short mode; ``SCANGATE_FAULT_SCALE=10`` runs each phase ten times longer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway import Settings
from gateway.http.keys import BUFFER
from gateway.metrics import FlusherMetrics
from gateway.pipeline.client import connect_redis
from gateway.pipeline.flusher import Flusher
from signing import Keyring
from storage import Storage, connect_storage

from .harness import GatewayStarter, GatewayUnderTest
from .ledger import Load, events_in_streams, phase_s, until
from .servers import free_loopback_port, scangate_env

SHARDS = 4


async def backlog(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return await events_in_streams(client, SHARDS)
    finally:
        await client.aclose()


async def wait_drained(
    url: str,
    timeout_s: float = 60,
    below: int = 1,
    count: Callable[[], Awaitable[int]] | None = None,
) -> None:
    """Until fewer than ``below`` events wait in the streams (1: none at all); ``count``
    measures the backlog where one node's streams are not all of it (a cluster)."""
    deadline = time.monotonic() + timeout_s
    while (left := await (count() if count else backlog(url))) >= below:
        assert time.monotonic() < deadline, f"{left} events never left the streams"
        await asyncio.sleep(0.2)


async def stored_ids(storage_url: str) -> list[str]:
    storage = await connect_storage(storage_url)
    try:
        return [event_id for _app, event_id in await storage.event_identities()]
    finally:
        await storage.close()


class Rig:
    """A gateway (in this process, on a real port) and a flusher task, on a given Redis
    and storage."""

    def __init__(self, gateway: GatewayUnderTest, keyring: Keyring, token: str) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.token = token
        self.keyring = keyring
        self._flusher: asyncio.Task[None] | None = None
        self._flusher_stop = asyncio.Event()
        self._storage: Storage | None = None
        self._client: aioredis.Redis | None = None

    @property
    def url(self) -> str:
        return self.gateway.url

    def load(self, **kwargs: Any) -> Load:
        return Load(self.url, self.token, self.keyring, **kwargs)

    async def start_flusher(self) -> None:
        assert self.settings.redis_url is not None
        self._storage = await connect_storage(self.settings.resolved_storage_url)
        self._client = connect_redis(self.settings.redis_url, self.settings.redis_cluster)
        self._flusher_stop = asyncio.Event()
        flusher = Flusher(self._client, self._storage, self.settings, FlusherMetrics())
        self._flusher = asyncio.create_task(flusher.run(self._flusher_stop))

    async def stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher_stop.set()
            await self._flusher
            self._flusher = None
        if self._client is not None:
            await self._client.aclose()
        if self._storage is not None:
            await self._storage.close()

    async def close(self) -> None:
        await self.stop_flusher()
        # Now, not at the test's teardown: the servers a test started stop before that.
        await self.gateway.close()

    async def finish(self, load: Load, drained: Callable[[], Awaitable[int]] | None = None) -> None:
        """Stop the load, answer every failed batch, drain, and check the ledger."""
        await load.stop()
        await load.settle()
        assert self.settings.redis_url is not None
        await wait_drained(self.settings.redis_url, count=drained)
        # The backlog counters agree with the streams: every event counted in, counted off.
        counters = await self.gateway.app[BUFFER].poll_lengths()
        assert counters == [0] * self.settings.shards, counters
        await self.stop_flusher()
        load.ledger.check(await stored_ids(self.settings.resolved_storage_url))
        assert load.answered() > 200, f"the load hardly ran: {load.ledger.statuses}"


@contextlib.asynccontextmanager
async def rig(
    gateway_under_test: GatewayStarter,
    keyring: Keyring,
    *,
    redis_url: str,
    flusher: bool = True,
    **over: Any,
) -> AsyncIterator[Rig]:
    # The app is added before the gateway starts, which is when its keyring is first read.
    token = keyring.add_app("vhd").token
    gateway = await gateway_under_test(
        redis_url,
        **{
            "shards": SHARDS,
            "flush_batch": 200,
            "flush_max_age_s": 0.02,
            "flush_claim_idle_s": 1,
            **over,
        },
    )
    made = Rig(gateway, keyring, token)
    try:
        if flusher:
            await made.start_flusher()
        yield made
    finally:
        await made.close()


# -- Redis -----------------------------------------------------------------------------------


async def test_a_graceful_redis_restart_under_load_answers_503_then_recovers(
    gateway_under_test: GatewayStarter, keyring: Keyring, private_redis: Any
) -> None:
    server = private_redis("valkey", appendonly=True)
    async with rig(gateway_under_test, keyring, redis_url=server.url) as r, r.load() as load:
        await asyncio.sleep(phase_s(1.5))
        before = len(load.ledger.accepted)
        server.stop()  # SHUTDOWN: the append-only file is written out
        await asyncio.sleep(phase_s(1.5))
        unavailable = load.ledger.statuses[503]
        assert unavailable > 0, load.ledger.statuses
        server.start()
        await asyncio.sleep(phase_s(2))
        # The same gateway, not restarted, takes scans again.
        assert len(load.ledger.accepted) > before
        await r.finish(load)
    assert load.ledger.missing_retry_after == 0


@pytest.mark.parametrize(
    "fsync",
    [
        pytest.param("always", id="server-fsyncs-every-write"),
        pytest.param("everysec", id="waitaof"),
    ],
)
async def test_kill_9_redis_under_load_loses_nothing_accepted_with_redis_fsync_always(
    gateway_under_test: GatewayStarter, keyring: Keyring, private_redis: Any, fsync: str
) -> None:
    # SCANGATE_REDIS_FSYNC=always: with a server that fsyncs every write, or (everysec)
    # through WAITAOF at the end of each group commit.
    server = private_redis("valkey", appendonly=True, appendfsync=fsync)
    async with (
        rig(gateway_under_test, keyring, redis_url=server.url, redis_fsync="always") as r,
        r.load() as load,
    ):
        for _ in range(2):
            await asyncio.sleep(phase_s(1.5))
            server.kill()  # SIGKILL: no chance to write anything out
            await asyncio.sleep(0.5)
            server.start()
        await asyncio.sleep(phase_s(1.5))
        await r.finish(load)
        assert load.ledger.statuses[503] + sum(load.ledger.failures.values()) > 0


async def test_redis_fsync_always_refuses_a_server_that_cannot_promise_it(
    gateway_under_test: GatewayStarter, keyring: Keyring, private_redis: Any
) -> None:
    # Redis 7.0 has no WAITAOF; with appendfsync everysec it cannot confirm an fsync.
    server = private_redis("redis", appendonly=True, appendfsync="everysec")
    async with rig(
        gateway_under_test, keyring, flusher=False, redis_url=server.url, redis_fsync="always"
    ) as r:
        async with r.load() as load:
            await asyncio.sleep(0.5)
            await load.stop()
        assert load.ledger.accepted == set()
        assert load.ledger.statuses[503] > 0 and set(load.ledger.statuses) == {503}


async def test_the_backlog_high_water_mark_answers_503_never_500(
    gateway_under_test: GatewayStarter, keyring: Keyring, private_redis: Any
) -> None:
    server = private_redis("valkey", appendonly=False)
    async with rig(
        gateway_under_test, keyring, flusher=False, redis_url=server.url, backlog_high_water=300
    ) as r:
        async with r.load() as load:
            assert await until(lambda: load.ledger.statuses[503] >= 20, 20), load.ledger.statuses
            # The flusher comes back; the backlog drains and scans are taken again.
            await r.start_flusher()
            accepted = len(load.ledger.accepted)
            assert await until(lambda: len(load.ledger.accepted) > accepted, 20)
            await r.finish(load)
        assert load.ledger.missing_retry_after == 0


async def test_redis_maxmemory_answers_503_never_500(
    gateway_under_test: GatewayStarter, keyring: Keyring, private_redis: Any
) -> None:
    server = private_redis(
        "valkey",
        appendonly=False,
        extra_args=["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"],
    )
    async with (
        rig(gateway_under_test, keyring, flusher=False, redis_url=server.url) as r,
        r.load() as load,
    ):
        assert await until(lambda: load.ledger.statuses[503] >= 20, 30), load.ledger.statuses
        await r.start_flusher()  # storage frees Redis; scans are taken again
        accepted = len(load.ledger.accepted)
        assert await until(lambda: len(load.ledger.accepted) > accepted, 30)
        await r.finish(load)


# -- storage ---------------------------------------------------------------------------------


async def test_postgresql_down_for_20_s_grows_the_backlog_then_it_drains(
    gateway_under_test: GatewayStarter, keyring: Keyring, private_redis: Any, private_postgres: Any
) -> None:
    server = private_redis("valkey", appendonly=False)
    pg = private_postgres()
    async with (
        rig(gateway_under_test, keyring, redis_url=server.url, storage_url=pg.url) as r,
        r.load(pause_s=0.02) as load,
    ):
        await asyncio.sleep(phase_s(1.5))
        pg.stop()
        low = await backlog(server.url)
        await asyncio.sleep(20 * max(1.0, phase_s(1.0)))
        high = await backlog(server.url)
        assert high > low + 500, (low, high)  # scans were still taken, and kept
        pg.start()
        # Under the same load the flusher catches up: the backlog falls back to what a
        # few batches hold (the load keeps adding), then to nothing once it stops.
        await wait_drained(server.url, timeout_s=60, below=max(500, high // 20))
        await r.finish(load)


async def test_postgresql_stopped_answers_503_to_what_reads_storage_then_recovers(
    gateway_under_test: GatewayStarter, keyring: Keyring, private_redis: Any, private_postgres: Any
) -> None:
    """A request that reads storage while PostgreSQL is down gets the documented 503 with
    Retry-After (storage says StorageUnavailable, whatever its driver raised), and the
    same request works again once the server is back, without a restart."""
    server = private_redis("valkey", appendonly=False)
    pg = private_postgres()
    setup = await connect_storage(pg.url)
    try:
        admin_token = await setup.add_admin("officer1")
    finally:
        await setup.close()
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with (
        rig(
            gateway_under_test, keyring, flusher=False, redis_url=server.url, storage_url=pg.url
        ) as r,
        aiohttp.ClientSession() as session,
    ):

        async def read_audit() -> tuple[int, str | None, Any]:
            async with session.get(r.url + "v1/audit", headers=headers) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.json()

        assert (await read_audit())[0] == 200
        pg.stop()
        status, retry_after, body = await read_audit()
        assert (status, retry_after, body["error"]) == (503, "1", "unavailable"), body
        pg.start()
        deadline = time.monotonic() + 30
        while (status := (await read_audit())[0]) != 200:
            assert status == 503 and time.monotonic() < deadline, status
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_kill_9_a_flusher_process_three_times_under_load(
    gateway_under_test: GatewayStarter,
    keyring: Keyring,
    private_redis: Any,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    storage: dict[str, str] = {}
    if backend == "postgresql":
        storage["storage_url"] = request.getfixturevalue("private_postgres")().url
    server = private_redis("valkey", appendonly=True)
    async with (
        rig(gateway_under_test, keyring, flusher=False, redis_url=server.url, **storage) as r,
        r.load() as load,
    ):
        proc = start_flusher_process(r.settings)
        for _ in range(3):
            await asyncio.sleep(phase_s(1.5))
            assert proc.poll() is None, proc.log.read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = start_flusher_process(r.settings)
        await asyncio.sleep(phase_s(1))
        await load.stop()
        await load.settle()
        await wait_drained(server.url)  # the last flusher claims what the dead held
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        load.ledger.check(await stored_ids(r.settings.resolved_storage_url))


async def test_a_flusher_signalled_again_while_it_stops_still_exits_0(
    gateway_under_test: GatewayStarter, keyring: Keyring, private_redis: Any
) -> None:
    """An impatient operator, or a service manager that signals every process of the
    group, sends SIGTERM more than once. Every one after the first lands while the flusher
    is already stopping, some after its event loop has closed: none may kill it."""
    server = private_redis("valkey", appendonly=False)
    async with rig(gateway_under_test, keyring, flusher=False, redis_url=server.url) as r:
        proc = start_flusher_process(r.settings)
        await wait_flusher_started(proc)
        while proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.002)
        assert proc.returncode == 0, proc.log.read_text()


async def wait_flusher_started(proc: Any, timeout_s: float = 30.0) -> None:
    """Until the flusher process logs that it runs (it starts a Python process first)."""
    deadline = time.monotonic() + timeout_s
    while "shards, batch" not in proc.log.read_text():
        assert proc.poll() is None, proc.log.read_text()
        assert time.monotonic() < deadline, "the flusher never started"
        await asyncio.sleep(0.05)


def start_flusher_process(settings: Settings) -> Any:
    env = scangate_env(
        SCANGATE_REDIS_URL=str(settings.redis_url),
        SCANGATE_STORAGE_URL=settings.resolved_storage_url,
        SCANGATE_MASTER_KEY=str(settings.master_key),
        SCANGATE_SHARDS=str(SHARDS),
        SCANGATE_FLUSH_BATCH="20",  # small batches: nearly always mid-batch
        SCANGATE_FLUSH_MAX_AGE="20ms",
        SCANGATE_FLUSH_CLAIM_IDLE="1s",
    )
    log = settings.data_dir / f"flusher-{time.monotonic_ns()}.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--data-dir", str(settings.data_dir), "flush"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


# -- the gateway itself ----------------------------------------------------------------------


async def test_sigterm_to_serve_under_load_finishes_requests_in_flight(
    tmp_path: Path, keyring: Keyring, master_key: bytes, private_redis: Any
) -> None:
    server = private_redis("valkey", appendonly=True)
    settings = Settings(
        data_dir=tmp_path,
        redis_url=server.url,
        master_key=base64.b64encode(master_key).decode(),
        shards=SHARDS,
    )
    token = keyring.add_app("vhd").token
    port = free_loopback_port()
    proc = start_serve(settings, port)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(url, proc)
    async with Load(url, token, keyring, clients=8, pause_s=0) as load:
        await asyncio.sleep(phase_s(1.5))
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
        await load.stop()
        assert code == 0, proc.log.read_text()
        assert not [s for s in load.ledger.statuses if s >= 500], load.ledger.statuses
        # Gone: the rest were refused a connection, not cut off mid-answer with a 5xx.
        proc = start_serve(settings, port)  # the next run's flusher drains the streams
        await wait_ready(url, proc)
        await load.settle()
        await wait_drained(server.url)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    load.ledger.check(await stored_ids(settings.resolved_storage_url))
    assert load.answered() > 200


def start_serve(settings: Settings, port: int) -> Any:
    env = scangate_env(
        SCANGATE_REDIS_URL=str(settings.redis_url),
        SCANGATE_MASTER_KEY=str(settings.master_key),
        SCANGATE_SHARDS=str(SHARDS),
    )
    log = settings.data_dir / f"serve-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "--data-dir",
                str(settings.data_dir),
                "serve",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


async def wait_ready(url: str, proc: Any, timeout_s: float = 60) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.log.read_text()
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise AssertionError("serve did not become ready")
