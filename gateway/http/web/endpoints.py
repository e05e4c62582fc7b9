"""The same-origin endpoints behind the citizen and venue pages (``/web/api/…``).

They act, inside the server, as the app named by ``SCANGATE_WEB_APP``: a browser never
holds an app token. Most are the API's own handlers, run with that app as the caller
(``ACTING_APP``), so a form is validated exactly as the API validates and refused with
the API's error bodies. Every state-changing call must pass the CSRF check
(``security.check_same_origin``).

Venue registration is stricter than the API's, since the caller is anyone on the web and
not a trusted app: the venue's phone must be the phone the visitor verified by SMS. Door-
staff tokens are not made here: a staff token can check anyone in by phone number, so it
comes from the operator (``scangate venues staff-token``) or a trusted app, never from a
verified SIM alone.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from gateway.http.addresses import address_bucket, client_address
from gateway.http.context import ACTING_APP, json_response, read_json
from gateway.http.declarations import (
    get_person_code,
    post_declaration,
    post_otp,
    post_otp_verify,
    session_phone,
)
from gateway.http.errors import ApiError, Forbidden, RateLimited
from gateway.http.keys import KEYRING, OTP, PERSONAL, SETTINGS, STORAGE, TRUSTED_PROXIES
from gateway.http.people import parse_venue
from gateway.http.ratelimit import TokenBuckets
from gateway.http.venues import get_poster, register_venue

from .pages import web_app_problem
from .security import check_same_origin

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebAppUnset(ApiError):
    status, code = 503, "web_app_unset"


def web_app(app: web.Application) -> str:
    """The app the pages act as; WebAppUnset when the operator has not set one up."""
    settings = app[SETTINGS]
    problem = web_app_problem(settings, app[KEYRING])
    if problem is not None or settings.web_app is None:
        raise WebAppUnset(
            "the web pages are off here: set SCANGATE_WEB_APP to an app id"
            if problem == "web.unset"
            else "SCANGATE_WEB_APP names an app that does not exist: scangate apps add it"
        )
    return settings.web_app


# The public poster route takes no session: a limit per client address keeps one client
# from keeping the render threads busy (it gets 429), while a venue's owner fetching its
# poster in three formats a few times over never meets it.
POSTER_RATE_PER_S: Final = 0.5
POSTER_BURST: Final = 10


def per_address(handler: Handler, buckets: TokenBuckets) -> Handler:
    """``handler`` behind a token bucket per client address (an IPv4 address, an IPv6
    /64; behind ``SCANGATE_TRUSTED_PROXIES``, the client they name)."""

    async def limited(request: web.Request) -> web.StreamResponse:
        trusted = request.app[TRUSTED_PROXIES]
        bucket = address_bucket(client_address(request, trusted))
        wait_s = buckets.take(bucket, 1, time.monotonic())
        if wait_s:
            raise RateLimited(
                "too many requests from this address; try again shortly",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        return await handler(request)

    return limited


def as_web_app(handler: Handler) -> Handler:
    """``handler`` run with the web app as its caller, behind the CSRF check."""

    async def handle(request: web.Request) -> web.StreamResponse:
        app_id = web_app(request.app)
        if request.method not in ("GET", "HEAD"):
            check_same_origin(request, request.app[PERSONAL].web_key)
        request[ACTING_APP] = app_id
        return await handler(request)

    return handle


async def post_venue(request: web.Request) -> web.Response:
    """Register a venue whose phone is the verified phone of the request's session."""
    app = request.app
    app_id = request[ACTING_APP]
    verified = session_phone(request, app[OTP], app_id)
    form = parse_venue(await read_json(request))
    personal = app[PERSONAL]
    if not hmac.compare_digest(personal.blind_index("phone", form.phone), verified):
        raise Forbidden("a venue's phone must be the phone verified by SMS")
    created = await register_venue(app[STORAGE], app[KEYRING], personal, app_id, form)
    return json_response(created, status=201)


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/web/api/otp", as_web_app(post_otp), name="web_otp")
    router.add_post("/web/api/otp/verify", as_web_app(post_otp_verify), name="web_otp_verify")
    router.add_post("/web/api/declarations", as_web_app(post_declaration), name="web_declarations")
    router.add_get(
        "/web/api/people/{person_id}/code.{format}",
        as_web_app(get_person_code),
        name="web_person_code",
    )
    router.add_post("/web/api/venues", as_web_app(post_venue), name="web_venues")
    router.add_get(
        "/web/api/venues/{venue_id}/poster.{format}",
        per_address(as_web_app(get_poster), TokenBuckets(POSTER_RATE_PER_S, POSTER_BURST)),
        name="web_poster",
    )
