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
from typing import Any, Final

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
    epidemic: Mapping[str, Any] | None = None,
) -> bytes:
    """The report ``rows`` (of :func:`storage.reports.daily_report`) as a 1600 x 1000 PNG
    (1600 x 1400 with ``epidemic``, the report's national epidemic part: its cases per day
    and their projection, drawn as a band, in a third panel).

    The :data:`TOP_GROUPS` groups with the most check-ins over the range are drawn on their
    own and the others summed as "khác" in the bars; the occupancy panel has no line for
    them, since peaks of different groups at different hours do not add up. With no rows
    the chart says "Không có dữ liệu".
    """
    days = [first_day + dt.timedelta(days=i) for i in range((last_day - first_day).days + 1)]
    size = FIGSIZE_IN if epidemic is None else (FIGSIZE_IN[0], FIGSIZE_IN[1] + 4)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig draws with Agg, no backend switch
    fig.suptitle(
        f"Báo cáo hằng ngày theo {_BY_LABEL[by]}, từ {first_day:%d/%m/%Y} đến {last_day:%d/%m/%Y}",
        fontsize=18,
        fontweight="bold",
    )
    report: Any = fig
    if epidemic is not None:
        panels: Any = fig.subfigures(2, 1, height_ratios=[10, 4])  # an array of two
        report = panels[0]
        _draw_cases(panels[1], epidemic)
    if rows:
        _draw(report, rows, by, days, names or {})
    else:
        ax = report.add_subplot()
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


def _draw_cases(fig: Any, epidemic: Mapping[str, Any]) -> None:
    """Confirmed cases per day as bars, and the fitted growth carried 7 days on as a band:
    the 14-day fit when there is one, else the 7-day one."""
    ax = fig.subplots()
    counts = epidemic["cases_per_day"]
    days = [dt.date.fromisoformat(d["day"]) for d in counts]
    ax.bar(range(len(days)), [d["cases"] for d in counts], color="C3", label="ca bệnh xác nhận")
    growth = epidemic["growth"]["last_14_days"] or epidemic["growth"]["last_7_days"]
    title = "Ca bệnh xác nhận mỗi ngày (cả nước)"
    ahead = []
    if growth is not None:
        ahead = growth["projection"]
        x = list(range(len(days), len(days) + len(ahead)))
        ax.fill_between(
            x,
            [p["low"] for p in ahead],
            [p["high"] for p in ahead],
            color="C3",
            alpha=0.2,
            label="dự báo 7 ngày (khoảng tin cậy 95%)",
        )
        ax.plot(x, [p["cases"] for p in ahead], color="C3", linestyle="--")
        title += f": {_growth_words(growth)}"
    else:
        title += ": quá ít ca để ước tính tốc độ tăng"
    all_days = days + [dt.date.fromisoformat(p["day"]) for p in ahead]
    ax.set_xticks(range(len(all_days)), [_day_label(d, False) for d in all_days])
    ax.set_title(title, fontsize=15, loc="left")
    ax.set_ylabel("Ca bệnh", fontsize=13)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", fontsize=12)


def _growth_words(growth: Mapping[str, Any]) -> str:
    """The growth as a steering committee reads it, in Vietnamese."""

    def pct(x: float) -> str:
        return f"{x * 100:.1f}%".replace(".", ",")

    low, high = growth["daily_growth_95"]
    words = (
        f"{'tăng' if growth['daily_growth'] >= 0 else 'giảm'} {pct(abs(growth['daily_growth']))}"
        f"/ngày (KTC 95%: {pct(low)} đến {pct(high)}, {growth['days']} ngày)"
    )
    if growth["doubling_days"] is not None:
        return words + f", gấp đôi sau {growth['doubling_days']:.1f} ngày".replace(".", ",")
    if growth["halving_days"] is not None:
        return words + f", giảm một nửa sau {growth['halving_days']:.1f} ngày".replace(".", ",")
    return words + ", chưa có ý nghĩa thống kê"


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
