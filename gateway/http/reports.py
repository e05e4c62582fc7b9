"""Daily reports for steering committees over HTTP (the CLI's ``scangate report`` shares
``build_report``): JSON, CSV, or a PNG chart. The numbers come from ``storage.reports``."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.http.context import authenticate_admin, json_response
from gateway.http.errors import InvalidRequest
from gateway.http.keys import SETTINGS, STORAGE
from storage import Storage
from storage.growth import Growth, fit_growth
from storage.outbox import CaseRecord
from storage.reports import (
    MAX_REPORT_DAYS,
    UNKNOWN_GROUP,
    ReportBy,
    ReportRow,
    daily_report,
    day_bounds_ms,
    rows_to_csv,
    rows_to_json,
)

ReportFormat = Literal["json", "csv", "png"]
GROUPINGS: Final[tuple[ReportBy, ...]] = ("province", "venue_kind", "venue")
FORMATS: Final[tuple[ReportFormat, ...]] = ("json", "csv", "png")


# No check-in data is older than this; and nobody reports on days a year ahead. The bounds
# also keep every day the report walks (the day after the last, in particular) a date.
FIRST_REPORT_DAY: Final = dt.date(2020, 1, 1)
REPORT_DAYS_AHEAD: Final = 366


def report_range(first: str, last: str, today: dt.date) -> tuple[dt.date, dt.date]:
    """The two days of a report; ValueError with a message fit for a ``detail``, naming
    the parameter (``from`` or ``to``) that is wrong."""
    latest = today + dt.timedelta(days=REPORT_DAYS_AHEAD)
    days = []
    for name, text in (("from", first), ("to", last)):
        try:
            day = dt.date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{name}: a day written YYYY-MM-DD") from None
        if not FIRST_REPORT_DAY <= day <= latest:
            raise ValueError(f"{name}: a day from {FIRST_REPORT_DAY} to {latest}")
        days.append(day)
    first_day, last_day = days
    if last_day < first_day:
        raise ValueError("to: the last day is before the first")
    if (last_day - first_day).days >= MAX_REPORT_DAYS:
        raise ValueError(f"to: at most {MAX_REPORT_DAYS} days, the first included")
    return first_day, last_day


async def build_report(
    storage: Storage, first_day: dt.date, last_day: dt.date, by: ReportBy, timezone: str
) -> list[ReportRow]:
    places: Mapping[str, tuple[str, str]] = await storage.venue_places()
    return await daily_report(storage, first_day, last_day, by, ZoneInfo(timezone), places)


def report_json(
    rows: list[ReportRow],
    first_day: dt.date,
    last_day: dt.date,
    by: ReportBy,
    timezone: str,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The report as JSON; by venue, each row also names its venue (``group_name``, null
    for a venue not registered here)."""
    items = rows_to_json(rows)
    if by == "venue":
        for item in items:
            item["group_name"] = (names or {}).get(str(item["group"]))
    return {
        "from": first_day.isoformat(),
        "to": last_day.isoformat(),
        "by": by,
        "timezone": timezone,
        "rows": items,
    }


# The daily cases the growth is fitted to: the last 7 and 14 days of the report's range.
GROWTH_WINDOWS: Final = (7, 14)
CASE_LOOKBACK_MS: Final = 14 * 86_400_000  # how far back a case's latest visit is looked for


async def epidemic(storage: Storage, last_day: dt.date, timezone: str) -> dict[str, Any]:
    """For steering committees, over the 14 days that end on ``last_day``: nationally and
    per province, confirmed cases per day and their growth over the last 7 and 14 days (a
    Poisson fit, ``storage.growth``), contacts per case, the notices delivered, failed and
    pending, the contacts no notice could reach, and the venues with exposures.

    A case counts in its declared province, or else in that of the venue of its latest
    visit; an exposure (a notice, a venue) in the province of its venue. Unknown either
    way: ``unknown``. No growth is given for a window with fewer than ``MIN_CASES`` cases."""
    tz = ZoneInfo(timezone)
    days = [last_day - dt.timedelta(days=i) for i in range(max(GROWTH_WINDOWS) - 1, -1, -1)]
    start_ms = day_bounds_ms(days[0], tz)[0]
    end_ms = day_bounds_ms(days[-1], tz)[1]
    cases = await storage.cases_between(start_ms, end_ms)
    case_province = await _case_provinces(storage, cases)
    outcomes = await storage.notice_outcomes([c.case_id for c in cases])
    labels = await storage.venue_labels(sorted({venue for _, _, venue, _ in outcomes}))

    def venue_province(venue_id: str) -> str:
        label = labels.get(venue_id)
        return label.province if label and label.province else UNKNOWN_GROUP

    provinces = sorted(set(case_province.values()) | {venue_province(v) for _, _, v, _ in outcomes})
    # The contacts a notice reached, per case: the rest of its contacts had no channel.
    reached: dict[str, set[str]] = {}
    for case_id, person, _venue, _state in outcomes:
        reached.setdefault(case_id, set()).add(person)
    national = _epidemic_part(days, last_day, tz, cases, outcomes, reached)
    by_province = []
    for province in provinces:
        mine = [c for c in cases if case_province[c.case_id] == province]
        exposed = [o for o in outcomes if venue_province(o[2]) == province]
        part = _epidemic_part(days, last_day, tz, mine, exposed, reached)
        by_province.append({"province": province, **part})
    return {**national, "provinces": by_province}


def _epidemic_part(
    days: list[dt.date],
    last_day: dt.date,
    tz: ZoneInfo,
    cases: list[CaseRecord],
    outcomes: list[tuple[str, str, str, str]],
    reached: Mapping[str, set[str]],
) -> dict[str, Any]:
    """One place's figures: ``cases`` counted there (and their contacts no notice could
    reach), ``outcomes`` (notices) exposed there."""
    counts = dict.fromkeys(days, 0)
    for case in cases:
        day = dt.datetime.fromtimestamp(case.confirmed_at_ms / 1000, tz).date()
        if day in counts:
            counts[day] += 1
    daily = [counts[d] for d in days]
    growth = {}
    for window in GROWTH_WINDOWS:
        fit = fit_growth(daily[-window:])
        growth[f"last_{window}_days"] = None if fit is None else growth_json(fit, last_day)
    states = Counter(state for _, _, _, state in outcomes)
    contacts = sum(c.contacts for c in cases)
    part: dict[str, Any] = {
        "cases_per_day": [{"day": d.isoformat(), "cases": counts[d]} for d in days],
        "growth": growth,
        "cases": len(cases),
        "contacts_per_case": round(contacts / len(cases), 2) if cases else None,
        "notices": {s: states.get(s, 0) for s in ("delivered", "failed", "pending")},
        "unreachable": sum(max(0, c.contacts - len(reached.get(c.case_id, ()))) for c in cases),
        "venues_with_exposures": len({venue for _, _, venue, _ in outcomes}),
    }
    return part


async def _case_provinces(storage: Storage, cases: list[CaseRecord]) -> dict[str, str]:
    """Each case's province: the one its person declared, or else that of the venue of
    their latest visit up to the confirmation."""
    declared = {
        p.person_id: p.province for p in await storage.persons([c.person_id for c in cases])
    }
    found: dict[str, str] = {}
    for case in cases:
        province = declared.get(case.person_id)
        if not province:
            visits = await storage.person_visits(
                case.person_id, case.confirmed_at_ms - CASE_LOOKBACK_MS, case.confirmed_at_ms
            )
            latest = max(visits, key=lambda v: v.checkin_at_ms, default=None)
            if latest is not None:
                label = (await storage.venue_labels([latest.venue_id])).get(latest.venue_id)
                province = label.province if label else None
        found[case.case_id] = province or UNKNOWN_GROUP
    return found


def growth_json(fit: Growth, last_day: dt.date) -> dict[str, Any]:
    return {
        "days": fit.days,
        "cases": fit.cases,
        "daily_growth": round(fit.daily_growth, 4),
        "daily_growth_95": [round(fit.low, 4), round(fit.high, 4)],
        "significant": fit.significant,
        "doubling_days": None if fit.doubling_days is None else round(fit.doubling_days, 1),
        "halving_days": None if fit.halving_days is None else round(fit.halving_days, 1),
        "projection": [
            {
                "day": (last_day + dt.timedelta(days=h)).isoformat(),
                "cases": round(mean, 1),
                "low": round(low, 1),
                "high": round(high, 1),
            }
            for h, (mean, low, high) in enumerate(fit.projection, start=1)
        ],
    }


async def group_names(storage: Storage, rows: list[ReportRow], by: ReportBy) -> dict[str, str]:
    """By venue: each venue's name, as its poster prints it; otherwise nothing to name."""
    if by != "venue":
        return {}
    labels = await storage.venue_labels([row.group for row in rows])
    return {venue_id: label.name for venue_id, label in labels.items()}


async def get_daily_report(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    query = request.query
    by_text, fmt_text = query.get("by", "province"), query.get("format", "json")
    if by_text not in GROUPINGS:
        raise InvalidRequest("by: province, venue_kind or venue")
    if fmt_text not in FORMATS:
        raise InvalidRequest("format: json, csv or png")
    by, fmt = GROUPINGS[GROUPINGS.index(by_text)], FORMATS[FORMATS.index(fmt_text)]
    try:
        today = dt.datetime.now(ZoneInfo(request.app[SETTINGS].timezone)).date()
        first_day, last_day = report_range(query.get("from", ""), query.get("to", ""), today)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    timezone = request.app[SETTINGS].timezone
    rows = await build_report(storage, first_day, last_day, by, timezone)
    await storage.audit(f"admin:{admin}", "report", by, f"from={first_day} to={last_day}")
    name = f"report-{by}-{first_day}-{last_day}"
    if fmt == "csv":
        return web.Response(
            text=rows_to_csv(rows),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    if fmt == "png":
        # Drawing takes a while (matplotlib): off the event loop.
        # Imported here: matplotlib costs every worker about 40 MB and a third of a second
        # at start, and only a chart needs it.
        from gateway.http.report_chart import render_chart

        names = await group_names(storage, rows, by)
        national = await epidemic(storage, last_day, timezone)
        png = await asyncio.to_thread(render_chart, rows, by, first_day, last_day, names, national)
        return web.Response(
            body=png,
            headers={
                "Content-Type": "image/png",
                "Content-Disposition": f'inline; filename="{name}.png"',
            },
        )
    names = await group_names(storage, rows, by)
    doc = report_json(rows, first_day, last_day, by, timezone, names)
    doc["epidemic"] = await epidemic(storage, last_day, timezone)
    return json_response(doc)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/reports/daily", get_daily_report, name="daily_report")
