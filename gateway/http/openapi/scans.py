"""The scans: ``POST /v1/scans`` (an app's batch, every event's verdict in request order)
and ``POST /v1/scans/manual`` (a check-in at the door, for a person found by phone or ID
card), with the scan envelope and the verdicts they share."""

from __future__ import annotations

from typing import Final

from gateway.http.context import JSON, MAX_BODY_BYTES
from gateway.http.openapi.schemas import (
    _TOO_LARGE,
    APP,
    Schema,
    _body_errors,
    _error,
    _full,
    _json,
    _json_body,
    _object,
    _unauthorized,
)
from gateway.http.people import MAX_NAME_CHARS
from gateway.http.scans import MAX_EVENTS
from gateway.pipeline.events import EVENT_ID_PATTERN, EVENT_REASONS, KINDS, MAX_DEVICE_ID_CHARS
from storage.times import MAX_EPOCH_MS

MAX_ID_CARD_CHARS: Final = 400  # gateway.http.people.parse_id_card

# The fields of a scan's envelope: an app's events and the door's manual scans share them.
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

SCAN_EVENT: Final[Schema] = {
    "type": "object",
    "required": ["event_id", "kind", "venue_code", "person_code", "scanned_at"],
    "properties": {
        "event_id": EVENT_ID,
        "kind": {"$ref": "#/components/schemas/ScanKind"},
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

_MANUAL_FIELDS: Final[dict[str, Schema]] = {
    "event_id": EVENT_ID,
    "kind": {"$ref": "#/components/schemas/ScanKind"},
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
}


def _manual_scan(found_by: str) -> Schema:
    """A manual scan that finds the person by ``found_by``: the same fields either way."""
    return {
        "type": "object",
        "required": ["event_id", "kind", "venue_code", "scanned_at", found_by],
        "properties": _MANUAL_FIELDS,
    }


# Either form, never both: a body with a phone and an ID card matches both, so neither.
MANUAL_SCAN: Final[Schema] = {
    "oneOf": [
        {"$ref": "#/components/schemas/ManualScanByPhone"},
        {"$ref": "#/components/schemas/ManualScanByIdCard"},
    ],
    "description": 'Either "phone" or "id_card". An envelope or venue code that breaks the '
    "rules answers 200 with a rejected verdict, as in POST /v1/scans.",
}

# Recorded or rejected: never who was found (issue 16: the door learns no person id).
MANUAL_VERDICT: Final[Schema] = {
    "oneOf": [
        {"$ref": "#/components/schemas/VerdictTaken"},
        {"$ref": "#/components/schemas/ManualVerdictRejected"},
    ]
}
MANUAL_VERDICT_REJECTED: Final[Schema] = _object(
    {
        "event_id": {"type": ["string", "null"]},
        "status": {"const": "rejected"},
        "reason": {"enum": [*EVENT_REASONS, "not_now"]},
        "detail": {"type": "string"},
    }
)

SCHEMAS: Final[dict[str, Schema]] = {
    "ScanKind": {"type": "string", "enum": list(KINDS)},
    "ScanEvent": SCAN_EVENT,
    "ScanResult": SCAN_RESULT,
    "VerdictTaken": VERDICT_TAKEN,
    "VerdictRejected": VERDICT_REJECTED,
    "ManualScan": MANUAL_SCAN,
    "ManualScanByPhone": _manual_scan("phone"),
    "ManualScanByIdCard": _manual_scan("id_card"),
    "ManualVerdict": MANUAL_VERDICT,
    "ManualVerdictRejected": MANUAL_VERDICT_REJECTED,
}

PATHS: Final[dict[str, Schema]] = {
    "/v1/scans": {
        "post": {
            "operationId": "postScans",
            "tags": ["scans"],
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
                                    "maxItems": MAX_EVENTS,
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
                    f"the body is over {MAX_BODY_BYTES} bytes, or over {MAX_EVENTS} events",
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
            "tags": ["door"],
            "summary": "A check-in or check-out at the door, for a person found by "
            "phone or ID card",
            "description": "With the app's token, or a staff token of the venue. The "
            "scan is now: scanned_at within SCANGATE_DOOR_SCAN_WINDOW of receipt, else "
            "rejected with not_now. The answer never names the person. Look-ups are "
            "limited per staff token and per venue (429), and audit-logged.",
            "security": [{"appToken": []}, {"staffToken": []}],
            "requestBody": _json_body("ManualScan"),
            "responses": {
                "200": _json({"$ref": "#/components/schemas/ManualVerdict"}, "The event's verdict"),
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
                **_error(429, "too many look-ups from this staff token or venue", "rate_limited"),
                **_error(503, "Redis did not take the write", "unavailable"),
            },
        }
    },
}
