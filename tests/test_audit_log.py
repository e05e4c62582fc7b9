"""The audit log as officials and operators read it, and its retention, on SQLite and on
PostgreSQL: ``GET /v1/audit`` with an admin token, ``scangate audit``, ``scangate purge``
and the flusher's daily purge."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
from typing import Any
from urllib.parse import quote

from .test_tokens import CLI_ACTOR, ONE_REDIS, Deployment, bearer, deployment, until

__all__ = ["deployment"]  # the fixture, used here

VIETNAM = dt.timezone(dt.timedelta(hours=7))


async def page(client: Any, token: str, query: str = "") -> tuple[int, Any, Any]:
    resp = await client.get(f"/v1/audit{query}", headers=bearer(token))
    return resp.status, await resp.json(), resp.headers


async def age(deployment: Deployment, subject: str, days: int) -> None:
    """Make the audit entries about ``subject`` ``days`` older than they are."""
    await deployment.sql(
        "UPDATE audit_log SET at = at - ? * 86400000 WHERE subject = ?",
        "UPDATE audit_log SET at = at - make_interval(days => $1) WHERE subject = $2",
        days,
        subject,
    )


@ONE_REDIS
async def test_the_audit_log_is_read_by_time_actor_and_action_a_page_at_a_time(
    deployment: Deployment,
) -> None:
    app = await deployment.cli_json("apps", "add", "vhd")
    one = (await deployment.cli_json("admins", "add", "officer1"))["token"]
    two = (await deployment.cli_json("admins", "add", "officer2"))["token"]
    client = await deployment.gateway()
    for token, person in ((one, "P1"), (two, "P2"), (one, "P3")):
        # Nobody is stored: 404 unknown_person, and the look-up is audit-logged all the same.
        assert (await client.get(f"/v1/trace/{person}", headers=bearer(token))).status == 404

    # Only an admin token opens it.
    assert (await client.get("/v1/audit")).status == 401
    for token in (app["token"], "sgadm_guess"):
        status, body, _ = await page(client, token)
        assert (status, body["error"]) == (401, "unauthorized")

    status, body, headers = await page(client, one)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    entries = body["entries"]
    assert [(e["actor"], e["action"], e["subject"]) for e in entries] == [
        (CLI_ACTOR, "admin_added", "officer1"),
        (CLI_ACTOR, "admin_added", "officer2"),
        ("admin:officer1", "trace", "P1"),
        ("admin:officer2", "trace", "P2"),
        ("admin:officer1", "trace", "P3"),
        ("admin:officer1", "audit_read", "audit_log"),  # this very read, logged first
    ]
    assert body["next_after"] is None
    assert [e["id"] for e in entries] == sorted({e["id"] for e in entries})
    for e in entries:
        assert e["at"].endswith("Z") and len(e["at"]) == 24
        assert set(e) == {"id", "at", "actor", "action", "subject", "detail"}

    async def subjects(query: str) -> list[str]:
        status, body, _ = await page(client, one, query)
        assert status == 200, body
        return [e["subject"] for e in body["entries"]]

    assert await subjects("?action=trace") == ["P1", "P2", "P3"]
    assert await subjects("?action=trace&actor=admin:officer1") == ["P1", "P3"]
    assert await subjects("?actor=admin:officer2") == ["P2"]
    assert await subjects("?action=trace&since=1h") == ["P1", "P2", "P3"]
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).astimezone(VIETNAM)
    assert later.isoformat(timespec="seconds").endswith("+07:00")
    assert await subjects(f"?since={quote(later.isoformat(timespec='seconds'))}") == []
    # "+07:00" typed into a URL unencoded arrives as " 07:00": still read as the offset.
    assert await subjects(f"?since={later.isoformat(timespec='seconds')}") == []
    assert await subjects(f"?action=trace&since={int(time.time() * 1000) - 60_000}") == [
        "P1",
        "P2",
        "P3",
    ]

    # A page at a time: a full page says where the next one starts.
    seen: list[str] = []
    after = 0
    while True:
        status, body, _ = await page(client, one, f"?action=trace&limit=2&after={after}")
        assert status == 200
        seen += [e["subject"] for e in body["entries"]]
        if body["next_after"] is None:
            break
        after = body["next_after"]
        assert after == body["entries"][-1]["id"]
    assert seen == ["P1", "P2", "P3"]

    for query in (
        "?limit=0",
        "?limit=1001",
        "?limit=ten",
        "?after=-1",
        "?after=1e3",
        "?since=soon",
        "?since=2026-01-01",
        "?actor=",
        f"?action={'x' * 201}",
    ):
        status, body, _ = await page(client, one, query)
        assert (status, body["error"]) == (400, "invalid_request"), query

    # Every read is in the log, with what it asked for.
    reads = (await page(client, two, "?action=audit_read&limit=1000"))[1]["entries"]
    assert {e["actor"] for e in reads} == {"admin:officer1", "admin:officer2"}
    assert any("actor=admin:officer1 action=trace" in e["detail"] for e in reads)

    # The CLI reads the same log, the same way.
    traced = await deployment.cli_json("audit", "--action", "trace")
    assert [(e["actor"], e["subject"]) for e in traced] == [
        ("admin:officer1", "P1"),
        ("admin:officer2", "P2"),
        ("admin:officer1", "P3"),
    ]
    assert traced == [e for e in entries if e["action"] == "trace"]
    mine = await deployment.cli_json("audit", "--actor", "admin:officer2", "--action", "trace")
    assert [e["subject"] for e in mine] == ["P2"]
    first = await deployment.cli("audit", "--action", "trace", "--limit", "1")
    assert first.returncode == 0
    assert first.stderr.strip() == f"scangate: more entries: add --after {traced[0]['id']}"
    rest = await deployment.cli_json(
        "audit", "--action", "trace", "--after", str(traced[0]["id"]), "--since", "10m"
    )
    assert [e["subject"] for e in rest] == ["P2", "P3"]
    for bad in (["--since", "soon"], ["--limit", "0"], ["--after", "x"]):
        assert "error" in await deployment.cli_fails("audit", *bad)
    cli_reads = await deployment.cli_json("audit", "--actor", CLI_ACTOR, "--action", "audit_read")
    assert len(cli_reads) >= 5


@ONE_REDIS
async def test_audit_retention_deletes_old_entries_and_keeps_recent_ones(
    deployment: Deployment,
) -> None:
    for name in ("old", "older", "recent"):
        await deployment.cli_json("admins", "add", name)
    await age(deployment, "older", 400)
    await age(deployment, "old", 200)

    # By default a year: only the entry of 400 days ago goes (events keep their own 21d).
    purged = await deployment.cli_json("purge")
    assert purged["audit_entries"] == 1
    cutoff = dt.datetime.fromisoformat(purged["audit_cutoff"])
    assert abs((dt.datetime.now(dt.UTC) - cutoff) - dt.timedelta(days=365)) < dt.timedelta(
        minutes=5
    )
    added = await deployment.cli_json("audit", "--since", "1000d", "--action", "admin_added")
    assert [e["subject"] for e in added] == ["old", "recent"]

    # A shorter setting cuts nearer.
    shorter = {"SCANGATE_AUDIT_RETENTION": "100d"}
    assert (await deployment.cli_json("purge", env=shorter))["audit_entries"] == 1
    added = await deployment.cli_json("audit", "--since", "1000d", "--action", "admin_added")
    assert [e["subject"] for e in added] == ["recent"]

    result = await deployment.cli("purge", env={"SCANGATE_AUDIT_RETENTION": "1h"})
    assert result.returncode == 2
    assert result.stderr.strip() == "scangate: error: SCANGATE_AUDIT_RETENTION: at least 1d"


@ONE_REDIS
async def test_the_flushers_daily_purge_applies_the_audit_retention(
    deployment: Deployment, redis_url: str
) -> None:
    for name in ("stale", "fresh"):
        await deployment.cli_json("admins", "add", name)
    await age(deployment, "stale", 40)
    env = {
        **deployment.env,
        "SCANGATE_REDIS_URL": redis_url,
        "SCANGATE_AUDIT_RETENTION": "30d",
    }

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--data-dir", str(deployment.data_dir),
             "flush"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    flusher = await asyncio.to_thread(start)
    try:

        async def purged() -> bool:
            assert flusher.poll() is None, "the flusher exited"
            rows = await deployment.sql(
                "SELECT subject FROM audit_log WHERE action = 'admin_added' ORDER BY id",
                "SELECT subject FROM audit_log WHERE action = 'admin_added' ORDER BY id",
            )
            return [r[0] for r in rows] == ["fresh"]

        await until(purged, 60)
    finally:
        flusher.terminate()
        await asyncio.to_thread(flusher.wait, 30)
