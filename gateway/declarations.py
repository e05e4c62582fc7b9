"""Citizens: phone OTP, health declarations, personal codes, and manual check-ins at the
door for people without a smartphone.

Everything personal is encrypted before storage sees it (``signing.personal``) and found
again through blind indexes; the phone of an OTP session is carried as its index only.
A person's code holds the pseudonymous person id, nothing else.

Who may act for a person: a phone linked to them, that is the phone whose session
declared them and the phone written in their declaration. Declaring a national id that
is already known succeeds only from such a phone (it updates the person and issues a
fresh code); from any other it is ``already_declared``, so knowing someone's id number
is not enough to take over their code.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Sequence
from typing import Final, TypeVar

import orjson
from aiohttp import web

from signing import Keyring
from signing.codes import ID_PATTERN
from signing.personal import PersonalData
from signing.qr import render_print
from storage import Storage
from storage.registry import PersonRecord

from .buffer import BufferUnavailable
from .context import GATEWAY, Gateway, authenticate, json_response, read_json
from .errors import (
    AlreadyDeclared,
    AmbiguousPerson,
    Forbidden,
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
from .events import Rejection, ScanEvent, check_code, check_envelope, encode_event
from .keyspace import seen_field, shard_of
from .otp import CHALLENGE, CODE_TTL_MS, otp_message
from .people import (
    Declaration,
    IdCard,
    new_id,
    normalise_name,
    normalise_phone,
    parse_declaration,
    parse_id_card,
)
from .venues import staff_venue

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
    gateway = request.app[GATEWAY]
    authenticate(request, gateway.keyring)
    doc = await read_json(request)
    phone = normalise_phone(doc.get("phone") if isinstance(doc, dict) else None)
    personal, otp = gateway.need_personal(), gateway.otp
    assert otp is not None and gateway.sms is not None
    sent = await _redis(
        otp.issue(personal.blind_index("phone", phone), gateway.client_index(request), _now_ms())
    )
    gateway.metrics.otp_sends.labels(sent.outcome).inc()
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
    gateway.spawn(_send_code(gateway, phone, otp_message(sent.code, sent.reference)))
    return json_response(
        {
            "status": "sent",
            "expires_in_s": CODE_TTL_MS // 1000,
            "challenge": sent.challenge,
            "reference": sent.reference,
        },
        status=202,
    )


async def _send_code(gateway: Gateway, phone: str, text: str) -> None:
    assert gateway.sms is not None
    try:
        await gateway.sms.send(phone, text)
    except Exception as exc:
        # No phone and no code in the log: the person asks again.
        log.warning("an OTP SMS was not delivered: %s", exc)


async def post_otp_verify(request: web.Request) -> web.Response:
    """Trade a phone's code for a session: 200, 401 ``otp_invalid`` or 429 ``otp_locked``.
    The code is checked against the phone's code that ``challenge`` names, or else the
    latest one asked from this client's address."""
    gateway = request.app[GATEWAY]
    app_id = authenticate(request, gateway.keyring)
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
    personal, otp = gateway.need_personal(), gateway.otp
    assert otp is not None
    phone_index = personal.blind_index("phone", phone)
    checked = await _redis(
        otp.check(phone_index, gateway.client_index(request), code, challenge, _now_ms())
    )
    gateway.metrics.otp_checks.labels(checked.outcome).inc()
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
    expires_s = int(time.time() + gateway.settings.session_ttl_s)
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


def session_phone(request: web.Request, gateway: Gateway, app_id: str) -> str:
    """The phone index of the request's ``X-Session``; 401 without a valid one."""
    token = request.headers.get("X-Session", "")
    assert gateway.otp is not None
    phone_index = gateway.otp.session_phone(token, app_id, time.time())
    if phone_index is None:
        raise Unauthorized("a valid X-Session is needed: verify the phone at /v1/otp/verify")
    return phone_index


# -- declarations ----------------------------------------------------------------------------


def _person_record(
    personal: PersonalData,
    person_id: str,
    national_id_index: str | None,
    old_id_index: str | None,
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
        national_id_index=national_id_index,
        old_id_index=old_id_index,
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
    """Store a declaration for ``form``'s person (new, or known and linked to the declaring
    phone); ``{"person_id", "code", "expires_at"}``."""
    national_index = personal.blind_index("national_id", form.national_id)
    issued_s = int(time.time())
    expires_s = issued_s + code_ttl_s
    existing = await storage.person_by_national_index([national_index])
    person_id = existing.person_id if existing else new_id("P")

    def record(created_at_ms: int) -> PersonRecord:
        return _person_record(
            personal,
            person_id,
            national_index,
            None,
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

    if existing is None and not await storage.insert_person(record(_now_ms())):
        # Someone declared this national id a moment ago: carry on as if it were known.
        existing = await storage.person_by_national_index([national_index])
        assert existing is not None
        person_id = existing.person_id
    if existing is not None:
        if not await storage.phone_linked(declarer_index, person_id):
            raise AlreadyDeclared(
                "this national id was declared from another phone; declare from that phone"
            )
        await storage.update_person(record(existing.created_at_ms))
    await storage.link_phone(declarer_index, person_id)
    await storage.link_phone(personal.blind_index("phone", form.phone), person_id)
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


async def post_declaration(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    app_id = authenticate(request, gateway.keyring)
    declarer = session_phone(request, gateway, app_id)
    today = dt.datetime.now(dt.UTC).date()
    form = parse_declaration(await read_json(request), today)
    created = await declare(
        gateway.need_storage(),
        gateway.keyring,
        gateway.need_personal(),
        app_id,
        declarer,
        form,
        int(gateway.settings.person_code_ttl_s),
    )
    return json_response(created, status=201)


async def get_person_code(request: web.Request) -> web.Response:
    """The personal code as an image that prints 5 cm wide, for a phone linked to the person."""
    gateway = request.app[GATEWAY]
    app_id = authenticate(request, gateway.keyring)
    phone_index = session_phone(request, gateway, app_id)
    fmt = request.match_info["format"]
    person_id = request.match_info["person_id"]
    if fmt not in CODE_IMAGE_TYPES:
        raise InvalidRequest("a personal code is .svg or .png")
    storage = gateway.need_storage()
    if not ID_PATTERN.fullmatch(person_id) or not await storage.phone_linked(
        phone_index, person_id
    ):
        raise NotFound("no such person for this phone")
    person = await storage.person(person_id)
    assert person is not None
    now_s = int(time.time())
    issued, expires = person.code_issued_s, person.code_expires_s
    if issued is None or expires is None or expires <= now_s:
        issued, expires = now_s, now_s + int(gateway.settings.person_code_ttl_s)
        await storage.update_person(
            person._replace(code_app_id=app_id, code_issued_s=issued, code_expires_s=expires)
        )
    # The same issue and expiry times give the same code text (with the same key).
    code = gateway.keyring.issue(app_id, "person", person_id, issued, expires - issued)
    return web.Response(
        body=render_print(code, fmt, PERSONAL_CODE_WIDTH_MM),  # type: ignore[arg-type]
        headers={
            "Content-Type": CODE_IMAGE_TYPES[fmt],
            "Cache-Control": "no-store",
            "Expires-At": _iso(expires),
        },
    )


# -- manual check-ins at the door ------------------------------------------------------------


async def find_person_by_phone(
    storage: Storage, personal: PersonalData, phone: str, full_name: str | None
) -> str:
    candidates = await storage.persons_by_phone(personal.blind_index("phone", phone))
    if full_name is not None:
        wanted = personal.blind_index("name", normalise_name(full_name))
        candidates = [p for p in candidates if p.name_index == wanted]
    if not candidates:
        raise NotFound("nobody declared with this phone (and name)")
    if len(candidates) > 1:
        raise AmbiguousPerson(
            "several people declared with this phone: give full_name too"
            if full_name is None
            else "several people with this name declared with this phone"
        )
    return candidates[0].person_id


async def find_or_create_card_holder(storage: Storage, personal: PersonalData, card: IdCard) -> str:
    indexes = [personal.blind_index("national_id", card.national_id)]
    if card.old_id:
        indexes.append(personal.blind_index("national_id", card.old_id))
    known = await storage.person_by_national_index(indexes)
    if known is not None:
        return known.person_id
    person_id = new_id("P")
    created = await storage.insert_person(
        _person_record(
            personal,
            person_id,
            indexes[0],
            indexes[1] if card.old_id else None,
            card.national_id,
            card.full_name,
            card.birth_year,
            card.gender,
            None,
            card.address,
            None,
            None,
            None,
            _now_ms(),
        )
    )
    if not created:  # the same card at two doors at once
        known = await storage.person_by_national_index(indexes)
        assert known is not None
        return known.person_id
    return person_id


async def post_manual_scan(request: web.Request) -> web.Response:
    """A check-in or check-out for a person found by phone or ID card, by door staff (a
    staff token of that venue) or by the app; then the same pipeline as any scan."""
    gateway = request.app[GATEWAY]
    staff = await staff_venue(request)
    app_id = staff.app_id if staff else authenticate(request, gateway.keyring)
    doc = await read_json(request)
    if not isinstance(doc, dict):
        raise InvalidRequest("expected a JSON object")
    now_ms = _now_ms()
    envelope = check_envelope(doc, gateway.rules, now_ms)
    if isinstance(envelope, Rejection):
        return _verdict(envelope, None)
    verifier = gateway.keyring.verifier(app_id)
    venue = check_code(doc, "venue_code", verifier, envelope, now_ms, gateway.revoked_venues)
    if isinstance(venue, Rejection):
        return _verdict(venue, None)
    if staff is not None and venue.id != staff.venue_id:
        raise Forbidden("this staff token is for another venue")
    has_phone, has_card = doc.get("phone") is not None, doc.get("id_card") is not None
    if has_phone == has_card:
        raise InvalidRequest('give either "phone" (with "full_name" if needed) or "id_card"')
    storage, personal = gateway.need_storage(), gateway.need_personal()
    if has_phone:
        full_name = doc.get("full_name")
        if full_name is not None and (not isinstance(full_name, str) or len(full_name) > 100):
            raise InvalidField("full_name", "the person's name as declared")
        person_id = await find_person_by_phone(
            storage, personal, normalise_phone(doc["phone"]), full_name
        )
    else:
        person_id = await find_or_create_card_holder(
            storage, personal, parse_id_card(doc["id_card"])
        )
    device_id = envelope.device_id or (f"staff:{staff.token_id}" if staff else "manual")
    event = ScanEvent(
        app_id,
        envelope.event_id,
        envelope.kind,
        venue.id,
        person_id,
        envelope.scanned_at_ms,
        now_ms,
        device_id,
    )
    shard = shard_of(app_id, event.event_id, gateway.settings.shards)
    assert gateway.buffer is not None
    try:
        appended = await gateway.buffer.append(
            {shard: [(seen_field(app_id, event.event_id), encode_event(event))]}, now_ms
        )
    except BufferUnavailable as exc:
        gateway.metrics.redis_errors.inc()
        raise Unavailable(str(exc), retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from exc
    status = "accepted" if appended[shard][0] else "duplicate"
    gateway.metrics.count_events(Tally({(app_id, event.kind, status, ""): 1}))
    return json_response({"event_id": event.event_id, "status": status, "person_id": person_id})


def _verdict(rejection: Rejection, person_id: str | None) -> web.Response:
    return json_response(
        {
            "event_id": rejection.event_id,
            "status": "rejected",
            "reason": rejection.reason,
            "detail": rejection.detail,
            "person_id": person_id,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/otp", post_otp, name="otp")
    app.router.add_post("/v1/otp/verify", post_otp_verify, name="otp_verify")
    app.router.add_post("/v1/declarations", post_declaration, name="declarations")
    app.router.add_get("/v1/people/{person_id}/code.{format}", get_person_code, name="person_code")
    app.router.add_post("/v1/scans/manual", post_manual_scan, name="manual_scans")


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
