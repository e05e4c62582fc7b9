"""Secrets at rest: the master key and AES-GCM sealing under it.

Everything secret that scangate keeps (app signing keys, later personal data keys) is sealed
with AES-256-GCM under one master key, with associated data naming what the secret is for,
so a sealed value copied to another slot does not open there.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import MasterKeyError

log = logging.getLogger(__name__)

MASTER_KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
MASTER_KEY_FILE: Final = "master.key"


class Sealer:
    """AES-256-GCM under the master key. A sealed value is ``nonce || ciphertext+tag``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, purpose)

    def open(self, sealed: bytes, purpose: bytes) -> bytes:
        """Decrypt; raises MasterKeyError when the key or the purpose does not match."""
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], purpose)
        except (InvalidTag, ValueError) as exc:
            raise MasterKeyError(
                "a sealed secret does not open with this master key "
                "(was SCANGATE_MASTER_KEY changed, or the file edited?)"
            ) from exc


def decode_master_key(value: str) -> bytes:
    """A master key from its base64 text (as in SCANGATE_MASTER_KEY)."""
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MasterKeyError("SCANGATE_MASTER_KEY is not valid base64") from exc
    if len(key) != MASTER_KEY_BYTES:
        raise MasterKeyError(
            f"SCANGATE_MASTER_KEY must decode to {MASTER_KEY_BYTES} bytes, not {len(key)}"
        )
    return key


def load_master_key(configured: str | None, data_dir: Path) -> bytes:
    """The configured master key, else the data dir's key file, generated on first use.

    A generated key is written with mode 0600 and a warning: whoever holds the data dir
    then holds the key, which is fine for a laptop and wrong for production.
    """
    if configured:
        return decode_master_key(configured)
    path = data_dir / MASTER_KEY_FILE
    try:
        return decode_master_key(path.read_text("ascii"))
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(MASTER_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process generated it first: use theirs.
        return decode_master_key(path.read_text("ascii"))
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(base64.b64encode(key).decode("ascii") + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.warning(
        "generated a master key in %s (mode 0600); set SCANGATE_MASTER_KEY in production "
        "and keep a copy: without it the keyring cannot be opened",
        path,
    )
    return key
