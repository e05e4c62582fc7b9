"""Daily reports for steering committees over HTTP (the CLI's ``scangate report`` shares
``build_report``): JSON, CSV, or a PNG chart. The numbers come from ``storage.reports``."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.http.context import authenticate_admin, json_response
from gateway.http.errors import InvalidRequest
from gateway.http.keys import SETTINGS, STORAGE
from gateway.http.report_chart import render_chart
from storage import Storage
from storage.growth import Growth, fit_growth
from storage.reports import (
    MAX_REPORT_DAYS,
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


async def epidemic(storage: Storage, last_day: dt.date, timezone: str) -> dict[str, Any]:
    """Nationally, for steering committees: confirmed cases per day over the 14 days that
    end on ``last_day``, and their growth over the last 7 and 14 of them (a Poisson fit,
    ``storage.growth``: rate a day with its 95% interval, doubling or halving time, and
    the fitted mean carried 7 days on with its band). No growth is given for a window with
    fewer than ``MIN_CASES`` cases."""
    tz = ZoneInfo(timezone)
    days = [last_day - dt.timedelta(days=i) for i in range(max(GROWTH_WINDOWS) - 1, -1, -1)]
    start_ms = day_bounds_ms(days[0], tz)[0]
    end_ms = day_bounds_ms(days[-1], tz)[1]
    counts = dict.fromkeys(days, 0)
    for at_ms in await storage.confirmations(start_ms, end_ms):
        day = dt.datetime.fromtimestamp(at_ms / 1000, tz).date()
        if day in counts:
            counts[day] += 1
    daily = [counts[d] for d in days]
    growth = {}
    for window in GROWTH_WINDOWS:
        fit = fit_growth(daily[-window:])
        growth[f"last_{window}_days"] = None if fit is None else growth_json(fit, last_day)
    return {
        "cases_per_day": [{"day": d.isoformat(), "cases": counts[d]} for d in days],
        "growth": growth,
    }


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
        names = await group_names(storage, rows, by)
        png = await asyncio.to_thread(render_chart, rows, by, first_day, last_day, names)
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
