"""What officials do with an admin token: trace a person's contacts (by id, or by a
national id number), settle national ids claimed more than once, read the audit log, and the
daily reports. Every read of personal data is audit-logged."""

from __future__ import annotations

from typing import Final

from gateway.http.audit import DEFAULT_LIMIT, MAX_FILTER_CHARS, MAX_LIMIT
from gateway.http.claims import DEFAULT_CLAIM_GROUPS, MAX_CLAIM_GROUPS
from gateway.http.context import JSON
from gateway.http.openapi.schemas import (
    ADMIN,
    NO_STORE,
    PERSON_ID,
    PHONE,
    TIMESTAMP,
    Schema,
    _body_errors,
    _error,
    _json,
    _object,
    _parameter,
    _query,
    _switch,
    _unauthorized,
)
from gateway.http.trace import DEFAULT_PAGE_ROWS, MAX_PAGE_ROWS

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

# 1, or 2 for contacts of contacts: a plain integer to a client.
DEPTH: Final[Schema] = {"type": "integer", "minimum": 1, "maximum": 2}

CONTACT: Final[Schema] = _object(
    {
        "person_id": {"$ref": "#/components/schemas/Id"},
        "venue_id": {"$ref": "#/components/schemas/Id"},
        "venue_name": {
            "type": ["string", "null"],
            "description": "What the venue's poster shows (null for a venue registered "
            "with no app here); so are venue_address and venue_province.",
        },
        "venue_address": {"type": ["string", "null"]},
        "venue_province": {"type": ["string", "null"]},
        "overlap_start": TIMESTAMP,
        "overlap_end": TIMESTAMP,
        "overlap_minutes": {"type": "number", "minimum": 0},
        "depth": DEPTH,
        "via": {
            "$ref": "#/components/schemas/Id",
            "description": "Depth-2 rows: the depth-1 contact they came through.",
        },
        "checkout_recorded": {
            "type": "boolean",
            "description": "false: the case's or the contact's visit had no check-out scanned, "
            "so the overlap runs to an assumed end (never past the moment traced).",
        },
        "full_name": {"type": ["string", "null"], "description": "With reveal=1."},
        "phone": {"type": ["string", "null"], "description": "With reveal=1."},
    },
    required=[
        "person_id",
        "venue_id",
        "overlap_start",
        "overlap_end",
        "overlap_minutes",
        "depth",
        "checkout_recorded",
    ],
)


def _trace_search(
    operation_id: str,
    summary: str,
    description: str,
    numbers: dict[str, Schema],
    required: list[str],
) -> Schema:
    """A search by number: the numbers in the body, the trace's parameters beside them."""
    return {
        "post": {
            "operationId": operation_id,
            "tags": ["trace"],
            "summary": summary,
            "description": description,
            "security": ADMIN,
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": _object(
                            {
                                **numbers,
                                "days": {"type": "integer", "minimum": 1, "maximum": 60},
                                "margin": {"type": "string"},
                                "min_overlap": {"type": "string"},
                                "depth": DEPTH,
                                "reveal": {"type": "boolean"},
                            },
                            required=required,
                        )
                    }
                },
            },
            "responses": {
                "200": _json(
                    {"$ref": "#/components/schemas/TraceSearchResult"},
                    "Persons found, their visits, and each one's contacts: the first "
                    "1,000 of each person's trace, and on the person, contacts_next, the "
                    "cursor of the rest (GET /v1/trace/{person_id}?cursor=), null when none",
                    {"Cache-Control": {"schema": {"const": "no-store"}}},
                ),
                **_body_errors(
                    "malformed_json", "invalid_request", "invalid_field", "invalid_phone"
                ),
                **_unauthorized("no admin token, or an unknown one"),
                **_error(404, "nobody is known by that number", "unknown_person"),
            },
        }
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

SCHEMAS: Final[dict[str, Schema]] = {
    "Contact": CONTACT,
    "Claim": CLAIM,
    "TraceSearchResult": _object(
        {
            "persons": {"type": "array", "items": {"type": "object"}},
            "visits": {"type": "array", "items": {"type": "object"}},
            "contacts": {"type": "array", "items": {"type": "object"}},
        }
    ),
    "AuditEntry": AUDIT_ENTRY,
}

PATHS: Final[dict[str, Schema]] = {
    "/v1/trace/{person_id}": {
        "get": {
            "operationId": "getTrace",
            "tags": ["trace"],
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
                _query("depth", {**DEPTH, "default": 1}, "1, or 2 for contacts of contacts."),
                _parameter("Reveal", "1 adds full_name and phone to each row (audit-logged)."),
                _query(
                    "format",
                    {"enum": ["json", "csv"], "default": "json"},
                    "csv: every row as a CSV file, written as the trace goes (as scangate "
                    "trace --format csv); json: a page of rows.",
                ),
                _query(
                    "limit",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_PAGE_ROWS,
                        "default": DEFAULT_PAGE_ROWS,
                    },
                    "Rows per JSON page.",
                ),
                _parameter(
                    "Cursor",
                    "The next page: the `next` of the page before. It holds that trace's "
                    "parameters and moment, so every page traces the same window; the other "
                    "parameters are not needed with it.",
                ),
            ],
            "responses": {
                "200": {
                    "description": "One row per pair of overlapping visits: contacts of each "
                    "of the person's visits in turn (by check-in), then, at depth 2, of each "
                    "contact's visits, contact by contact",
                    "content": {
                        JSON: {
                            "schema": _object(
                                {
                                    "rows": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Contact"},
                                    },
                                    "next": {
                                        "type": ["string", "null"],
                                        "description": "The cursor of the next page; null "
                                        "after the last row.",
                                    },
                                }
                            )
                        },
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                **_error(400, "a parameter breaks its rule", "invalid_request"),
                **_unauthorized("no admin token, or an unknown one"),
                **_error(404, "nothing is stored of that person", "unknown_person"),
            },
        }
    },
    "/v1/trace/search": _trace_search(
        "traceSearch",
        "Everyone a phone number or national id names, their visits and contacts",
        "For a phone, everyone declared from it (a family shares one); for an id, every "
        "claimant and the person the id's card was recorded under at the doors; both when "
        "both are given. The numbers go in the body, never in a URL. Audit-logged (the "
        "numbers are not). Nobody found: 404 unknown_person.",
        {"phone": PHONE, "national_id": {"type": "string"}},
        required=[],
    ),
    "/v1/trace/national-id": _trace_search(
        "traceNationalId",
        "Everyone an id number names (the search by id alone; see /v1/trace/search)",
        "Every claimant and the person the id's card was recorded under at the doors. The "
        "number goes in the body, never in a URL. Audit-logged (the number is not).",
        {"national_id": {"type": "string"}},
        required=["national_id"],
    ),
    "/v1/claims": {
        "get": {
            "operationId": "getClaims",
            "tags": ["officials"],
            "summary": "Claims on national ids claimed more than once (audit-logged)",
            "security": ADMIN,
            "parameters": [
                _query("all", _switch(), "1 adds resolved groups."),
                _parameter("Reveal", "1 adds each claimant's full_name and phone (audit-logged)."),
                _query(
                    "limit",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_CLAIM_GROUPS,
                        "default": DEFAULT_CLAIM_GROUPS,
                    },
                    "Ids per page, each with all its claims.",
                ),
                _parameter("Cursor"),
            ],
            "responses": {
                "200": _json(
                    _object(
                        {
                            "claims": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Claim"},
                            },
                            "next": {
                                "type": ["string", "null"],
                                "description": "The cursor of the next page; null after "
                                "the last id.",
                            },
                        }
                    ),
                    "The claims, grouped by id (competing_group), a page of ids",
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
            "tags": ["officials"],
            "summary": "Accept a claim; every other claim on its id is rejected",
            "security": ADMIN,
            "parameters": [_parameter("ClaimId")],
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
    "/v1/audit": {
        "get": {
            "operationId": "getAudit",
            "tags": ["officials"],
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
    "/v1/visits/{person_id}": {
        "get": {
            "operationId": "getStoredVisits",
            "tags": ["trace"],
            "summary": "A person's stored scan events and visits (audit-logged)",
            "security": ADMIN,
            "parameters": [PERSON_ID],
            "responses": {
                "200": _json(
                    _object(
                        {
                            "person_id": {"$ref": "#/components/schemas/Id"},
                            "events": {"type": "array", "items": {"type": "object"}},
                            "visits": {"type": "array", "items": {"type": "object"}},
                        }
                    ),
                    "Events in scan order; visits with closed_by and checkout_recorded",
                    NO_STORE,
                ),
                **_error(400, "person_id breaks its rule", "invalid_request"),
                **_unauthorized("no admin token, or an unknown or revoked one"),
                **_error(404, "nothing is stored of that person", "unknown_person"),
            },
        }
    },
    "/v1/status": {
        "get": {
            "operationId": "getStatus",
            "tags": ["operations"],
            "summary": "The buffer's backlog per shard, the last flush, what storage holds, "
            "and the notices pending",
            "security": ADMIN,
            "responses": {
                "200": _json(
                    _object(
                        {
                            "buffer": {
                                "type": "object",
                                "description": "backlog, oldest_age_s, last_flush, "
                                "last_flush_age_s, shards; or error when Redis does not "
                                "answer",
                            },
                            "storage": {
                                "type": "object",
                                "description": "kind, events, visits, exact (false: "
                                "PostgreSQL's estimates, for millions of rows)",
                            },
                            "outbox": {"type": "object", "description": "pending"},
                        }
                    ),
                    "The status",
                    NO_STORE,
                ),
                **_unauthorized("no admin token, or an unknown or revoked one"),
            },
        }
    },
    "/v1/reports/daily": {
        "get": {
            "operationId": "getDailyReport",
            "tags": ["reports"],
            "summary": "Per day and group: scans, check-ins, persons, visits, median "
            "stay, peak occupancy",
            "description": "Days in SCANGATE_TIMEZONE, at most 92.",
            "security": ADMIN,
            "parameters": [
                _query(
                    "from",
                    {"type": "string", "format": "date"},
                    "First day: 2020-01-01 or later.",
                    required=True,
                ),
                _query(
                    "to",
                    {"type": "string", "format": "date"},
                    "Last day: at most 92 days from the first, and at most 366 days after today.",
                    required=True,
                ),
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
                    "description": "The report: from, to, by, timezone, rows (by venue each "
                    "with group_name); in JSON also epidemic: cases_per_day over the 14 days "
                    "ending on `to`, and growth over the last 7 and 14 of them (daily_growth "
                    "with its 95% interval, doubling_days or halving_days, a 7-day "
                    "projection with its band; null with under 10 cases)",
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
}
