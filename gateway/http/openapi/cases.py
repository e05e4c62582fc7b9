"""Confirmed cases: an official records one and its contacts are notified
(``POST /v1/cases``), reads one back with each notice's delivery state, and apps fetch the
venue windows where cases were present, without person ids (``GET /v1/risky-venues``)."""

from __future__ import annotations

from typing import Final

from gateway.http.cases import DEFAULT_RISKY_VENUES, MAX_NOTE_CHARS, MAX_RISKY_VENUES
from gateway.http.openapi.schemas import (
    ADMIN,
    APP,
    NO_STORE,
    TIMESTAMP,
    VENUE_ID_MEMBER,
    Schema,
    _body_errors,
    _error,
    _json,
    _json_body,
    _object,
    _parameter,
    _query,
    _switch,
    _unauthorized,
)
from storage.times import MAX_EPOCH_MS

CASE_REQUEST: Final[Schema] = {
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
}

CASE_RECORDED: Final[Schema] = _object(
    {
        "case_id": {"$ref": "#/components/schemas/Id"},
        "contacts": {"type": "integer", "minimum": 0},
        "notices": {"type": "integer", "minimum": 0},
    }
)
CASE_PREVIEW: Final[Schema] = _object(
    {
        "contacts": {"type": "integer", "minimum": 0},
        "notices": {"type": "integer", "minimum": 0},
        "unreachable": {"type": "integer", "minimum": 0},
        "exposures": {"type": "array", "items": {"type": "object"}},
    }
)

SCHEMAS: Final[dict[str, Schema]] = {
    "CaseRequest": CASE_REQUEST,
    "CaseRecorded": CASE_RECORDED,
    "CasePreview": CASE_PREVIEW,
}

PATHS: Final[dict[str, Schema]] = {
    "/v1/cases": {
        "post": {
            "operationId": "postCase",
            "tags": ["cases"],
            "summary": "Record a confirmed case; its contacts are notified (audit-logged)",
            "description": "Contacts: the trace over the 14 days before confirmed_at. "
            "Each is notified through every app with a webhook that posted their scans, "
            "else by SMS when a phone is on record. dry_run=1 stores and sends nothing.",
            "security": ADMIN,
            "parameters": [
                _query(
                    "dry_run",
                    _switch(),
                    "1: list the contacts and notices; create and send nothing.",
                )
            ],
            "requestBody": _json_body("CaseRequest"),
            "responses": {
                "201": _json(
                    {"$ref": "#/components/schemas/CaseRecorded"},
                    "The case is recorded and its notices queued",
                ),
                "200": _json(
                    {
                        "oneOf": [
                            {"$ref": "#/components/schemas/CasePreview"},
                            {"$ref": "#/components/schemas/CaseRecorded"},
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
            "tags": ["cases"],
            "summary": "A case and each notice's delivery state (audit-logged)",
            "description": "Every read, found or not, is written to the audit log as case_read.",
            "security": ADMIN,
            "parameters": [_parameter("CaseId")],
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
            "tags": ["cases"],
            "summary": "Venue windows where cases were present, without person ids",
            "description": "For matching on the device. Overlapping windows at a venue "
            "are merged; times are epoch milliseconds.",
            "security": APP,
            "parameters": [
                _query(
                    "since",
                    {"type": "integer", "minimum": 0},
                    "Windows ending at or after this (epoch ms; default 14 days ago).",
                ),
                _query(
                    "limit",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_RISKY_VENUES,
                        "default": DEFAULT_RISKY_VENUES,
                    },
                    "Venues per page (each with all its windows).",
                ),
                _parameter(
                    "Cursor", "The next page: the `next` of the page before (it holds `since`)."
                ),
            ],
            "responses": {
                "200": _json(
                    _object(
                        {
                            "windows": {
                                "type": "array",
                                "items": _object(
                                    {
                                        **VENUE_ID_MEMBER,
                                        "venue_name": {"type": ["string", "null"]},
                                        "venue_address": {"type": ["string", "null"]},
                                        "venue_province": {"type": ["string", "null"]},
                                        "from": {"type": "integer"},
                                        "to": {"type": "integer"},
                                        "level": {"enum": ["high", "low"]},
                                    }
                                ),
                            },
                            "next": {
                                "type": ["string", "null"],
                                "description": "The cursor of the next page; null after "
                                "the last venue.",
                            },
                        }
                    ),
                    "A page of venues' windows, by venue id",
                ),
                **_error(400, "since, limit or cursor breaks its rule", "invalid_request"),
                **_unauthorized("no app token, or an unknown one"),
            },
        }
    },
}
