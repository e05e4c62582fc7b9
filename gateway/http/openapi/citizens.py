"""What a citizen's app does: prove a phone with a one-time SMS code for a session
(``X-Session``), declare a person's health for their personal code, fetch that code as an
image, and link a relative's own verified phone to them."""

from __future__ import annotations

from typing import Final

from gateway.http.context import JSON
from gateway.http.declarations import CODE_IMAGE_TYPES
from gateway.http.openapi.schemas import (
    APP,
    APP_AND_SESSION,
    PERSON_ID,
    TIMESTAMP,
    Schema,
    _binary,
    _body_errors,
    _error,
    _format_param,
    _json,
    _json_body,
    _object,
    _text,
    _unauthorized,
)
from gateway.http.otp import CHALLENGE, CODE_DIGITS, CODE_TTL_MS, REFERENCE_LENGTH, SESSION_PREFIX
from gateway.http.people import (
    ANSWER_KEYS,
    GENDERS,
    MAX_ADDRESS_CHARS,
    MAX_NAME_CHARS,
    MAX_PROVINCE_CHARS,
    MAX_RELATIONSHIP_CHARS,
)

MAX_SESSION_CHARS: Final = 512  # gateway.http.otp.OtpService.session_phone

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

SESSION: Final[Schema] = {
    "type": "string",
    "maxLength": MAX_SESSION_CHARS,
    "pattern": f"^{SESSION_PREFIX}\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$",
}
OTP_REQUEST: Final[Schema] = {
    "type": "object",
    "required": ["phone"],
    "properties": {"phone": {"$ref": "#/components/schemas/Phone"}},
}
OTP_VERIFY: Final[Schema] = {
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
}
CHALLENGE_SCHEMA: Final[Schema] = {
    "type": "string",
    "pattern": f"^{CHALLENGE.pattern}$",
    "description": "Names one code: given by POST /v1/otp, sent back with "
    "the code to POST /v1/otp/verify, which then works from any address. "
    "Without it a code is checked against the latest code asked from the "
    "same client address.",
}

SCHEMAS: Final[dict[str, Schema]] = {
    "Session": SESSION,
    "Declaration": DECLARATION,
    "OtpRequest": OTP_REQUEST,
    "OtpVerify": OTP_VERIFY,
    "Challenge": CHALLENGE_SCHEMA,
}

PATHS: Final[dict[str, Schema]] = {
    "/v1/otp": {
        "post": {
            "operationId": "postOtp",
            "tags": ["citizens"],
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
            "tags": ["citizens"],
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
            "tags": ["citizens"],
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
    "/v1/people/{person_id}/code.{format}": {
        "get": {
            "operationId": "getPersonCode",
            "tags": ["citizens"],
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
    "/v1/people/{person_id}/phones": {
        "post": {
            "operationId": "postPersonPhone",
            "tags": ["citizens"],
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
}
