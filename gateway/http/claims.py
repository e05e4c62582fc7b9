"""Identity claims for officials: the national ids claimed by more than one declaration,
accepting one claim, and tracing by national id (HTTP and CLI share the functions here).

A declaration binds (verified phone, national id) to a person as a claim; an ID card seen
at a door is recorded under a pseudonymous person of its own (``gateway.http.door``). Neither
is a fact, and neither locks anyone out: when several claims name one id they compete
until an official accepts one (the others are rejected). Every read and every resolution
here is audit-logged, by ids only.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.http.context import JSON, authenticate_admin, json_response, read_json
from gateway.http.declarations import reveal_contacts
from gateway.http.errors import InvalidRequest, NotFound, UnknownPerson
from gateway.http.keys import PERSONAL, STORAGE, TRACE_STORAGE
from gateway.http.people import national_id, normalise_phone
from gateway.http.trace import DEFAULT_PAGE_ROWS, trace_query
from signing.codes import ID_PATTERN
from signing.personal import BLIND_INDEX_HEX, PersonalData
from storage import Storage
from storage.registry import ClaimRecord
from storage.times import format_time_ms
from storage.tracing import encode_cursor, rows_to_json

DEFAULT_CLAIM_GROUPS: Final = 500
MAX_CLAIM_GROUPS: Final = 5000
_BLIND_INDEX: Final = re.compile(f"[0-9a-f]{{{BLIND_INDEX_HEX}}}")


def _now_ms() -> int:
    return int(time.time() * 1000)


def claim_json(claim: ClaimRecord, group: str) -> dict[str, Any]:
    """A claim as officials see it: ids and times, never the national id or its index."""
    return {
        "claim_id": claim.claim_id,
        "competing_group": group,
        "person_id": claim.person_id,
        "claimed_at": format_time_ms(claim.claimed_at_ms),
        "state": claim.state,
        "resolved_by": claim.resolved_by,
        "resolved_at": (
            format_time_ms(claim.resolved_at_ms) if claim.resolved_at_ms is not None else None
        ),
    }


async def contested_claims(
    storage: Storage,
    personal: PersonalData,
    actor: str,
    *,
    include_resolved: bool = False,
    reveal: bool = False,
    after: str = "",
    groups: int | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Claims on ids that more than one declaration claims, grouped (``competing_group``
    is the first claim of the group); unresolved groups only unless ``include_resolved``.
    With ``reveal``, each claimant's declared name and phone, decrypted (audit-logged).
    A page of ``groups`` ids after ``after`` (all when None), and the id to page on from
    (None after the last)."""
    # One group more than asked for, to know whether another page follows.
    claims = await storage.contested_claims(
        include_resolved, after, None if groups is None else groups + 1
    )
    ids = sorted({c.national_id_index for c in claims})
    more = groups is not None and len(ids) > groups
    if more:
        assert groups is not None
        kept = set(ids[:groups])
        claims = [c for c in claims if c.national_id_index in kept]
    listed: list[dict[str, Any]] = []
    group_of: dict[str, str] = {}
    for claim in claims:
        group = group_of.setdefault(claim.national_id_index, claim.claim_id)
        listed.append(claim_json(claim, group))
    await storage.audit(actor, "id_claims_read", "contested", f"claims={len(listed)}")
    if reveal and claims:
        revealed = await reveal_contacts(
            storage, personal, [c.person_id for c in claims], actor, "claims"
        )
        for item in listed:
            item["full_name"], item["phone"] = revealed.get(item["person_id"], (None, None))
    return listed, (ids[groups - 1] if more and groups is not None else None)


async def accept_claim(storage: Storage, claim_id: str, actor: str) -> dict[str, Any]:
    """Accept one claim and reject the others on its id; audit-logged."""
    claim = await storage.id_claim(claim_id) if ID_PATTERN.fullmatch(claim_id) else None
    if claim is None:
        raise NotFound("no such claim")
    await storage.accept_id_claim(claim_id, actor, _now_ms())
    rejected = [
        c.claim_id
        for c in await storage.id_claims([claim.national_id_index])
        if c.claim_id != claim_id and c.state == "rejected"
    ]
    await storage.audit(
        actor,
        "id_claim_accept",
        claim_id,
        f"person={claim.person_id} rejected={','.join(rejected) or '-'}",
    )
    return {"claim_id": claim_id, "person_id": claim.person_id, "rejected": rejected}


async def trace_search(
    storage: Storage,
    personal: PersonalData,
    params: Mapping[str, str],
    actor: str,
    *,
    phone: str | None = None,
    id_number: str | None = None,
    reveal: bool = False,
    read_from: Storage | None = None,
    contacts_limit: int | None = None,
) -> dict[str, Any]:
    """Everyone a phone number or a national id number names (both, when both are given),
    their visits and their contacts: for a phone, every person declared from it (a family
    shares one); for an id, every claimant (any state) and the person its card was
    recorded under at the doors. Each person's trace is audit-logged as a trace of that
    person, and the search itself as ``trace_search`` (the number never is). UnknownPerson
    when nobody is found. With ``contacts_limit``, each person's contacts are the first
    page of their trace, and ``contacts_next`` on the person is the cursor of the rest
    (``GET /v1/trace/{person_id}?cursor=``); without, every contact."""
    found: list[dict[str, Any]] = []
    if id_number is not None:
        index = personal.blind_index("national_id", id_number)
        for claim in await storage.id_claims([index]):
            found.append(
                {
                    "person_id": claim.person_id,
                    "found_as": "claim",
                    "claim_id": claim.claim_id,
                    "state": claim.state,
                }
            )
        card = await storage.door_card_holder([index])
        if card is not None:
            found.append({"person_id": card, "found_as": "door_card"})
    if phone is not None:
        for record in await storage.persons_by_phone(personal.blind_index("phone", phone)):
            found.append({"person_id": record.person_id, "found_as": "phone"})
    # One entry per person: the first way they were found.
    found = list({p["person_id"]: p for p in reversed(found)}.values())[::-1]
    by = ",".join(k for k, v in (("phone", phone), ("national_id", id_number)) if v is not None)
    await storage.audit(
        actor, "trace_search", "-", f"by={by} persons={','.join(p['person_id'] for p in found)}"
    )
    if not found:
        raise UnknownPerson("nobody is known by that number")
    now_ms = _now_ms()
    visits: list[dict[str, Any]] = []
    contacts: list[dict[str, Any]] = []
    reader = read_from or storage
    for person in found:
        query = trace_query(person["person_id"], params, now_ms=now_ms)
        for visit in await reader.person_visits(person["person_id"], query.window_start_ms, now_ms):
            visits.append(
                {
                    "person_id": visit.person_id,
                    "venue_id": visit.venue_id,
                    "checkin_at": format_time_ms(visit.checkin_at_ms),
                    "checkout_at": format_time_ms(visit.checkout_at_ms),
                    "closed_by": visit.closed_by,
                }
            )
        if contacts_limit is None:
            rows = await storage.trace(query, actor=actor, read_from=read_from)
        else:
            rows, after = await storage.trace_page(
                query, actor, contacts_limit, read_from=read_from
            )
            person["contacts_next"] = None if after is None else encode_cursor(query, after)
        revealed = None
        if reveal and rows:
            revealed = await reveal_contacts(
                storage, personal, [r.person_id for r in rows], actor, person["person_id"]
            )
        venues = await storage.venue_labels([r.venue_id for r in rows])
        for item in rows_to_json(rows, revealed, venues):
            contacts.append({"case_person_id": person["person_id"], **item})
    return {"persons": found, "visits": visits, "contacts": contacts}


# -- HTTP (admin token) ----------------------------------------------------------------------


def _no_store(doc: Any) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), headers={"Content-Type": JSON, "Cache-Control": "no-store"}
    )


def _flag(value: object, name: str) -> bool:
    if value in (None, False, "0"):
        return False
    if value in (True, "1"):
        return True
    raise InvalidRequest(f"{name}: 0 or 1 (true or false in a body)")


async def get_claims(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    params = request.query
    try:
        after = _decode_claims_cursor(params["cursor"]) if "cursor" in params else ""
        limit_text = params.get("limit", str(DEFAULT_CLAIM_GROUPS))
        if not limit_text.isdecimal() or not 1 <= int(limit_text) <= MAX_CLAIM_GROUPS:
            raise ValueError(f"limit: 1 to {MAX_CLAIM_GROUPS} ids")
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    listed, last = await contested_claims(
        storage,
        request.app[PERSONAL],
        f"admin:{admin}",
        include_resolved=_flag(params.get("all"), "all"),
        reveal=_flag(params.get("reveal"), "reveal"),
        after=after,
        groups=int(limit_text),
    )
    cursor = None if last is None else base64.urlsafe_b64encode(last.encode()).decode()
    return _no_store({"claims": listed, "next": cursor})


def _decode_claims_cursor(text: str) -> str:
    try:
        after = base64.urlsafe_b64decode(text.encode("ascii")).decode("ascii")
    except (ValueError, UnicodeError, binascii.Error):
        raise ValueError("cursor: not one this server gave") from None
    if not _BLIND_INDEX.fullmatch(after):
        raise ValueError("cursor: not one this server gave")
    return after


async def post_accept_claim(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    return json_response(
        await accept_claim(storage, request.match_info["claim_id"], f"admin:{admin}")
    )


async def post_trace_search(request: web.Request) -> web.Response:
    """Trace by phone number and/or national id. The numbers come in the body, never the
    URL: URLs end up in access logs, proxies and browser history."""
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    doc = await read_json(request)
    if not isinstance(doc, dict):
        raise InvalidRequest('expected {"phone": ..., "national_id": ..., "days": ..., ...}')
    if doc.get("phone") is None and doc.get("national_id") is None:
        raise InvalidRequest('give "phone", "national_id", or both')
    phone = normalise_phone(doc["phone"]) if doc.get("phone") is not None else None
    id_number = national_id(doc["national_id"]) if doc.get("national_id") is not None else None
    params = {k: str(doc[k]) for k in ("days", "margin", "min_overlap", "depth") if k in doc}
    try:
        found = await trace_search(
            storage,
            request.app[PERSONAL],
            params,
            f"admin:{admin}",
            phone=phone,
            id_number=id_number,
            reveal=_flag(doc.get("reveal"), "reveal"),
            read_from=request.app[TRACE_STORAGE],
            contacts_limit=DEFAULT_PAGE_ROWS,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return _no_store(found)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/claims", get_claims, name="claims")
    app.router.add_post("/v1/claims/{claim_id}/accept", post_accept_claim, name="claim_accept")
    app.router.add_post("/v1/trace/search", post_trace_search, name="trace_search")
    # The search's first form, by national id only: kept for the tools that use it.
    app.router.add_post("/v1/trace/national-id", post_trace_search, name="trace_national_id")
