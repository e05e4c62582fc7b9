"""Confirmed cases and what follows from them: the exposure notices to their contacts, and
the risky venue windows that apps match on the device (HTTP and CLI share the functions
here; ``gateway.outbox.notifier`` delivers the notices).

A case's contacts are the tracing result (``Storage.trace``, the same rules and defaults
as ``scangate trace``) over the 14 days before ``confirmed_at``. Each contact is notified
through every app that posted that person's scans in those days and has a webhook; a
contact no such app can reach, whose phone is on record (declared), gets an SMS instead;
anyone else is counted as unreachable. The notices go into the outbox with the case, in
one transaction.

Risky venues carry no person id: each is a venue and a time (a case's visit widened by
the tracing margin), merged with the overlapping windows of other cases at that venue.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.http.context import authenticate, authenticate_admin, json_response, read_json
from gateway.http.errors import InvalidField, InvalidRequest, NotFound
from gateway.http.keys import KEYRING, METRICS, PERSONAL, SETTINGS, STORAGE, TRACE_STORAGE
from gateway.http.people import new_id
from signing import Keyring
from signing.codes import ID_PATTERN
from signing.personal import PersonalData
from signing.text import has_unprintable
from storage import Storage, TraceQuery
from storage.models import ContactRow
from storage.outbox import CaseRecord, CaseWindow, NoticeRecord, notice_id
from storage.registry import VenueLabel
from storage.times import format_time_ms, parse_time_ms
from storage.tracing import venue_members

CASE_DAYS: Final = 14
MAX_NOTE_CHARS: Final = 500
DEFAULT_RISKY_VENUES: Final = 1000
MAX_RISKY_VENUES: Final = 5000
DAY_MS: Final = 86_400_000


@dataclass(frozen=True)
class CasePlan:
    """What recording a case would do: its contacts, windows and notices."""

    case: CaseRecord
    rows: list[ContactRow]
    windows: list[CaseWindow]
    notices: list[NoticeRecord]
    unreachable: list[str]  # contacts with no channel: no app webhook and no phone
    venues: Mapping[str, VenueLabel] = dataclasses.field(default_factory=dict)

    @property
    def contacts(self) -> int:
        return len({row.person_id for row in self.rows})

    def preview(self) -> dict[str, Any]:
        """The dry run's answer: counts and each exposure with its channels."""
        channels: dict[tuple[str, str, int], list[dict[str, str]]] = {}
        for n in self.notices:
            key = (n.person_id, n.venue_id, n.exposure_start_ms)
            channels.setdefault(key, []).append({"channel": n.channel, "app_id": n.app_id})
        return {
            "contacts": self.contacts,
            "notices": len(self.notices),
            "unreachable": len(self.unreachable),
            "exposures": [
                {
                    "person_id": row.person_id,
                    "venue_id": row.venue_id,
                    **venue_members(self.venues.get(row.venue_id)),
                    "exposure_start": format_time_ms(row.overlap_start_ms),
                    "exposure_end": format_time_ms(row.overlap_end_ms),
                    "overlap_minutes": row.overlap_minutes,
                    "checkout_recorded": row.checkout_recorded,
                    "channels": channels.get(
                        (row.person_id, row.venue_id, row.overlap_start_ms), []
                    ),
                }
                for row in self.rows
            ],
        }


async def plan_case(
    storage: Storage,
    keyring: Keyring,
    personal: PersonalData,
    person_id: str,
    confirmed_at_ms: int,
    note: str | None,
    actor: str,
    *,
    read_from: Storage | None = None,
) -> CasePlan:
    """Trace the case and decide every notice; nothing is stored (but the trace's audit)."""
    now_ms = int(time.time() * 1000)
    case_id = new_id("C")
    query = TraceQuery(person_id=person_id, now_ms=confirmed_at_ms, days=CASE_DAYS)
    rows = await storage.trace(query, actor=actor, read_from=read_from)
    reader = read_from or storage
    case_visits = await reader.person_visits(person_id, query.window_start_ms, confirmed_at_ms)
    windows = sorted(
        {
            CaseWindow(
                v.venue_id,
                v.checkin_at_ms - query.margin_ms,
                # Not past the confirmation: an open visit's assumed end may be later.
                min(v.checkout_at_ms + query.margin_ms, confirmed_at_ms),
                "high" if v.checkout_at_ms - v.checkin_at_ms >= query.min_overlap_ms else "low",
            )
            for v in case_visits
        }
    )
    notices: list[NoticeRecord] = []
    unreachable: list[str] = []
    # Which apps have a webhook, asked once per app (the keyring opens a sealed secret).
    has_webhook: dict[str, bool] = {}
    for contact in sorted({row.person_id for row in rows}):
        apps = await reader.apps_of_person(contact, query.window_start_ms, confirmed_at_ms)
        for app in apps:
            if app not in has_webhook:
                has_webhook[app] = keyring.webhook(app) is not None
        hooked = [app for app in apps if has_webhook[app]]
        if hooked:
            targets = [("webhook", app) for app in hooked]
        else:
            person = await storage.person(contact)
            if person is None or person.phone_enc is None:
                unreachable.append(contact)
                continue
            targets = [("sms", "")]
        for row in (r for r in rows if r.person_id == contact):
            for channel, app in targets:
                notices.append(
                    NoticeRecord(
                        notice_id=notice_id(
                            case_id, contact, row.venue_id, row.overlap_start_ms, channel, app
                        ),
                        case_id=case_id,
                        person_id=contact,
                        venue_id=row.venue_id,
                        exposure_start_ms=row.overlap_start_ms,
                        exposure_end_ms=row.overlap_end_ms,
                        overlap_minutes=row.overlap_minutes,
                        channel=channel,
                        app_id=app,
                        state="pending",
                        attempts=0,
                        next_attempt_at_ms=now_ms,
                        last_error=None,
                        delivered_at_ms=None,
                        created_at_ms=now_ms,
                        checkout_recorded=row.checkout_recorded,
                    )
                )
    # One notice per unique tuple, as the table's key would keep it.
    unique = list({n.notice_id: n for n in notices}.values())
    case = CaseRecord(
        case_id=case_id,
        person_id=person_id,
        confirmed_at_ms=confirmed_at_ms,
        note_enc=personal.encrypt(note, "case.note", case_id) if note else None,
        created_at_ms=now_ms,
        created_by=actor,
        contacts=len({row.person_id for row in rows}),
        notices=len(unique),
    )
    venues = await storage.venue_labels([row.venue_id for row in rows])
    return CasePlan(case, rows, windows, unique, unreachable, venues)


async def record_case(storage: Storage, plan: CasePlan) -> None:
    """Store the case, its windows and its notices (one transaction), and audit it."""
    await storage.add_case(plan.case, plan.windows, plan.notices)
    await storage.audit(
        plan.case.created_by,
        "case",
        plan.case.person_id,
        f"case_id={plan.case.case_id} contacts={plan.contacts} notices={len(plan.notices)} "
        f"unreachable={len(plan.unreachable)}",
    )


async def audit_preview(storage: Storage, plan: CasePlan) -> None:
    await storage.audit(
        plan.case.created_by,
        "case_preview",
        plan.case.person_id,
        f"contacts={plan.contacts} notices={len(plan.notices)} unreachable={len(plan.unreachable)}",
    )


def check_case_request(
    doc: object, now_ms: int, clock_skew_ms: int, retention_ms: int
) -> tuple[str, int, str | None]:
    """``(person_id, confirmed_at_ms, note)`` of a case request; InvalidField otherwise."""
    if not isinstance(doc, dict):
        raise InvalidRequest('expected {"person_id", "confirmed_at", "note"}')
    person_id = doc.get("person_id")
    if not isinstance(person_id, str) or not ID_PATTERN.fullmatch(person_id):
        raise InvalidField("person_id", "1 to 16 characters of A-Z0-9")
    try:
        confirmed_at_ms = parse_time_ms(doc.get("confirmed_at"))
    except ValueError as exc:
        raise InvalidField("confirmed_at", str(exc)) from None
    if confirmed_at_ms > now_ms + clock_skew_ms:
        raise InvalidField("confirmed_at", "in the future")
    if confirmed_at_ms < now_ms - retention_ms:
        raise InvalidField("confirmed_at", "older than the retention: no visits are kept")
    note = doc.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
        raise InvalidField("note", f"text of at most {MAX_NOTE_CHARS} characters")
    if note is not None and has_unprintable(note.replace("\n", " ")):
        raise InvalidField("note", "contains control, invisible or unassigned characters")
    return person_id, confirmed_at_ms, note or None


def case_json(
    case: CaseRecord,
    notices: Sequence[NoticeRecord],
    note: str | None,
    venues: Mapping[str, VenueLabel],
) -> Any:
    return {
        "case_id": case.case_id,
        "person_id": case.person_id,
        "confirmed_at": format_time_ms(case.confirmed_at_ms),
        "created_at": format_time_ms(case.created_at_ms),
        "created_by": case.created_by,
        "note": note,
        "contacts": case.contacts,
        "notices": [
            {
                "notice_id": n.notice_id,
                "person_id": n.person_id,
                "venue_id": n.venue_id,
                **venue_members(venues.get(n.venue_id)),
                "exposure_start": format_time_ms(n.exposure_start_ms),
                "exposure_end": format_time_ms(n.exposure_end_ms),
                "overlap_minutes": n.overlap_minutes,
                "checkout_recorded": n.checkout_recorded,
                "channel": n.channel,
                "app_id": n.app_id or None,
                "state": n.state,
                "attempts": n.attempts,
                "last_error": n.last_error,
                "delivered_at": (
                    format_time_ms(n.delivered_at_ms) if n.delivered_at_ms is not None else None
                ),
            }
            for n in notices
        ],
    }


async def read_case(
    storage: Storage, personal: PersonalData, case_id: str, actor: str
) -> Any | None:
    """A case as an official sees it (``case_json``), or None when there is no such case.
    Audit-logged like a trace (``case_read``), found or not, before it is answered."""
    case = await storage.case(case_id)
    await storage.audit(actor, "case_read", case_id, "" if case is not None else "no such case")
    if case is None:
        return None
    note = personal.decrypt(case.note_enc, "case.note", case.case_id) if case.note_enc else None
    notices = await storage.case_notices(case.case_id)
    venues = await storage.venue_labels([n.venue_id for n in notices])
    return case_json(case, notices, note, venues)


def merge_windows(windows: Sequence[CaseWindow]) -> list[CaseWindow]:
    """Overlapping windows at one venue as one (the highest level): an app learns when a
    venue was risky, not how many cases made it so."""
    merged: list[CaseWindow] = []
    for w in sorted(windows):
        last = merged[-1] if merged else None
        if last is not None and last.venue_id == w.venue_id and w.from_ms <= last.to_ms:
            level = "high" if "high" in (last.level, w.level) else "low"
            merged[-1] = CaseWindow(w.venue_id, last.from_ms, max(last.to_ms, w.to_ms), level)
        else:
            merged.append(w)
    return merged


# -- HTTP ------------------------------------------------------------------------------------


async def post_case(request: web.Request) -> web.Response:
    app = request.app
    storage = app[STORAGE]
    admin = await authenticate_admin(request, storage)
    dry_run = request.query.get("dry_run", "0")
    if dry_run not in ("0", "1"):
        raise InvalidRequest("dry_run: 0 or 1")
    settings = app[SETTINGS]
    now_ms = int(time.time() * 1000)
    person_id, confirmed_at_ms, note = check_case_request(
        await read_json(request),
        now_ms,
        int(settings.clock_skew_s * 1000),
        int(settings.retention_s * 1000),
    )
    if dry_run == "0":
        known = await storage.case_confirmed(person_id, confirmed_at_ms)
        if known is not None:
            # The same request again (a retry after a timeout): the case it made, once.
            return json_response(
                {"case_id": known.case_id, "contacts": known.contacts, "notices": known.notices}
            )
    plan = await plan_case(
        storage,
        app[KEYRING],
        app[PERSONAL],
        person_id,
        confirmed_at_ms,
        note,
        f"admin:{admin}",
        read_from=app[TRACE_STORAGE],
    )
    if dry_run == "1":
        await audit_preview(storage, plan)
        return json_response(plan.preview())
    await record_case(storage, plan)
    app[METRICS].cases.inc()
    return json_response(
        {"case_id": plan.case.case_id, "contacts": plan.contacts, "notices": len(plan.notices)},
        status=201,
    )


async def get_case(request: web.Request) -> web.Response:
    """A case and its notices, for an admin token: audit-logged, and ``no-store`` (it names
    the case's contacts)."""
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    case_id = request.match_info["case_id"]
    if not ID_PATTERN.fullmatch(case_id):
        raise NotFound("no such case")
    shown = await read_case(storage, request.app[PERSONAL], case_id, f"admin:{admin}")
    if shown is None:
        raise NotFound("no such case")
    return json_response(shown, no_store=True)


async def get_risky_venues(request: web.Request) -> web.Response:
    """Venue windows where cases were present, for matching on the device: a page of
    venues (``limit``), each with all its windows, and a ``next`` cursor while more
    follow."""
    await authenticate(request, request.app[KEYRING])
    params = request.query
    now_ms = int(time.time() * 1000)
    try:
        cursor = params.get("cursor")
        if cursor is not None:
            since, after = _decode_venue_cursor(cursor)
        else:
            since_text = params.get("since", str(now_ms - CASE_DAYS * DAY_MS))
            if not since_text.isdecimal() or len(since_text) > 15:
                raise ValueError("since: epoch milliseconds")
            since, after = int(since_text), ""
        limit_text = params.get("limit", str(DEFAULT_RISKY_VENUES))
        if not limit_text.isdecimal() or not 1 <= int(limit_text) <= MAX_RISKY_VENUES:
            raise ValueError(f"limit: 1 to {MAX_RISKY_VENUES} venues")
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    limit = int(limit_text)
    # One venue more than the page, to know whether another page follows.
    found = await request.app[STORAGE].risky_windows(since, after, limit + 1)
    venues = sorted({w.venue_id for w in found})
    shown = [w for w in found if w.venue_id in set(venues[:limit])]
    more = len(venues) > limit
    labels = await request.app[STORAGE].venue_labels(venues[:limit])
    return json_response(
        {
            "windows": [
                {
                    "venue_id": w.venue_id,
                    **venue_members(labels.get(w.venue_id)),
                    "from": w.from_ms,
                    "to": w.to_ms,
                    "level": w.level,
                }
                for w in merge_windows(shown)
            ],
            "next": _encode_venue_cursor(since, venues[limit - 1]) if more else None,
        }
    )


def _encode_venue_cursor(since_ms: int, after_venue: str) -> str:
    doc = orjson.dumps([1, since_ms, after_venue])
    return base64.urlsafe_b64encode(doc).decode()


def _decode_venue_cursor(text: str) -> tuple[int, str]:
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(text.encode("ascii")))
        version, since, after = doc
        if version != 1 or type(since) is not int or not 0 <= since < 2**53:
            raise ValueError
        if not isinstance(after, str) or not ID_PATTERN.fullmatch(after):
            raise ValueError
    except (ValueError, TypeError, UnicodeError, binascii.Error, orjson.JSONDecodeError):
        raise ValueError("cursor: not one this server gave") from None
    return since, after


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/cases", post_case, name="cases")
    app.router.add_get("/v1/cases/{case_id}", get_case, name="case")
    app.router.add_get("/v1/risky-venues", get_risky_venues, name="risky_venues")
