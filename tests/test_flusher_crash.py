"""Kill -9 a flusher process mid-batch while scans keep arriving: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from gateway import Settings
from gateway.app import create_app
from gateway.keyspace import stream_key
from signing import Keyring
from storage import connect_storage

SHARDS = 4


def start_flusher(data_dir: Path, redis_url: str, storage_url: str, master_key: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCANGATE_", "PROMETHEUS_"))}
    env.update(
        {
            "SCANGATE_REDIS_URL": redis_url,
            "SCANGATE_STORAGE_URL": storage_url,
            "SCANGATE_MASTER_KEY": master_key,
            "SCANGATE_SHARDS": str(SHARDS),
            # Small batches, so the flusher is nearly always in the middle of one.
            "SCANGATE_FLUSH_BATCH": "20",
            "SCANGATE_FLUSH_MAX_AGE": "20ms",
            "SCANGATE_FLUSH_CLAIM_IDLE": "1s",
        }
    )
    log = data_dir / f"flusher-{time.monotonic_ns()}.log"
    with log.open("wb") as stderr:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "--data-dir", str(data_dir), "flush"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_kill_9_flusher_three_times_under_load(
    tmp_path: Path,
    keyring: Keyring,
    master_key: bytes,
    private_redis: Any,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    server = private_redis("valkey", appendonly=True)
    if backend == "sqlite":
        storage_url = f"sqlite:///{tmp_path / 'scangate.db'}"
    else:
        private_postgres = request.getfixturevalue("private_postgres")
        storage_url = private_postgres().url
    key_b64 = base64.b64encode(master_key).decode()
    token = keyring.add_app("vhd").token
    settings = Settings(
        data_dir=tmp_path,
        redis_url=server.url,
        master_key=key_b64,
        shards=SHARDS,
        storage_url=storage_url,
    )
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    venue = keyring.issue("vhd", "venue", "V1")
    persons = [keyring.issue("vhd", "person", f"P{i}", ttl_s=86400) for i in range(50)]
    accepted: set[str] = set()
    rejected_or_failed = 0
    stop_load = asyncio.Event()

    async def load() -> None:
        nonlocal rejected_or_failed
        n = 0
        while not stop_load.is_set():
            events = []
            for _ in range(10):
                events.append(
                    {
                        "event_id": f"LOAD{n:08d}",
                        "kind": "checkin" if n % 3 else "checkout",
                        "venue_code": venue,
                        "person_code": persons[n % 50],
                        "scanned_at": int(time.time() * 1000) - (n % 7) * 1000,
                    }
                )
                n += 1
            resp = await client.post(
                "/v1/scans", json={"events": events}, headers={"Authorization": f"Bearer {token}"}
            )
            if resp.status == 200:
                for r in (await resp.json())["results"]:
                    if r["status"] == "accepted":
                        accepted.add(r["event_id"])
            else:
                rejected_or_failed += 1
            await asyncio.sleep(0.005)

    load_task = asyncio.create_task(load())
    flusher = start_flusher(tmp_path, server.url, storage_url, key_b64)
    try:
        for _ in range(3):
            await asyncio.sleep(1.5)
            assert flusher.poll() is None, flusher.log.read_text()
            flusher.send_signal(signal.SIGKILL)
            flusher.wait(10)
            flusher = start_flusher(tmp_path, server.url, storage_url, key_b64)
        await asyncio.sleep(1.0)
        stop_load.set()
        await load_task
        # The last flusher drains the streams, claiming what the killed ones held.
        r = aioredis.Redis.from_url(server.url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            backlog = sum([await r.xlen(stream_key(s)) for s in range(SHARDS)])
            if backlog == 0:
                break
            await asyncio.sleep(0.3)
        await r.aclose()
        assert backlog == 0
    finally:
        flusher.send_signal(signal.SIGTERM)
        assert flusher.wait(30) == 0
        await client.close()
    assert len(accepted) > 500, "the load did not run"
    assert rejected_or_failed == 0
    storage = await connect_storage(storage_url)
    try:
        ids = await storage.event_identities()
    finally:
        await storage.close()
    stored = [e for _a, e in ids]
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert set(stored) == accepted, (
        f"missing {len(accepted - set(stored))}, unexpected {len(set(stored) - accepted)}"
    )
