"""What the whole OpenAPI document shares: the schemas several resources use (ids, codes,
phones, times, the error body), the error answers and parameters every resource refers to
(``components/responses``, ``components/parameters``), the headers and security
requirements, and the helpers every operation is written with (``_object``, ``_json``,
``_error`` and friends).

Every error answer is the one ``Error`` schema, by reference: a client generator makes one
error model of it, not one per operation and status. Which codes an operation's answer can
carry is said in that answer's description, in backticks after ``error:``.

The helpers keep their leading underscore: they are for the modules of this package only.
"""

from __future__ import annotations

from typing import Any, Final

from gateway.http.context import JSON, MAX_BODY_BYTES
from signing.codes import ID_PATTERN, MAX_CODE_CHARS, PREFIX_PATTERN

Schema = dict[str, Any]

# Where the closed sets of error codes come from: gateway.http.errors.
_AUTH: Final = ("unauthorized",)
_TOO_LARGE: Final = ("payload_too_large",)
_NOT_JSON: Final = ("unsupported_media_type",)


def _full(pattern: str) -> str:
    """A Python ``fullmatch`` pattern as a JSON Schema pattern (which searches)."""
    return f"^(?:{pattern})$"


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
# Vietnamese mobile numbers, with the separators gateway.http.people.normalise_phone drops.
_SEP = r"[\s.()-]*"
PHONE: Final[Schema] = {
    "type": "string",
    "maxLength": 32,
    "pattern": f"^{_SEP}(?:0|\\+{_SEP}8{_SEP}4){_SEP}[35789](?:{_SEP}[0-9]){{8}}{_SEP}$",
    "description": "A Vietnamese mobile number: 03, 05, 07, 08 or 09 and 8 more digits, "
    "as 0… or +84…; spaces, dots, dashes and parentheses are allowed.",
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
        "error": {
            "type": "string",
            "description": "A stable code: each answer's description names the codes it can carry.",
        },
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

# What an official reads (a case, the audit log) is answered for no cache to keep.
NO_STORE: Final[dict[str, Schema]] = {
    "Cache-Control": {"required": True, "schema": {"const": "no-store"}}
}

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


# The error answers, one per status: the Error body (429 and 503 also say when to retry).
_ERROR_ANSWERS: Final = {
    400: ("BadRequest", "The request breaks a rule"),
    401: ("Unauthorized", "No credential, or one that is not (or no longer) valid"),
    403: ("Forbidden", "The credential may not do this"),
    404: ("NotFound", "Nothing of that is known to the caller"),
    409: ("Conflict", "The request conflicts with what is stored"),
    413: ("PayloadTooLarge", f"The body is over {MAX_BODY_BYTES} bytes"),
    415: ("UnsupportedMediaType", "The body is not application/json"),
    429: ("TooManyRequests", "Over a limit: retry after Retry-After seconds"),
    503: ("Unavailable", "A server the gateway needs does not answer: retry after Retry-After"),
}


def _error_answer(status: int) -> Schema:
    _, description = _ERROR_ANSWERS[status]
    retry = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return _json(
        {"$ref": "#/components/schemas/Error"},
        description,
        retry if status in (429, 503) else None,
    )


def _error(status: int, description: str, *codes: str) -> dict[str, Schema]:
    """An error answer of the shared kind for ``status``, whose ``error`` is one of
    ``codes``: the codes are named in the description, which OpenAPI 3.1 lets a reference
    give in place of the shared one."""
    name, _ = _ERROR_ANSWERS[status]
    named = ", ".join(f"`{code}`" for code in codes)
    return {
        str(status): {
            "$ref": f"#/components/responses/{name}",
            "description": f"{description}. error: {named}",
        }
    }


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


def _switch() -> Schema:
    """A query parameter that is 0 (the default) or 1: a plain integer to a client."""
    return {"type": "integer", "minimum": 0, "maximum": 1, "default": 0}


def _path_param(name: str, schema: Schema, description: str = "") -> Schema:
    param: Schema = {"name": name, "in": "path", "required": True, "schema": schema}
    if description:
        param["description"] = description
    return param


def _format_param(types: dict[str, str]) -> Schema:
    return _path_param("format", {"enum": list(types)}, "The image format, as a file suffix.")


def _query(name: str, schema: Schema, description: str, *, required: bool = False) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


def _parameter(name: str, description: str = "") -> Schema:
    """A reference to a shared parameter, with a description of its own when given."""
    reference: Schema = {"$ref": f"#/components/parameters/{name}"}
    if description:
        reference["description"] = description
    return reference


_ID_REF: Final[Schema] = {"$ref": "#/components/schemas/Id"}
# The parameters several operations take.
PARAMETERS: Final[dict[str, Schema]] = {
    "VenueId": _path_param("venue_id", _ID_REF, "A venue."),
    "PersonId": _path_param("person_id", _ID_REF, "A person."),
    "CaseId": _path_param("case_id", _ID_REF, "A confirmed case."),
    "ClaimId": _path_param("claim_id", _ID_REF, "A claim on a national id."),
    "Cursor": _query(
        "cursor",
        {"type": "string", "maxLength": 512},
        "The next page: the `next` of the page before.",
    ),
    "Reveal": _query("reveal", _switch(), "1 adds full_name and phone (audit-logged)."),
}
PERSON_ID: Final[Schema] = _parameter("PersonId")
# The venue_id member of an answer about a venue (the venues, and the risky venue windows).
VENUE_ID_MEMBER: Final[dict[str, Schema]] = {"venue_id": {"$ref": "#/components/schemas/Id"}}

# Security requirements, by the names of the document's securitySchemes.
APP: Final[list[dict[str, list[str]]]] = [{"appToken": []}]
ADMIN: Final[list[dict[str, list[str]]]] = [{"adminToken": []}]
APP_AND_SESSION: Final[list[dict[str, list[str]]]] = [{"appToken": [], "session": []}]
PUBLIC: Final[list[dict[str, list[str]]]] = []

# The components every resource refers to; each resource module adds its own schemas.
SCHEMAS: Final[dict[str, Schema]] = {"Error": ERROR, "Id": ID, "Code": CODE, "Phone": PHONE}
RESPONSES: Final[dict[str, Schema]] = {
    name: _error_answer(status) for status, (name, _) in _ERROR_ANSWERS.items()
}
