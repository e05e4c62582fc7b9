"""Venues: registration, revocation, door-staff tokens and posters (HTTP and CLI share the
functions here).

A venue belongs to the app that registered it: only that app's token sees its poster or
hands out its staff tokens. Its code is issued by that app (``Keyring.issue``) and issued
again, with the app's active key, whenever a poster is rendered, so a poster printed
after a key rotation carries a code of the current key. A revoked venue's code is refused
at scan time with ``revoked`` (``gateway.http.keys.REVOKED_VENUES``).

A staff token (``sgs_…``) lets a door device make manual check-ins at one venue and
nothing else; it is stored as a SHA-256 hash, looked up by that hash, and revocable.
"""

from __future__ import annotations

import secrets
import time
from typing import Final

from aiohttp import web

from gateway.http.access import CALLER_APP
from gateway.http.context import authenticate, json_response, read_json
from gateway.http.errors import InvalidRequest, NotFound, Unauthorized
from gateway.http.keys import KEYRING, PERSONAL, POSTERS, REVOKED_VENUES, STORAGE
from gateway.http.people import VenueForm, new_id, parse_venue
from gateway.http.posters import poster_code
from signing import Keyring, hash_token
from signing.codes import ID_PATTERN
from signing.personal import PersonalData
from signing.poster import PosterFormat, render_poster
from storage import Storage
from storage.registry import StaffTokenRecord, VenueRecord
from storage.times import format_time_ms

STAFF_TOKEN_PREFIX: Final = "sgs_"  # noqa: S105 - a label, not a secret
POSTER_TYPES: Final[dict[str, str]] = {
    "svg": "image/svg+xml",
    "png": "image/png",
    "pdf": "application/pdf",
}


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- what the API and the CLI share ---------------------------------------------------------


async def register_venue(
    storage: Storage, keyring: Keyring, personal: PersonalData, app_id: str, form: VenueForm
) -> dict[str, str]:
    """Store a new venue of ``app_id``; ``{"venue_id", "code"}``."""
    keyring.verifier(app_id)  # an unknown app fails here, before anything is stored
    venue_id = new_id("V")
    await storage.add_venue(
        VenueRecord(
            venue_id=venue_id,
            app_id=app_id,
            name=form.name,
            phone_enc=personal.encrypt(form.phone, "venue.phone", venue_id),
            address=form.address,
            province=form.province,
            kind=form.kind,
            created_at_ms=_now_ms(),
        )
    )
    return {"venue_id": venue_id, "code": keyring.issue(app_id, "venue", venue_id)}


async def owned_venue(storage: Storage, venue_id: str, app_id: str | None) -> VenueRecord:
    """The registered venue; NotFound when there is none, or it is another app's (an app
    cannot learn which ids other apps registered)."""
    if not ID_PATTERN.fullmatch(venue_id):
        raise NotFound("no such venue")
    venue = await storage.venue(venue_id)
    if venue is None or (app_id is not None and venue.app_id != app_id):
        raise NotFound("no such venue")
    return venue


async def new_staff_token(storage: Storage, venue: VenueRecord) -> dict[str, str]:
    """A token for manual check-ins at this venue only; shown once."""
    token = STAFF_TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = new_id("T")
    await storage.add_staff_token(
        StaffTokenRecord(token_id, venue.venue_id, venue.app_id, _now_ms()), hash_token(token)
    )
    return {"token": token, "token_id": token_id, "venue_id": venue.venue_id}


def poster(keyring: Keyring, venue: VenueRecord, fmt: PosterFormat) -> bytes:
    """The venue's poster, drawn here and now (the CLI; the server keeps them: ``Posters``)."""
    return render_poster(
        poster_code(keyring, venue),
        venue_name=venue.name,
        address=venue.address,
        province=venue.province,
        app_name=keyring.app_name(venue.app_id),
        fmt=fmt,
    )


# -- HTTP ------------------------------------------------------------------------------------


async def post_venue(request: web.Request) -> web.Response:
    app = request.app
    keyring = app[KEYRING]
    app_id = await authenticate(request, keyring)
    form = parse_venue(await read_json(request))
    created = await register_venue(app[STORAGE], keyring, app[PERSONAL], app_id, form)
    return json_response(created, status=201)


async def delete_venue(request: web.Request) -> web.Response:
    """Revoke the venue's code (its owner app only)."""
    app = request.app
    app_id = await authenticate(request, app[KEYRING])
    storage = app[STORAGE]
    venue = await owned_venue(storage, request.match_info["venue_id"], app_id)
    await storage.revoke_venue(venue.venue_id, _now_ms())
    # This process refuses it at once; the others within their refresh interval.
    app[REVOKED_VENUES].add(venue.venue_id)
    app[POSTERS].drop_venue(venue.venue_id)
    return json_response({"venue_id": venue.venue_id, "revoked": True})


async def post_staff_token(request: web.Request) -> web.Response:
    app_id = await authenticate(request, request.app[KEYRING])
    storage = request.app[STORAGE]
    venue = await owned_venue(storage, request.match_info["venue_id"], app_id)
    return json_response(await new_staff_token(storage, venue), status=201)


async def delete_staff_token(request: web.Request) -> web.Response:
    app_id = await authenticate(request, request.app[KEYRING])
    storage = request.app[STORAGE]
    venue = await owned_venue(storage, request.match_info["venue_id"], app_id)
    token_id = request.match_info["token_id"]
    if not any(t.token_id == token_id for t in await storage.staff_tokens(venue.venue_id)):
        raise NotFound("no such staff token at this venue")
    await storage.revoke_staff_token(token_id, _now_ms())
    return json_response({"token_id": token_id, "revoked": True})


async def get_poster(request: web.Request) -> web.Response:
    app = request.app
    keyring = app[KEYRING]
    app_id = await authenticate(request, keyring)
    fmt = request.match_info["format"]
    if fmt not in POSTER_TYPES:
        raise InvalidRequest("a poster is .svg, .png or .pdf")
    venue = await owned_venue(app[STORAGE], request.match_info["venue_id"], app_id)
    if venue.revoked_at_ms is not None or venue.venue_id in app[REVOKED_VENUES].ids:
        app[POSTERS].drop_venue(venue.venue_id)
        raise NotFound("this venue's code is revoked: it has no poster")
    body = await app[POSTERS].poster(keyring, venue, fmt)  # type: ignore[arg-type]
    return web.Response(
        body=body,
        headers={
            "Content-Type": POSTER_TYPES[fmt],
            "Content-Disposition": f'inline; filename="poster-{venue.venue_id}.{fmt}"',
        },
    )


async def staff_venue(request: web.Request) -> StaffTokenRecord | None:
    """The staff token of the request, if it bears one (``Bearer sgs_…``); Unauthorized
    when it does but the token is unknown or revoked."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(STAFF_TOKEN_PREFIX):
        return None
    if len(token) > 256:
        raise Unauthorized("unknown token")
    record = await request.app[STORAGE].staff_token(hash_token(token))
    if record is None:
        raise Unauthorized("unknown or revoked staff token")
    request[CALLER_APP] = record.app_id
    return record


async def get_occupancy(request: web.Request) -> web.Response:
    """How many people are inside a venue now: the visits in progress (checked in, not yet
    out, within the maximum stay). For the app that registered the venue only: a count of
    people at a place is not for everyone to poll."""
    app_id = await authenticate(request, request.app[KEYRING])
    storage = request.app[STORAGE]
    venue = await owned_venue(storage, request.match_info["venue_id"], app_id)
    now_ms = _now_ms()
    visits = await storage.venue_visits(venue.venue_id, now_ms, now_ms)
    inside = {v.person_id for v in visits if v.checkin_at_ms <= now_ms < v.checkout_at_ms}
    return json_response(
        {"venue_id": venue.venue_id, "inside": len(inside), "at": format_time_ms(now_ms)}
    )


async def get_staff_venue(request: web.Request) -> web.Response:
    """The venue of a staff token, with a code for it: what a door device needs to make
    manual check-ins (``POST /v1/scans/manual`` wants the venue's code)."""
    staff = await staff_venue(request)
    if staff is None:
        raise Unauthorized("a staff token is needed: Authorization: Bearer sgs_...")
    venue = await owned_venue(request.app[STORAGE], staff.venue_id, staff.app_id)
    return json_response(
        {
            "venue_id": venue.venue_id,
            "name": venue.name,
            "address": venue.address,
            "province": venue.province,
            "kind": venue.kind,
            "venue_code": request.app[KEYRING].issue(venue.app_id, "venue", venue.venue_id),
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/venues", post_venue, name="venues")
    app.router.add_delete("/v1/venues/{venue_id}", delete_venue, name="venue")
    app.router.add_post("/v1/venues/{venue_id}/staff-tokens", post_staff_token, name="staff_tokens")
    app.router.add_delete(
        "/v1/venues/{venue_id}/staff-tokens/{token_id}", delete_staff_token, name="staff_token"
    )
    app.router.add_get("/v1/venues/{venue_id}/poster.{format}", get_poster, name="poster")
    app.router.add_get("/v1/staff/venue", get_staff_venue, name="staff_venue")
    app.router.add_get("/v1/venues/{venue_id}/occupancy", get_occupancy, name="occupancy")
