"""Domain errors of the signing package and the closed set of verification reasons."""

from __future__ import annotations

from typing import Final, Literal

# Why a code was refused. An expected outcome, so verification returns it as a value.
RejectReason = Literal[
    "malformed_code", "wrong_app", "wrong_type", "unknown_key", "bad_signature", "expired"
]
REJECT_REASONS: Final[tuple[RejectReason, ...]] = (
    "malformed_code",
    "wrong_app",
    "wrong_type",
    "unknown_key",
    "bad_signature",
    "expired",
)


class SigningError(Exception):
    """Base of the errors this package raises; the message is fit to show a user."""


class MasterKeyError(SigningError):
    """The master key is missing, malformed or does not open the stored secrets."""


class KeyringError(SigningError):
    """A keyring operation that cannot be done (unknown app, duplicate prefix, ...)."""


class UnknownApp(KeyringError):
    def __init__(self, app_id: str) -> None:
        super().__init__(f"unknown app {app_id!r}")
        self.app_id = app_id
