"""What the request handlers share: the helpers that authenticate a request, read its JSON
body and answer in JSON. The resources they use are under their own keys
(``gateway.http.keys``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.http.access import CALLER_APP
from gateway.http.addresses import address_bucket, client_address
from gateway.http.errors import MalformedJson, PayloadTooLarge, Unauthorized, UnsupportedMediaType
from gateway.http.keyring_refresh import KeyringRefresh
from gateway.http.keys import KEYRING_REFRESH, TOKEN_USES, TRUSTED_PROXIES
from gateway.http.last_use import LastUse
from signing import Keyring, Sealer
from signing.personal import PersonalData, new_data_key, open_data_key, seal_data_key
from storage import Storage

MAX_BODY_BYTES: Final = 1024 * 1024
JSON: Final = "application/json"
# Set as a plain header: aiohttp's content_type setter parses and rebuilds it each time.
JSON_HEADERS: Final = {"Content-Type": JSON}
# For answers no cache may keep (what an official reads: traces, cases, the audit log).
JSON_NO_STORE_HEADERS: Final = {"Content-Type": JSON, "Cache-Control": "no-store"}

# Set on a request by the web pages' endpoints (gateway.http.web.endpoints), which act as the
# configured web app: such a request carries no app token, and this is its caller.
ACTING_APP: Final = web.RequestKey("acting_app", str)


def client_index(request: web.Request, personal: PersonalData) -> str:
    """The blind index of the request's client address bucket: what every per-address
    limit counts (``gateway.http.addresses``), with nothing personal in the key."""
    trusted = request.app[TRUSTED_PROXIES]
    bucket = address_bucket(client_address(request, trusted))
    return personal.blind_index("client_address", bucket)


async def authenticate(request: web.Request, keyring: Keyring) -> str:
    """The app id of the request's bearer token (or of the web app, for the web pages).
    A revoked token is refused like an unknown one; a use of a live one is noted. A token
    not known is looked for again after a check of the keyring's store that began after
    it was first missed: an app just added works at once."""
    acting: str | None = request.get(ACTING_APP)
    if acting is not None:
        request[CALLER_APP] = acting
        return acting
    app = request.app
    return await app_of_token(request, keyring, app[KEYRING_REFRESH], app[TOKEN_USES])


async def app_of_token(
    request: web.Request, keyring: Keyring, refresh: KeyringRefresh, uses: LastUse
) -> str:
    """``authenticate``'s check of the bearer token, for a caller that holds the
    application's resources already (the scans, ``gateway.http.scans.ScanIntake``)."""
    app_id = app_of_known_token(request, keyring, uses)
    if app_id is None:
        app_id = await app_of_refreshed_token(request, keyring, refresh, uses)
    return app_id


async def app_of_refreshed_token(
    request: web.Request, keyring: Keyring, refresh: KeyringRefresh, uses: LastUse
) -> str:
    """The app id of a bearer token ``app_of_known_token`` did not know, looked for again
    after a check of the keyring's store that began after it was missed (an app just
    added works at once); Unauthorized when it is still unknown."""
    await refresh.since(asyncio.get_running_loop().time())
    app_id = app_of_known_token(request, keyring, uses)
    if app_id is None:
        raise Unauthorized("unknown or revoked token")
    return app_id


def app_of_known_token(request: web.Request, keyring: Keyring, uses: LastUse) -> str | None:
    """The app id of the request's bearer token if the keyring knows it now (its use
    noted), else None; Unauthorized when the request has no bearer token. Without an
    await: the scans try this first, and wait for a keyring check only for a token it
    does not know (``app_of_token``)."""
    header = request.headers.get("Authorization")
    if header is None:
        raise Unauthorized("missing Authorization: Bearer <app token>")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        raise Unauthorized("use Authorization: Bearer <app token>")
    found = keyring.token_for(token.strip())
    if found is None:
        return None
    uses.note(found.token_id, time.time())
    request[CALLER_APP] = found.app_id
    return found.app_id


async def authenticate_admin(request: web.Request, storage: Storage) -> str:
    """The admin name of the request's bearer token (``scangate admins add``), looked up
    in storage on every request (nothing cached), so ``scangate admins revoke`` holds at
    once."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    admin = (
        await storage.admin_for_token(token.strip())
        if scheme.lower() == "bearer" and 0 < len(token) <= 256
        else None
    )
    if admin is None:
        raise Unauthorized("an admin token is needed: Authorization: Bearer <admin token>")
    return admin


# What ``json_received`` answers for a body that has not all arrived yet.
NOT_RECEIVED: Final = object()


async def read_json(request: web.Request) -> Any:
    """The body as JSON: 415 unless JSON, 413 over the limit, 400 when it does not parse."""
    doc = json_received(request)
    return await json_awaited(request) if doc is NOT_RECEIVED else doc


async def json_awaited(request: web.Request) -> Any:
    """The body as JSON, read to its end: for one ``json_received`` found still
    arriving (which made the checks of its head already)."""
    try:
        body = await request.read()
    except web.RequestPayloadError:
        # A body that does not decode as its Content-Encoding says (or is cut short). The
        # rest of it will not decode either: end it here, so aiohttp does not try to read
        # it after the answer (and log the decoder's error), and close the connection.
        request.content.feed_eof()
        raise MalformedJson(
            "the body could not be read (check Content-Encoding)",
            headers={"Connection": "close"},
        ) from None
    return _parsed(body)


def json_received(request: web.Request) -> Any:
    """``read_json`` without an await: the body as JSON when all of it has arrived (the
    common case, a small request in one packet), taken as it lies, without ``read()``'s
    awaits and copies; else ``NOT_RECEIVED``. A compressed body is decompressed as it is
    read, so it is never taken here."""
    if request.content_type != JSON:
        raise UnsupportedMediaType("send Content-Type: application/json")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes")
    content = request.content
    if not content.is_eof() or "Content-Encoding" in request.headers:
        return NOT_RECEIVED
    body = content.read_nowait()
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes")
    return _parsed(body)


def _parsed(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJson(f"the body is not valid JSON: {exc.msg}") from None


def json_response(doc: Any, status: int = 200, *, no_store: bool = False) -> web.Response:
    headers = JSON_NO_STORE_HEADERS if no_store else JSON_HEADERS
    return web.Response(status=status, body=orjson.dumps(doc), headers=headers)


async def load_personal_data(storage: Storage, sealer: Sealer) -> PersonalData:
    """The data key from storage, made (and sealed under the master key) on first use."""
    sealed = await storage.sealed_data_key()
    if sealed is None:
        offered = seal_data_key(sealer, new_data_key())
        sealed = await storage.offer_sealed_data_key(offered, int(time.time() * 1000))
    return PersonalData(open_data_key(sealer, sealed))
