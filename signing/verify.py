"""Signing and verifying one app's codes, fast enough for the hot path.

Per key, the HMAC's inner and outer SHA-256 states are computed once (key pads plus the
domain label and app id), so a verification costs two ``hashlib`` copies and two short
updates. Codes that verified are cached: a venue's poster is scanned thousands of times a
day. The cache has two generations (a new dict fills while the previous one still answers),
which bounds memory without per-hit bookkeeping. Removing a key empties it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from .codes import TAG_BYTES, Code, CodeType, encode_record, format_code, parse_code
from .codes import signed_message_prefix as _message_prefix
from .errors import RejectReason

DEFAULT_CACHE_SIZE: Final = 100_000
_BLOCK: Final = 64  # SHA-256 block size


class _KeyState:
    """HMAC-SHA256 with the key pads and the message prefix already absorbed."""

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes, message_prefix: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self.inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self.inner.update(message_prefix)
        self.outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def tag(self, record: bytes) -> bytes:
        inner = self.inner.copy()
        inner.update(record)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:TAG_BYTES]


class CodeVerifier:
    """Issues and verifies the codes of one app with that app's keys."""

    def __init__(
        self,
        app_id: str,
        prefix: str,
        keys: dict[int, bytes],
        active_kid: int,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.app_id = app_id
        self.prefix = prefix
        self.active_kid = active_kid
        self._message_prefix = _message_prefix(app_id)
        self._states = {kid: _KeyState(key, self._message_prefix) for kid, key in keys.items()}
        self._cache_size = cache_size
        self._cache: dict[str, Code] = {}
        self._previous: dict[str, Code] = {}

    @property
    def kids(self) -> frozenset[int]:
        return frozenset(self._states)

    def add_key(self, kid: int, key: bytes) -> None:
        self._states[kid] = _KeyState(key, self._message_prefix)

    def remove_key(self, kid: int) -> None:
        """Stop verifying a key's codes, including ones verified before (cache emptied)."""
        self._states.pop(kid, None)
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache = {}
        self._previous = {}

    def issue(
        self, code_type: CodeType, id_: str, issued_at: int, expires_at: int | None = None
    ) -> str:
        """A new code signed with the active key."""
        record = encode_record(code_type, self.active_kid, id_, issued_at, expires_at)
        return format_code(self.prefix, record, self._states[self.active_kid].tag(record))

    def verify(self, text: str, expected: CodeType, now_s: float) -> Code | RejectReason:
        """The decoded code, or why it is refused. Never raises for any input text."""
        code = self._cache.get(text)
        if code is None:
            code = self._previous.get(text)
            if code is None:
                checked = self._check(text)
                if isinstance(checked, str):
                    return checked
                code = checked
            self._remember(text, code)
        if code.type != expected:
            return "wrong_type"
        if code.expires_at is not None and now_s >= code.expires_at:
            return "expired"
        return code

    def _check(self, text: str) -> Code | RejectReason:
        if type(text) is not str:
            return "malformed_code"
        code = parse_code(text)
        if code is None:
            return "malformed_code"
        if code.prefix != self.prefix:
            return "wrong_app"
        state = self._states.get(code.kid)
        if state is None:
            return "unknown_key"
        if not hmac.compare_digest(state.tag(code.signed), code.tag):
            return "bad_signature"
        return code

    def _remember(self, text: str, code: Code) -> None:
        cache = self._cache
        if len(cache) >= self._cache_size:
            self._previous = cache
            cache = self._cache = {}
        cache[text] = code
