"""The venues of an app: register one, revoke its code, its poster, how many are inside,
and its door-staff tokens (made and revoked by the app, used by ``GET /v1/staff/venue``)."""

from __future__ import annotations

from typing import Final

from gateway.http.openapi.schemas import (
    APP,
    TIMESTAMP,
    VENUE_ID_MEMBER,
    Schema,
    _binary,
    _body_errors,
    _error,
    _format_param,
    _json,
    _json_body,
    _object,
    _parameter,
    _path_param,
    _text,
    _unauthorized,
)
from gateway.http.people import MAX_ADDRESS_CHARS, MAX_PROVINCE_CHARS, MAX_VENUE_NAME_CHARS
from gateway.http.venues import POSTER_TYPES, STAFF_TOKEN_PREFIX
from storage.models import VENUE_KINDS

VENUE_FORM: Final[Schema] = {
    "type": "object",
    "required": ["name", "phone", "address", "province"],
    "properties": {
        "name": _text(MAX_VENUE_NAME_CHARS),
        "phone": {"$ref": "#/components/schemas/Phone"},
        "address": _text(MAX_ADDRESS_CHARS),
        "province": _text(MAX_PROVINCE_CHARS),
        "kind": {"$ref": "#/components/schemas/VenueKind", "default": "other"},
    },
}

VENUE_ID: Final[Schema] = _parameter("VenueId")
NO_SUCH_VENUE: Final = _error(404, "no such venue, or another app's", "not_found")

SCHEMAS: Final[dict[str, Schema]] = {
    "VenueForm": VENUE_FORM,
    "VenueKind": {"type": "string", "enum": list(VENUE_KINDS)},
}

PATHS: Final[dict[str, Schema]] = {
    "/v1/venues": {
        "post": {
            "operationId": "postVenue",
            "tags": ["venues"],
            "summary": "Register a venue of the calling app",
            "security": APP,
            "requestBody": _json_body("VenueForm"),
            "responses": {
                "201": _json(
                    _object({**VENUE_ID_MEMBER, "code": {"$ref": "#/components/schemas/Code"}}),
                    "The venue and its code",
                ),
                **_body_errors("malformed_json", "invalid_field", "invalid_phone"),
                **_unauthorized("no app token, or an unknown one"),
            },
        }
    },
    "/v1/venues/{venue_id}": {
        "delete": {
            "operationId": "deleteVenue",
            "tags": ["venues"],
            "summary": "Revoke the venue's code: scans with it are rejected (revoked)",
            "security": APP,
            "parameters": [VENUE_ID],
            "responses": {
                "200": _json(_object({**VENUE_ID_MEMBER, "revoked": {"const": True}}), "Revoked"),
                **_unauthorized("no app token, or an unknown one"),
                **NO_SUCH_VENUE,
            },
        }
    },
    "/v1/venues/{venue_id}/staff-tokens": {
        "post": {
            "operationId": "postStaffToken",
            "tags": ["venues"],
            "summary": "A door-staff token for manual check-ins at this venue only",
            "description": "The token is shown only now.",
            "security": APP,
            "parameters": [VENUE_ID],
            "responses": {
                "201": _json(
                    _object(
                        {
                            "token": {
                                "type": "string",
                                "pattern": f"^{STAFF_TOKEN_PREFIX}[A-Za-z0-9_-]+$",
                            },
                            "token_id": {"type": "string"},
                            **VENUE_ID_MEMBER,
                        }
                    ),
                    "The new token",
                ),
                **_unauthorized("no app token, or an unknown one"),
                **NO_SUCH_VENUE,
            },
        }
    },
    "/v1/venues/{venue_id}/staff-tokens/{token_id}": {
        "delete": {
            "operationId": "deleteStaffToken",
            "tags": ["venues"],
            "summary": "Revoke a door-staff token",
            "security": APP,
            "parameters": [VENUE_ID, _path_param("token_id", {"type": "string"})],
            "responses": {
                "200": _json(
                    _object({"token_id": {"type": "string"}, "revoked": {"const": True}}),
                    "Revoked",
                ),
                **_unauthorized("no app token, or an unknown one"),
                **_error(
                    404,
                    "no such venue (or another app's), or no such token at it",
                    "not_found",
                ),
            },
        }
    },
    "/v1/venues/{venue_id}/poster.{format}": {
        "get": {
            "operationId": "getPoster",
            "tags": ["venues"],
            "summary": "The venue's printable A4 poster, its code issued afresh",
            "security": APP,
            "parameters": [VENUE_ID, _format_param(POSTER_TYPES)],
            "responses": {
                "200": _binary(
                    POSTER_TYPES,
                    "The poster",
                    {"Content-Disposition": {"schema": {"type": "string"}}},
                ),
                **_error(400, "a poster is .svg, .png or .pdf", "invalid_request"),
                **_unauthorized("no app token, or an unknown one"),
                **NO_SUCH_VENUE,
            },
        }
    },
    "/v1/staff/venue": {
        "get": {
            "operationId": "getStaffVenue",
            "tags": ["door"],
            "summary": "The venue of a staff token, with a fresh code for manual check-ins",
            "security": [{"staffToken": []}],
            "responses": {
                "200": _json(
                    _object(
                        {
                            **VENUE_ID_MEMBER,
                            "name": {"type": "string"},
                            "address": {"type": "string"},
                            "province": {"type": "string"},
                            "kind": {"$ref": "#/components/schemas/VenueKind"},
                            "venue_code": {"$ref": "#/components/schemas/Code"},
                        }
                    ),
                    "The venue",
                ),
                **_unauthorized("no staff token, or an unknown or revoked one"),
            },
        }
    },
    "/v1/venues/{venue_id}/occupancy": {
        "get": {
            "operationId": "getOccupancy",
            "tags": ["venues"],
            "summary": "How many people are inside now (visits in progress)",
            "security": APP,
            "parameters": [VENUE_ID],
            "responses": {
                "200": _json(
                    _object(
                        {
                            **VENUE_ID_MEMBER,
                            "inside": {"type": "integer", "minimum": 0},
                            "at": TIMESTAMP,
                        }
                    ),
                    "The count now",
                ),
                **_unauthorized("no app token, or an unknown one"),
                **_error(404, "another app's registered venue", "not_found"),
            },
        }
    },
}
