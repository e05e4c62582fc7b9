"""The daily report as a PNG chart for a steering committee, in Vietnamese.

Top panel: check-ins per day, stacked by group; bottom panel: the most people inside at
once per day, one line per group. Drawn with a ``Figure`` and an Agg canvas of its own,
never pyplot, whose global figure registry is not safe to use from several threads.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import orjson
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from storage.reports import UNKNOWN_GROUP, ReportBy, ReportRow

# 16 x 10 inches at 100 dpi: 1600 x 1000 px, readable on a projector or printed A4.
FIGSIZE_IN: Final = (16.0, 10.0)
DPI: Final = 100
TOP_GROUPS: Final = 6
# Up to this many days every day has its tick (with the weekday) and its bar its total;
# beyond, ticks thin out to about this many.
LABELLED_DAYS: Final = 16
# Up to this many days the occupancy lines mark each day's point.
MARKED_DAYS: Final = 31
REST_COLOR: Final = "#9e9e9e"
_BY_LABEL: Final[dict[ReportBy, str]] = {
    "province": "tỉnh/thành phố",
    "venue_kind": "loại địa điểm",
    "venue": "địa điểm",
}
_WEEKDAYS: Final = ("T2", "T3", "T4", "T5", "T6", "T7", "CN")
_LOCALE: Final = Path(__file__).parent / "web" / "locales" / "vi.json"


def render_chart(
    rows: Sequence[ReportRow],
    by: ReportBy,
    first_day: dt.date,
    last_day: dt.date,
    names: Mapping[str, str] | None = None,
) -> bytes:
    """The report ``rows`` (of :func:`storage.reports.daily_report`) as a 1600 x 1000 PNG.

    The :data:`TOP_GROUPS` groups with the most check-ins over the range are drawn on their
    own and the others summed as "khác" in the bars; the occupancy panel has no line for
    them, since peaks of different groups at different hours do not add up. With no rows
    the chart says "Không có dữ liệu".
    """
    days = [first_day + dt.timedelta(days=i) for i in range((last_day - first_day).days + 1)]
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig draws with Agg, no backend switch
    fig.suptitle(
        f"Báo cáo hằng ngày theo {_BY_LABEL[by]}, từ {first_day:%d/%m/%Y} đến {last_day:%d/%m/%Y}",
        fontsize=18,
        fontweight="bold",
    )
    if rows:
        _draw(fig, rows, by, days, names or {})
    else:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "Không có dữ liệu", ha="center", va="center", fontsize=24)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw(
    fig: Figure,
    rows: Sequence[ReportRow],
    by: ReportBy,
    days: list[dt.date],
    names: Mapping[str, str],
) -> None:
    index = {day.isoformat(): i for i, day in enumerate(days)}
    checkins: dict[str, list[int]] = defaultdict(lambda: [0] * len(days))
    peaks: dict[str, list[int]] = defaultdict(lambda: [0] * len(days))
    for row in rows:
        i = index.get(row.day)
        if i is None:
            continue  # a row outside the range asked for
        checkins[row.group][i] += row.checkins
        peaks[row.group][i] = max(peaks[row.group][i], row.peak_occupancy)
    ranked = sorted(checkins, key=lambda g: (-sum(checkins[g]), g))
    top, rest = ranked[:TOP_GROUPS], ranked[TOP_GROUPS:]

    x = list(range(len(days)))
    labelled = len(days) <= LABELLED_DAYS
    bars_ax, peaks_ax = fig.subplots(2, 1, sharex=True)

    bottom = [0] * len(days)
    for n, group in enumerate(top):
        heights = checkins[group]
        bars_ax.bar(x, heights, bottom=bottom, color=f"C{n}", label=_label(group, by, names))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if rest:
        heights = [sum(checkins[g][i] for g in rest) for i in x]
        bars_ax.bar(x, heights, bottom=bottom, color=REST_COLOR, label=f"khác ({len(rest)} nhóm)")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if labelled:
        for i, total in enumerate(bottom):
            if total:
                bars_ax.annotate(
                    _number(total),
                    (i, total),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=10,
                )
    bars_ax.set_title("Lượt vào theo ngày", fontsize=15, loc="left")
    bars_ax.set_ylabel("Lượt vào (check-in)", fontsize=13)

    for n, group in enumerate(top):
        peaks_ax.plot(
            x,
            peaks[group],
            color=f"C{n}",
            marker="o" if len(days) <= MARKED_DAYS else None,
            linewidth=2,
        )
    peaks_ax.set_title("Số người cùng lúc cao nhất", fontsize=15, loc="left")
    peaks_ax.set_ylabel("Số người", fontsize=13)
    peaks_ax.set_xlabel("Ngày", fontsize=13)

    for ax in (bars_ax, peaks_ax):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: _number(int(value))))
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=11)
        ax.spines[["top", "right"]].set_visible(False)
    step = 1 if labelled else -(-len(days) // LABELLED_DAYS)
    peaks_ax.set_xticks(x[::step], [_day_label(days[i], labelled) for i in x[::step]])
    peaks_ax.set_xlim(-0.6, len(days) - 0.4)
    # Listed top to bottom as the bars stack, "khác" first.
    handles, labels = bars_ax.get_legend_handles_labels()
    fig.legend(
        handles[::-1],
        labels[::-1],
        loc="outside right upper",
        fontsize=12,
        title=_BY_LABEL[by].capitalize(),
        title_fontsize=12,
    )


def _day_label(day: dt.date, with_weekday: bool) -> str:
    return f"{day:%d/%m}\n{_WEEKDAYS[day.weekday()]}" if with_weekday else f"{day:%d/%m}"


def _number(n: int) -> str:
    """``12.345``: Vietnamese groups thousands with a dot."""
    return f"{n:,}".replace(",", ".")


def _label(group: str, by: ReportBy, names: Mapping[str, str] | None = None) -> str:
    if by == "venue":
        # A venue by the name on its poster (its id for one not registered here).
        return (names or {}).get(group, group)
    if group == UNKNOWN_GROUP:
        return "không rõ"
    if by == "venue_kind":
        return _kind_names().get(group, group)
    return group


@functools.cache
def _kind_names() -> dict[str, str]:
    """Venue kind -> its Vietnamese name, from the web pages' catalogue."""
    catalogue: dict[str, str] = orjson.loads(_LOCALE.read_bytes())
    return {k.removeprefix("kind."): v for k, v in catalogue.items() if k.startswith("kind.")}
