"""The OpenAPI 3.1 document of the whole HTTP API, and ``GET /openapi.json`` that serves it.

The document is Python data built from the code's own constants (patterns, limits, enums),
so a changed limit changes the document too. ``tests/test_openapi.py`` keeps it equal to
the router (every route, no other) and runs schemathesis against a live gateway with it:
every answer must have a status, content type, headers and body the document lists.

Statuses listed per operation are the ones its handler can give. Two more can answer any
request, documented once in ``info.description`` rather than on every operation: 404
``not_found`` for a path no route matches and 405 ``method_not_allowed`` for a method a path
does not take (both with the JSON error body).

The document is built here from one module per group of paths, each holding its operations
and the component schemas only it uses: ``scans`` (the apps' batches and the door),
``venues`` (venues and their staff tokens), ``citizens`` (one-time codes, declarations,
personal codes), ``cases`` (cases and risky venues), ``officials`` (trace, claims, the audit
log, reports) and ``operations`` (health, metrics, this document). What they share is in
``schemas``: the error body, the error answers and the parameters several operations take.

Every operation has one tag, of ``TAGS``: a client generator makes one module of each, and
the interactive documentation at ``/docs`` (``gateway.http.web.docs``) one section.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.http.context import JSON, MAX_BODY_BYTES
from gateway.http.keys import SETTINGS
from gateway.http.openapi import cases, citizens, officials, operations, scans, schemas, venues
from gateway.http.openapi.schemas import PUBLIC, RETRY_AFTER, Schema
from gateway.http.venues import STAFF_TOKEN_PREFIX
from gateway.logs import SANE_REQUEST_ID

OPENAPI_VERSION: Final = "3.1.0"
API_VERSION: Final = "1"
MAX_TOKEN_CHARS: Final = 256  # gateway.http.context.authenticate

# The operations' groups, in the order the documentation shows them.
TAGS: Final[list[dict[str, str]]] = [
    {"name": "scans", "description": "An app's batches of signed check-in and check-out events."},
    {
        "name": "venues",
        "description": "An app's venues: registration, revocation, posters, occupancy and "
        "door-staff tokens.",
    },
    {
        "name": "door",
        "description": "Check-ins at the door for people without a smartphone, by phone or "
        "ID card, and the venue of a staff token.",
    },
    {
        "name": "citizens",
        "description": "A phone proved by a one-time SMS code, health declarations, personal "
        "codes, and relatives' phones.",
    },
    {
        "name": "cases",
        "description": "Confirmed cases and the notices to their contacts; the venue windows "
        "where cases were present, for apps.",
    },
    {
        "name": "trace",
        "description": "Contact tracing, and a person's stored events and visits "
        "(admin token, audit-logged).",
    },
    {"name": "reports", "description": "Daily reports, as JSON, CSV or a chart."},
    {
        "name": "officials",
        "description": "National ids claimed more than once, and the audit log (admin token).",
    },
    {
        "name": "operations",
        "description": "Health, readiness, metrics, the pipeline's status and this document.",
    },
]


def _merged(*parts: Mapping[str, Schema]) -> dict[str, Schema]:
    """One mapping of the resources' paths (or component schemas), in the order given."""
    merged: dict[str, Schema] = {}
    for part in parts:
        for name, value in part.items():
            # A name in two modules would silently lose one of them: refuse it instead.
            if name in merged:
                raise ValueError(f"{name} is described by two modules")
            merged[name] = value
    return merged


def openapi_document(*, metrics: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route ``create_app`` registers: a fresh copy, so a
    caller that changes it (tools resolve references in place) changes nothing else.

    ``metrics=False`` leaves out ``/metrics``, which ``SCANGATE_METRICS_PORT`` moves to a
    listener of its own."""
    paths = _merged(
        scans.PATHS,
        venues.PATHS,
        citizens.PATHS,
        cases.PATHS,
        officials.PATHS,
        operations.PATHS,
    )
    if not metrics:
        del paths[operations.METRICS_PATH]
    document = {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "scangate",
            "version": API_VERSION,
            "summary": "Scan ingestion gateway for QR health check-in",
            "description": 'Every error answer is JSON: {"error": code, "detail": text}, '
            'plus "field" for invalid_field and "tries_left" for otp_invalid; 429 and 503 '
            "carry Retry-After. Any request can also get 404 not_found (no route matches the "
            "path) or 405 method_not_allowed (the path does not take the method). A body "
            "must be application/json (else 415) of at most "
            f"{MAX_BODY_BYTES} bytes (else 413). Every answer carries X-Request-Id: the "
            f"request's own X-Request-Id when it matches {SANE_REQUEST_ID.pattern}, else one "
            "made for it; the gateway's log lines about the request carry it.",
        },
        "servers": [{"url": "/"}],
        "security": PUBLIC,
        "tags": TAGS,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "appToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An app's API token (scangate apps add, apps token), at "
                    f"most {MAX_TOKEN_CHARS} characters. A token revoked with scangate apps "
                    "revoke-token gets 401 within 2 s.",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin token (scangate admins add). A token revoked "
                    "with scangate admins revoke gets 401 at once.",
                },
                "staffToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": f"{STAFF_TOKEN_PREFIX}…",
                    "description": "A door-staff token of one venue "
                    "(POST /v1/venues/{venue_id}/staff-tokens).",
                },
                "session": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Session",
                    "description": "A phone's session from POST /v1/otp/verify, bound to the "
                    "app that verified it.",
                },
            },
            "headers": {"RetryAfter": RETRY_AFTER},
            "responses": schemas.RESPONSES,
            "parameters": schemas.PARAMETERS,
            "schemas": _merged(
                schemas.SCHEMAS,
                scans.SCHEMAS,
                venues.SCHEMAS,
                citizens.SCHEMAS,
                cases.SCHEMAS,
                officials.SCHEMAS,
            ),
        },
    }
    return copy.deepcopy(document)


OPENAPI_BODY: Final = web.AppKey("openapi_body", bytes)


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_BODY], content_type=JSON)


def add_routes(app: web.Application) -> None:
    """``GET /openapi.json``: the document of this application's routes, serialised once."""
    app[OPENAPI_BODY] = orjson.dumps(openapi_document(metrics=not app[SETTINGS].metrics_port))
    app.router.add_get("/openapi.json", get_openapi, name="openapi")
