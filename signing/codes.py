"""The code format: what a venue or person code says, and its exact text.

A code is ``PREFIX:BODY``. ``PREFIX`` is the issuing app's prefix (``VHD``); ``BODY`` is
uppercase Base32 (RFC 4648 alphabet, no padding) of this big-endian record::

    version_type  1 byte   high nibble: format version (1); low nibble: 0 venue, 1 person
    kid           2 bytes  key id that signed it (1..65535)
    id_len        1 byte   1..16
    id            id_len   A-Z0-9, ASCII
    issued_at     4 bytes  epoch seconds
    expires_at    4 bytes  epoch seconds, person codes only
    tag          16 bytes  HMAC-SHA256 truncated to 128 bits (see ``signed_message``)

Every character is in QR alphanumeric mode, so a printed venue code fits QR version 4-M.
Decoding is strict: a text decodes only if encoding the result gives that text back
(canonical Base32 length, spare bits zero, exact record length, id characters checked), so
any single-character change makes a code malformed or breaks its tag.
"""

from __future__ import annotations

import re
import struct
from typing import Final, Literal, NamedTuple

CodeType = Literal["venue", "person"]

FORMAT_VERSION: Final = 1
TAG_BYTES: Final = 16
MAX_ID_CHARS: Final = 16
MAX_VENUE_CODE_CHARS: Final = 90  # QR version 4 at level M, alphanumeric mode
MAX_CODE_CHARS: Final = 128  # anything longer is refused before it is decoded
MAX_KID: Final = 0xFFFF
MAX_EPOCH_S: Final = 0xFFFFFFFF

ID_PATTERN: Final = re.compile(r"[A-Z0-9]{1,16}")
PREFIX_PATTERN: Final = re.compile(r"[A-Z0-9]{1,16}")

_TYPE_NIBBLE: Final[dict[CodeType, int]] = {"venue": 0, "person": 1}
_NIBBLE_TYPE: Final[dict[int, CodeType]] = {0: "venue", 1: "person"}

_B32_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32HEX_ALPHABET: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUV"
# Base32 -> the digits int(x, 32) reads. Every other byte maps to "!", which int() refuses,
# so the translation also validates the alphabet (no lowercase, no "=", no whitespace, no "_").
_DECODE_TABLE: Final = bytes(
    _B32HEX_ALPHABET[_B32_ALPHABET.index(b)] if b in _B32_ALPHABET else ord("!") for b in range(256)
)
_ENCODE_TABLE: Final = bytes.maketrans(_B32HEX_ALPHABET, _B32_ALPHABET)
_ID_BYTES: Final = re.compile(rb"[A-Z0-9]+")
# Canonical Base32 lengths -> (decoded bytes, spare low bits), for every length a code can have.
_B32_LENGTHS: Final = {
    -(-n * 8 // 5): (n, -(-n * 8 // 5) * 5 - n * 8) for n in range(1, MAX_CODE_CHARS)
}
_HEAD: Final = struct.Struct(">BHB")  # version_type, kid, id_len
_U32: Final = struct.Struct(">I")


class Code(NamedTuple):
    """A decoded code. ``tag`` and ``signed`` are what verification checks.

    A NamedTuple, not a frozen dataclass: it is built once per never-seen code on the hot
    path, and a frozen dataclass's ``__init__`` costs several times more.
    """

    prefix: str
    type: CodeType
    kid: int
    id: str
    issued_at: int
    expires_at: int | None
    signed: bytes  # the record without its tag: the part the HMAC covers
    tag: bytes


def b32encode(data: bytes) -> str:
    """Uppercase Base32 without padding (RFC 4648 alphabet)."""
    if not data:
        return ""
    bits = len(data) * 8
    chars = -(-bits // 5)
    n = int.from_bytes(data, "big") << (chars * 5 - bits)
    digits = _to_base32hex(n, chars)
    return digits.translate(_ENCODE_TABLE).decode("ascii")


def _to_base32hex(n: int, chars: int) -> bytes:
    out = bytearray(chars)
    for i in range(chars - 1, -1, -1):
        out[i] = _B32HEX_ALPHABET[n & 31]
        n >>= 5
    return bytes(out)


def b32decode_strict(text: bytes) -> bytes | None:
    """Decode canonical unpadded Base32, or return None.

    Canonical means: only ``A-Z2-7``, a length some byte string encodes to, and the spare
    low bits of the last character zero. ``int(x, 32)`` does the work in C; the pure-Python
    ``base64.b32decode`` is several times slower.
    """
    shape = _B32_LENGTHS.get(len(text))
    if shape is None:
        return None
    nbytes, spare = shape
    try:
        n = int(text.translate(_DECODE_TABLE), 32)
    except ValueError:
        return None
    if n & ((1 << spare) - 1):
        return None
    return (n >> spare).to_bytes(nbytes, "big")


def encode_record(
    code_type: CodeType, kid: int, id_: str, issued_at: int, expires_at: int | None
) -> bytes:
    """The signed part of a code's record (everything but the tag)."""
    if not 1 <= kid <= MAX_KID:
        raise ValueError(f"key id {kid} out of range 1..{MAX_KID}")
    if not ID_PATTERN.fullmatch(id_):
        raise ValueError("an id is 1 to 16 characters of A-Z0-9")
    if not 0 <= issued_at <= MAX_EPOCH_S:
        raise ValueError("issue time out of range")
    head = bytes([(FORMAT_VERSION << 4) | _TYPE_NIBBLE[code_type]])
    record = (
        head
        + kid.to_bytes(2, "big")
        + bytes([len(id_)])
        + id_.encode("ascii")
        + issued_at.to_bytes(4, "big")
    )
    if code_type == "person":
        if expires_at is None or not issued_at < expires_at <= MAX_EPOCH_S:
            raise ValueError("a person code needs an expiry after its issue time")
        record += expires_at.to_bytes(4, "big")
    elif expires_at is not None:
        raise ValueError("a venue code has no expiry")
    return record


def format_code(prefix: str, signed: bytes, tag: bytes) -> str:
    """The code's text from its prefix, signed record and tag."""
    return f"{prefix}:{b32encode(signed + tag)}"


def parse_code(text: str) -> Code | None:
    """Decode a code's text strictly; None when it is not a well-formed code.

    The tag is not checked here; see ``signing.verify``.
    """
    if len(text) > MAX_CODE_CHARS:
        return None
    prefix, sep, body = text.partition(":")
    if not sep or not PREFIX_PATTERN.fullmatch(prefix):
        return None
    try:
        raw = b32decode_strict(body.encode("ascii"))
    except UnicodeEncodeError:
        return None
    if raw is None or len(raw) < 8 + TAG_BYTES:
        return None
    head, kid, id_len = _HEAD.unpack_from(raw)
    code_type = _NIBBLE_TYPE.get(head & 0x0F)
    if head >> 4 != FORMAT_VERSION or code_type is None:
        return None
    end_id = 4 + id_len
    expected_len = end_id + 4 + TAG_BYTES + (4 if code_type == "person" else 0)
    if kid == 0 or not 1 <= id_len <= MAX_ID_CHARS or len(raw) != expected_len:
        return None
    id_bytes = raw[4:end_id]
    if _ID_BYTES.fullmatch(id_bytes) is None:
        return None
    issued_at = _U32.unpack_from(raw, end_id)[0]
    expires_at = _U32.unpack_from(raw, end_id + 4)[0] if code_type == "person" else None
    split = len(raw) - TAG_BYTES
    return Code(
        prefix,
        code_type,
        kid,
        id_bytes.decode("ascii"),
        issued_at,
        expires_at,
        raw[:split],
        raw[split:],
    )


def signed_message_prefix(app_id: str) -> bytes:
    """What the HMAC covers before a code's record: a domain label and the app id.

    The record itself carries the format version and the code type, so the tag binds the
    app, the type and every field together.
    """
    return b"scangate-code\x00" + app_id.encode("ascii") + b"\x00"
