"""Traces too big for one answer: pages with a cursor over HTTP, every row streamed as CSV
and by the CLI, and the event loop free between the units of a trace. On both backends."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import time
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import pytest

from gateway.http.keys import STORAGE
from gateway.http.trace import MAX_PAGE_ROWS
from signing import Keyring
from storage import PairingRules, ScanEvent, Storage, TraceQuery
from storage.tracing import TracePosition, decode_cursor, encode_cursor

from .harness import GatewayStarter
from .test_declarations import Desk, DeskFactory, make_desk
from .test_trace_api import cli

__all__ = ["make_desk"]  # the fixture, used here

HOUR: Final = 3_600_000
MINUTE: Final = 60_000
ONE_REDIS: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)


async def plant_crowd(storage: Storage, venues: int, visitors: int) -> int:
    """CASE visits ``venues`` venues an hour each, one after another, ``visitors`` others
    overlap each visit, and one of them (V0-0) met a stranger later (for depth 2). The
    moment to trace from."""
    start = int(time.time() * 1000) - 30 * HOUR
    events: list[ScanEvent] = []

    def visit(person: str, venue: str, t0: int, t1: int) -> None:
        n = len(events)
        events.append(ScanEvent("vhd", f"E{n:09d}", "checkin", venue, person, t0, t0, None))
        events.append(ScanEvent("vhd", f"E{n + 1:09d}", "checkout", venue, person, t1, t1, None))

    for v in range(venues):
        t = start + v * 2 * HOUR
        visit("CASE", f"VENUE{v}", t, t + HOUR)
        for i in range(visitors):
            visit(f"V{v}-{i}", f"VENUE{v}", t + (i % 30) * MINUTE, t + HOUR + (i % 7) * MINUTE)
    later = start + venues * 2 * HOUR + HOUR
    visit("V0-0", "CAFE", later, later + HOUR)
    visit("STRANGER", "CAFE", later + 10 * MINUTE, later + HOUR)
    for i in range(0, len(events), 10_000):
        await storage.store_batch(events[i : i + 10_000], PairingRules())
    return int(time.time() * 1000)


@pytest.mark.parametrize("limit", [1, 7, 40, 1000])
async def test_pages_put_together_are_the_whole_trace(storage: Storage, limit: int) -> None:
    now = await plant_crowd(storage, venues=3, visitors=8)
    query = TraceQuery(person_id="CASE", now_ms=now, days=3, depth=2)
    whole = await storage.trace(query, "test")
    # Depth 1: the 24 visitors; depth 2: each visitor's 7 fellow visitors, and STRANGER.
    assert len(whole) == 24 + 24 * 7 + 1
    assert [r.depth for r in whole] == [1] * 24 + [2] * (24 * 7 + 1)
    assert ("STRANGER", "V0-0") in {(r.person_id, r.via) for r in whole}
    pages: list[Any] = []
    position: TracePosition | None = TracePosition()
    while position is not None:
        # Through the cursor's text, as a client carries it.
        query, position = decode_cursor(encode_cursor(query, position), "CASE")
        rows, position = await storage.trace_page(query, "test", limit, position)
        assert 1 <= len(rows) <= limit
        pages.append(rows)
    assert [row for page in pages for row in page] == whole
    assert all(len(page) == limit for page in pages[:-1])
    traces = [e for e in await storage.audit_entries() if e.action == "trace"]
    assert len(traces) == 1 + len(pages)  # the whole one, and one per page


async def test_a_trace_lets_the_event_loop_run_between_its_units(storage: Storage) -> None:
    now = await plant_crowd(storage, venues=6, visitors=5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    running = asyncio.create_task(ticker())
    try:
        ticks_before = ticks
        rows = await storage.trace(TraceQuery(person_id="CASE", now_ms=now, days=3), "test")
        ran = ticks - ticks_before
    finally:
        running.cancel()
    assert len(rows) == 6 * 5
    assert ran >= 6  # at least once per unit (one per case visit)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not a cursor",
        "W10=",  # []
        encode_cursor(TraceQuery(person_id="X", now_ms=1, days=60), TracePosition())[:-4],
    ],
)
def test_a_cursor_not_made_here_is_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor(cursor, "CASE")


def test_a_cursor_cannot_ask_for_a_wider_trace_than_the_api_allows() -> None:
    wide = TraceQuery(person_id="CASE", now_ms=1, days=61)
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor(encode_cursor(wide, TracePosition()), "CASE")
    margin = TraceQuery(person_id="CASE", now_ms=1, margin_ms=25 * HOUR)
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor(encode_cursor(margin, TracePosition()), "CASE")


@ONE_REDIS
@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_http_pages_with_a_cursor_and_csv_streams_every_row(
    gateway_under_test: GatewayStarter, redis_url: str, storage_kind: str
) -> None:
    gateway = await gateway_under_test(redis_url, storage=storage_kind)
    storage = gateway.app[STORAGE]
    await plant_crowd(storage, venues=2, visitors=MAX_PAGE_ROWS // 2 + 300)
    auth = {"Authorization": f"Bearer {await storage.add_admin('officer')}"}
    client = gateway.client
    rows: list[dict[str, Any]] = []
    pages = 0
    response = await client.get("/v1/trace/CASE?days=3&limit=2500", headers=auth)
    while True:
        assert response.status == 200, await response.text()
        assert response.headers["Cache-Control"] == "no-store"
        page = await response.json()
        assert len(page["rows"]) <= 2500
        rows += page["rows"]
        pages += 1
        if page["next"] is None:
            break
        # The cursor carries the query (and its moment); the page size is each request's.
        response = await client.get(
            f"/v1/trace/CASE?cursor={page['next']}&limit=2500", headers=auth
        )
    expected = 2 * (MAX_PAGE_ROWS // 2 + 300)
    assert len(rows) == expected and pages == 3
    assert len({(r["person_id"], r["venue_id"]) for r in rows}) == expected
    # The default page, and the largest allowed, are bounded.
    page = await (await client.get("/v1/trace/CASE?days=3", headers=auth)).json()
    assert len(page["rows"]) == 1000 and page["next"]
    page = await (
        await client.get(f"/v1/trace/CASE?days=3&limit={MAX_PAGE_ROWS}", headers=auth)
    ).json()
    assert len(page["rows"]) == MAX_PAGE_ROWS
    # CSV: every row, past any page size, in the same order as the pages.
    response = await client.get("/v1/trace/CASE?days=3&format=csv", headers=auth)
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    table = list(csv.reader(io.StringIO(await response.text())))
    assert len(table) == 1 + expected
    assert [(r[0], r[1]) for r in table[1:]] == [(r["person_id"], r["venue_id"]) for r in rows]
    for bad in ("limit=0", f"limit={MAX_PAGE_ROWS + 1}", "cursor=xyz", "format=csv&cursor=x"):
        response = await client.get(f"/v1/trace/CASE?days=3&{bad}", headers=auth)
        assert response.status == 400, bad
        assert (await response.json())["error"] == "invalid_request"


async def test_the_cli_writes_every_row_of_a_big_trace(tmp_path: Path) -> None:
    from storage import connect_storage

    storage = await connect_storage(f"sqlite:///{tmp_path / 'scangate.db'}")
    try:
        await plant_crowd(storage, venues=2, visitors=MAX_PAGE_ROWS // 2 + 300)
    finally:
        await storage.close()
    expected = 2 * (MAX_PAGE_ROWS // 2 + 300)
    result = cli(tmp_path, "trace", "CASE", "--days", "3")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1  # one JSON array on one line
    assert len(json.loads(result.stdout)) == expected
    result = cli(tmp_path, "trace", "CASE", "--days", "3", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert len(list(csv.reader(io.StringIO(result.stdout)))) == 1 + expected


@ONE_REDIS
async def test_a_case_counts_every_contact_past_any_page_size(
    make_desk: DeskFactory, keyring: Keyring
) -> None:
    keyring.set_webhook("vhd", "http://127.0.0.1:9/hook")  # a notice per contact's visit
    desk: Desk = await make_desk(notice_poll_s=60, webhook_private=True)  # none delivered
    visitors = MAX_PAGE_ROWS // 2 + 300
    now = await plant_crowd(desk.storage, venues=2, visitors=visitors)
    auth = {"Authorization": f"Bearer {await desk.storage.add_admin('officer')}"}
    status, made, _ = await desk.call(
        "POST", "/v1/cases", {"person_id": "CASE", "confirmed_at": now - 1000}, headers=auth
    )
    assert status == 201, made
    assert made["contacts"] == 2 * visitors
    status, shown, _ = await desk.call("GET", f"/v1/cases/{made['case_id']}", headers=auth)
    assert status == 200
    stored = await desk.storage.case_notices(made["case_id"])
    # One notice per contact (each met the case once, at one venue), every one listed.
    assert len(shown["notices"]) == len(stored) == made["notices"] == 2 * visitors


@ONE_REDIS
async def test_the_trace_by_national_id_gives_a_first_page_and_the_cursor_of_the_rest(
    make_desk: DeskFactory,
) -> None:
    desk: Desk = await make_desk()
    session = await desk.session()
    status, made = await desk.declare(session, national_id="079200001234")
    assert status == 201, made
    person = made["person_id"]
    # The declared person met 1,200 others: more than the first page.
    storage = desk.storage
    start = int(time.time() * 1000) - 5 * HOUR
    events = [
        ScanEvent("vhd", "N0", "checkin", "VENUE", person, start, start, None),
        ScanEvent("vhd", "N1", "checkout", "VENUE", person, start + HOUR, start + HOUR, None),
    ]
    for i in range(1200):
        t = start + (i % 20) * MINUTE
        events += [
            ScanEvent("vhd", f"M{i}a", "checkin", "VENUE", f"X{i}", t, t, None),
            ScanEvent("vhd", f"M{i}b", "checkout", "VENUE", f"X{i}", t + HOUR, t + HOUR, None),
        ]
    await storage.store_batch(events, PairingRules())
    auth = {"Authorization": f"Bearer {await storage.add_admin('officer')}"}
    status, found, _ = await desk.call(
        "POST", "/v1/trace/national-id", {"national_id": "079200001234"}, headers=auth
    )
    assert status == 200, found
    (entry,) = found["persons"]
    assert len(found["contacts"]) == 1000 and entry["contacts_next"]
    status, rest, _ = await desk.call(
        "GET", f"/v1/trace/{person}?cursor={entry['contacts_next']}", headers=auth
    )
    assert status == 200 and rest["next"] is None
    everyone = {c["person_id"] for c in found["contacts"]} | {r["person_id"] for r in rest["rows"]}
    assert everyone == {f"X{i}" for i in range(1200)}


@ONE_REDIS
@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_venues_are_named_as_their_posters_name_them_and_no_more(
    make_desk: DeskFactory, storage_kind: str
) -> None:
    """A venue bluezone registered, where vhd's users met: the trace, the case, the risky
    venues and the report name it as its poster does, and show nothing else of it."""
    desk: Desk = await make_desk(storage=storage_kind)
    venue = await desk.venue(
        app="bluezone", name="Chợ Bến Thành", address="Lê Lợi, Quận 1", province="Hồ Chí Minh"
    )
    start = int(time.time() * 1000) - 5 * HOUR
    await desk.storage.store_batch(
        [
            ScanEvent("vhd", "N1", "checkin", venue["venue_id"], "CASE", start, start, None),
            ScanEvent(
                "vhd", "N2", "checkout", venue["venue_id"], "CASE", start + HOUR, start, None
            ),
            ScanEvent("vhd", "N3", "checkin", venue["venue_id"], "NEAR", start, start, None),
            ScanEvent(
                "vhd", "N4", "checkout", venue["venue_id"], "NEAR", start + HOUR, start, None
            ),
            ScanEvent(
                "vhd", "N5", "checkin", "UNREGISTERED", "CASE", start + 2 * HOUR, start, None
            ),
            ScanEvent(
                "vhd", "N6", "checkin", "UNREGISTERED", "NEAR", start + 2 * HOUR, start, None
            ),
        ],
        PairingRules(),
    )
    auth = {"Authorization": f"Bearer {await desk.storage.add_admin('officer')}"}
    named = {
        "venue_name": "Chợ Bến Thành",
        "venue_address": "Lê Lợi, Quận 1",
        "venue_province": "Hồ Chí Minh",
    }
    nameless = dict.fromkeys(named)
    status, page, _ = await desk.call("GET", "/v1/trace/CASE", headers=auth)
    assert status == 200, page
    by_venue = {r["venue_id"]: {k: r[k] for k in named} for r in page["rows"]}
    assert by_venue == {venue["venue_id"]: named, "UNREGISTERED": nameless}
    for row in page["rows"]:  # nothing else of the venue: not its phone
        assert set(row) <= {
            "person_id", "venue_id", *named, "overlap_start", "overlap_end",
            "overlap_minutes", "depth", "via", "checkout_recorded", "full_name", "phone",
        }  # fmt: skip
        assert "0983829927" not in json.dumps(row)
    response = await desk.client.get("/v1/trace/CASE?format=csv", headers=auth)
    table = list(csv.reader(io.StringIO(await response.text())))
    assert table[0][-3:] == list(named)
    assert {tuple(r[-3:]) for r in table[1:]} == {tuple(named.values()), ("", "", "")}
    # The case's notices and the risky venues name it too.
    status, made, _ = await desk.call(
        "POST", "/v1/cases?dry_run=1", {"person_id": "CASE", "confirmed_at": start + 3 * HOUR},
        headers=auth,
    )  # fmt: skip
    assert status == 200, made
    assert {e["venue_name"] for e in made["exposures"]} == {"Chợ Bến Thành", None}
    status, made, _ = await desk.call(
        "POST", "/v1/cases", {"person_id": "CASE", "confirmed_at": start + 3 * HOUR}, headers=auth
    )
    assert status == 201, made
    status, risky, _ = await desk.call("GET", f"/v1/risky-venues?since={start - HOUR}")
    assert {w["venue_id"]: w["venue_name"] for w in risky["windows"]} == {
        venue["venue_id"]: "Chợ Bến Thành",
        "UNREGISTERED": None,
    }
    # The report by venue names it.
    day = dt.datetime.fromtimestamp(start / 1000, ZoneInfo("Asia/Ho_Chi_Minh")).date()
    status, report, _ = await desk.call(
        "GET", f"/v1/reports/daily?from={day}&to={day}&by=venue", headers=auth
    )
    assert status == 200, report
    assert {r["group"]: r["group_name"] for r in report["rows"]} == {
        venue["venue_id"]: "Chợ Bến Thành",
        "UNREGISTERED": None,
    }
    # And vhd learns nothing else of bluezone's venue: its occupancy is not vhd's to see.
    status, doc, _ = await desk.call("GET", f"/v1/venues/{venue['venue_id']}/occupancy")
    assert (status, doc["error"]) == (404, "not_found")
