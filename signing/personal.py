"""Personal data at rest: field encryption under the data key, and keyed blind indexes.

Names, national ids, phone numbers, addresses, insurance numbers and health answers are
kept only as AES-256-GCM ciphertexts under one *data key*. The data key is random, kept
sealed under the master key (``Sealer``) in storage, so every process sharing a database
shares it and the master key never leaves its own configuration.

Look-ups (a phone, a national id, a name among a phone's people) go through *blind
indexes*: an HMAC-SHA256 of the normalised value under a key derived from the data key,
one key per field kind, so equal values are findable without storing the value and an
index of one kind says nothing about another. The OTP hashes and the session signatures
use their own derived keys too.

Each ciphertext is bound (as associated data) to its field and to the row that owns it:
a ciphertext copied into another row or column does not open there.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .crypto import Sealer
from .errors import MasterKeyError, SigningError

DATA_KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
FORMAT_V1: Final = b"\x01"
DATA_KEY_PURPOSE: Final = b"scangate/data-key/v1"
BLIND_INDEX_HEX: Final = 32  # 128 bits: collisions are not a concern at national scale


class PersonalDataError(SigningError):
    """A ciphertext that does not open (wrong key, wrong row or field, or altered)."""


def new_data_key() -> bytes:
    return secrets.token_bytes(DATA_KEY_BYTES)


def seal_data_key(sealer: Sealer, key: bytes) -> bytes:
    return sealer.seal(key, DATA_KEY_PURPOSE)


def open_data_key(sealer: Sealer, sealed: bytes) -> bytes:
    """The data key; MasterKeyError when the master key is not the one that sealed it."""
    key = sealer.open(sealed, DATA_KEY_PURPOSE)
    if len(key) != DATA_KEY_BYTES:
        raise MasterKeyError("the stored data key has the wrong length")
    return key


def _derive(key: bytes, label: str) -> bytes:
    return HKDF(
        algorithm=SHA256(), length=32, salt=None, info=f"scangate/{label}/v1".encode()
    ).derive(key)


class PersonalData:
    """Encrypts and decrypts personal fields and computes their blind indexes."""

    def __init__(self, data_key: bytes) -> None:
        if len(data_key) != DATA_KEY_BYTES:
            raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes")
        self._aead = AESGCM(_derive(data_key, "fields"))
        self._index_key = _derive(data_key, "blind-index")
        # Keys for the OTP hashes and the phone sessions: separate, so a leak of one
        # kind of value never helps forge or find another.
        self.otp_key = _derive(data_key, "otp")
        self.session_key = _derive(data_key, "session")
        # The web pages' CSRF tokens (gateway.http.web.security).
        self.web_key = _derive(data_key, "web")

    def encrypt(self, value: str, field: str, owner: str) -> bytes:
        """``value`` sealed for ``field`` of the row ``owner`` (a person or venue id)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = _aad(field, owner)
        return FORMAT_V1 + nonce + self._aead.encrypt(nonce, value.encode("utf-8"), aad)

    def decrypt(self, blob: bytes, field: str, owner: str) -> str:
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != FORMAT_V1:
            raise PersonalDataError(f"{field}: not a scangate ciphertext")
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, sealed, _aad(field, owner)).decode("utf-8")
        except (InvalidTag, UnicodeDecodeError) as exc:
            raise PersonalDataError(f"{field} of {owner} does not open with this data key") from exc

    def blind_index(self, kind: str, normalised: str) -> str:
        """The index of a normalised value of one kind ("phone", "national_id", "name"):
        equal values give equal indexes; the value cannot be read back."""
        mac = hmac.new(self._index_key, kind.encode() + b"\x00", hashlib.sha256)
        mac.update(normalised.encode("utf-8"))
        return mac.hexdigest()[:BLIND_INDEX_HEX]


def _aad(field: str, owner: str) -> bytes:
    return f"scangate/pd/v1/{field}/{owner}".encode()
