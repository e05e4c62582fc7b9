"""Codes, keys and secrets: the code format, the keyring, sign/verify, QR rendering, and
sealing under the master key. Imports neither ``gateway`` nor ``storage``."""

from __future__ import annotations

from .codes import (
    MAX_ID_CHARS,
    MAX_VENUE_CODE_CHARS,
    Code,
    CodeType,
    parse_code,
)
from .crypto import Sealer, load_master_key
from .errors import (
    REJECT_REASONS,
    KeyringError,
    MasterKeyError,
    RejectReason,
    SigningError,
    UnknownApp,
)
from .keyring import (
    KEYRING_FILE,
    TOKEN_ID_PATTERN,
    AppInfo,
    AppToken,
    FileKeyringStore,
    Keyring,
    KeyringStore,
    NewApp,
    TokenInfo,
    hash_token,
    token_id,
)
from .qr import make_qr, render, render_to_file
from .verify import CodeVerifier
from .webhooks import signature_headers, standard_secret

__all__ = [
    "KEYRING_FILE",
    "MAX_ID_CHARS",
    "MAX_VENUE_CODE_CHARS",
    "REJECT_REASONS",
    "TOKEN_ID_PATTERN",
    "AppInfo",
    "AppToken",
    "Code",
    "CodeType",
    "CodeVerifier",
    "FileKeyringStore",
    "Keyring",
    "KeyringError",
    "KeyringStore",
    "MasterKeyError",
    "NewApp",
    "RejectReason",
    "Sealer",
    "SigningError",
    "TokenInfo",
    "UnknownApp",
    "hash_token",
    "load_master_key",
    "make_qr",
    "parse_code",
    "render",
    "render_to_file",
    "signature_headers",
    "standard_secret",
    "token_id",
]
