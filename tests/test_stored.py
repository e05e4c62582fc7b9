"""What is stored, as officials and operators ask for it: a person's events and visits,
and the pipeline's status, over HTTP (admin token) and the CLI, on both backends."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Final

import pytest

from gateway.http.keys import STORAGE
from gateway.pipeline.keyspace import EVENTS_FIELD, LAST_FLUSH_KEY, backlog_key, stream_key
from storage import PairingRules, ScanEvent

from .harness import GatewayStarter
from .test_trace_api import cli

ONE_REDIS: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)
MINUTE: Final = 60_000


@ONE_REDIS
@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_an_official_sees_a_persons_stored_events_and_visits(
    gateway_under_test: GatewayStarter, redis_url: str, storage_kind: str
) -> None:
    gateway = await gateway_under_test(redis_url, storage=storage_kind)
    storage = gateway.app[STORAGE]
    now = int(time.time() * 1000)
    await storage.store_batch(
        [
            ScanEvent("vhd", "A1", "checkin", "MARKET", "P1", now - 90 * MINUTE, now, "dev-1"),
            ScanEvent("vhd", "A2", "checkout", "MARKET", "P1", now - 30 * MINUTE, now, "dev-1"),
            ScanEvent("vhd", "A3", "checkin", "SCHOOL", "P1", now - 10 * MINUTE, now, None),
            ScanEvent("vhd", "B1", "checkin", "MARKET", "P2", now - 10 * MINUTE, now, None),
        ],
        PairingRules(),
    )
    auth = {"Authorization": f"Bearer {await storage.add_admin('officer')}"}
    response = await gateway.client.get("/v1/visits/P1", headers=auth)
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    doc = await response.json()
    assert [e["event_id"] for e in doc["events"]] == ["A1", "A2", "A3"]
    assert doc["events"][0]["device_id"] == "dev-1"
    assert [(v["venue_id"], v["closed_by"], v["checkout_recorded"]) for v in doc["visits"]] == [
        ("MARKET", "checkout", True),
        ("SCHOOL", "auto", False),
    ]
    assert [(e.action, e.subject) for e in await storage.audit_entries()] == [("visits_read", "P1")]
    assert (await gateway.client.get("/v1/visits/P1")).status == 401
    assert (await gateway.client.get("/v1/visits/p-1", headers=auth)).status == 400


@ONE_REDIS
@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_the_status_shows_the_backlog_the_last_flush_and_what_is_stored(
    gateway_under_test: GatewayStarter, redis_url: str, storage_kind: str
) -> None:
    gateway = await gateway_under_test(redis_url, storage=storage_kind, shards=4)
    storage = gateway.app[STORAGE]
    auth = {"Authorization": f"Bearer {await storage.add_admin('operator')}"}
    before = await (await gateway.client.get("/v1/status", headers=auth)).json()
    assert before["buffer"]["backlog"] == 0 and before["buffer"]["last_flush"] is None
    assert before["storage"] == {"kind": storage_kind, "events": 0, "visits": 0, "exact": True}
    assert before["outbox"] == {"pending": 0}
    # Three entries of six events waiting in shard 2, the oldest a minute old, counted as
    # the gateway's script counts them; a flush ten seconds ago.
    now = int(time.time() * 1000)
    for age_ms, lines in ((60_000, b"[]"), (30_000, b"[]\n[]"), (1_000, b"[]\n[]\n[]")):
        await gateway.redis.xadd(stream_key(2), {EVENTS_FIELD: lines}, id=f"{now - age_ms}-0")
    await gateway.redis.incrby(backlog_key(2), 6)
    await gateway.redis.set(LAST_FLUSH_KEY, now - 10_000)
    await storage.store_batch(
        [ScanEvent("vhd", "A1", "checkin", "MARKET", "P1", now - MINUTE, now, None)],
        PairingRules(),
    )
    doc: dict[str, Any] = await (await gateway.client.get("/v1/status", headers=auth)).json()
    buffer = doc["buffer"]
    assert buffer["backlog"] == 6
    assert [s["backlog"] for s in buffer["shards"]] == [0, 0, 6, 0]
    assert 59 <= buffer["oldest_age_s"] <= 70 and 9 <= buffer["last_flush_age_s"] <= 20
    assert doc["storage"]["events"] == 1 and doc["storage"]["visits"] == 1
    assert (await gateway.client.get("/v1/status")).status == 401


def test_the_status_without_a_server_says_so_and_still_shows_storage(tmp_path: Path) -> None:
    result = cli(tmp_path, "status")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert "SCANGATE_REDIS_URL" in doc["buffer"]["error"]
    assert doc["storage"]["kind"] == "sqlite" and doc["storage"]["events"] == 0
    table = cli(tmp_path, "status", "--format", "table")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].startswith("buffer         no Redis to ask")
    assert "storage        sqlite: 0 events, 0 visits" in table.stdout


@ONE_REDIS
async def test_postgresql_estimates_come_from_its_statistics(
    gateway_under_test: GatewayStarter, redis_url: str
) -> None:
    """Past a million rows the status reads PostgreSQL's estimates instead of counting;
    here, on a few rows, the estimate is what ANALYZE found."""
    gateway = await gateway_under_test(redis_url, storage="postgresql")
    storage = gateway.app[STORAGE]
    now = int(time.time() * 1000)
    await storage.store_batch(
        [ScanEvent("vhd", f"E{i}", "checkin", "MARKET", f"P{i}", now, now, None) for i in range(5)],
        PairingRules(),
    )
    assert await storage._estimated_rows(("scan_events", "visits")) == [0, 0]  # not analyzed
    await storage._fetch("ANALYZE scan_events")
    await storage._fetch("ANALYZE visits")
    assert await storage._estimated_rows(("scan_events", "visits")) == [5, 5]
    assert await storage.stored_counts() == (5, 5, True)  # few rows: counted exactly
