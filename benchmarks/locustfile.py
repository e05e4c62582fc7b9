"""Load test of ``POST /v1/scans``: a morning rush of venue scanners and citizens' phones.

    locust -f benchmarks/locustfile.py --headless --host http://127.0.0.1:8080 --csv benchmarks/out/rush --csv-full-history

First mint the data set against the gateway's own data dir (the codes must verify there):
``python benchmarks/setup_data.py --data-dir scangate-data --out benchmarks/out/loadtest.json``.
The ``MorningRush`` shape ramps up, holds the peak and decays, then ends the run by itself.
At rush scale, name the events per second the peak should offer and spread the users over
several processes: ``--rush-target-eps 10000 --processes 2`` (docs/benchmarks.md).

Users:
  * ``VenueScanner`` (weight 7): a device at one venue checks in 1 to 20 persons per request
    (an offline queue flushed: half the requests hold one event, half a batch), waits a
    stay, then posts the check-outs of the same persons. Scan times are epoch ms.
  * ``CitizenApp`` (weight 3): a person's phone checks itself in at a random venue and out
    again, one event per request, scan times in RFC 3339 with the +07:00 offset.
Mixed in: about 2% of requests are sent twice (a retried batch: every event taken the first
time must come back ``duplicate``), about 1% are late uploads (whole visits scanned 1 to 3
days ago), about 0.5% carry a bad code next to a good check-in (one character of a code
changed, or bluezone's codes under vhd's token: ``wrong_app``).

Request names tell the kinds apart: ``/v1/scans [single]``, ``[batch]``, ``[retry]``,
``[late]``, ``[bad]``. A request fails only for a status other than 200, an answer that does
not match the request, or an event whose verdict is not the expected one: accepted or
duplicate for a good event, duplicate for a retried good one, rejected for a bad one (a bad
code accepted is a hole, not noise). Every event's verdict is counted by request kind.

Distributed (``--processes N``, or ``--master`` and ``--worker`` on several machines), each
worker reads the data file itself and mints its event ids under a prefix of its own, so no
two workers send the same id. Verdict counts, the events answered each second and each
process's CPU reach the master in Locust's worker reports; when the rush is over the shape
stops every user and waits until each worker has reported with none left, so the master's
counts are whole. The end of a run logs the figures and, with ``--csv``, writes beside
Locust's files:
  ``<prefix>_outcomes.csv``: events by request kind and verdict;
  ``<prefix>_summary.csv``: events/s over the peak's hold and in its busiest second,
      requests, failures, p50 and p99, the load generator's CPU;
  ``<prefix>_events.csv``: requests and events answered in each second (plot_locust.py
      draws events/s from it);
  ``<prefix>_cpu.csv``: CPU seconds, and % of one core, of the master and each worker.

Settings (flag, or environment variable; with workers, the master's apply: Locust sends them
when the run starts, and only the data file is each worker's own):
  ``--scangate-data`` / ``SCANGATE_LOADTEST_DATA``: the data file
      (default benchmarks/out/loadtest.json), read once by each process that runs users
  ``--rush-target-eps`` / ``SCANGATE_RUSH_TARGET_EPS``: events per second the peak offers;
      the peak's users are sized from it (the mix's events per visit over its think times)
  ``--rush-max-users`` / ``SCANGATE_RUSH_MAX_USERS``: the most users a target may take
      (default 500, under the gateway's 1,000 connections a worker); past it every think
      time (waits and stays) shrinks instead
  ``--rush-peak-users`` / ``SCANGATE_RUSH_PEAK_USERS``: users at the peak, at the think
      times as written, when no target is given (default 50)
  ``--rush-seconds`` / ``SCANGATE_RUSH_SECONDS``: the whole run (default 60)
  ``--stay`` / ``SCANGATE_LOADTEST_STAY``: seconds between a check-in and its check-out,
      ``MIN-MAX`` (default 1-3; real stays are hours, scaled down so one run sees both)
(``locust --help`` does not list these: it prints its help before it reads this file.)
"""  # noqa: E501 - the commands above are meant to be copied whole

from __future__ import annotations

import csv
import datetime as dt
import itertools
import logging
import math
import os
import random
import secrets
import socket
import string
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

import gevent
import orjson
from locust import FastHttpUser, LoadTestShape, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WORKER_REPORT_INTERVAL, MasterRunner, Runner, WorkerRunner
from locust.stats import calculate_response_time_percentile

log = logging.getLogger("scangate.loadtest")

ROUTE: Final = "/v1/scans"
DEFAULT_DATA: Final = "benchmarks/out/loadtest.json"
MAX_BATCH: Final = 20  # events in one offline-queue flush
SINGLE_SHARE: Final = 0.5  # of a venue scanner's flushes, those holding one event
RETRY_SHARE: Final = 0.02  # of successful requests, sent again as they were
# Late and bad requests replace a whole visit (two requests: check-in, check-out), so these
# per-visit chances come to about 1% and 0.5% of requests.
LATE_VISIT_SHARE: Final = 0.02
BAD_VISIT_SHARE: Final = 0.01
# Think times (seconds, uniform between) as written; a target rate may shrink them.
VENUE_WAIT_S: Final = (0.5, 1.5)
CITIZEN_WAIT_S: Final = (1.0, 3.0)
DEFAULT_PEAK_USERS: Final = 50
DEFAULT_MAX_USERS: Final = 500
# How long the end of a distributed run waits, past the users' --stop-timeout, for every
# worker's report with no user left: two report intervals, and one more for a slow worker.
DRAIN_WAIT_S: Final = 3 * WORKER_REPORT_INTERVAL
VN_TIME: Final = dt.timezone(dt.timedelta(hours=7))
# What a code's body is written in: a changed character stays a plausible code, so the
# change is caught by the signature (or the strict parser), not by a character check.
_BASE32: Final = string.ascii_uppercase + "234567"

Expect = Literal["new", "duplicate", "rejected", "wrong_app"]


# -- settings and data -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadData:
    """The file ``setup_data.py`` writes."""

    token: str
    venue_codes: list[str]
    person_codes: list[str]
    wrong_app_venue_codes: list[str]
    wrong_app_person_codes: list[str]


@dataclass(frozen=True, slots=True)
class RushPlan:
    """The peak's size: its users, and the factor on every think time (waits and stays)."""

    peak_users: int
    think_scale: float
    target_eps: float | None
    # What the peak's users offer at that scale with answers taken as instant; a gateway
    # slower than that holds them back (each user waits for its answer).
    planned_eps: float
    events_per_request: float


@dataclass(frozen=True, slots=True)
class RunConfig:
    data: LoadData | None  # None on a master: its workers run the users
    plan: RushPlan
    rush_s: float
    stay_min_s: float
    stay_max_s: float
    # Event ids are ``{id_prefix}-{user}-{n}``, the prefix random per process: ids of a
    # re-run against the same gateway (which remembers them for SCANGATE_RETRY_MEMORY) and of
    # each worker (forked by --processes after this file was imported) stay apart.
    id_prefix: str


def load_data(path: Path) -> LoadData:
    """Read and check the data file; ValueError with a message that says what to do."""
    hint = "make it with benchmarks/setup_data.py against the gateway's data dir"
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"no data file {str(path)!r}: {hint}") from None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"data file {str(path)!r} unreadable ({exc}): {hint}") from None
    try:
        wrong = raw["wrong_app_token_codes"]
        data = LoadData(
            token=raw["token"],
            venue_codes=raw["venue_codes"],
            person_codes=raw["person_codes"],
            wrong_app_venue_codes=wrong["venue_codes"],
            wrong_app_person_codes=wrong["person_codes"],
        )
    except (KeyError, TypeError):
        raise ValueError(f"data file {str(path)!r} lacks a field: {hint}") from None
    wrong_app_lists = (data.wrong_app_venue_codes, data.wrong_app_person_codes)
    if not all((data.venue_codes, data.person_codes, *wrong_app_lists)):
        raise ValueError(f"data file {str(path)!r} has an empty code list: {hint}")
    return data


def parse_stay(text: str) -> tuple[float, float]:
    """``1-3`` (seconds, uniform between) or ``2`` (always 2)."""
    low, sep, high = text.partition("-")
    try:
        bounds = (float(low), float(high) if sep else float(low))
    except ValueError:
        raise ValueError(f"--stay {text!r}: write MIN-MAX in seconds, like 1-3") from None
    if not 0 <= bounds[0] <= bounds[1] or not all(map(math.isfinite, bounds)):
        raise ValueError(f"--stay {text!r}: need 0 <= MIN <= MAX")
    return bounds


@events.init_command_line_parser.add_listener
def _add_arguments(parser: LocustArgumentParser) -> None:
    group = parser.add_argument_group("scangate load test")
    group.add_argument(
        "--scangate-data",
        env_var="SCANGATE_LOADTEST_DATA",
        default=DEFAULT_DATA,
        help="data file from benchmarks/setup_data.py (default %(default)s)",
    )
    group.add_argument(
        "--rush-target-eps",
        env_var="SCANGATE_RUSH_TARGET_EPS",
        type=float,
        default=None,
        help="MorningRush: events/s the peak offers; its users are sized from it",
    )
    group.add_argument(
        "--rush-max-users",
        env_var="SCANGATE_RUSH_MAX_USERS",
        type=int,
        default=DEFAULT_MAX_USERS,
        help="MorningRush: the most users a target may take; past it think times shrink "
        "(default %(default)s)",
    )
    group.add_argument(
        "--rush-peak-users",
        env_var="SCANGATE_RUSH_PEAK_USERS",
        type=int,
        default=None,
        help="MorningRush: users at the peak when no target is given "
        f"(default {DEFAULT_PEAK_USERS})",
    )
    group.add_argument(
        "--rush-seconds",
        env_var="SCANGATE_RUSH_SECONDS",
        type=float,
        default=60.0,
        help="MorningRush: length of the whole run; 30%% ramp, 40%% peak, 30%% decay "
        "(default %(default)s)",
    )
    group.add_argument(
        "--stay",
        env_var="SCANGATE_LOADTEST_STAY",
        default="1-3",
        metavar="MIN-MAX",
        help="seconds between a check-in and its check-out (default %(default)s)",
    )


# -- the rush's size ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VisitMix:
    """One user's average task (a visit, or a late or bad upload in its place), at the think
    times as written and with answers taken as instant."""

    events: float
    requests: float
    seconds: float


def visit_mix(
    batch_sizes: Mapping[int, float], wait_s: tuple[float, float], stay_s: tuple[float, float]
) -> VisitMix:
    """What ``ScanUser.visit`` sends per task, on average, for persons drawn by
    ``batch_sizes`` (size -> chance); retries included, since the gateway answers them too."""
    mean_persons = sum(n * p for n, p in batch_sizes.items())
    mean_late = sum(min(2 * n, MAX_BATCH) * p for n, p in batch_sizes.items())
    ordinary = 1 - BAD_VISIT_SHARE - LATE_VISIT_SHARE
    sent = 1 + RETRY_SHARE
    return VisitMix(
        events=sent
        * (BAD_VISIT_SHARE * 2 + LATE_VISIT_SHARE * mean_late + ordinary * 2 * mean_persons),
        requests=sent * (BAD_VISIT_SHARE + LATE_VISIT_SHARE + ordinary * 2),
        seconds=sum(wait_s) / 2 + ordinary * sum(stay_s) / 2,
    )


def plan_rush(
    kinds: Sequence[type[ScanUser]],
    stay_s: tuple[float, float],
    target_eps: float | None,
    peak_users: int | None,
    max_users: int,
) -> RushPlan:
    """Size the peak. Users divide among ``kinds`` by weight, and a user offers its mix's
    events over its mix's seconds; at think-time scale ``s`` it offers ``1/s`` times as many.
    A target takes as many users as it needs up to ``max_users``, then scales every think
    time down so that ``max_users`` offer it."""
    total_weight = sum(kind.weight for kind in kinds)
    mixes = [
        (kind.weight / total_weight, visit_mix(kind.batch_sizes, kind.wait_s, stay_s))
        for kind in kinds
    ]
    eps_per_user = sum(share * mix.events / mix.seconds for share, mix in mixes)
    rps_per_user = sum(share * mix.requests / mix.seconds for share, mix in mixes)
    users, scale = peak_users or DEFAULT_PEAK_USERS, 1.0
    if target_eps is not None:
        users = math.ceil(target_eps / eps_per_user)
        if users > max_users:
            users, scale = max_users, max_users * eps_per_user / target_eps
    return RushPlan(
        peak_users=users,
        think_scale=scale,
        target_eps=target_eps,
        planned_eps=users * eps_per_user / scale,
        events_per_request=eps_per_user / rps_per_user,
    )


def read_config(options: Any, data: LoadData | None, id_prefix: str) -> RunConfig:
    """The settings from locust's parsed options; ValueError says which one is wrong."""
    if options.rush_target_eps is not None and options.rush_peak_users is not None:
        raise ValueError("give --rush-target-eps or --rush-peak-users, not both")
    if options.rush_target_eps is not None and not 0 < options.rush_target_eps < math.inf:
        raise ValueError("--rush-target-eps must be above 0")
    if (options.rush_peak_users or 1) < 1 or options.rush_max_users < 1:
        raise ValueError("--rush-peak-users and --rush-max-users must be at least 1")
    if options.rush_seconds <= 0:
        raise ValueError("--rush-seconds must be above 0")
    stay_min_s, stay_max_s = parse_stay(options.stay)
    plan = plan_rush(
        (VenueScanner, CitizenApp),
        (stay_min_s, stay_max_s),
        options.rush_target_eps,
        options.rush_peak_users,
        options.rush_max_users,
    )
    return RunConfig(data, plan, options.rush_seconds, stay_min_s, stay_max_s, id_prefix)


def describe(plan: RushPlan) -> str:
    aim = f"target {plan.target_eps:,.0f} events/s: " if plan.target_eps else ""
    return (
        f"MorningRush: {aim}{plan.peak_users:,} users at the peak, think times x "
        f"{plan.think_scale:.3g}, offering {plan.planned_eps:,.0f} events/s if answers took no "
        f"time ({plan.events_per_request:.2f} events a request)"
    )


_run: RunConfig | None = None  # set once per locust process, by the init event


@events.init.add_listener
def _configure(environment: Environment, runner: Runner, **_: Any) -> None:
    """Read the settings once per process, and the data file where users run; a bad one
    stops locust."""
    global _run
    options = environment.parsed_options
    try:
        if options is None:
            raise ValueError("no command-line options (run this file with the locust command)")
        master = isinstance(runner, MasterRunner)
        data: LoadData | None = None
        if not master or options.processes:
            # A --processes master checks the file its workers share: a bad one stops the
            # run here, not with the master waiting for workers that exited. It runs no
            # users itself, and a master on its own machine needs no data file.
            data = load_data(Path(options.scangate_data))
        # Made here, not at import: --processes forks its workers after the import.
        id_prefix = secrets.token_hex(4)
        if isinstance(runner, WorkerRunner):
            # Its index came with the master's answer to its connection, before this event.
            id_prefix += f"w{runner.worker_index}"
            _clock.role = f"worker {runner.worker_index}"
        elif master:
            _clock.role = "master"
        _run = read_config(options, None if master else data, id_prefix)
    except ValueError as exc:
        # SystemExit passes through locust's event dispatch (an Exception would be logged
        # and the run would go on, every user failing on_start).
        raise SystemExit(f"locustfile: {exc}") from None
    if not isinstance(runner, WorkerRunner):
        log.info("%s", describe(_run.plan))


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    """Start this process's CPU clock. A worker's options now hold the master's (Locust
    sent them with the first spawn): it sizes the think times as the master does, and keeps
    its own data."""
    global _run
    _clock.start()
    if isinstance(environment.runner, WorkerRunner) and _run is not None:
        try:
            _run = read_config(environment.parsed_options, _run.data, _run.id_prefix)
        except ValueError as exc:  # the master checked the same options at its start
            raise SystemExit(f"locustfile: the master's settings: {exc}") from None


def run_config() -> RunConfig:
    if _run is None:
        raise RuntimeError("the locustfile's init event has not run")
    return _run


# -- counts across processes -------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """What this process counted: on a worker, since its last report to the master; on the
    master or a local runner, in the whole run."""

    verdicts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, verdict)
    # By the (epoch) second an answer came: requests answered, and the events of those
    # answered 200 (each with its verdict).
    requests_by_s: Counter[int] = field(default_factory=Counter)
    events_by_s: Counter[int] = field(default_factory=Counter)
    events_total: int = 0  # never cleared: this process's share, for its CPU row

    def export(self) -> dict[str, Any]:
        """The counts as a worker report carries them (lists: msgpack has no tuple keys),
        then cleared."""
        data = {
            "verdicts": [[kind, verdict, n] for (kind, verdict), n in self.verdicts.items()],
            "seconds": [[s, n, self.events_by_s[s]] for s, n in self.requests_by_s.items()],
        }
        self.verdicts.clear()
        self.requests_by_s.clear()
        self.events_by_s.clear()
        return data

    def merge(self, data: Mapping[str, Any]) -> None:
        for kind, verdict, n in data["verdicts"]:
            self.verdicts[(kind, verdict)] += n
        for s, requests, events_answered in data["seconds"]:
            self.requests_by_s[s] += requests
            self.events_by_s[s] += events_answered
            self.events_total += events_answered


@dataclass(frozen=True, slots=True)
class ProcessCpu:
    """One locust process's CPU from its test start (a worker's: its first users) to now."""

    role: str  # "local", "master", "worker 0", ...
    host: str
    pid: int
    host_cores: int
    cpu_s: float
    wall_s: float
    events: int  # answered to its users

    @property
    def core_share(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


class ProcessClock:
    """This process's CPU seconds (user + system, from os.times) and wall time since its
    test start."""

    def __init__(self) -> None:
        self.role = "local"  # set by the init event
        self.started: tuple[float, float] | None = None

    @staticmethod
    def _cpu_s() -> float:
        times = os.times()
        return times.user + times.system

    def start(self) -> None:
        self.started = (self._cpu_s(), time.monotonic())

    def read(self, events_answered: int) -> ProcessCpu:
        cpu0, wall0 = self.started or (self._cpu_s(), time.monotonic())
        return ProcessCpu(
            role=self.role,
            host=socket.gethostname(),
            pid=os.getpid(),
            host_cores=os.cpu_count() or 1,
            cpu_s=self._cpu_s() - cpu0,
            wall_s=time.monotonic() - wall0,
            events=events_answered,
        )


@dataclass(slots=True)
class Workers:
    """What the master knows of its workers."""

    cpu: dict[str, ProcessCpu] = field(default_factory=dict)  # by client id, latest report
    drain_started: float | None = None  # monotonic: when the shape sent every user home
    drained: set[str] = field(default_factory=set)  # reported no user left since then


_tally = Tally()
_clock = ProcessClock()
_workers = Workers()


@events.report_to_master.add_listener
def _send_counts(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["scangate"] = {**_tally.export(), "cpu": astuple(_clock.read(_tally.events_total))}


@events.worker_report.add_listener
def _receive_counts(client_id: str, data: dict[str, Any], **_: Any) -> None:
    ours = data.get("scangate")
    if ours is None:
        return
    _tally.merge(ours)
    _workers.cpu[client_id] = ProcessCpu(*ours["cpu"])
    # Locust puts the worker's user count in the same report, taken at the same moment: a
    # report with no user left, sent after the drain began, holds the worker's last counts.
    if _workers.drain_started is not None and data.get("user_count") == 0:
        _workers.drained.add(client_id)


def counts_are_in(runner: Runner | None) -> bool:
    """At the end of the rush: has every worker reported since its last user stopped? True
    at once without workers; waits at most the users' stop timeout and DRAIN_WAIT_S."""
    if not isinstance(runner, MasterRunner):
        return True
    now = time.monotonic()
    if _workers.drain_started is None:
        _workers.drain_started = now
        return False
    missing = {node.id for node in runner.clients.all} - _workers.drained
    if not missing:
        return True
    if now - _workers.drain_started > (runner.environment.stop_timeout or 0) + DRAIN_WAIT_S:
        log.warning(
            "%d worker(s) sent no report after their users stopped: their last seconds' "
            "counts are missing",
            len(missing),
        )
        return True
    return False


# -- the end of a run --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """A run's numbers, for benchmarks/RESULTS.md beside the capacity run's."""

    plan: RushPlan
    # The peak's hold, in whole seconds of answers; None when the run ended before it did.
    hold_s: int | None
    hold_eps: float | None
    hold_rps: float | None
    hold_p99_ms: float | None
    busiest_second_events: int
    events: int
    requests: int
    failures: int
    p50_ms: float
    p99_ms: float
    processes: list[ProcessCpu]  # this one first, then its workers

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.processes)

    def cores(self, host: str | None = None) -> float:
        """Cores the load generator kept busy over the run (on ``host``, or in all): its
        processes' CPU over the longest wall time among them."""
        mine = [p for p in self.processes if host in (None, p.host)]
        wall_s = max((p.wall_s for p in mine), default=0.0)
        return sum(p.cpu_s for p in mine) / wall_s if wall_s > 0 else 0.0

    def rows(self) -> list[tuple[str, object]]:
        def rounded(value: float | None, digits: int = 1) -> object:
            return "" if value is None else round(value, digits)

        return [
            ("target_events_per_s", rounded(self.plan.target_eps)),
            ("peak_users", self.plan.peak_users),
            ("think_scale", round(self.plan.think_scale, 4)),
            ("planned_events_per_s", round(self.plan.planned_eps, 1)),
            ("hold_s", "" if self.hold_s is None else self.hold_s),
            ("hold_events_per_s", rounded(self.hold_eps)),
            ("hold_requests_per_s", rounded(self.hold_rps)),
            ("hold_p99_ms", rounded(self.hold_p99_ms, 0)),
            ("busiest_second_events", self.busiest_second_events),
            ("events", self.events),
            ("requests", self.requests),
            ("failures", self.failures),
            ("p50_ms", self.p50_ms),
            ("p99_ms", self.p99_ms),
            ("generator_cpu_s", round(self.cpu_s, 2)),
            ("generator_cores", round(self.cores(), 3)),
        ]

    def lines(self) -> list[str]:
        hold = "the run ended before the peak's hold did"
        if self.hold_s is not None and self.hold_eps is not None and self.hold_rps is not None:
            p99 = "-" if self.hold_p99_ms is None else f"{self.hold_p99_ms:.0f} ms"
            hold = (
                f"over the peak's {self.hold_s} s hold {self.hold_eps:,.0f} events/s "
                f"({self.hold_rps:,.0f} requests/s), p99 {p99}"
            )
        failed = self.failures / self.requests if self.requests else 0.0
        hosts = {p.host: p.host_cores for p in self.processes}
        return [
            describe(self.plan),
            f"rush: {hold}; busiest second {self.busiest_second_events:,} events",
            f"rush: {self.events:,} events in {self.requests:,} requests, {self.failures:,} "
            f"failed ({failed:.2%}); over the whole run p50 {self.p50_ms:.0f} ms, "
            f"p99 {self.p99_ms:.0f} ms",
            f"load generator CPU: {self.cpu_s:.1f} s, {self.cores():.2f} cores ("
            + ", ".join(f"{h}: {self.cores(h) / n:.0%} of its {n}" for h, n in hosts.items())
            + ")",
            *(
                f"  {p.role} ({p.host}, pid {p.pid}): {p.cpu_s:.1f} s, "
                f"{p.core_share:.0%} of a core, {p.events:,} events"
                for p in self.processes
            ),
        ]


def collect_figures(environment: Environment) -> Figures:
    """The figures of the run now ending, on the master or a local runner."""
    runner = environment.runner
    assert runner is not None
    total = runner.stats.total
    hold_s = hold_eps = hold_rps = hold_p99_ms = None
    shape = environment.shape_class
    if isinstance(shape, MorningRush) and shape.hold_marks is not None:
        (start, times_at_start), (end, times_at_end) = shape.hold_marks
        # Whole seconds only: the first and the last are partly outside the hold.
        seconds = range(math.ceil(start), math.floor(end))
        if seconds:
            hold_s = len(seconds)
            hold_eps = sum(_tally.events_by_s[s] for s in seconds) / hold_s
            hold_rps = sum(_tally.requests_by_s[s] for s in seconds) / hold_s
        held = Counter(times_at_end)
        held.subtract(times_at_start)
        if held := +held:
            n = sum(held.values())
            hold_p99_ms = float(calculate_response_time_percentile(held, n, 0.99))
    own = _clock.read(0 if isinstance(runner, MasterRunner) else _tally.events_total)
    workers = sorted(_workers.cpu.values(), key=lambda p: int(p.role.removeprefix("worker ")))
    return Figures(
        plan=run_config().plan,
        hold_s=hold_s,
        hold_eps=hold_eps,
        hold_rps=hold_rps,
        hold_p99_ms=hold_p99_ms,
        busiest_second_events=max(_tally.events_by_s.values(), default=0),
        events=sum(_tally.events_by_s.values()),
        requests=total.num_requests,
        failures=total.num_failures,
        p50_ms=float(total.get_response_time_percentile(0.5) or 0),
        p99_ms=float(total.get_response_time_percentile(0.99) or 0),
        processes=[own, *workers],
    )


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@events.quitting.add_listener
def _report_run(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or _run is None:
        return
    verdicts = sorted(_tally.verdicts.items())
    if verdicts:
        log.info(
            "event verdicts by request kind:\n%s",
            "\n".join(f"  {tag:<8} {verdict:<28} {n:>10,}" for (tag, verdict), n in verdicts),
        )
    figures = collect_figures(environment)
    for line in figures.lines():
        log.info("%s", line)
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    write_csv(
        f"{prefix}_outcomes.csv",
        ["Kind", "Verdict", "Events"],
        ([tag, verdict, n] for (tag, verdict), n in verdicts),
    )
    write_csv(f"{prefix}_summary.csv", ["Figure", "Value"], figures.rows())
    seconds = sorted(_tally.requests_by_s)
    write_csv(
        f"{prefix}_events.csv",
        ["Timestamp", "Requests", "Events"],
        (
            [s, _tally.requests_by_s[s], _tally.events_by_s[s]]
            for s in range(seconds[0], seconds[-1] + 1)
        )
        if seconds
        else (),
    )
    write_csv(
        f"{prefix}_cpu.csv",
        ["Process", "Host", "PID", "Host cores", "CPU s", "Wall s", "CPU % of a core", "Events"],
        (
            [p.role, p.host, p.pid, p.host_cores, round(p.cpu_s, 3), round(p.wall_s, 3),
             round(100 * p.core_share, 1), p.events]
            for p in figures.processes
        ),
    )  # fmt: skip


# -- users -------------------------------------------------------------------------------------

_user_numbers = itertools.count(1)


def tamper(code: str) -> str:
    """The code with one character of its body changed (the prefix kept, so the verdict
    comes from the signature or the parser rather than a trivial prefix mismatch)."""
    prefix, _, body = code.partition(":")
    i = random.randrange(len(body))
    other = random.choice(_BASE32.replace(body[i], ""))
    return f"{prefix}:{body[:i]}{other}{body[i + 1 :]}"


def _verdict_ok(expect: Expect, status: object, reason: object) -> bool:
    if expect == "new":
        return status in ("accepted", "duplicate")
    if expect == "duplicate":
        return status == "duplicate"
    if expect == "wrong_app":
        return status == "rejected" and reason == "wrong_app"
    return status == "rejected"


class ScanUser(FastHttpUser):
    """What both kinds of user share: event ids, posting, checking the answer, the mix."""

    abstract = True
    scan_time_format: Literal["epoch_ms", "rfc3339"] = "epoch_ms"
    # The think time between tasks as written, and the persons of one task: size -> chance.
    wait_s: ClassVar[tuple[float, float]]
    batch_sizes: ClassVar[Mapping[int, float]] = {1: 1.0}

    def on_start(self) -> None:
        # Not "self.run": that is the User method running the task loop.
        self.config = run_config()
        if self.config.data is None:
            raise RuntimeError("users run on a process without the data file")
        self.data = self.config.data
        self.headers = {
            "Authorization": f"Bearer {self.data.token}",
            "Content-Type": "application/json",
        }
        self.user_tag = f"{self.config.id_prefix}-{next(_user_numbers)}"
        self.event_numbers = itertools.count(1)
        self.device_id = f"{type(self).__name__.lower()}-{self.user_tag}"

    def wait_time(self) -> float:
        return random.uniform(*self.wait_s) * self.config.plan.think_scale

    def persons(self) -> list[str]:
        """The persons of one task, as many as ``batch_sizes`` draws."""
        sizes, chances = zip(*self.batch_sizes.items(), strict=True)
        n = random.choices(sizes, chances)[0]
        return random.sample(self.data.person_codes, n)

    def scan(self, kind: str, venue_code: str, person_code: str, at_ms: int) -> dict[str, Any]:
        scanned_at: int | str = at_ms
        if self.scan_time_format == "rfc3339":
            moment = dt.datetime.fromtimestamp(at_ms / 1000, VN_TIME)
            scanned_at = moment.isoformat(timespec="milliseconds")
        return {
            "event_id": f"{self.user_tag}-{next(self.event_numbers)}",
            "kind": kind,
            "venue_code": venue_code,
            "person_code": person_code,
            "scanned_at": scanned_at,
            "device_id": self.device_id,
        }

    def post(self, scans: list[dict[str, Any]], expects: list[Expect], tag: str) -> bool:
        """Post one request and check every verdict; sometimes retry it as a client would
        after a lost answer. True when the answer was as expected."""
        body = orjson.dumps({"events": scans})
        ok = self._send(body, scans, expects, tag)
        if ok and random.random() < RETRY_SHARE:
            # The gateway remembers what it accepted, not what it refused: a bad event is
            # refused again, with the same reason.
            again: list[Expect] = ["duplicate" if e == "new" else e for e in expects]
            self._send(body, scans, again, "retry")
        return ok

    def _send(
        self, body: bytes, scans: list[dict[str, Any]], expects: list[Expect], tag: str
    ) -> bool:
        with self.client.post(
            ROUTE, data=body, headers=self.headers, name=f"{ROUTE} [{tag}]", catch_response=True
        ) as response:
            second = int(time.time())
            _tally.requests_by_s[second] += 1
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return False
            try:
                results = orjson.loads(response.content or b"")["results"]
                if len(results) != len(scans):
                    raise ValueError(f"{len(results)} results for {len(scans)} events")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                response.failure(f"200 without a proper scans answer: {exc}")
                return False
            _tally.events_by_s[second] += len(scans)
            _tally.events_total += len(scans)
            wrong: list[str] = []
            for scan, expect, result in zip(scans, expects, results, strict=True):
                status, reason = result.get("status"), result.get("reason")
                _tally.verdicts[(tag, f"{status}:{reason}" if reason else str(status))] += 1
                if result.get("event_id") != scan["event_id"]:
                    wrong.append(f"{scan['event_id']}: answered as {result.get('event_id')}")
                elif not _verdict_ok(expect, status, reason):
                    wrong.append(f"{scan['event_id']}: {status} {reason or ''} (wanted {expect})")
            if wrong:
                response.failure(f"{len(wrong)} unexpected verdicts, first: {wrong[0]}")
                return False
            response.success()
            return True

    def visit(self, venue_code: str, person_codes: list[str]) -> None:
        """Check persons in, let them stay, check them out; or, now and then, upload a late
        visit or post a bad code instead."""
        roll = random.random()
        if roll < BAD_VISIT_SHARE:
            self.post_bad(venue_code, person_codes[0])
            return
        if roll < BAD_VISIT_SHARE + LATE_VISIT_SHARE:
            self.post_late(venue_code, person_codes)
            return
        tag = "single" if len(person_codes) == 1 else "batch"
        now_ms = int(time.time() * 1000)
        # A flushed queue holds scans made over the last minute; the check-outs reuse the
        # same offsets so each person's check-out follows their check-in.
        offsets_ms = [random.randrange(0, 60_000) for _ in person_codes]
        checkins = [
            self.scan("checkin", venue_code, p, now_ms - off)
            for p, off in zip(person_codes, offsets_ms, strict=True)
        ]
        if not self.post(checkins, ["new"] * len(checkins), tag):
            return  # a device that got no answer keeps its queue; no check-outs follow
        stay_s = random.uniform(self.config.stay_min_s, self.config.stay_max_s)
        gevent.sleep(stay_s * self.config.plan.think_scale)
        now_ms = int(time.time() * 1000)
        checkouts = [
            self.scan("checkout", venue_code, p, now_ms - off)
            for p, off in zip(person_codes, offsets_ms, strict=True)
        ]
        self.post(checkouts, ["new"] * len(checkouts), tag)

    def post_late(self, venue_code: str, person_codes: list[str]) -> None:
        """A device back online after days: whole visits (check-in and check-out) at once."""
        scans: list[dict[str, Any]] = []
        for p in person_codes:
            checkin_ms = int((time.time() - random.uniform(86400, 3 * 86400)) * 1000)
            stay_ms = random.randrange(10 * 60_000, 2 * 3600_000)
            scans.append(self.scan("checkin", venue_code, p, checkin_ms))
            scans.append(self.scan("checkout", venue_code, p, checkin_ms + stay_ms))
        self.post(scans[:MAX_BATCH], ["new"] * len(scans[:MAX_BATCH]), "late")

    def post_bad(self, venue_code: str, person_code: str) -> None:
        """One good check-in and one with a bad code, in the same request."""
        data = self.data
        now_ms = int(time.time() * 1000)
        good = self.scan("checkin", venue_code, person_code, now_ms)
        expect: Expect = "rejected"
        match random.randrange(3):
            case 0:
                bad = self.scan("checkin", tamper(venue_code), person_code, now_ms)
            case 1:
                bad = self.scan("checkin", venue_code, tamper(person_code), now_ms)
            case _:
                other_venue = random.choice(data.wrong_app_venue_codes)
                other_person = random.choice(data.wrong_app_person_codes)
                bad = self.scan("checkin", other_venue, other_person, now_ms)
                expect = "wrong_app"
        self.post([good, bad], ["new", expect], "bad")


class VenueScanner(ScanUser):
    """The scanner at one venue's door: check-ins and check-outs, often batched."""

    weight = 7
    wait_s = VENUE_WAIT_S
    # An offline queue flushed: one event SINGLE_SHARE of the time, else 2 to MAX_BATCH.
    batch_sizes: ClassVar[Mapping[int, float]] = {
        1: SINGLE_SHARE,
        **{n: (1 - SINGLE_SHARE) / (MAX_BATCH - 1) for n in range(2, MAX_BATCH + 1)},
    }

    def on_start(self) -> None:
        super().on_start()
        self.venue_code = random.choice(self.data.venue_codes)

    @task
    def serve_customers(self) -> None:
        self.visit(self.venue_code, self.persons())


class CitizenApp(ScanUser):
    """A citizen's phone scanning venue posters: one event per request."""

    weight = 3
    wait_s = CITIZEN_WAIT_S
    scan_time_format = "rfc3339"

    def on_start(self) -> None:
        super().on_start()
        self.person_code = random.choice(self.data.person_codes)

    @task
    def go_somewhere(self) -> None:
        self.visit(random.choice(self.data.venue_codes), [self.person_code])


# -- the shape of the run ----------------------------------------------------------------------

# A moment of the run: epoch seconds, and the response times so far (Locust's rounded ms ->
# requests). A master's lag its workers' by up to a report interval (3 s).
Mark = tuple[float, dict[int, int]]


class MorningRush(LoadTestShape):
    """Ramp up over the first 30% of the run, hold the peak for 40%, decay to a tenth of the
    peak over the last 30%, then stop (a headless run ends by itself). With workers, the
    users are sent home first and the run ends once each worker's last counts are in."""

    RAMP_SHARE: Final = 0.3
    HOLD_SHARE: Final = 0.4

    def __init__(self) -> None:
        super().__init__()
        self._hold_start: Mark | None = None
        self.hold_marks: tuple[Mark, Mark] | None = None  # the hold's first and last moment

    def tick(self) -> tuple[int, float] | None:
        run = run_config()
        elapsed = self.get_run_time()
        peak = run.plan.peak_users
        ramp_s = run.rush_s * self.RAMP_SHARE
        decay_from_s = run.rush_s * (self.RAMP_SHARE + self.HOLD_SHARE)
        floor = max(1, peak // 10)
        # Spawning faster than the line rises lets the user count follow the line itself.
        spawn_rate = max(1.0, 2 * peak / max(ramp_s, 1.0))
        if elapsed >= run.rush_s:
            return None if counts_are_in(self.runner) else (0, spawn_rate)
        if elapsed < ramp_s:
            users = math.ceil(peak * elapsed / ramp_s)
        elif elapsed < decay_from_s:
            users = peak
            if self._hold_start is None:
                self._hold_start = self._mark()
        else:
            if self._hold_start is not None and self.hold_marks is None:
                self.hold_marks = (self._hold_start, self._mark())
            left = (run.rush_s - elapsed) / (run.rush_s - decay_from_s)
            users = floor + math.ceil((peak - floor) * left)
        return max(1, users), spawn_rate

    def _mark(self) -> Mark:
        times = self.runner.stats.total.response_times if self.runner is not None else {}
        return time.time(), dict(times)
