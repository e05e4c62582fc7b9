"""Load test of ``POST /v1/scans``: a morning rush of venue scanners and citizens' phones.

    locust -f benchmarks/locustfile.py --headless --host http://127.0.0.1:8080 --csv benchmarks/out/rush --csv-full-history

First mint the data set against the gateway's own data dir (the codes must verify there):
``python benchmarks/setup_data.py --data-dir scangate-data --out benchmarks/out/loadtest.json``.
The ``MorningRush`` shape ramps up, holds the peak and decays, then ends the run by itself.

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
code accepted is a hole, not noise). Every event's verdict is counted by request kind; the
counts are logged at the end and written to ``<csv prefix>_outcomes.csv`` with ``--csv``.

Settings (flag, or environment variable):
  ``--scangate-data`` / ``SCANGATE_LOADTEST_DATA``: the data file
      (default benchmarks/out/loadtest.json)
  ``--rush-peak-users`` / ``SCANGATE_RUSH_PEAK_USERS``: users at the peak (default 50)
  ``--rush-seconds`` / ``SCANGATE_RUSH_SECONDS``: the whole run (default 60)
  ``--stay`` / ``SCANGATE_LOADTEST_STAY``: seconds between a check-in and its check-out,
      ``MIN-MAX`` (default 1-3; real stays are hours, scaled down so one run sees both)
(``locust --help`` does not list these: it prints its help before it reads this file.)
"""  # noqa: E501 - the command above is meant to be copied whole

from __future__ import annotations

import csv
import datetime as dt
import itertools
import logging
import math
import random
import secrets
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import gevent
import orjson
from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

log = logging.getLogger("scangate.loadtest")

ROUTE: Final = "/v1/scans"
DEFAULT_DATA: Final = "benchmarks/out/loadtest.json"
MAX_BATCH: Final = 20  # events in one offline-queue flush
RETRY_SHARE: Final = 0.02  # of successful requests, sent again as they were
# Late and bad requests replace a whole visit (two requests: check-in, check-out), so these
# per-visit chances come to about 1% and 0.5% of requests.
LATE_VISIT_SHARE: Final = 0.02
BAD_VISIT_SHARE: Final = 0.01
VN_TIME: Final = dt.timezone(dt.timedelta(hours=7))
# What a code's body is written in: a changed character stays a plausible code, so the
# change is caught by the signature (or the strict parser), not by a character check.
_BASE32: Final = string.ascii_uppercase + "234567"
# Event ids are ``{process}-{user}-{n}``: the random part keeps ids of a re-run against the
# same gateway apart from the last run's, which it remembers for SCANGATE_RETRY_MEMORY.
PROCESS_TAG: Final = secrets.token_hex(4)

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
class RunConfig:
    data: LoadData
    peak_users: int
    rush_s: float
    stay_min_s: float
    stay_max_s: float


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
        "--rush-peak-users",
        env_var="SCANGATE_RUSH_PEAK_USERS",
        type=int,
        default=50,
        help="MorningRush: users at the peak (default %(default)s)",
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


_run: RunConfig | None = None  # set once per locust process, by the init event


@events.init.add_listener
def _configure(environment: Environment, **_: Any) -> None:
    """Read the settings and the data file once per process; a bad one stops locust."""
    global _run
    options = environment.parsed_options
    try:
        if options is None:
            raise ValueError("no command-line options (run this file with the locust command)")
        if options.rush_peak_users < 1 or options.rush_seconds <= 0:
            raise ValueError("--rush-peak-users must be at least 1, --rush-seconds above 0")
        stay_min_s, stay_max_s = parse_stay(options.stay)
        _run = RunConfig(
            data=load_data(Path(options.scangate_data)),
            peak_users=options.rush_peak_users,
            rush_s=options.rush_seconds,
            stay_min_s=stay_min_s,
            stay_max_s=stay_max_s,
        )
    except ValueError as exc:
        # SystemExit passes through locust's event dispatch (an Exception would be logged
        # and the run would go on, every user failing on_start).
        raise SystemExit(f"locustfile: {exc}") from None


def run_config() -> RunConfig:
    if _run is None:
        raise RuntimeError("the locustfile's init event has not run")
    return _run


# -- verdict counts ----------------------------------------------------------------------------

# (request kind, verdict) -> events. On a worker: since its last report to the master; on
# the master or a local runner: the whole run.
_verdicts: Counter[tuple[str, str]] = Counter()


@events.report_to_master.add_listener
def _send_verdicts(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["scangate_verdicts"] = [[tag, verdict, n] for (tag, verdict), n in _verdicts.items()]
    _verdicts.clear()


@events.worker_report.add_listener
def _receive_verdicts(client_id: str, data: dict[str, Any], **_: Any) -> None:
    for tag, verdict, n in data.get("scangate_verdicts", ()):
        _verdicts[(tag, verdict)] += n


@events.quitting.add_listener
def _report_verdicts(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or not _verdicts:
        return
    rows = sorted(_verdicts.items())
    log.info(
        "event verdicts by request kind:\n%s",
        "\n".join(f"  {tag:<8} {verdict:<28} {n:>10,}" for (tag, verdict), n in rows),
    )
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        with open(f"{prefix}_outcomes.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Kind", "Verdict", "Events"])
            writer.writerows([tag, verdict, n] for (tag, verdict), n in rows)


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

    def on_start(self) -> None:
        # Not "self.run": that is the User method running the task loop.
        self.config = run_config()
        self.headers = {
            "Authorization": f"Bearer {self.config.data.token}",
            "Content-Type": "application/json",
        }
        self.user_tag = f"{PROCESS_TAG}-{next(_user_numbers)}"
        self.event_numbers = itertools.count(1)
        self.device_id = f"{type(self).__name__.lower()}-{self.user_tag}"

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
            wrong: list[str] = []
            for scan, expect, result in zip(scans, expects, results, strict=True):
                status, reason = result.get("status"), result.get("reason")
                _verdicts[(tag, f"{status}:{reason}" if reason else str(status))] += 1
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
        gevent.sleep(random.uniform(self.config.stay_min_s, self.config.stay_max_s))
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
        data = self.config.data
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
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        super().on_start()
        self.venue_code = random.choice(self.config.data.venue_codes)

    @task
    def serve_customers(self) -> None:
        n = 1 if random.random() < 0.5 else random.randint(2, MAX_BATCH)
        self.visit(self.venue_code, random.sample(self.config.data.person_codes, n))


class CitizenApp(ScanUser):
    """A citizen's phone scanning venue posters: one event per request."""

    weight = 3
    wait_time = between(1.0, 3.0)
    scan_time_format = "rfc3339"

    def on_start(self) -> None:
        super().on_start()
        self.person_code = random.choice(self.config.data.person_codes)

    @task
    def go_somewhere(self) -> None:
        self.visit(random.choice(self.config.data.venue_codes), [self.person_code])


# -- the shape of the run ----------------------------------------------------------------------


class MorningRush(LoadTestShape):
    """Ramp up over the first 30% of the run, hold the peak for 40%, decay to a tenth of the
    peak over the last 30%, then stop (a headless run ends by itself)."""

    RAMP_SHARE: Final = 0.3
    HOLD_SHARE: Final = 0.4

    def tick(self) -> tuple[int, float] | None:
        run = run_config()
        elapsed = self.get_run_time()
        if elapsed >= run.rush_s:
            return None
        peak = run.peak_users
        ramp_s = run.rush_s * self.RAMP_SHARE
        decay_from_s = run.rush_s * (self.RAMP_SHARE + self.HOLD_SHARE)
        floor = max(1, peak // 10)
        if elapsed < ramp_s:
            users = math.ceil(peak * elapsed / ramp_s)
        elif elapsed < decay_from_s:
            users = peak
        else:
            left = (run.rush_s - elapsed) / (run.rush_s - decay_from_s)
            users = floor + math.ceil((peak - floor) * left)
        # Spawning faster than the line rises lets the user count follow the line itself.
        spawn_rate = max(1.0, 2 * peak / max(ramp_s, 1.0))
        return max(1, users), spawn_rate
