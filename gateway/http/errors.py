"""Whole-request errors and the one place they become HTTP answers.

Every error body is ``{"error": code, "detail": text}``. Per-event problems inside a valid
batch are not errors: they are verdicts (see ``gateway.pipeline.events``).
"""

from __future__ import annotations

from typing import Final


class ApiError(Exception):
    """An answer other than success, with a stable code and a detail for people."""

    status: int = 400
    code: str = "invalid_request"

    def __init__(
        self,
        detail: str,
        *,
        retry_after_s: int | None = None,
        extra: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.extra = extra or {}  # more members of the error body ("field", "tries_left")
        self.headers = headers or {}


class MalformedJson(ApiError):
    code = "malformed_json"


class InvalidRequest(ApiError):
    code = "invalid_request"


class InvalidField(ApiError):
    """One field of the body is wrong; the body names it."""

    code = "invalid_field"

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}", extra={"field": field})
        self.field = field


class InvalidPhone(ApiError):
    code = "invalid_phone"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class UnknownPerson(ApiError):
    """Nobody is known by that id, phone or national id: no declaration, scan or visit is
    stored of them (an official must not read "no contacts" into it)."""

    status, code = 404, "unknown_person"


class Conflict(ApiError):
    status, code = 409, "conflict"


class AlreadyDeclared(ApiError):
    status, code = 409, "already_declared"


class AmbiguousPerson(ApiError):
    status, code = 409, "ambiguous_person"


class OtpInvalid(ApiError):
    status, code = 401, "otp_invalid"


class OtpLocked(ApiError):
    """Too many wrong codes from this client address (for the phone, or for all phones)."""

    status, code = 429, "otp_locked"


class OtpPhoneCap(ApiError):
    """The phone has had its SMS-cost cap of codes (``SCANGATE_OTP_PHONE_CAP``)."""

    status, code = 429, "otp_phone_cap"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class BacklogFull(ApiError):
    status, code = 503, "backlog_full"


# Codes for answers aiohttp itself makes (unknown route, wrong method, body over the limit).
HTTP_STATUS_CODES: Final[dict[int, str]] = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}
