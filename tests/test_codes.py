"""The code format: strict parsing, QR-friendly text, size limits, and tamper refusal."""

from __future__ import annotations

import base64
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signing import Code, CodeVerifier, Keyring, parse_code
from signing.codes import (
    MAX_VENUE_CODE_CHARS,
    b32decode_strict,
    b32encode,
    encode_record,
    format_code,
)

QR_ALPHANUMERIC = string.digits + string.ascii_uppercase + " $%*+-./:"
NOW = 1_790_000_000
ids = st.text(alphabet=string.ascii_uppercase + string.digits, min_size=1, max_size=16)
prefixes = st.text(alphabet=string.ascii_uppercase + string.digits, min_size=1, max_size=16)
# Characters a mutation may use: the whole QR alphabet, lowercase, padding, a non-ASCII one.
MUTATION_CHARS = QR_ALPHANUMERIC + "abz=_é"


def verifier(prefix: str = "VHD", app_id: str = "vhd", kid: int = 1) -> CodeVerifier:
    return CodeVerifier(app_id, prefix, {kid: bytes(range(32))}, kid, cache_size=4)


def mutations(code: str) -> set[str]:
    """Every text one substitution, deletion or insertion away from ``code``."""
    out: set[str] = set()
    for i in range(len(code) + 1):
        for ch in MUTATION_CHARS:
            out.add(code[:i] + ch + code[i:])
            if i < len(code):
                out.add(code[:i] + ch + code[i + 1 :])
        if i < len(code):
            out.add(code[:i] + code[i + 1 :])
    out.discard(code)
    return out


@given(data=st.binary(min_size=1, max_size=60))
def test_base32_matches_the_standard_library(data: bytes) -> None:
    text = b32encode(data)
    assert text == base64.b32encode(data).decode().rstrip("=")
    assert b32decode_strict(text.encode()) == data


@pytest.mark.parametrize(
    "text", ["", "A", "ABC", "ABCDEF", "AB", "aa", "A=", "A A", "1B", "_AAAAAAA", "+AAAAAAA"]
)
def test_base32_refuses_noncanonical_text(text: str) -> None:
    # "AB" has 2 spare bits set by "B"; lengths 1, 3 and 6 no byte string encodes to.
    assert b32decode_strict(text.encode()) is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(id_=ids, kind=st.sampled_from(["venue", "person"]), prefix=prefixes)
def test_every_single_character_change_is_refused(id_: str, kind: str, prefix: str) -> None:
    v = verifier(prefix=prefix)
    expires = NOW + 86400 if kind == "person" else None
    code = v.issue(kind, id_, NOW, expires)  # type: ignore[arg-type]
    assert isinstance(v.verify(code, kind, NOW), Code)  # type: ignore[arg-type]
    for mutated in mutations(code):
        result = v.verify(mutated, kind, NOW)  # type: ignore[arg-type]
        assert isinstance(result, str), f"accepted a changed code: {mutated!r}"


@settings(max_examples=200, deadline=None)
@given(
    id_=ids,
    kind=st.sampled_from(["venue", "person"]),
    prefix=prefixes,
    kid=st.integers(1, 0xFFFF),
    issued=st.integers(0, 2**32 - 2),
)
def test_decoding_then_encoding_gives_the_same_text(
    id_: str, kind: str, prefix: str, kid: int, issued: int
) -> None:
    expires = issued + 1 if kind == "person" else None
    record = encode_record(kind, kid, id_, issued, expires)  # type: ignore[arg-type]
    text = format_code(prefix, record, b"\x07" * 16)
    code = parse_code(text)
    assert code is not None
    assert (code.type, code.kid, code.id, code.issued_at, code.expires_at) == (
        kind,
        kid,
        id_,
        issued,
        expires,
    )
    again = format_code(
        code.prefix,
        encode_record(code.type, code.kid, code.id, code.issued_at, code.expires_at),
        code.tag,
    )
    assert again == text


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet=QR_ALPHANUMERIC + "abc=é", max_size=100))
def test_any_text_that_parses_is_canonical(text: str) -> None:
    code = parse_code(text)
    if code is not None:
        assert format_code(code.prefix, code.signed, code.tag) == text


@pytest.mark.parametrize(
    "bad",
    [
        None,
        42,
        b"VHD:AAAA",
        "",
        ":",
        "VHD:",
        "vhd:" + "A" * 40,
        "VHD:" + "A" * 500,
        "VHD:" + "A" * 1000000,
    ],
)
def test_garbage_is_malformed_not_an_exception(bad: object) -> None:
    assert verifier().verify(bad, "venue", NOW) == "malformed_code"  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(id_=ids, prefix=prefixes)
def test_codes_use_qr_alphanumeric_text_and_venue_codes_fit(id_: str, prefix: str) -> None:
    v = verifier(prefix=prefix)
    venue = v.issue("venue", id_, NOW)
    person = v.issue("person", id_, NOW, NOW + 1)
    for code in (venue, person):
        assert set(code) <= set(QR_ALPHANUMERIC)
        assert code.startswith(prefix + ":")
    assert len(venue) <= MAX_VENUE_CODE_CHARS


def test_longest_venue_code_is_within_90_characters() -> None:
    code = verifier(prefix="P" * 16, kid=0xFFFF).issue("venue", "Z" * 16, 2**32 - 1)
    assert len(code) <= 90
    assert re.fullmatch(r"[A-Z0-9]+:[A-Z2-7]+", code)


def test_tag_is_hmac_sha256_over_app_and_record_at_least_128_bits() -> None:
    import hashlib
    import hmac

    key = bytes(range(32))
    v = CodeVerifier("vhd", "VHD", {1: key}, 1)
    code = parse_code(v.issue("venue", "V1", NOW))
    assert code is not None
    expected = hmac.new(key, b"scangate-code\x00vhd\x00" + code.signed, hashlib.sha256).digest()
    assert len(code.tag) * 8 >= 128
    assert code.tag == expected[: len(code.tag)]


def test_same_key_different_app_id_is_a_bad_signature() -> None:
    # Domain separation: two apps that happened to share a key and prefix still differ.
    a = CodeVerifier("appa", "X", {1: bytes(32)}, 1)
    b = CodeVerifier("appb", "X", {1: bytes(32)}, 1)
    assert b.verify(a.issue("venue", "V1", NOW), "venue", NOW) == "bad_signature"


def test_a_forged_tag_is_a_bad_signature() -> None:
    v = verifier()
    code = parse_code(v.issue("venue", "V1", NOW))
    assert code is not None
    forged = format_code("VHD", code.signed, bytes(16))
    assert v.verify(forged, "venue", NOW) == "bad_signature"


def test_wrong_type_and_expiry(keyring: Keyring) -> None:
    keyring.add_app("vhd")
    venue = keyring.issue("vhd", "venue", "V1", now_s=NOW)
    person = keyring.issue("vhd", "person", "P1", now_s=NOW, ttl_s=3600)
    v = keyring.verifier("vhd")
    assert v.verify(venue, "person", NOW) == "wrong_type"
    assert v.verify(person, "venue", NOW) == "wrong_type"
    assert isinstance(v.verify(person, "person", NOW + 3599), Code)
    assert v.verify(person, "person", NOW + 3600) == "expired"
    # Cached or not, an expired code stays expired.
    assert v.verify(person, "person", NOW + 10**6) == "expired"


def test_cache_is_bounded_and_still_answers() -> None:
    v = verifier()
    codes = [v.issue("venue", f"V{i}", NOW) for i in range(20)]
    for _ in range(3):
        for c in codes:
            assert isinstance(v.verify(c, "venue", NOW), Code)
    assert len(v._cache) <= 4 and len(v._previous) <= 4
