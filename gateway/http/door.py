"""The door fallback: a check-in or check-out that door staff (a venue's staff token) or the
venue's app records for someone without a smartphone, found by phone or by the QR on
their ID card; then the same pipeline as any scan.

A look-up by phone could be an identity oracle, and a manual scan could write history, so
(issue 16):

- A manual scan is "now": its ``scanned_at`` within ``SCANGATE_DOOR_SCAN_WINDOW`` of
  receipt, either way, else ``rejected`` with ``not_now``.
- The answer says only what the door needs: recorded (200, ``accepted`` or
  ``duplicate``), unknown (404) or ambiguous (409). Never a person id or any detail.
- Look-ups are limited per staff token and per venue in fixed windows, counted in Redis
  so every worker shares them (``DoorLimits``). Per app there is only the metric
  ``scangate_door_lookups_total{app,outcome}`` and an alert: a limit there would let one
  leaked staff token stop every door of that app. Every look-up made is audit-logged;
  refused ones are counted.
- A staff token's scans are attributed to it (``device_id`` ``staff:<token id>``); a
  ``device_id`` in the body cannot replace that. An app's own are ``manual`` (or
  ``manual:<device_id>``), so they can never pass for a staff token's.
- An ID card seen at the door is recorded as that: a card seen here, under a
  pseudonymous person of its own (``door_cards``). It claims no identity and blocks no
  one's declaration of that id.
"""

from __future__ import annotations

import time
from typing import Final, Literal

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from gateway.http.context import authenticate, json_response, read_json
from gateway.http.declarations import RETRY_AFTER_UNAVAILABLE_S, person_record
from gateway.http.errors import (
    AmbiguousPerson,
    Forbidden,
    InvalidField,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unavailable,
)
from gateway.http.keys import (
    BUFFER,
    EVENT_RULES,
    KEYRING,
    METRICS,
    PERSONAL,
    REVOKED_VENUES,
    SETTINGS,
    STORAGE,
)
from gateway.http.people import IdCard, new_id, normalise_name, normalise_phone, parse_id_card
from gateway.http.venues import staff_venue
from gateway.pipeline.buffer import BufferUnavailable
from gateway.pipeline.events import Rejection, ScanEvent, check_code, check_envelope
from gateway.pipeline.keyspace import door_lookups_key
from gateway.settings import Settings
from signing.personal import PersonalData
from signing.text import has_unprintable
from storage import Storage

LookupOutcome = Literal["recorded", "unknown", "ambiguous", "refused_token", "refused_venue"]

# KEYS: the venue's counter, then the staff token's (absent for an app's look-up).
# ARGV: venue limit, token limit, window ms.
# -> {0, 0} counted | {1, ms left} the token is over | {2, ms left} the venue is over.
# A refused look-up counts against neither, so a token over its limit spends none of the
# budget its venue's other doors share.
_COUNT_LOOKUP: Final = """
local venue = tonumber(redis.call('GET', KEYS[1]) or '0')
if KEYS[2] then
  local token = tonumber(redis.call('GET', KEYS[2]) or '0')
  if token >= tonumber(ARGV[2]) then return {1, redis.call('PTTL', KEYS[2])} end
end
if venue >= tonumber(ARGV[1]) then return {2, redis.call('PTTL', KEYS[1])} end
for _, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('PEXPIRE', key, ARGV[3]) end
end
return {0, 0}
"""


class DoorLimits:
    """Person look-ups per staff token and per venue, in fixed windows shared through
    Redis by every gateway process."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._count = client.register_script(_COUNT_LOOKUP)
        self._window_ms = int(settings.door_lookup_window_s * 1000)
        self._per_venue = settings.door_lookups_per_venue
        self._per_token = settings.door_lookups_per_token

    async def take(self, venue_id: str, token_id: str | None, now_ms: int) -> tuple[int, int]:
        """Count one look-up: (0, 0) when allowed, else (1 token or 2 venue, ms to wait)."""
        window = now_ms // self._window_ms
        keys = [door_lookups_key(venue_id, "venue", window)]
        if token_id is not None:
            keys.append(door_lookups_key(venue_id, f"token:{token_id}", window))
        try:
            over, wait_ms = await self._count(
                keys=keys, args=[self._per_venue, self._per_token, self._window_ms]
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"Redis does not answer ({type(exc).__name__})",
                retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
            ) from exc
        return int(over), max(int(wait_ms), 1) if over else 0


DOOR_LIMITS: Final = web.AppKey("door_limits", DoorLimits)
"""The door's person look-up limits, counted in Redis; set by their cleanup context in
``gateway.http.app``. Kept beside the class, not in ``gateway.http.keys``: this module
imports that one, which therefore cannot import this one."""


def _now_ms() -> int:
    return int(time.time() * 1000)


async def find_person_by_phone(
    storage: Storage, personal: PersonalData, phone: str, full_name: str | None
) -> str:
    """The one person a verified phone acts for (with that name, if given)."""
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


async def card_holder(storage: Storage, personal: PersonalData, card: IdCard) -> str:
    """The pseudonymous person this ID card is recorded under at the doors; the first
    time it is seen, a new one (with the card's details, encrypted, for officials)."""
    indexes = [personal.blind_index("national_id", card.national_id)]
    if card.old_id:
        indexes.append(personal.blind_index("national_id", card.old_id))
    known = await storage.door_card_holder(indexes)
    if known is not None:
        return known
    person_id = new_id("P")
    now_ms = _now_ms()
    await storage.insert_person(
        person_record(
            personal,
            person_id,
            card.national_id,
            card.full_name,
            card.birth_year,
            card.gender,
            None,
            card.address,
            None,
            None,
            None,
            now_ms,
        )
    )
    holder = await storage.add_door_card(indexes, person_id, now_ms)
    if holder != person_id:  # the same card at two doors at once: the other was first
        await storage.forget_person(person_id)
    return holder


async def post_manual_scan(request: web.Request) -> web.Response:
    """A check-in or check-out, now, for a person found by phone or ID card."""
    app = request.app
    keyring, metrics = app[KEYRING], app[METRICS]
    staff = await staff_venue(request)
    app_id = staff.app_id if staff else await authenticate(request, keyring)
    doc = await read_json(request)
    if not isinstance(doc, dict):
        raise InvalidRequest("expected a JSON object")
    now_ms = _now_ms()
    envelope = check_envelope(doc, app[EVENT_RULES], now_ms)
    if isinstance(envelope, Rejection):
        return _rejected(envelope)
    window_ms = int(app[SETTINGS].door_scan_window_s * 1000)
    if abs(envelope.scanned_at_ms - now_ms) > window_ms:
        return _rejected(
            Rejection(
                envelope.event_id,
                "not_now",
                f"a manual scan is recorded as it happens: scanned_at within "
                f"{window_ms // 1000} s of now",
            )
        )
    verifier = keyring.verifier(app_id)
    venue = check_code(doc, "venue_code", verifier, envelope, now_ms, app[REVOKED_VENUES].ids)
    if isinstance(venue, Rejection):
        return _rejected(venue)
    if staff is not None and venue.id != staff.venue_id:
        raise Forbidden("this staff token is for another venue")
    has_phone, has_card = doc.get("phone") is not None, doc.get("id_card") is not None
    if has_phone == has_card:
        raise InvalidRequest('give either "phone" (with "full_name" if needed) or "id_card"')
    # Everything is checked before the look-up is counted: a malformed request spends none
    # of the budget.
    phone = card = full_name = None
    if has_phone:
        phone = normalise_phone(doc["phone"])
        full_name = doc.get("full_name")
        if full_name is not None and (
            not isinstance(full_name, str) or len(full_name) > 100 or has_unprintable(full_name)
        ):
            raise InvalidField("full_name", "the person's name as declared")
    else:
        card = parse_id_card(doc["id_card"])

    limits = app[DOOR_LIMITS]
    over, wait_ms = await limits.take(venue.id, staff.token_id if staff else None, now_ms)
    if over:
        outcome: LookupOutcome = "refused_token" if over == 1 else "refused_venue"
        metrics.door_lookups.labels(app_id, outcome).inc()
        raise RateLimited(
            "too many look-ups from this staff token; try again shortly"
            if over == 1
            else "too many look-ups at this venue; try again shortly",
            retry_after_s=max(1, -(-wait_ms // 1000)),
        )

    storage, personal = app[STORAGE], app[PERSONAL]
    actor = f"staff:{staff.token_id}" if staff else f"app:{app_id}"
    by = "phone" if phone is not None else "id_card"
    try:
        if phone is not None:
            person_id = await find_person_by_phone(storage, personal, phone, full_name)
        else:
            assert card is not None
            person_id = await card_holder(storage, personal, card)
    except (NotFound, AmbiguousPerson) as exc:
        outcome = "unknown" if isinstance(exc, NotFound) else "ambiguous"
        metrics.door_lookups.labels(app_id, outcome).inc()
        await _audit_lookup(storage, actor, venue.id, by, outcome, envelope.event_id)
        raise
    metrics.door_lookups.labels(app_id, "recorded").inc()
    await _audit_lookup(storage, actor, venue.id, by, "recorded", envelope.event_id)

    if staff is not None:
        device_id = f"staff:{staff.token_id}"
    else:
        device_id = f"manual:{envelope.device_id}" if envelope.device_id else "manual"
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
    try:
        (fresh,) = await app[BUFFER].append([event], now_ms)
    except BufferUnavailable as exc:
        metrics.redis_errors.inc()
        raise Unavailable(str(exc), retry_after_s=RETRY_AFTER_UNAVAILABLE_S) from exc
    status = "accepted" if fresh else "duplicate"
    metrics.count_event(app_id, event.kind, status, 1)
    return json_response({"event_id": event.event_id, "status": status})


async def _audit_lookup(
    storage: Storage, actor: str, venue_id: str, by: str, outcome: str, event_id: str
) -> None:
    await storage.audit(
        actor, "door_lookup", venue_id, f"by={by} outcome={outcome} event_id={event_id}"
    )


def _rejected(rejection: Rejection) -> web.Response:
    return json_response(
        {
            "event_id": rejection.event_id,
            "status": "rejected",
            "reason": rejection.reason,
            "detail": rejection.detail,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/scans/manual", post_manual_scan, name="manual_scans")
