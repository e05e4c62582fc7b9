"""Daily reports on SQLite and PostgreSQL: rows checked against counts made here from the
generated events and the stored visits, day boundaries in the committee's time zone, the
range limit, the exports, and the PNG chart."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from PIL import Image

from gateway.http.report_chart import render_chart
from gateway.http.reports import growth_json
from signing import Keyring
from storage import PairingRules, ScanEvent, Storage, Visit
from storage.growth import fit_growth
from storage.outbox import CaseRecord
from storage.reports import (
    REPORT_BY,
    ReportBy,
    ReportRow,
    daily_report,
    day_bounds_ms,
    rows_to_csv,
    rows_to_json,
)

from .servers import scangate_env
from .test_declarations import Desk, DeskFactory, make_desk

__all__ = ["make_desk"]  # the fixture, used here

TZ = dt.timezone(dt.timedelta(hours=7))  # Asia/Ho_Chi_Minh has had no DST since 1975
ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
ROOT = Path(__file__).resolve().parent.parent
DAY0 = dt.date(2026, 3, 2)
DAYS = [DAY0 + dt.timedelta(days=i) for i in range(3)]
MINUTE = 60_000
PLACES = {
    "HN-CHO-1": ("Hà Nội", "market"),
    "HN-CHO-2": ("Hà Nội", "market"),
    "HN-BV-1": ("Hà Nội", "hospital"),
    "DN-CHO-1": ("Đà Nẵng", "market"),
    "DN-BV-1": ("Đà Nẵng", "hospital"),
    "HCM-CHO-1": ("TP. Hồ Chí Minh", "market"),
    "HCM-BV-1": ("TP. Hồ Chí Minh", "hospital"),
    "HCM-BV-2": ("TP. Hồ Chí Minh", "hospital"),
}
# Venues known only from their codes, not registered: grouped as "unknown".
UNREGISTERED = ("=CHUA-DK", "XA-LA")
VENUES = (*PLACES, *UNREGISTERED)
REAL_ENDS = ("checkout", "next_checkin")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def local_ms(day: dt.date, minute_of_day: int, extra_ms: int = 0) -> int:
    midnight = dt.datetime.combine(day, dt.time(), TZ)
    return int(midnight.timestamp()) * 1000 + minute_of_day * MINUTE + extra_ms


def local_day(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, TZ).date()


class Events:
    def __init__(self) -> None:
        self.events: list[ScanEvent] = []

    def add(self, kind: str, venue: str, person: str, t: int) -> None:
        event_id = f"E{len(self.events):06d}"
        self.events.append(ScanEvent("vhd", event_id, kind, venue, person, t, t, None))  # type: ignore[arg-type]


def generate(seed: int = 20260302) -> list[ScanEvent]:
    """A few hundred scans of 40 persons at 10 venues over three days (and spilling over
    midnight at both ends): stays with and without check-out, repeats, lone check-outs."""
    rng = random.Random(seed)
    out = Events()
    for _ in range(180):
        person = f"P{rng.randrange(40):02d}"
        venue = rng.choice(VENUES)
        day = rng.choice(DAYS)
        start = local_ms(day, rng.randrange(24 * 60), rng.randrange(MINUTE))
        out.add("checkin", venue, person, start)
        r = rng.random()
        if r < 0.7:
            out.add("checkout", venue, person, start + rng.randrange(1, 300) * MINUTE)
        elif r < 0.8:
            out.add("checkin", venue, person, start + rng.randrange(6) * MINUTE)  # a repeat
    for _ in range(25):
        day = rng.choice(DAYS)
        t = local_ms(day, rng.randrange(24 * 60))
        out.add("checkout", rng.choice(VENUES), f"P{rng.randrange(40):02d}", t)
    # The day before the report: its late stays run into the first day.
    for person in ("P01", "P02"):
        out.add("checkin", "HN-CHO-1", person, local_ms(DAY0 - dt.timedelta(days=1), 23 * 60))
    return out.events


def group_of(venue_id: str, by: ReportBy) -> str:
    if by == "venue":
        return venue_id
    province, kind = PLACES.get(venue_id, ("unknown", "unknown"))
    return province if by == "province" else kind


def expected_rows(
    events: Sequence[ScanEvent], visits: Sequence[Visit], by: ReportBy, days: Iterable[dt.date]
) -> list[ReportRow]:
    """The report as its definition reads, computed the slow way."""
    rows: list[ReportRow] = []
    for day in days:
        start = local_ms(day, 0)
        end = local_ms(day + dt.timedelta(days=1), 0)
        todays = [e for e in events if local_day(e.scanned_at_ms) == day]
        begun = [v for v in visits if local_day(v.checkin_at_ms) == day]
        overlapping = [v for v in visits if v.checkin_at_ms < end and v.checkout_at_ms > start]
        groups = {group_of(x.venue_id, by) for x in [*todays, *begun, *overlapping]}
        for group in sorted(groups):
            mine = [e for e in todays if group_of(e.venue_id, by) == group]
            started = [v for v in begun if group_of(v.venue_id, by) == group]
            stays = [
                v.checkout_at_ms - v.checkin_at_ms for v in started if v.closed_by in REAL_ENDS
            ]
            inside = [v for v in overlapping if group_of(v.venue_id, by) == group]
            # Occupancy changes only where a visit starts: try each such instant (and the
            # day's start), counting every visit in progress then.
            instants = {start} | {v.checkin_at_ms for v in inside if v.checkin_at_ms >= start}
            peak = max(
                sum(1 for v in inside if v.checkin_at_ms <= t < v.checkout_at_ms) for t in instants
            )
            rows.append(
                ReportRow(
                    day=day.isoformat(),
                    group=group,
                    scans=len(mine),
                    checkins=sum(1 for e in mine if e.kind == "checkin"),
                    unique_persons=len({e.person_id for e in mine}),
                    visits=len(started),
                    median_stay_minutes=(
                        round(statistics.median(stays) / MINUTE, 2) if stays else None
                    ),
                    peak_occupancy=peak,
                )
            )
    return rows


@pytest.mark.parametrize("by", ["province", "venue_kind", "venue"])
async def test_report_matches_counts_from_events_and_visits(storage: Storage, by: ReportBy) -> None:
    events = generate()
    await storage.store_batch(events, PairingRules())
    visits = await storage.all_visits()

    rows = await daily_report(storage, DAYS[0], DAYS[-1], by, ZONE, PLACES)

    assert rows == expected_rows(events, visits, by, DAYS)
    assert len(events) > 300 and {r.day for r in rows} == {d.isoformat() for d in DAYS}
    groups = {r.group for r in rows}
    if by == "venue":
        assert set(UNREGISTERED) <= groups
    else:
        assert "unknown" in groups and len(groups) == (4 if by == "province" else 3)
    # The data exercise what the rules distinguish.
    assert any(r.peak_occupancy > 1 for r in rows)
    assert any(v.closed_by not in REAL_ENDS for v in visits)
    assert sum(r.scans for r in rows) == sum(
        1 for e in events if local_day(e.scanned_at_ms) in DAYS
    )


async def test_days_end_at_local_midnight(storage: Storage) -> None:
    """23:59 and 00:01 in Ho Chi Minh City are one UTC day but two report days."""
    out = Events()
    checkin = local_ms(DAY0, 23 * 60 + 59)
    checkout = local_ms(DAY0 + dt.timedelta(days=1), 1)
    assert dt.datetime.fromtimestamp(checkin / 1000, dt.UTC).date() == (
        dt.datetime.fromtimestamp(checkout / 1000, dt.UTC).date()
    )
    out.add("checkin", "HN-CHO-1", "P1", checkin)
    out.add("checkout", "HN-CHO-1", "P1", checkout)
    await storage.store_batch(out.events, PairingRules())

    rows = await daily_report(storage, DAY0, DAY0 + dt.timedelta(days=2), "venue", ZONE, {})

    assert rows == [
        ReportRow(DAY0.isoformat(), "HN-CHO-1", 1, 1, 1, 1, 2.0, 1),
        # The visit begun yesterday is still in progress after midnight.
        ReportRow((DAY0 + dt.timedelta(days=1)).isoformat(), "HN-CHO-1", 1, 0, 1, 0, None, 1),
    ]


async def test_stays_and_peaks_follow_their_rules(storage: Storage) -> None:
    """Only real ends make the median; every visit counts for the peak; touching visits do
    not overlap; a zero-length visit is a visit at no instant, even at midnight."""
    out = Events()
    at = lambda hhmm, day=DAY0: local_ms(day, int(hhmm[:2]) * 60 + int(hhmm[3:]))  # noqa: E731
    out.add("checkin", "HN-CHO-1", "A", at("10:00"))
    out.add("checkout", "HN-CHO-1", "A", at("11:00"))  # 60 min, checkout
    out.add("checkin", "HN-CHO-1", "B", at("11:00"))
    out.add("checkout", "HN-CHO-1", "B", at("11:30"))  # 30 min, starts as A ends
    out.add("checkin", "HN-CHO-1", "C", at("10:30"))  # never checks out: auto, 4 h
    out.add("checkout", "HN-CHO-1", "D", at("13:00"))  # lone check-out: orphan 12:00-13:00
    out.add("checkin", "HN-BV-1", "E", at("15:00"))
    out.add("checkout", "HN-BV-1", "E", at("15:00"))
    next_day = DAY0 + dt.timedelta(days=1)
    out.add("checkin", "DN-BV-1", "F", at("00:00", next_day))
    out.add("checkout", "DN-BV-1", "F", at("00:00", next_day))
    await storage.store_batch(out.events, PairingRules())

    rows = await daily_report(storage, DAY0, next_day, "venue", ZONE, PLACES)

    day0, day1 = DAY0.isoformat(), next_day.isoformat()
    assert rows == [
        # Median of 60 and 30 (all four stays would give 60); at most C with one other.
        ReportRow(day0, "HN-BV-1", 2, 1, 1, 1, 0.0, 0),
        ReportRow(day0, "HN-CHO-1", 6, 3, 4, 4, 45.0, 2),
        ReportRow(day1, "DN-BV-1", 2, 1, 1, 1, 0.0, 0),
    ]
    by_province = await daily_report(storage, DAY0, DAY0, "province", ZONE, PLACES)
    assert by_province == [ReportRow(day0, "Hà Nội", 8, 4, 5, 5, 30.0, 2)]


async def test_range_is_checked(storage: Storage) -> None:
    longest = await daily_report(
        storage,
        DAY0,
        DAY0 + dt.timedelta(days=91),
        "province",
        ZONE,
        PLACES,
    )
    assert longest == []
    with pytest.raises(ValueError, match="at most 92 days"):
        await daily_report(storage, DAY0, DAY0 + dt.timedelta(days=92), "province", ZONE, PLACES)
    with pytest.raises(ValueError, match="before the first day"):
        await daily_report(storage, DAY0, DAY0 - dt.timedelta(days=1), "venue", ZONE, PLACES)


def test_day_bounds_follow_the_zone() -> None:
    start, end = day_bounds_ms(DAY0, ZONE)
    assert start == int(dt.datetime(2026, 3, 1, 17, tzinfo=dt.UTC).timestamp()) * 1000
    assert end - start == 24 * 3_600_000
    berlin = ZoneInfo("Europe/Berlin")
    spring = day_bounds_ms(dt.date(2026, 3, 29), berlin)
    autumn = day_bounds_ms(dt.date(2026, 10, 25), berlin)
    assert spring[1] - spring[0] == 23 * 3_600_000
    assert autumn[1] - autumn[0] == 25 * 3_600_000


def test_exports() -> None:
    rows = [
        ReportRow("2026-03-02", "=CHUA-DK", 3, 2, 2, 2, None, 1),
        ReportRow("2026-03-02", "Hà Nội", 10, 6, 5, 6, 42.5, 3),
    ]
    assert rows_to_json(rows)[0] == {
        "day": "2026-03-02",
        "group": "=CHUA-DK",
        "scans": 3,
        "checkins": 2,
        "unique_persons": 2,
        "visits": 2,
        "median_stay_minutes": None,
        "peak_occupancy": 1,
    }
    table = list(csv.reader(io.StringIO(rows_to_csv(rows))))
    assert table == [
        list(ReportRow._fields),
        ["2026-03-02", "'=CHUA-DK", "3", "2", "2", "2", "", "1"],
        ["2026-03-02", "Hà Nội", "10", "6", "5", "6", "42.50", "3"],
    ]


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


async def test_chart_is_a_png_with_rows_and_without(storage: Storage) -> None:
    await storage.store_batch(generate(), PairingRules())
    for by in REPORT_BY:
        rows = await daily_report(storage, DAYS[0], DAYS[-1], by, ZONE, PLACES)
        assert png_size(render_chart(rows, by, DAYS[0], DAYS[-1])) == (1600, 1000)
    assert png_size(render_chart([], "province", DAY0, DAY0 + dt.timedelta(days=91))) == (
        1600,
        1000,
    )


async def test_charts_render_in_parallel_threads(storage: Storage) -> None:
    """No pyplot state: charts drawn at once in threads come out as drawn alone."""
    await storage.store_batch(generate(), PairingRules())
    rows = await daily_report(storage, DAYS[0], DAYS[-1], "venue", ZONE, PLACES)
    alone = render_chart(rows, "venue", DAYS[0], DAYS[-1])
    together = await asyncio.gather(
        *(asyncio.to_thread(render_chart, rows, "venue", DAYS[0], DAYS[-1]) for _ in range(4))
    )
    assert all(chart == alone for chart in together)


# -- over HTTP and on the command line ---------------------------------------------------------


async def test_the_report_over_http_in_each_format(make_desk: DeskFactory) -> None:
    desk: Desk = await make_desk()
    venue = await desk.venue(province="Đà Nẵng", kind="market")
    now = int(time.time() * 1000)
    await desk.storage.store_batch(
        [
            ScanEvent(
                "vhd", "R1", "checkin", venue["venue_id"], "P1", now - 90 * MINUTE, now, None
            ),
            ScanEvent(
                "vhd", "R2", "checkout", venue["venue_id"], "P1", now - 30 * MINUTE, now, None
            ),
            ScanEvent("vhd", "R3", "checkin", "UNREG", "P2", now - 20 * MINUTE, now, None),
        ],
        PairingRules(),
    )
    token = await desk.storage.add_admin("ban-chi-dao")
    auth = {"Authorization": f"Bearer {token}"}
    today = dt.datetime.now(ZONE).date()
    first = (today - dt.timedelta(days=1)).isoformat()
    base = f"/v1/reports/daily?from={first}&to={today.isoformat()}"
    path = base + "&by=province"
    status, doc, _ = await desk.call("GET", path, headers=auth)
    assert status == 200, doc
    assert (doc["from"], doc["to"], doc["by"], doc["timezone"]) == (
        first,
        today.isoformat(),
        "province",
        "Asia/Ho_Chi_Minh",
    )
    expected = await daily_report(
        desk.storage,
        today - dt.timedelta(days=1),
        today,
        "province",
        ZONE,
        await desk.storage.venue_places(),
    )
    assert doc["rows"] == rows_to_json(expected)
    # Summed over the days: a visit that runs past local midnight (a check-in late in the
    # evening, its auto end hours later) gives its group a row with 0 scans the next day.
    totals: Counter[str] = Counter()
    for r in doc["rows"]:
        totals[r["group"]] += r["scans"]
    assert sum(totals.values()) == 3 and totals["unknown"] == 1
    response = await desk.client.get(path + "&format=csv", headers=auth)
    assert response.content_type == "text/csv"
    assert (await response.text()) == rows_to_csv(expected)
    response = await desk.client.get(path + "&format=png", headers=auth)
    assert response.content_type == "image/png"
    assert (await response.read()).startswith(PNG_SIGNATURE)
    for bad in (base + "&by=ward", path + "&format=pdf"):
        status, doc, _ = await desk.call("GET", bad, headers=auth)
        assert (status, doc["error"]) == (400, "invalid_request"), bad
    status, doc, _ = await desk.call(
        "GET", "/v1/reports/daily?from=2026-01-01&to=2026-06-01", headers=auth
    )
    assert (status, doc["error"]) == (400, "invalid_request")
    status, doc, _ = await desk.call("GET", path)  # an app token is not an admin's
    assert (status, doc["error"]) == (401, "unauthorized")
    assert [e.action for e in await desk.storage.audit_entries()].count("report") == 3


def test_the_report_on_the_command_line(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path), "report", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=scangate_env(),
        )

    done = cli("--from", "2026-03-02", "--to", "2026-03-04", "--by", "venue_kind")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == []
    chart = tmp_path / "chart.png"
    done = cli("--from", "2026-03-02", "--to", "2026-03-04", "--format", "png", "-o", str(chart))
    assert done.returncode == 0, done.stderr
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    done = cli("--from", "2026-03-02", "--to", "2026-03-04", "--format", "png")
    assert done.returncode == 2 and "-o FILE.png" in done.stderr
    done = cli("--from", "2026-03-04", "--to", "2026-03-02")
    assert done.returncode == 2 and "before the first" in done.stderr


@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_report_days_out_of_bounds_are_400_naming_the_parameter(
    make_desk: DeskFactory, storage_kind: str
) -> None:
    desk: Desk = await make_desk(storage=storage_kind)
    auth = {"Authorization": f"Bearer {await desk.storage.add_admin('ban-chi-dao')}"}
    today = dt.datetime.now(ZONE).date()
    far = (today + dt.timedelta(days=400)).isoformat()
    cases = {
        "from=9999-12-31&to=9999-12-31": "from",  # was OverflowError, a 500
        "from=0001-01-01&to=0001-01-02": "from",
        "from=1999-12-31&to=2020-01-05": "from",
        f"from={today}&to={far}": "to",
        "from=2026-01-01&to=2025-12-31": "to",
        "from=2025-01-01&to=2025-06-01": "to",  # over 92 days
        "from=2025-1-1&to=2025-01-02": "from",
        "from=2025-01-01&to=": "to",
        "to=2025-01-02": "from",
    }
    for query, parameter in cases.items():
        status, doc, _ = await desk.call("GET", f"/v1/reports/daily?{query}", headers=auth)
        assert (status, doc["error"]) == (400, "invalid_request"), (query, doc)
        assert doc["detail"].startswith(f"{parameter}: "), (query, doc)
    # The bounds themselves are days a report can cover.
    status, doc, _ = await desk.call(
        "GET", "/v1/reports/daily?from=2020-01-01&to=2020-01-01", headers=auth
    )
    assert status == 200, doc


@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_the_report_gives_cases_per_day_and_their_growth(
    make_desk: DeskFactory, storage_kind: str
) -> None:
    """Cases confirmed over 14 days growing about 10% a day: the report's epidemic part
    counts them by local day and finds the growth significant, with a doubling time."""
    desk: Desk = await make_desk(storage=storage_kind)
    today = dt.datetime.now(ZONE).date()
    made = 0
    for back in range(13, -1, -1):
        day = today - dt.timedelta(days=back)
        noon = day_bounds_ms(day, ZONE)[0] + 12 * 3_600_000
        for n in range(round(5 * 1.1 ** (13 - back))):
            case = CaseRecord(f"C{back}x{n}", f"P{back}x{n}", noon + n, None, noon, "test", 0, 0)
            await desk.storage.add_case(case, [], [])
            made += 1
    auth = {"Authorization": f"Bearer {await desk.storage.add_admin('ban-chi-dao')}"}
    status, doc, _ = await desk.call(
        "GET", f"/v1/reports/daily?from={today}&to={today}", headers=auth
    )
    assert status == 200, doc
    epidemic = doc["epidemic"]
    assert [d["day"] for d in epidemic["cases_per_day"]][-1] == today.isoformat()
    assert sum(d["cases"] for d in epidemic["cases_per_day"]) == made
    fourteen = epidemic["growth"]["last_14_days"]
    assert fourteen["significant"] and fourteen["doubling_days"] is not None
    low, high = fourteen["daily_growth_95"]
    assert low <= 0.10 <= high
    assert len(fourteen["projection"]) == 7
    assert fourteen["projection"][0]["low"] < fourteen["projection"][0]["cases"]


@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_the_epidemic_part_counts_by_province_as_the_issue_defines_it(
    make_desk: DeskFactory, keyring: Keyring, storage_kind: str
) -> None:
    """A case counts where it declared, or else where its latest visit was; an exposure
    where its venue is. One declared in Hà Nội met a vhd user at a Hà Nội venue (a notice,
    pending); one never declared, last seen at a Đà Nẵng venue, met a bluezone user there
    (no webhook, no phone: unreachable)."""
    keyring.set_webhook("vhd", "http://127.0.0.1:9/hook")
    desk: Desk = await make_desk(notice_poll_s=60, webhook_private=True, storage=storage_kind)
    hanoi = await desk.venue(province="Hà Nội")
    danang = await desk.venue(province="Đà Nẵng")
    status, declared = await desk.declare(await desk.session(), province="Hà Nội")
    assert status == 201, declared
    case1 = declared["person_id"]
    now = int(time.time() * 1000)
    start = now - 5 * 3_600_000
    hour = 3_600_000
    events = []
    for n, (app, person, venue, t0) in enumerate(
        [
            ("vhd", case1, hanoi["venue_id"], start),
            ("vhd", "CONTACTX", hanoi["venue_id"], start),
            ("vhd", "CASE2", danang["venue_id"], start),
            ("bluezone", "CONTACTY", danang["venue_id"], start),
        ]
    ):
        events += [
            ScanEvent(app, f"EP{n}a", "checkin", venue, person, t0, t0, None),
            ScanEvent(app, f"EP{n}b", "checkout", venue, person, t0 + hour, t0, None),
        ]
    await desk.storage.store_batch(events, PairingRules())
    auth = {"Authorization": f"Bearer {await desk.storage.add_admin('ban-chi-dao')}"}
    for person in (case1, "CASE2"):
        status, made, _ = await desk.call(
            "POST", "/v1/cases", {"person_id": person, "confirmed_at": now - 1000}, headers=auth
        )
        assert status == 201, made
    today = dt.datetime.now(ZONE).date()
    status, doc, _ = await desk.call(
        "GET", f"/v1/reports/daily?from={today}&to={today}", headers=auth
    )
    assert status == 200, doc
    epidemic = doc["epidemic"]
    figures = ("cases", "contacts_per_case", "notices", "unreachable", "venues_with_exposures")
    pending = {"delivered": 0, "failed": 0, "pending": 1}
    none = {"delivered": 0, "failed": 0, "pending": 0}
    assert {k: epidemic[k] for k in figures} == {
        "cases": 2,
        "contacts_per_case": 1.0,
        "notices": pending,
        "unreachable": 1,
        "venues_with_exposures": 1,
    }
    by_province = {p["province"]: {k: p[k] for k in figures} for p in epidemic["provinces"]}
    assert by_province == {
        "Hà Nội": {
            "cases": 1,
            "contacts_per_case": 1.0,
            "notices": pending,
            "unreachable": 0,
            "venues_with_exposures": 1,
        },
        "Đà Nẵng": {
            "cases": 1,
            "contacts_per_case": 1.0,
            "notices": none,
            "unreachable": 1,
            "venues_with_exposures": 0,
        },
    }
    assert epidemic["cases_per_day"][-1] == {"day": today.isoformat(), "cases": 2}


def test_the_chart_draws_the_cases_and_their_projection_band() -> None:
    """A 14-day series growing 10% a day: the chart gets a third panel, the cases and the
    fit carried a week on as a band; a copy lands with the screenshots (docs/development.md,
    "Browser tests")."""
    rows = [ReportRow("2026-12-05", "Hà Nội", 10, 8, 7, 6, 42.0, 3)]
    counts = [round(5 * 1.1**t) for t in range(14)]
    days = [dt.date(2026, 11, 22) + dt.timedelta(days=i) for i in range(14)]
    fit = fit_growth(counts)
    assert fit is not None
    epidemic = {
        "cases_per_day": [
            {"day": d.isoformat(), "cases": c} for d, c in zip(days, counts, strict=True)
        ],
        "growth": {"last_7_days": None, "last_14_days": growth_json(fit, days[-1])},
    }
    png = render_chart(rows, "province", days[-1], days[-1], None, epidemic)
    image = Image.open(io.BytesIO(png))
    assert image.size == (1600, 1400)
    plain = Image.open(io.BytesIO(render_chart(rows, "province", days[-1], days[-1])))
    assert plain.size == (1600, 1000)
    shots = Path(os.environ.get("SCANGATE_SCREENSHOT_DIR", ROOT / "artifacts" / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    (shots / "report-chart-projection.png").write_bytes(png)


def test_a_gateway_worker_imports_matplotlib_only_to_draw_a_chart() -> None:
    """matplotlib cost every worker about 40 MB of memory and a third of a second at start
    (issue 20); only a chart needs it."""
    code = (
        "import sys\n"
        "import gateway.http.app, gateway.run.server, gateway.run.cli\n"
        "print('matplotlib' in sys.modules)\n"
        "from gateway.http.report_chart import render_chart\n"
        "print('matplotlib' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "True"], done.stdout
