"""Citizens: phone OTP, health declarations, personal codes, and the phones that act for
a person (the door fallback is ``gateway.http.door``).

Everything personal is encrypted before storage sees it (``signing.personal``) and found
again through blind indexes; the phone of an OTP session is carried as its index only.
A person's code holds the pseudonymous person id, nothing else.

Who may act for a person: a verified phone linked to them, that is the phone whose
session declared them (a declaration's ``phone`` must be that phone: relatives share it)
and any phone of their own linked later with both phones' sessions. A declaration binds
(verified phone, national id) as a claim: declaring an id someone else claims, or whose
card was seen at a door, succeeds and gives its own person and code; the claims compete
until an official accepts one (``scangate claims``), so knowing someone's id number
neither takes over their code nor locks them out.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from typing import Final, TypeVar

import orjson
from aiohttp import web

from gateway.http.context import authenticate, client_index, json_response, read_json
from gateway.http.errors import (
    InvalidField,
    InvalidRequest,
    NotFound,
    OtpInvalid,
    OtpLocked,
    OtpPhoneCap,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from gateway.http.keys import BACKGROUND, KEYRING, METRICS, OTP, PERSONAL, SETTINGS, SMS, STORAGE
from gateway.http.otp import CHALLENGE, CODE_TTL_MS, OtpService, otp_message
from gateway.http.people import (
    Declaration,
    new_id,
    normalise_name,
    normalise_phone,
    parse_declaration,
)
from gateway.outbox.sms import SmsError, SmsSender
from gateway.pipeline.buffer import BufferUnavailable
from signing import Keyring
from signing.codes import ID_PATTERN
from signing.personal import PersonalData
from signing.qr import render_print
from storage import Storage
from storage.registry import ClaimRecord, PersonRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

PERSONAL_CODE_WIDTH_MM: Final = 50
CODE_IMAGE_TYPES: Final[dict[str, str]] = {"svg": "image/svg+xml", "png": "image/png"}
RETRY_AFTER_UNAVAILABLE_S: Final = 1


def _now_ms() -> int:
    return int(time.time() * 1000)


def _retry_after_s(wait_ms: int) -> int:
    return max(1, math.ceil(wait_ms / 1000))


def _iso(epoch_s: int) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat().replace("+00:00", "Z")


# -- OTP -------------------------------------------------------------------------------------


async def post_otp(request: web.Request) -> web.Response:
    """Send a one-time code to a phone: 202 with the code's challenge and reference, or 429
    when a limit of the client's address or the phone's SMS-cost cap refuses it."""
    app = request.app
    await authenticate(request, app[KEYRING])
    doc = await read_json(request)
    phone = normalise_phone(doc.get("phone") if isinstance(doc, dict) else None)
    personal, otp = app[PERSONAL], app[OTP]
    sent = await _redis(
        otp.issue(personal.blind_index("phone", phone), client_index(request, personal), _now_ms())
    )
    app[METRICS].otp_sends.labels(sent.outcome).inc()
    retry_after_s = _retry_after_s(sent.wait_ms)
    limits = otp.limits
    if sent.outcome == "address_limit":
        raise RateLimited(
            "too many codes asked from this address; try later", retry_after_s=retry_after_s
        )
    if sent.outcome == "phone_address_limit":
        raise RateLimited(
            f"at most {limits.pair_sends} codes for one phone from this address in "
            f"{_duration(limits.window_ms)}; try later",
            retry_after_s=retry_after_s,
        )
    if sent.outcome == "phone_cap":
        # Nothing that names the phone: the alert (ScangateOtpPhoneCap) counts these.
        log.warning("a phone reached the SMS-cost cap of one-time codes (SCANGATE_OTP_PHONE_CAP)")
        raise OtpPhoneCap(
            f"this phone has been sent {limits.phone_cap} codes in "
            f"{_duration(limits.phone_cap_window_ms)}, the most allowed; try later",
            retry_after_s=retry_after_s,
        )
    app[BACKGROUND].spawn(_send_code(app[SMS], phone, otp_message(sent.code, sent.reference)))
    return json_response(
        {
            "status": "sent",
            "expires_in_s": CODE_TTL_MS // 1000,
            "challenge": sent.challenge,
            "reference": sent.reference,
        },
        status=202,
    )


async def _send_code(sms: SmsSender, phone: str, text: str) -> None:
    try:
        await sms.send(phone, text)
    except Exception as exc:
        # No phone and no code in the log: the person asks again. An SmsError's text is
        # safe to log; any other error's may quote the message, so only its type is.
        reason = str(exc) if isinstance(exc, SmsError) else type(exc).__name__
        log.warning("an OTP SMS was not delivered: %s", reason)


async def post_otp_verify(request: web.Request) -> web.Response:
    """Trade a phone's code for a session: 200, 401 ``otp_invalid`` or 429 ``otp_locked``.
    The code is checked against the phone's code that ``challenge`` names, or else the
    latest one asked from this client's address."""
    app = request.app
    app_id = await authenticate(request, app[KEYRING])
    doc = await read_json(request)
    if not isinstance(doc, dict):
        raise InvalidRequest('expected {"phone": ..., "code": ..., "challenge": ...}')
    phone = normalise_phone(doc.get("phone"))
    code = doc.get("code")
    if not isinstance(code, str) or len(code) != 6 or not code.isascii() or not code.isdigit():
        raise InvalidField("code", "the 6 digits of the SMS")
    challenge = doc.get("challenge")
    if challenge is not None and (
        not isinstance(challenge, str) or not CHALLENGE.fullmatch(challenge)
    ):
        raise InvalidField("challenge", "the challenge from the answer of POST /v1/otp")
    personal, otp = app[PERSONAL], app[OTP]
    phone_index = personal.blind_index("phone", phone)
    checked = await _redis(
        otp.check(phone_index, client_index(request, personal), code, challenge, _now_ms())
    )
    app[METRICS].otp_checks.labels(checked.outcome).inc()
    if checked.outcome == "invalid":
        raise OtpInvalid(
            "the code is wrong or has expired"
            if checked.tries_left
            else "the code is wrong or has expired; ask for a new code",
            extra={"tries_left": checked.tries_left},
        )
    if checked.outcome == "address_limit":
        raise OtpLocked(
            "too many wrong codes from this address; try later",
            retry_after_s=_retry_after_s(checked.wait_ms),
        )
    if checked.outcome == "phone_address_limit":
        raise OtpLocked(
            "too many wrong codes for this phone from this address; try later",
            retry_after_s=_retry_after_s(checked.wait_ms),
        )
    expires_s = int(time.time() + app[SETTINGS].session_ttl_s)
    return json_response(
        {"session": otp.new_session(phone_index, app_id, expires_s), "expires_at": _iso(expires_s)}
    )


def _duration(ms: int) -> str:
    """A window for people: "15 minutes", "1 day", "90 seconds"."""
    for unit_ms, unit in ((86_400_000, "day"), (3_600_000, "hour"), (60_000, "minute")):
        if ms >= unit_ms and ms % unit_ms == 0:
            n = ms // unit_ms
            return f"{n} {unit}" + ("s" if n != 1 else "")
    return f"{ms / 1000:g} seconds"


async def _redis(work: Awaitable[T]) -> T:
    """OTP state lives in Redis: when it is down, 503 with Retry-After, as for scans."""
    try:
        return await work
    except BufferUnavailable as exc:
        raise Unavailable(str(exc), retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from exc


def session_phone(request: web.Request, otp: OtpService, app_id: str) -> str:
    """The phone index of the request's ``X-Session``; 401 without a valid one."""
    token = request.headers.get("X-Session", "")
    phone_index = otp.session_phone(token, app_id, time.time())
    if phone_index is None:
        raise Unauthorized("a valid X-Session is needed: verify the phone at /v1/otp/verify")
    return phone_index


# -- declarations ----------------------------------------------------------------------------


def person_record(
    personal: PersonalData,
    person_id: str,
    national_id: str | None,
    full_name: str,
    birth_year: int | None,
    gender: str | None,
    phone: str | None,
    address: str | None,
    province: str | None,
    insurance: str | None,
    code: tuple[str, int, int] | None,
    created_at_ms: int,
) -> PersonRecord:
    def enc(value: str | None, field: str) -> bytes | None:
        return None if value is None else personal.encrypt(value, f"person.{field}", person_id)

    now = _now_ms()
    full_name_enc = enc(full_name, "full_name")
    assert full_name_enc is not None
    return PersonRecord(
        person_id=person_id,
        national_id_enc=enc(national_id, "national_id"),
        full_name_enc=full_name_enc,
        name_index=personal.blind_index("name", normalise_name(full_name)),
        birth_year=birth_year,
        gender=gender,
        phone_enc=enc(phone, "phone"),
        address_enc=enc(address, "address"),
        province=province,
        insurance_enc=enc(insurance, "insurance"),
        code_app_id=code[0] if code else None,
        code_issued_s=code[1] if code else None,
        code_expires_s=code[2] if code else None,
        created_at_ms=created_at_ms,
        updated_at_ms=now,
    )


async def declare(
    storage: Storage,
    keyring: Keyring,
    personal: PersonalData,
    app_id: str,
    declarer_index: str,
    form: Declaration,
    code_ttl_s: int,
) -> dict[str, str]:
    """Store a declaration made from a verified phone; ``{"person_id", "code",
    "expires_at"}``.

    The phone's own claim on ``form``'s national id is updated (a fresh code), or a new
    person and claim are made. Someone else's claim on the id never refuses this one: the
    claims compete until an official accepts one, and the conflict is audit-logged."""
    if personal.blind_index("phone", form.phone) != declarer_index:
        raise InvalidField(
            "phone",
            "must be the phone verified for this session (relatives share it; link a "
            "relative's own phone at /v1/people/{person_id}/phones once it is verified)",
        )
    national_index = personal.blind_index("national_id", form.national_id)
    issued_s = int(time.time())
    expires_s = issued_s + code_ttl_s
    mine = await storage.id_claim_of_phone(national_index, declarer_index)

    def record(person_id: str, created_at_ms: int) -> PersonRecord:
        return person_record(
            personal,
            person_id,
            form.national_id,
            form.full_name,
            form.birth_year,
            form.gender,
            form.phone,
            form.address,
            form.province,
            form.health_insurance_no,
            (app_id, issued_s, expires_s),
            created_at_ms,
        )

    if mine is None:
        now_ms = _now_ms()
        person_id = new_id("P")
        await storage.insert_person(record(person_id, now_ms))
        claim = ClaimRecord(new_id("K"), national_index, person_id, declarer_index, now_ms, "open")
        if await storage.add_id_claim(claim):
            await _audit_competing_claims(storage, app_id, claim)
        else:  # the same phone declared this id a moment ago: that claim stands
            await storage.forget_person(person_id)
            mine = await storage.id_claim_of_phone(national_index, declarer_index)
            assert mine is not None
    if mine is not None:
        person_id = mine.person_id
        existing = await storage.person(person_id)
        assert existing is not None
        await storage.update_person(record(person_id, existing.created_at_ms))
    await storage.link_phone(declarer_index, person_id)
    answers = orjson.dumps({"answers": form.answers, "on_behalf": form.on_behalf}).decode()
    await storage.add_declaration(
        person_id,
        app_id,
        _now_ms(),
        declarer_index,
        personal.encrypt(answers, "declaration.answers", person_id),
    )
    return {
        "person_id": person_id,
        "code": keyring.issue(app_id, "person", person_id, issued_s, code_ttl_s),
        "expires_at": _iso(expires_s),
    }


async def _audit_competing_claims(storage: Storage, app_id: str, claim: ClaimRecord) -> None:
    """A new claim on an id others claim too: kept, and logged for officials
    (``scangate claims list``). Ids only: the national id itself is never logged."""
    others = [
        c.claim_id
        for c in await storage.id_claims([claim.national_id_index])
        if c.claim_id != claim.claim_id
    ]
    if others:
        await storage.audit(
            f"app:{app_id}",
            "id_claim_conflict",
            claim.claim_id,
            f"person={claim.person_id} competes_with={','.join(others)}",
        )


async def post_declaration(request: web.Request) -> web.Response:
    app = request.app
    keyring = app[KEYRING]
    app_id = await authenticate(request, keyring)
    declarer = session_phone(request, app[OTP], app_id)
    today = dt.datetime.now(dt.UTC).date()
    form = parse_declaration(await read_json(request), today)
    created = await declare(
        app[STORAGE],
        keyring,
        app[PERSONAL],
        app_id,
        declarer,
        form,
        int(app[SETTINGS].person_code_ttl_s),
    )
    return json_response(created, status=201)


async def get_person_code(request: web.Request) -> web.Response:
    """The personal code as an image that prints 5 cm wide, for a phone linked to the person."""
    app = request.app
    keyring = app[KEYRING]
    app_id = await authenticate(request, keyring)
    phone_index = session_phone(request, app[OTP], app_id)
    fmt = request.match_info["format"]
    person_id = request.match_info["person_id"]
    if fmt not in CODE_IMAGE_TYPES:
        raise InvalidRequest("a personal code is .svg or .png")
    storage = app[STORAGE]
    if not ID_PATTERN.fullmatch(person_id) or not await storage.phone_linked(
        phone_index, person_id
    ):
        raise NotFound("no such person for this phone")
    person = await storage.person(person_id)
    assert person is not None
    now_s = int(time.time())
    issued, expires = person.code_issued_s, person.code_expires_s
    if issued is None or expires is None or expires <= now_s:
        issued, expires = now_s, now_s + int(app[SETTINGS].person_code_ttl_s)
        await storage.update_person(
            person._replace(code_app_id=app_id, code_issued_s=issued, code_expires_s=expires)
        )
    # The same issue and expiry times give the same code text (with the same key).
    code = keyring.issue(app_id, "person", person_id, issued, expires - issued)
    return web.Response(
        body=render_print(code, fmt, PERSONAL_CODE_WIDTH_MM),  # type: ignore[arg-type]
        headers={
            "Content-Type": CODE_IMAGE_TYPES[fmt],
            "Cache-Control": "no-store",
            "Expires-At": _iso(expires),
        },
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/otp", post_otp, name="otp")
    app.router.add_post("/v1/otp/verify", post_otp_verify, name="otp_verify")
    app.router.add_post("/v1/declarations", post_declaration, name="declarations")
    app.router.add_get("/v1/people/{person_id}/code.{format}", get_person_code, name="person_code")
    app.router.add_post("/v1/people/{person_id}/phones", post_person_phone, name="person_phones")


# -- a relative's own phone ------------------------------------------------------------------


async def post_person_phone(request: web.Request) -> web.Response:
    """Link another verified phone to a person a session's phone acts for: a relative
    declared from the family phone who has a phone of their own. Both phones prove
    themselves: ``X-Session`` is the linked phone's session, the body's ``session`` the new
    phone's (same app). The door then finds the person by either phone."""
    app = request.app
    otp = app[OTP]
    app_id = await authenticate(request, app[KEYRING])
    linked = session_phone(request, otp, app_id)
    doc = await read_json(request)
    token = doc.get("session") if isinstance(doc, dict) else None
    if not isinstance(token, str) or len(token) > 1024:
        raise InvalidField("session", "the new phone's session, from /v1/otp/verify")
    new_phone = otp.session_phone(token, app_id, time.time())
    if new_phone is None:
        raise InvalidField("session", "not a valid session of this app: verify the phone again")
    person_id = request.match_info["person_id"]
    storage = app[STORAGE]
    if not ID_PATTERN.fullmatch(person_id) or not await storage.phone_linked(linked, person_id):
        raise NotFound("no such person for this phone")
    await storage.link_phone(new_phone, person_id)
    return json_response({"person_id": person_id, "status": "linked"}, status=201)


# -- revealing contacts to officials -----------------------------------------------------------


async def reveal_contacts(
    storage: Storage,
    personal: PersonalData,
    person_ids: Sequence[str],
    actor: str,
    case_person_id: str,
) -> dict[str, tuple[str | None, str | None]]:
    """The names and phones of traced contacts, decrypted, for an official who asked for
    them (``--reveal``, ``?reveal=1``); audit-logged with how many were revealed. A person
    known only from an app's own codes (never declared here) has no details: (None, None)."""
    records = await storage.persons(sorted(set(person_ids)))
    revealed: dict[str, tuple[str | None, str | None]] = {}
    for record in records:
        owner = record.person_id
        name = personal.decrypt(record.full_name_enc, "person.full_name", owner)
        phone = (
            personal.decrypt(record.phone_enc, "person.phone", owner) if record.phone_enc else None
        )
        revealed[owner] = (name, phone)
    await storage.audit(
        actor, "reveal", case_person_id, f"contacts={len(set(person_ids))} known={len(revealed)}"
    )
    return revealed
