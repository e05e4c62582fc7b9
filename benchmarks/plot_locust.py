"""Plot a Locust run: throughput, latency and users over time, from its stats history CSV.

    python benchmarks/plot_locust.py benchmarks/out/rush_stats_history.csv -o benchmarks/out/rush.png

Reads the ``Aggregated`` rows of ``<prefix>_stats_history.csv`` (written by ``locust --csv
PREFIX``, one row a second) and draws panels sharing the time axis: throughput with the
user count on a second axis, and the p50 and p99 latency in ms (p95 when the file has no
99% column). Throughput is drawn twice: locust's own requests/s (and failures/s, when there
were any), an average over 10 seconds that ends 2 seconds back, so it lags the users; and
the requests completed in each second, from the running total, which does not lag but is
noisy at low rates. Run locust with
``--csv-full-history`` to get percentiles of the last few seconds at each point; without
it they are cumulative from the start, which flattens every change.

When ``<prefix>_events.csv`` is there too (benchmarks/locustfile.py writes it: the events
answered in each second, from every worker), a middle panel draws events/s: each second's,
and their average over the 10 seconds up to it. ``--events FILE`` names another such file.
The top panel then leaves out the requests done in each second: with worker processes the
running total it comes from moves only when they report, every 3 seconds.
"""  # noqa: E501 - the command above is meant to be copied whole

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn

PROG: Final = "plot_locust.py"
EXIT_USAGE: Final = 2
AGGREGATED: Final = "Aggregated"
REQUIRED_COLUMNS: Final = ("Timestamp", "User Count", "Name", "Requests/s", "Failures/s", "50%")
EVENTS_COLUMNS: Final = ("Timestamp", "Events")
HISTORY_SUFFIX: Final = "_stats_history.csv"
EVENTS_SUFFIX: Final = "_events.csv"
EVENTS_WINDOW_S: Final = 10
HIGH_PERCENTILES: Final = ("99%", "95%")  # the first one the file has is drawn


class UsageError(Exception):
    """A bad argument or an input that cannot be plotted; printed on one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line, like the scangate CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(slots=True)
class History:
    """The Aggregated series of one run; latencies in ms, NaN where there was no request."""

    high_label: str
    start: float = math.nan  # epoch seconds of the first row: time 0 of every panel
    seconds: list[float] = field(default_factory=list)
    users: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)  # locust's 10 s average
    rps_each_second: list[float] = field(default_factory=list)  # from the running total
    failures_per_s: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    high_ms: list[float] = field(default_factory=list)
    total_requests: int = 0
    total_failures: int = 0


def _number(text: str | None) -> float:
    # Locust writes "N/A" for a percentile of a second without requests: a gap, not a zero.
    try:
        return float(text) if text not in (None, "", "N/A") else math.nan
    except ValueError:
        return math.nan


def _count(text: str | None) -> int:
    value = _number(text)
    return 0 if math.isnan(value) else int(value)


def read_history(path: Path) -> History:
    """The Aggregated rows of a Locust stats history CSV."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise UsageError(
                    f"{path} is not a locust stats history CSV (no column {missing[0]!r}; "
                    "use the <prefix>_stats_history.csv of locust --csv)"
                )
            high = next((c for c in HIGH_PERCENTILES if c in columns), None)
            if high is None:
                raise UsageError(f"{path} has neither a 99% nor a 95% column")
            history = History(high_label=f"p{high.rstrip('%')}")
            start: float | None = None
            previous: tuple[float, int] | None = None  # (timestamp, total requests)
            for row in reader:
                if row["Name"] != AGGREGATED:
                    continue
                stamp = _number(row["Timestamp"])
                if math.isnan(stamp):
                    continue
                if start is None:
                    start = history.start = stamp
                history.seconds.append(stamp - start)
                history.users.append(_number(row["User Count"]))
                history.rps.append(_number(row["Requests/s"]))
                history.failures_per_s.append(_number(row["Failures/s"]))
                p50, p_high = _number(row["50%"]), _number(row[high])
                # With --csv-full-history locust writes 0 for every percentile until its
                # window of recent response times fills (the first second or two): no data.
                if _number(row.get("100%")) == 0:
                    p50 = p_high = math.nan
                history.p50_ms.append(p50)
                history.high_ms.append(p_high)
                history.total_requests = _count(row.get("Total Request Count"))
                if previous is not None and stamp > previous[0]:
                    done = history.total_requests - previous[1]
                    history.rps_each_second.append(done / (stamp - previous[0]))
                else:
                    history.rps_each_second.append(math.nan)
                previous = (stamp, history.total_requests)
                history.total_failures = _count(row.get("Total Failure Count"))
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not history.seconds:
        raise UsageError(f"{path} has no {AGGREGATED!r} rows (did the run send any request?)")
    return history


@dataclass(slots=True)
class EventRates:
    """Events answered in each second, and their trailing average (EVENTS_WINDOW_S)."""

    seconds: list[float] = field(default_factory=list)  # since the history's start
    each_second: list[float] = field(default_factory=list)
    average: list[float] = field(default_factory=list)


def read_events(path: Path, start: float) -> EventRates:
    """A ``<prefix>_events.csv``, its seconds counted from ``start`` (epoch seconds)."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in EVENTS_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UsageError(
                    f"{path} is not an events CSV of benchmarks/locustfile.py "
                    f"(no column {missing[0]!r})"
                )
            counts = {int(_number(r["Timestamp"])): _count(r["Events"]) for r in reader}
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    rates = EventRates()
    if not counts:
        return rates
    window: list[int] = []
    for second in range(min(counts), max(counts) + 1):
        window = [*window[-(EVENTS_WINDOW_S - 1) :], counts.get(second, 0)]
        rates.seconds.append(second - start)
        rates.each_second.append(float(window[-1]))
        rates.average.append(sum(window) / len(window))
    return rates


def events_beside(history_path: Path) -> Path | None:
    """The locustfile's ``<prefix>_events.csv`` next to ``<prefix>_stats_history.csv``."""
    if not history_path.name.endswith(HISTORY_SUFFIX):
        return None
    prefix = history_path.name.removesuffix(HISTORY_SUFFIX)
    path = history_path.with_name(prefix + EVENTS_SUFFIX)
    return path if path.is_file() else None


def plot(history: History, out: Path, title: str, event_rates: EventRates | None = None) -> None:
    """Write the PNG: throughput with users, events/s when given, latency."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "matplotlib is not installed: pip install matplotlib (or the project's bench extra)"
        ) from None
    matplotlib.use("Agg")  # no display needed: a file is the only output
    import matplotlib.pyplot as plt

    with_events = event_rates is not None and bool(event_rates.seconds)
    fig, axes = plt.subplots(
        3 if with_events else 2,
        1,
        sharex=True,
        figsize=(11, 9.5 if with_events else 7),
        height_ratios=(3, 2, 2) if with_events else (3, 2),
        constrained_layout=True,
    )
    top, bottom = axes[0], axes[-1]
    t = history.seconds
    if not with_events:
        # With workers the running total moves only when they report (every 3 s), so
        # each second's difference swings between 0 and three seconds' worth; the events
        # panel has each second's count from the workers themselves instead.
        top.plot(
            t,
            history.rps_each_second,
            color="tab:blue",
            alpha=0.35,
            linewidth=1.0,
            label="requests done in each second",
        )
    top.plot(t, history.rps, color="tab:blue", linewidth=1.8, label="requests/s (locust, 10 s avg)")
    if any(f > 0 for f in history.failures_per_s if not math.isnan(f)):
        top.plot(t, history.failures_per_s, color="tab:red", linewidth=1.2, label="failures/s")
    top.set_ylabel("requests / s")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    users_axis = top.twinx()
    users_axis.step(t, history.users, where="post", color="tab:gray", linestyle="--", label="users")
    users_axis.set_ylabel("users")
    users_axis.set_ylim(bottom=0)
    lines = top.get_lines() + users_axis.get_lines()
    top.legend(lines, [line.get_label() for line in lines], loc="upper left")

    peak_events = ""
    if event_rates is not None and with_events:
        middle = axes[1]
        middle.plot(
            event_rates.seconds,
            event_rates.each_second,
            color="tab:purple",
            alpha=0.35,
            linewidth=1.0,
            label="events answered in each second",
        )
        middle.plot(
            event_rates.seconds,
            event_rates.average,
            color="tab:purple",
            linewidth=1.8,
            label=f"events/s ({EVENTS_WINDOW_S} s average)",
        )
        middle.set_ylabel("events / s")
        middle.set_ylim(bottom=0)
        middle.grid(alpha=0.3)
        middle.legend(loc="upper left")
        peak_events = f", {max(event_rates.average):,.0f} events/s"

    bottom.plot(t, history.p50_ms, color="tab:green", linewidth=1.6, label="p50")
    bottom.plot(t, history.high_ms, color="tab:orange", linewidth=1.6, label=history.high_label)
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("time since start (s)")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper left")

    peak = max((r for r in history.rps if not math.isnan(r)), default=0.0)
    fig.suptitle(
        f"{title}: {history.total_requests:,} requests, {history.total_failures:,} failures, "
        f"peak {peak:,.0f} req/s{peak_events} (10 s average)"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Latency percentiles come from locust itself; run it with --csv-full-history "
        "so each point is recent rather than cumulative. Needs matplotlib.",
    )
    parser.add_argument(
        "history", type=Path, metavar="HISTORY_CSV", help="<prefix>_stats_history.csv of a run"
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE.png", help="the PNG to write"
    )
    parser.add_argument("--title", help="heading of the chart (default: the CSV's name)")
    parser.add_argument(
        "--events",
        type=Path,
        metavar="EVENTS_CSV",
        help=f"events answered each second, from benchmarks/locustfile.py (default: "
        f"<prefix>{EVENTS_SUFFIX} beside the history, when there)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.output.suffix.lower() != ".png":
            raise UsageError(f"-o {str(args.output)!r}: the output is a PNG; name it *.png")
        history = read_history(args.history)
        events_path = args.events or events_beside(args.history)
        event_rates = None if events_path is None else read_events(events_path, history.start)
        title = args.title or args.history.name.removesuffix(HISTORY_SUFFIX)
        plot(history, args.output, title, event_rates)
    except (UsageError, OSError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
