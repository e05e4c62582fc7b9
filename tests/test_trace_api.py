"""Tracing as officials use it: the CLI (JSON, CSV) and GET /v1/trace with an admin token."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway.http.keys import STORAGE
from storage import PairingRules, ScanEvent, connect_storage

from .harness import GatewayStarter

HOUR = 3_600_000


def cli(
    data_dir: Path, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCANGATE_")}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


async def plant(data_dir: Path) -> int:
    """A case and a contact at one venue two hours ago; returns the case's check-in time."""
    start = int(time.time() * 1000) - 3 * HOUR
    storage = await connect_storage(f"sqlite:///{data_dir / 'scangate.db'}")
    try:
        events = [
            ("CASE", "checkin", start),
            ("CASE", "checkout", start + HOUR),
            ("=CONTACT", "checkin", start + HOUR // 2),
            ("=CONTACT", "checkout", start + 2 * HOUR),
        ]
        await storage.store_batch(
            [
                ScanEvent("vhd", f"TR{i:08d}", kind, "MARKET", person, t, t, None)  # type: ignore[arg-type]
                for i, (person, kind, t) in enumerate(events)
            ],
            PairingRules(),
        )
    finally:
        await storage.close()
    return start


async def test_cli_trace_json_and_csv_and_admins(tmp_path: Path) -> None:
    start = await plant(tmp_path)
    result = cli(tmp_path, "trace", "CASE")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["person_id"] == "=CONTACT" and row["venue_id"] == "MARKET"
    assert row["overlap_minutes"] == 90.0 and row["depth"] == 1 and "via" not in row
    assert row["overlap_start"].endswith("Z") and len(row["overlap_start"]) == 24

    result = cli(tmp_path, "trace", "CASE", "--format", "csv", "--min-overlap", "5m")
    table = list(csv.reader(io.StringIO(result.stdout)))
    assert table[0] == [
        "person_id",
        "venue_id",
        "overlap_start",
        "overlap_end",
        "overlap_minutes",
        "depth",
        "via",
        "checkout_recorded",
        "venue_name",
        "venue_address",
        "venue_province",
    ]
    assert table[1][0] == "'=CONTACT"  # formula injection neutralised
    assert len(table) == 2

    assert cli(tmp_path, "trace", "CASE", "--min-overlap", "2h").stdout.strip() == "[]"
    bad = cli(tmp_path, "trace", "case")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    bad = cli(tmp_path, "trace", "CASE", "--margin", "soon")
    assert bad.returncode == 2 and "margin" in bad.stderr

    admin = cli(tmp_path, "admins", "add", "officer1")
    assert admin.returncode == 0
    assert set(json.loads(admin.stdout)) == {"name", "token"}
    assert cli(tmp_path, "admins", "add", "officer1").returncode == 2
    assert start > 0


async def test_http_trace_needs_an_admin_token_and_is_audited(
    tmp_path: Path, keyring: Any, gateway_under_test: GatewayStarter, redis_url: str
) -> None:
    await plant(tmp_path)
    app_token = keyring.add_app("vhd").token
    gateway = await gateway_under_test(redis_url)
    client = gateway.client
    try:
        storage = gateway.app[STORAGE]
        admin_token = await storage.add_admin("officer1")
        for headers in (
            {},
            {"Authorization": f"Bearer {app_token}"},
            {"Authorization": "Bearer sgadm_guess"},
        ):
            resp = await client.get("/v1/trace/CASE", headers=headers)
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        auth = {"Authorization": f"Bearer {admin_token}"}
        resp = await client.get("/v1/trace/CASE", headers=auth)
        assert resp.status == 200
        page = await resp.json()
        assert page["next"] is None
        rows = page["rows"]
        assert [(r["person_id"], r["overlap_minutes"]) for r in rows] == [("=CONTACT", 90.0)]
        resp = await client.get("/v1/trace/CASE?depth=3", headers=auth)
        assert resp.status == 400
        resp = await client.get("/v1/trace/CASE?margin=forever", headers=auth)
        assert resp.status == 400
        resp = await client.get("/v1/trace/not-an-id", headers=auth)
        assert resp.status == 400
        audit = await storage.audit_entries()
        assert [(a.actor, a.action, a.subject) for a in audit] == [
            ("admin:officer1", "trace", "CASE")
        ]
        assert (await client.get("/readyz")).status == 200
    finally:
        await gateway.close()


def test_migrate_and_purge_commands(tmp_path: Path) -> None:
    result = cli(tmp_path, "migrate")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"storage": "sqlite", "migrated": True}
    result = cli(tmp_path, "purge")
    assert result.returncode == 0
    assert json.loads(result.stdout)["events"] == 0


async def test_tracing_reads_the_trace_storage_and_audits_in_the_primary(
    tmp_path: Path, gateway_under_test: GatewayStarter, redis_url: str
) -> None:
    # The "replica" holds the visits; the primary has none, and gets the audit entries.
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    await plant(replica_dir)
    replica_url = f"sqlite:///{replica_dir / 'scangate.db'}"
    gateway = await gateway_under_test(redis_url, trace_storage_url=replica_url)
    client = gateway.client
    try:
        storage = gateway.app[STORAGE]
        auth = {"Authorization": f"Bearer {await storage.add_admin('officer1')}"}
        rows = (await (await client.get("/v1/trace/CASE", headers=auth)).json())["rows"]
        assert [r["person_id"] for r in rows] == ["=CONTACT"]
        assert await storage.all_visits() == []
        assert [a.action for a in await storage.audit_entries()] == ["trace"]
    finally:
        await gateway.close()
    replica = await connect_storage(replica_url)
    try:
        assert await replica.audit_entries() == []
    finally:
        await replica.close()
    # The CLI reads from it too.
    result = await asyncio.to_thread(
        cli, tmp_path, "trace", "CASE", extra_env={"SCANGATE_TRACE_STORAGE_URL": replica_url}
    )
    assert [r["person_id"] for r in json.loads(result.stdout)] == ["=CONTACT"], result.stderr
