"""The OpenAPI 3.1 document of the whole HTTP API, and ``GET /openapi.json`` that serves it.

The document is Python data built from the code's own constants (patterns, limits, enums),
so a changed limit changes the document too. ``tests/test_openapi.py`` keeps it equal to
the router (every route, no other) and runs schemathesis against a live gateway with it:
every answer must have a status, content type, headers and body the document lists.

Statuses listed per operation are the ones its handler can give. Two more can answer any
request, documented once in ``info.description`` rather than on every operation: 404
``not_found`` for a path no route matches and 405 ``method_not_allowed`` for a method a path
does not take (both with the JSON error body).
"""

from __future__ import annotations

import copy
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.http.audit import DEFAULT_LIMIT, MAX_FILTER_CHARS, MAX_LIMIT
from gateway.http.cases import MAX_NOTE_CHARS
from gateway.http.context import JSON, MAX_BODY_BYTES
from gateway.http.declarations import CODE_IMAGE_TYPES
from gateway.http.otp import CHALLENGE, CODE_DIGITS, CODE_TTL_MS, REFERENCE_LENGTH, SESSION_PREFIX
from gateway.http.people import (
    ANSWER_KEYS,
    GENDERS,
    MAX_ADDRESS_CHARS,
    MAX_NAME_CHARS,
    MAX_PROVINCE_CHARS,
    MAX_RELATIONSHIP_CHARS,
    MAX_VENUE_NAME_CHARS,
)
from gateway.http.scans import MAX_EVENTS
from gateway.http.venues import POSTER_TYPES, STAFF_TOKEN_PREFIX
from gateway.pipeline.events import EVENT_ID_PATTERN, EVENT_REASONS, KINDS, MAX_DEVICE_ID_CHARS
from signing.codes import ID_PATTERN, MAX_CODE_CHARS, PREFIX_PATTERN
from storage.models import VENUE_KINDS
from storage.times import MAX_EPOCH_MS

Schema = dict[str, Any]

OPENAPI_VERSION: Final = "3.1.0"
API_VERSION: Final = "1"
METRICS_MEDIA_TYPE: Final = "text/plain"
MAX_ID_CARD_CHARS: Final = 400  # gateway.http.people.parse_id_card
MAX_SESSION_CHARS: Final = 512  # gateway.http.otp.OtpService.session_phone
MAX_TOKEN_CHARS: Final = 256  # gateway.http.context.authenticate

# Where the closed sets of error codes come from: gateway.errors.
_AUTH: Final = ("unauthorized",)
_TOO_LARGE: Final = ("payload_too_large",)
_NOT_JSON: Final = ("unsupported_media_type",)


def _full(pattern: str) -> str:
    """A Python ``fullmatch`` pattern as a JSON Schema pattern (which searches)."""
    return f"^(?:{pattern})$"


# -- schemas -----------------------------------------------------------------------------------

ID: Final[Schema] = {
    "type": "string",
    "pattern": _full(ID_PATTERN.pattern),
    "description": "A venue or person id: 1 to 16 characters of A-Z0-9.",
}
CODE: Final[Schema] = {
    "type": "string",
    "maxLength": MAX_CODE_CHARS,
    "pattern": _full(PREFIX_PATTERN.pattern + ":[A-Z2-7]+"),
    "description": "A signed code, PREFIX:BODY (BODY: uppercase Base32, no padding).",
}
TIMESTAMP: Final[Schema] = {"type": "string", "format": "date-time"}
# Vietnamese mobile numbers, with the separators gateway.people.normalise_phone drops.
_SEP = r"[\s.()-]*"
PHONE: Final[Schema] = {
    "type": "string",
    "maxLength": 32,
    "pattern": f"^{_SEP}(?:0|\\+{_SEP}8{_SEP}4){_SEP}[35789](?:{_SEP}[0-9]){{8}}{_SEP}$",
    "description": "A Vietnamese mobile number: 03, 05, 07, 08 or 09 and 8 more digits, "
    "as 0… or +84…; spaces, dots, dashes and parentheses are allowed.",
}
SCANNED_AT: Final[Schema] = {
    "description": "RFC 3339 with an offset, or epoch milliseconds.",
    "oneOf": [
        {"type": "string", "format": "date-time", "maxLength": 40},
        {"type": "integer", "minimum": 0, "maximum": MAX_EPOCH_MS},
    ],
}
EVENT_ID: Final[Schema] = {"type": "string", "pattern": _full(EVENT_ID_PATTERN.pattern)}
DEVICE_ID: Final[Schema] = {
    "type": "string",
    "pattern": f"^[\\x20-\\x7e]{{1,{MAX_DEVICE_ID_CHARS}}}$",
    "description": "Printable ASCII.",
}


def _text(max_chars: int, description: str = "") -> Schema:
    """Free text: trimmed, runs of white space made one, no control characters."""
    schema: Schema = {"type": "string", "minLength": 1, "maxLength": max_chars}
    note = (
        f"At most {max_chars} characters once white space is collapsed; not blank; no "
        "control or invisible characters."
    )
    schema["description"] = f"{description} {note}".strip()
    return schema


def _object(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    """An object of exactly these members (what the gateway answers)."""
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
        "additionalProperties": False,
    }


ERROR: Final[Schema] = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "A stable code."},
        "detail": {"type": "string", "description": "For people; never personal data."},
        "field": {"type": "string", "description": "The field that is wrong (invalid_field)."},
        "tries_left": {
            "type": "integer",
            "minimum": 0,
            "description": "Wrong codes this client may still send for the phone before it "
            "must wait, or (0) ask for a new code (otp_invalid).",
        },
    },
    "additionalProperties": False,
}

SCAN_EVENT: Final[Schema] = {
    "type": "object",
    "required": ["event_id", "kind", "venue_code", "person_code", "scanned_at"],
    "properties": {
        "event_id": EVENT_ID,
        "kind": {"enum": list(KINDS)},
        "venue_code": {"$ref": "#/components/schemas/Code"},
        "person_code": {"$ref": "#/components/schemas/Code"},
        "scanned_at": SCANNED_AT,
        "device_id": DEVICE_ID,
    },
    "description": "An event that breaks these rules is not a whole-request error: its "
    "verdict is rejected (invalid_event), and the others are taken.",
}

VERDICT_TAKEN: Final[Schema] = _object(
    {"event_id": {"type": "string"}, "status": {"enum": ["accepted", "duplicate"]}}
)
VERDICT_REJECTED: Final[Schema] = _object(
    {
        "event_id": {
            "type": ["string", "null"],
            "description": "null when the event's own id was missing or unreadable.",
        },
        "status": {"const": "rejected"},
        "reason": {"enum": list(EVENT_REASONS)},
        "detail": {"type": "string"},
    }
)

SCAN_RESULT: Final[Schema] = _object(
    {
        "accepted": {"type": "integer", "minimum": 0},
        "duplicates": {"type": "integer", "minimum": 0},
        "rejected": {"type": "integer", "minimum": 0},
        "results": {
            "type": "array",
            "description": "Every event's verdict, in request order.",
            "items": {
                "oneOf": [
                    {"$ref": "#/components/schemas/VerdictTaken"},
                    {"$ref": "#/components/schemas/VerdictRejected"},
                ]
            },
        },
    }
)

VENUE_FORM: Final[Schema] = {
    "type": "object",
    "required": ["name", "phone", "address", "province"],
    "properties": {
        "name": _text(MAX_VENUE_NAME_CHARS),
        "phone": {"$ref": "#/components/schemas/Phone"},
        "address": _text(MAX_ADDRESS_CHARS),
        "province": _text(MAX_PROVINCE_CHARS),
        "kind": {"enum": list(VENUE_KINDS), "default": "other"},
    },
}

DECLARATION: Final[Schema] = {
    "type": "object",
    "required": [
        "full_name",
        "national_id",
        "birth_year",
        "gender",
        "phone",
        "address",
        "province",
        "answers",
    ],
    "properties": {
        "full_name": _text(MAX_NAME_CHARS, "Letters, spaces and . ' - only."),
        "national_id": {
            "type": "string",
            "pattern": r"^\s*(?:[0-9]{12}|[0-9]{9}|[A-Za-z0-9]{6,9})\s*$",
            "description": "A 12-digit citizen id (CCCD), a 9-digit id (CMND) or a passport "
            "number (6 to 9 of A-Z0-9 with at least one letter).",
        },
        "birth_year": {
            "type": "integer",
            "minimum": 1900,
            "description": "From 1900 to the current year.",
        },
        "gender": {"enum": list(GENDERS)},
        "phone": {"$ref": "#/components/schemas/Phone"},
        "address": _text(MAX_ADDRESS_CHARS),
        "province": _text(MAX_PROVINCE_CHARS),
        "health_insurance_no": {
            "type": ["string", "null"],
            "pattern": r"^\s*(?:[A-Za-z0-9]{10}|[A-Za-z]{2}[0-9]{13})\s*$",
            "description": "10 characters, or 2 letters and 13 digits (BHYT).",
        },
        "on_behalf": {
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": MAX_RELATIONSHIP_CHARS,
            "description": "The relationship, when declaring for someone else.",
        },
        "answers": {
            "type": "object",
            "required": list(ANSWER_KEYS),
            "properties": {key: {"type": "boolean"} for key in ANSWER_KEYS},
            "additionalProperties": False,
        },
    },
}

MANUAL_SCAN: Final[Schema] = {
    "type": "object",
    "required": ["event_id", "kind", "venue_code", "scanned_at"],
    "properties": {
        "event_id": EVENT_ID,
        "kind": {"enum": list(KINDS)},
        "venue_code": {"$ref": "#/components/schemas/Code"},
        "scanned_at": SCANNED_AT,
        "device_id": DEVICE_ID,
        "phone": {"$ref": "#/components/schemas/Phone"},
        "full_name": {
            "type": ["string", "null"],
            "maxLength": MAX_NAME_CHARS,
            "description": "Needed when several people declared with that phone.",
        },
        "id_card": {
            "type": "string",
            "maxLength": MAX_ID_CARD_CHARS,
            "description": "The text of a chip ID card's QR: "
            "id|old id|name|ddmmyyyy|gender|address|issue date.",
        },
    },
    "oneOf": [{"required": ["phone"]}, {"required": ["id_card"]}],
    "description": 'Either "phone" or "id_card". An envelope or venue code that breaks the '
    "rules answers 200 with a rejected verdict, as in POST /v1/scans.",
}

# Recorded or rejected: never who was found (issue 16: the door learns no person id).
MANUAL_VERDICT: Final[Schema] = {
    "oneOf": [
        _object(
            {
                "event_id": {"type": "string"},
                "status": {"enum": ["accepted", "duplicate"]},
            }
        ),
        _object(
            {
                "event_id": {"type": ["string", "null"]},
                "status": {"const": "rejected"},
                "reason": {"enum": [*EVENT_REASONS, "not_now"]},
                "detail": {"type": "string"},
            }
        ),
    ]
}

CLAIM: Final[Schema] = _object(
    {
        "claim_id": {"$ref": "#/components/schemas/Id"},
        "competing_group": {"$ref": "#/components/schemas/Id"},
        "person_id": {"$ref": "#/components/schemas/Id"},
        "claimed_at": TIMESTAMP,
        "state": {"enum": ["open", "accepted", "rejected"]},
        "resolved_by": {"type": ["string", "null"]},
        "resolved_at": {"anyOf": [TIMESTAMP, {"type": "null"}]},
        "full_name": {"type": ["string", "null"]},
        "phone": {"type": ["string", "null"]},
    },
    required=["claim_id", "competing_group", "person_id", "claimed_at", "state"],
)

CONTACT: Final[Schema] = _object(
    {
        "person_id": {"$ref": "#/components/schemas/Id"},
        "venue_id": {"$ref": "#/components/schemas/Id"},
        "overlap_start": TIMESTAMP,
        "overlap_end": TIMESTAMP,
        "overlap_minutes": {"type": "number", "minimum": 0},
        "depth": {"enum": [1, 2]},
        "via": {
            "$ref": "#/components/schemas/Id",
            "description": "Depth-2 rows: the depth-1 contact they came through.",
        },
        "full_name": {"type": ["string", "null"], "description": "With reveal=1."},
        "phone": {"type": ["string", "null"], "description": "With reveal=1."},
    },
    required=["person_id", "venue_id", "overlap_start", "overlap_end", "overlap_minutes", "depth"],
)

# -- responses ---------------------------------------------------------------------------------

# What an official reads (a case, the audit log) is answered for no cache to keep.
NO_STORE: Final[dict[str, Schema]] = {
    "Cache-Control": {"required": True, "schema": {"const": "no-store"}}
}

AUDIT_ENTRY: Final[Schema] = _object(
    {
        "id": {"type": "integer", "minimum": 1, "description": "In the order of writing."},
        "at": TIMESTAMP,
        "actor": {"type": "string", "description": "admin:NAME, cli:USER, ..."},
        "action": {"type": "string", "description": "trace, reveal, case_read, ..."},
        "subject": {"type": "string", "description": "Whom or what it was about."},
        "detail": {"type": "string"},
    }
)

RETRY_AFTER: Final[Schema] = {
    "description": "Seconds to wait before retrying.",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}


def _json(schema: Schema, description: str, headers: dict[str, Schema] | None = None) -> Schema:
    response: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(status: int, description: str, *codes: str) -> dict[str, Schema]:
    """An error answer whose ``error`` is one of ``codes``; 429 and 503 say when to retry."""
    schema: Schema = {
        "allOf": [
            {"$ref": "#/components/schemas/Error"},
            {"properties": {"error": {"enum": list(codes)}}},
        ]
    }
    retry = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return {str(status): _json(schema, description, retry if status in (429, 503) else None)}


def _json_body(schema_name: str) -> Schema:
    return {
        "required": True,
        "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
    }


def _body_errors(*bad_request: str) -> dict[str, Schema]:
    """What reading a JSON body can answer, besides the handler's own 400s."""
    return {
        **_error(400, "the body does not parse, or breaks a rule", *bad_request),
        **_error(413, f"the body is over {MAX_BODY_BYTES} bytes", *_TOO_LARGE),
        **_error(415, "the body is not application/json", *_NOT_JSON),
    }


def _unauthorized(what: str, *codes: str) -> dict[str, Schema]:
    return _error(401, what, *(codes or _AUTH))


def _binary(types: dict[str, str], description: str, headers: dict[str, Schema]) -> Schema:
    return {
        "description": description,
        "headers": headers,
        "content": {media: {} for media in types.values()},
    }


def _path_param(name: str, schema: Schema, description: str = "") -> Schema:
    param: Schema = {"name": name, "in": "path", "required": True, "schema": schema}
    if description:
        param["description"] = description
    return param


def _format_param(types: dict[str, str]) -> Schema:
    return _path_param("format", {"enum": list(types)}, "The image format, as a file suffix.")


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


VENUE_ID: Final[Schema] = _path_param("venue_id", {"$ref": "#/components/schemas/Id"})
PERSON_ID: Final[Schema] = _path_param("person_id", {"$ref": "#/components/schemas/Id"})
NO_SUCH_VENUE: Final = _error(404, "no such venue, or another app's", "not_found")
APP: Final[list[dict[str, list[str]]]] = [{"appToken": []}]
ADMIN: Final[list[dict[str, list[str]]]] = [{"adminToken": []}]
APP_AND_SESSION: Final[list[dict[str, list[str]]]] = [{"appToken": [], "session": []}]
PUBLIC: Final[list[dict[str, list[str]]]] = []


# -- operations --------------------------------------------------------------------------------


def _paths(max_events: int) -> dict[str, Schema]:
    venue_id_object = {"venue_id": {"$ref": "#/components/schemas/Id"}}
    return {
        "/v1/scans": {
            "post": {
                "operationId": "postScans",
                "summary": "Post a batch of scans; every event's verdict in request order",
                "description": "A 2xx means every accepted event is in Redis.",
                "security": APP,
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "required": ["events"],
                                "properties": {
                                    "events": {
                                        "type": "array",
                                        "minItems": 1,
                                        "maxItems": max_events,
                                        "items": {"$ref": "#/components/schemas/ScanEvent"},
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/ScanResult"}, "The verdicts"),
                    **_body_errors("malformed_json", "invalid_request"),
                    **_unauthorized("no app token, or an unknown one"),
                    **_error(
                        413,
                        f"the body is over {MAX_BODY_BYTES} bytes, or over {max_events} events",
                        *_TOO_LARGE,
                    ),
                    **_error(429, "over the app's rate limit", "rate_limited"),
                    **_error(
                        503,
                        "Redis did not take the write, or the backlog is over its high-water mark",
                        "unavailable",
                        "backlog_full",
                    ),
                },
            }
        },
        "/v1/scans/manual": {
            "post": {
                "operationId": "postManualScan",
                "summary": "A check-in or check-out at the door, for a person found by "
                "phone or ID card",
                "description": "With the app's token, or a staff token of the venue. The "
                "scan is now: scanned_at within SCANGATE_DOOR_SCAN_WINDOW of receipt, else "
                "rejected with not_now. The answer never names the person. Look-ups are "
                "limited per staff token and per venue (429), and audit-logged.",
                "security": [{"appToken": []}, {"staffToken": []}],
                "requestBody": _json_body("ManualScan"),
                "responses": {
                    "200": _json(
                        {"$ref": "#/components/schemas/ManualVerdict"}, "The event's verdict"
                    ),
                    **_body_errors(
                        "malformed_json", "invalid_request", "invalid_field", "invalid_phone"
                    ),
                    **_unauthorized("no token, an unknown one, or a revoked staff token"),
                    **_error(403, "a staff token of another venue", "forbidden"),
                    **_error(404, "nobody declared with this phone (and name)", "not_found"),
                    **_error(
                        409,
                        "several people declared with this phone: give full_name",
                        "ambiguous_person",
                    ),
                    **_error(
                        429, "too many look-ups from this staff token or venue", "rate_limited"
                    ),
                    **_error(503, "Redis did not take the write", "unavailable"),
                },
            }
        },
        "/v1/trace/{person_id}": {
            "get": {
                "operationId": "getTrace",
                "summary": "Contacts of a person (audit-logged)",
                "security": [{"adminToken": []}],
                "parameters": [
                    PERSON_ID,
                    _query(
                        "days",
                        {"type": "integer", "minimum": 1, "maximum": 60, "default": 14},
                        "How many days back.",
                    ),
                    _query(
                        "margin",
                        {"type": "string", "pattern": r"^\s*[0-9]+(?:ms|s|m|h|d)\s*$"},
                        "Widen each visit by this much (default 60m, at most 24h).",
                    ),
                    _query(
                        "min_overlap",
                        {"type": "string", "pattern": r"^\s*[0-9]+(?:ms|s|m|h|d)\s*$"},
                        "Shortest overlap that counts (default 10m, at most 24h).",
                    ),
                    _query(
                        "depth", {"enum": [1, 2], "default": 1}, "1, or 2 for contacts of contacts."
                    ),
                    _query(
                        "reveal",
                        {"enum": [0, 1], "default": 0},
                        "1 adds full_name and phone to each row (audit-logged).",
                    ),
                    _query(
                        "format",
                        {"enum": ["json", "csv"], "default": "json"},
                        "csv: the same rows as a CSV file (as scangate trace --format csv).",
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "One row per pair of overlapping visits",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Contact"},
                                }
                            },
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    **_error(400, "a parameter breaks its rule", "invalid_request"),
                    **_unauthorized("no admin token, or an unknown one"),
                },
            }
        },
        "/v1/venues": {
            "post": {
                "operationId": "postVenue",
                "summary": "Register a venue of the calling app",
                "security": APP,
                "requestBody": _json_body("VenueForm"),
                "responses": {
                    "201": _json(
                        _object({**venue_id_object, "code": {"$ref": "#/components/schemas/Code"}}),
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
                "summary": "Revoke the venue's code: scans with it are rejected (revoked)",
                "security": APP,
                "parameters": [VENUE_ID],
                "responses": {
                    "200": _json(
                        _object({**venue_id_object, "revoked": {"const": True}}), "Revoked"
                    ),
                    **_unauthorized("no app token, or an unknown one"),
                    **NO_SUCH_VENUE,
                },
            }
        },
        "/v1/venues/{venue_id}/staff-tokens": {
            "post": {
                "operationId": "postStaffToken",
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
                                **venue_id_object,
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
                "summary": "The venue of a staff token, with a fresh code for manual check-ins",
                "security": [{"staffToken": []}],
                "responses": {
                    "200": _json(
                        _object(
                            {
                                **venue_id_object,
                                "name": {"type": "string"},
                                "address": {"type": "string"},
                                "province": {"type": "string"},
                                "kind": {"enum": list(VENUE_KINDS)},
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
                "summary": "How many people are inside now (visits in progress)",
                "security": APP,
                "parameters": [VENUE_ID],
                "responses": {
                    "200": _json(
                        _object(
                            {
                                **venue_id_object,
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
        "/v1/cases": {
            "post": {
                "operationId": "postCase",
                "summary": "Record a confirmed case; its contacts are notified (audit-logged)",
                "description": "Contacts: the trace over the 14 days before confirmed_at. "
                "Each is notified through every app with a webhook that posted their scans, "
                "else by SMS when a phone is on record. dry_run=1 stores and sends nothing.",
                "security": ADMIN,
                "parameters": [
                    _query(
                        "dry_run",
                        {"enum": [0, 1], "default": 0},
                        "1: list the contacts and notices; create and send nothing.",
                    )
                ],
                "requestBody": _json_body("CaseRequest"),
                "responses": {
                    "201": _json(
                        _object(
                            {
                                "case_id": {"$ref": "#/components/schemas/Id"},
                                "contacts": {"type": "integer", "minimum": 0},
                                "notices": {"type": "integer", "minimum": 0},
                            }
                        ),
                        "The case is recorded and its notices queued",
                    ),
                    "200": _json(
                        {
                            "oneOf": [
                                _object(
                                    {
                                        "contacts": {"type": "integer", "minimum": 0},
                                        "notices": {"type": "integer", "minimum": 0},
                                        "unreachable": {"type": "integer", "minimum": 0},
                                        "exposures": {
                                            "type": "array",
                                            "items": {"type": "object"},
                                        },
                                    }
                                ),
                                _object(
                                    {
                                        "case_id": {"$ref": "#/components/schemas/Id"},
                                        "contacts": {"type": "integer", "minimum": 0},
                                        "notices": {"type": "integer", "minimum": 0},
                                    }
                                ),
                            ]
                        },
                        "The dry run's preview; or, for a case already recorded with this "
                        "person and confirmed_at, that case (nothing is sent again)",
                    ),
                    **_body_errors("malformed_json", "invalid_request", "invalid_field"),
                    **_unauthorized("no admin token, or an unknown one"),
                },
            }
        },
        "/v1/cases/{case_id}": {
            "get": {
                "operationId": "getCase",
                "summary": "A case and each notice's delivery state (audit-logged)",
                "description": "Every read, found or not, is written to the audit log as "
                "case_read.",
                "security": ADMIN,
                "parameters": [_path_param("case_id", {"$ref": "#/components/schemas/Id"})],
                "responses": {
                    "200": _json({"type": "object"}, "The case", NO_STORE),
                    **_unauthorized("no admin token, or an unknown one"),
                    **_error(404, "no such case", "not_found"),
                },
            }
        },
        "/v1/risky-venues": {
            "get": {
                "operationId": "getRiskyVenues",
                "summary": "Venue windows where cases were present, without person ids",
                "description": "For matching on the device. Overlapping windows at a venue "
                "are merged; times are epoch milliseconds.",
                "security": APP,
                "parameters": [
                    _query(
                        "since",
                        {"type": "integer", "minimum": 0},
                        "Windows ending at or after this (epoch ms; default 14 days ago).",
                    )
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "array",
                            "items": _object(
                                {
                                    **venue_id_object,
                                    "from": {"type": "integer"},
                                    "to": {"type": "integer"},
                                    "level": {"enum": ["high", "low"]},
                                }
                            ),
                        },
                        "The windows",
                    ),
                    **_error(400, "since is not epoch milliseconds", "invalid_request"),
                    **_unauthorized("no app token, or an unknown one"),
                },
            }
        },
        "/v1/audit": {
            "get": {
                "operationId": "getAudit",
                "summary": "A page of the audit log, oldest first (this read is logged too)",
                "description": "Entries written at or after since, by id. A full page "
                "gives next_after: ask again with after=next_after for the next one. Entries "
                "older than SCANGATE_AUDIT_RETENTION (default one year) are deleted.",
                "security": ADMIN,
                "parameters": [
                    _query(
                        "since",
                        {"type": "string", "maxLength": 40},
                        "A duration back from now (7d, 12h), or a time (RFC 3339 with an "
                        "offset, or epoch ms); default 1d.",
                    ),
                    _query(
                        "actor",
                        {"type": "string", "minLength": 1, "maxLength": MAX_FILTER_CHARS},
                        "Only this actor (admin:NAME, cli:USER).",
                    ),
                    _query(
                        "action",
                        {"type": "string", "minLength": 1, "maxLength": MAX_FILTER_CHARS},
                        "Only this action (trace, reveal, case_read, ...).",
                    ),
                    _query(
                        "after",
                        {"type": "integer", "minimum": 0},
                        "Entries with an id above this (a previous page's next_after).",
                    ),
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIMIT,
                            "default": DEFAULT_LIMIT,
                        },
                        "At most this many entries.",
                    ),
                ],
                "responses": {
                    "200": _json(
                        _object(
                            {
                                "entries": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/AuditEntry"},
                                },
                                "next_after": {"type": ["integer", "null"]},
                            }
                        ),
                        "The page",
                        NO_STORE,
                    ),
                    **_error(400, "a parameter breaks its rule", "invalid_request"),
                    **_unauthorized("no admin token, or an unknown or revoked one"),
                },
            }
        },
        "/v1/reports/daily": {
            "get": {
                "operationId": "getDailyReport",
                "summary": "Per day and group: scans, check-ins, persons, visits, median "
                "stay, peak occupancy",
                "description": "Days in SCANGATE_TIMEZONE, at most 92.",
                "security": ADMIN,
                "parameters": [
                    _query("from", {"type": "string", "format": "date"}, "First day."),
                    _query("to", {"type": "string", "format": "date"}, "Last day."),
                    _query(
                        "by",
                        {"enum": ["province", "venue_kind", "venue"], "default": "province"},
                        "How venues are grouped.",
                    ),
                    _query(
                        "format",
                        {"enum": ["json", "csv", "png"], "default": "json"},
                        "png: a chart.",
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "The report",
                        "content": {
                            JSON: {"schema": {"type": "object"}},
                            "text/csv": {"schema": {"type": "string"}},
                            "image/png": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    **_error(400, "a parameter breaks its rule", "invalid_request"),
                    **_unauthorized("no admin token, or an unknown one"),
                },
            }
        },
        "/v1/otp": {
            "post": {
                "operationId": "postOtp",
                "summary": "Send a one-time code to a phone by SMS",
                "security": APP,
                "requestBody": _json_body("OtpRequest"),
                "responses": {
                    "202": _json(
                        _object(
                            {
                                "status": {"const": "sent"},
                                "expires_in_s": {"const": CODE_TTL_MS // 1000},
                                "challenge": {
                                    "$ref": "#/components/schemas/Challenge",
                                },
                                "reference": {
                                    "type": "string",
                                    "pattern": f"^[A-Z]{{{REFERENCE_LENGTH}}}$",
                                    "description": "Also in the SMS (tham chieu ...): tells "
                                    "this request's SMS from any other.",
                                },
                            }
                        ),
                        "The code is on its way",
                    ),
                    **_body_errors("malformed_json", "invalid_phone"),
                    **_unauthorized("no app token, or an unknown one"),
                    **_error(
                        429,
                        "over the codes this address may ask, for all phones or for this one "
                        "(rate_limited), or the phone has had the most codes allowed a day "
                        "(otp_phone_cap, the SMS-cost cap)",
                        "rate_limited",
                        "otp_phone_cap",
                    ),
                    **_error(503, "Redis does not answer", "unavailable"),
                },
            }
        },
        "/v1/otp/verify": {
            "post": {
                "operationId": "postOtpVerify",
                "summary": "Trade a phone's code for a session (X-Session)",
                "security": APP,
                "requestBody": _json_body("OtpVerify"),
                "responses": {
                    "200": _json(
                        _object(
                            {
                                "session": {"$ref": "#/components/schemas/Session"},
                                "expires_at": TIMESTAMP,
                            }
                        ),
                        "A session bound to the app",
                    ),
                    **_body_errors(
                        "malformed_json", "invalid_request", "invalid_phone", "invalid_field"
                    ),
                    **_unauthorized(
                        "no app token or an unknown one (unauthorized), or a wrong or expired "
                        "code (otp_invalid, with tries_left)",
                        "unauthorized",
                        "otp_invalid",
                    ),
                    **_error(
                        429,
                        "too many wrong codes from this address, for this phone or for all",
                        "otp_locked",
                    ),
                    **_error(503, "Redis does not answer", "unavailable"),
                },
            }
        },
        "/v1/declarations": {
            "post": {
                "operationId": "postDeclaration",
                "summary": "Declare a person's health; their personal code",
                "security": APP_AND_SESSION,
                "requestBody": _json_body("Declaration"),
                "responses": {
                    "201": _json(
                        _object(
                            {
                                "person_id": {"$ref": "#/components/schemas/Id"},
                                "code": {"$ref": "#/components/schemas/Code"},
                                "expires_at": TIMESTAMP,
                            }
                        ),
                        "The person and their code",
                    ),
                    **_body_errors("malformed_json", "invalid_field"),
                    **_unauthorized("no app token or an unknown one, or no valid X-Session"),
                },
            }
        },
        "/v1/people/{person_id}/phones": {
            "post": {
                "operationId": "postPersonPhone",
                "summary": "Link a relative's own verified phone to them",
                "description": "X-Session: a phone linked to the person. The body's session: "
                "the new phone's, from POST /v1/otp/verify with the same app. The door then "
                "finds the person by either phone.",
                "security": APP_AND_SESSION,
                "parameters": [PERSON_ID],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _object({"session": {"type": "string"}})}},
                },
                "responses": {
                    "201": _json(
                        _object(
                            {
                                "person_id": {"$ref": "#/components/schemas/Id"},
                                "status": {"const": "linked"},
                            }
                        ),
                        "Linked",
                    ),
                    **_body_errors("malformed_json", "invalid_request", "invalid_field"),
                    **_unauthorized("no app token or an unknown one, or no valid X-Session"),
                    **_error(404, "no such person for this session's phone", "not_found"),
                },
            }
        },
        "/v1/claims": {
            "get": {
                "operationId": "getClaims",
                "summary": "Claims on national ids claimed more than once (audit-logged)",
                "security": ADMIN,
                "parameters": [
                    _query("all", {"enum": [0, 1], "default": 0}, "1 adds resolved groups."),
                    _query(
                        "reveal",
                        {"enum": [0, 1], "default": 0},
                        "1 adds each claimant's full_name and phone (audit-logged).",
                    ),
                ],
                "responses": {
                    "200": _json(
                        _object({"claims": {"type": "array", "items": CLAIM}}),
                        "The claims, grouped by id (competing_group)",
                        {"Cache-Control": {"schema": {"const": "no-store"}}},
                    ),
                    **_body_errors("invalid_request"),
                    **_unauthorized("no admin token, or an unknown one"),
                },
            }
        },
        "/v1/claims/{claim_id}/accept": {
            "post": {
                "operationId": "acceptClaim",
                "summary": "Accept a claim; every other claim on its id is rejected",
                "security": ADMIN,
                "parameters": [_path_param("claim_id", {"$ref": "#/components/schemas/Id"})],
                "responses": {
                    "200": _json(
                        _object(
                            {
                                "claim_id": {"$ref": "#/components/schemas/Id"},
                                "person_id": {"$ref": "#/components/schemas/Id"},
                                "rejected": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Id"},
                                },
                            }
                        ),
                        "Accepted (audit-logged)",
                    ),
                    **_unauthorized("no admin token, or an unknown one"),
                    **_error(404, "no such claim", "not_found"),
                },
            }
        },
        "/v1/trace/national-id": {
            "post": {
                "operationId": "traceNationalId",
                "summary": "Everyone an id number names, their visits and contacts",
                "description": "Every claimant and the person the id's card was recorded "
                "under at the doors. The number goes in the body, never in a URL. "
                "Audit-logged (the number is not).",
                "security": ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": _object(
                                {
                                    "national_id": {"type": "string"},
                                    "days": {"type": "integer", "minimum": 1, "maximum": 60},
                                    "margin": {"type": "string"},
                                    "min_overlap": {"type": "string"},
                                    "depth": {"enum": [1, 2]},
                                    "reveal": {"type": "boolean"},
                                },
                                required=["national_id"],
                            )
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        _object(
                            {
                                "persons": {"type": "array", "items": {"type": "object"}},
                                "visits": {"type": "array", "items": {"type": "object"}},
                                "contacts": {"type": "array", "items": {"type": "object"}},
                            }
                        ),
                        "Persons found, their visits, and each one's contacts",
                        {"Cache-Control": {"schema": {"const": "no-store"}}},
                    ),
                    **_body_errors("malformed_json", "invalid_request", "invalid_field"),
                    **_unauthorized("no admin token, or an unknown one"),
                },
            }
        },
        "/v1/people/{person_id}/code.{format}": {
            "get": {
                "operationId": "getPersonCode",
                "summary": "The personal code as an image that prints 5 cm wide",
                "description": "For a session whose phone is linked to the person.",
                "security": APP_AND_SESSION,
                "parameters": [PERSON_ID, _format_param(CODE_IMAGE_TYPES)],
                "responses": {
                    "200": _binary(
                        CODE_IMAGE_TYPES,
                        "The code",
                        {
                            "Cache-Control": {"schema": {"const": "no-store"}},
                            "Expires-At": {"required": True, "schema": TIMESTAMP},
                        },
                    ),
                    **_error(400, "a personal code is .svg or .png", "invalid_request"),
                    **_unauthorized("no app token or an unknown one, or no valid X-Session"),
                    **_error(404, "no such person for this phone", "not_found"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "getHealthz",
                "summary": "Alive",
                "security": PUBLIC,
                "responses": {"200": _json(_object({"status": {"const": "ok"}}), "Alive")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "getReadyz",
                "summary": "Ready: Redis and storage answer",
                "security": PUBLIC,
                "responses": {
                    "200": _json(
                        _object(
                            {
                                "status": {"const": "ready"},
                                "redis": {"const": "ok"},
                                "storage": {"const": "ok"},
                            }
                        ),
                        "Ready",
                    ),
                    **_error(503, "Redis or storage does not answer", "unavailable"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "summary": "Prometheus metrics of all workers",
                "security": PUBLIC,
                "responses": {
                    "200": {
                        "description": "The Prometheus text exposition format",
                        "content": {METRICS_MEDIA_TYPE: {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenapi",
                "summary": "This document",
                "security": PUBLIC,
                "responses": {"200": _json({"type": "object"}, "The OpenAPI document")},
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route ``create_app`` registers: a fresh copy, so a
    caller that changes it (tools resolve references in place) changes nothing else."""
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
            f"{MAX_BODY_BYTES} bytes (else 413).",
        },
        "servers": [{"url": "/"}],
        "security": PUBLIC,
        "paths": _paths(MAX_EVENTS),
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
            "schemas": {
                "Error": ERROR,
                "Id": ID,
                "Code": CODE,
                "Phone": PHONE,
                "Session": {
                    "type": "string",
                    "maxLength": MAX_SESSION_CHARS,
                    "pattern": f"^{SESSION_PREFIX}\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$",
                },
                "ScanEvent": SCAN_EVENT,
                "ScanResult": SCAN_RESULT,
                "VerdictTaken": VERDICT_TAKEN,
                "VerdictRejected": VERDICT_REJECTED,
                "ManualScan": MANUAL_SCAN,
                "ManualVerdict": MANUAL_VERDICT,
                "VenueForm": VENUE_FORM,
                "Declaration": DECLARATION,
                "CaseRequest": {
                    "type": "object",
                    "required": ["person_id", "confirmed_at"],
                    "properties": {
                        "person_id": {"$ref": "#/components/schemas/Id"},
                        "confirmed_at": {
                            "oneOf": [
                                TIMESTAMP,
                                {"type": "integer", "minimum": 0, "maximum": MAX_EPOCH_MS},
                            ]
                        },
                        "note": {"type": "string", "maxLength": MAX_NOTE_CHARS},
                    },
                },
                "OtpRequest": {
                    "type": "object",
                    "required": ["phone"],
                    "properties": {"phone": {"$ref": "#/components/schemas/Phone"}},
                },
                "OtpVerify": {
                    "type": "object",
                    "required": ["phone", "code"],
                    "properties": {
                        "phone": {"$ref": "#/components/schemas/Phone"},
                        "code": {
                            "type": "string",
                            "pattern": f"^[0-9]{{{CODE_DIGITS}}}$",
                            "description": "The digits of the SMS.",
                        },
                        "challenge": {"$ref": "#/components/schemas/Challenge"},
                    },
                },
                "Challenge": {
                    "type": "string",
                    "pattern": f"^{CHALLENGE.pattern}$",
                    "description": "Names one code: given by POST /v1/otp, sent back with "
                    "the code to POST /v1/otp/verify, which then works from any address. "
                    "Without it a code is checked against the latest code asked from the "
                    "same client address.",
                },
                "Contact": CONTACT,
                "AuditEntry": AUDIT_ENTRY,
            },
        },
    }
    return copy.deepcopy(document)


OPENAPI_BODY: Final = web.AppKey("openapi_body", bytes)


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_BODY], content_type=JSON)


def add_routes(app: web.Application) -> None:
    """``GET /openapi.json``: the document, serialised once."""
    app[OPENAPI_BODY] = orjson.dumps(openapi_document())
    app.router.add_get("/openapi.json", get_openapi, name="openapi")
