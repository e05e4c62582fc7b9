"""Scan events: checking one posted event, and its compact form in a stream entry.

This is the transform between the HTTP source and the Redis buffer: a posted JSON object
becomes either a ``ScanEvent`` (both codes verified with the posting app's keys, times in
range) or a ``Rejection`` with a reason from a closed set and a detail naming the field.
A ``ScanEvent`` is also the row storage keeps, so its type is ``storage.models``'s; its
stream format is here. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Final, NamedTuple

import orjson

from signing import REJECT_REASONS, Code, CodeType, CodeVerifier
from storage.models import Kind, ScanEvent
from storage.times import parse_time_ms

__all__ = [
    "EVENT_REASONS",
    "EventRules",
    "Rejection",
    "ScanEvent",
    "check_event",
    "decode_event",
    "encode_event",
    "encode_lines",
]
KINDS: Final[tuple[Kind, ...]] = ("checkin", "checkout")

# Why an event is rejected: the signing reasons plus the gateway's own. Also a metric label.
EVENT_REASONS: Final[tuple[str, ...]] = (
    *REJECT_REASONS,
    "clock_skew",
    "too_late",
    "invalid_event",
    "revoked",
)

EVENT_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_DEVICE_ID_CHARS: Final = 128
_DEVICE_ID_PATTERN: Final = re.compile(r"[\x20-\x7e]{1,128}")  # printable ASCII
_KIND_CODE: Final[dict[str, str]] = {"checkin": "i", "checkout": "o"}
_CODE_KIND: Final[dict[str, Kind]] = {"i": "checkin", "o": "checkout"}


class Rejection(NamedTuple):
    event_id: str | None
    reason: str
    detail: str
    kind: str = "unknown"  # the event's kind when it was readable (a metric label)


class EventRules(NamedTuple):
    """The time limits an event's scan time must meet."""

    clock_skew_ms: int
    late_window_ms: int


class Envelope(NamedTuple):
    """What every event carries besides its codes."""

    event_id: str
    kind: Kind
    device_id: str | None
    scanned_at_ms: int


def check_envelope(raw: object, rules: EventRules, now_ms: int) -> Envelope | Rejection:
    """Check an event's id, kind, device id and scan time (not its codes)."""
    if not isinstance(raw, dict):
        return Rejection(None, "invalid_event", "an event must be a JSON object")
    event_id = raw.get("event_id")
    if not isinstance(event_id, str) or not EVENT_ID_PATTERN.fullmatch(event_id):
        shown = event_id if isinstance(event_id, str) and len(event_id) <= 64 else None
        return Rejection(shown, "invalid_event", "event_id: 8 to 64 characters of A-Za-z0-9_-")
    kind = raw.get("kind")
    if kind != "checkin" and kind != "checkout":
        return Rejection(event_id, "invalid_event", 'kind: "checkin" or "checkout"')
    device_id = raw.get("device_id")
    if device_id is not None and (
        not isinstance(device_id, str) or not _DEVICE_ID_PATTERN.fullmatch(device_id)
    ):
        return Rejection(
            event_id, "invalid_event", "device_id: 1 to 128 printable ASCII characters", kind
        )
    try:
        scanned_at_ms = parse_time_ms(raw.get("scanned_at"))
    except ValueError as exc:
        return Rejection(event_id, "invalid_event", f"scanned_at: {exc}", kind)
    if scanned_at_ms > now_ms + rules.clock_skew_ms:
        return Rejection(event_id, "clock_skew", "scanned_at: too far in the future", kind)
    if scanned_at_ms < now_ms - rules.late_window_ms:
        return Rejection(event_id, "too_late", "scanned_at: older than the late window", kind)
    return Envelope(event_id, kind, device_id, scanned_at_ms)


def check_event(
    raw: object,
    app_id: str,
    verifier: CodeVerifier,
    rules: EventRules,
    now_ms: int,
    revoked_venues: AbstractSet[str] = frozenset(),
) -> ScanEvent | Rejection:
    """Check one posted event. Never raises, whatever ``raw`` holds.

    ``revoked_venues``: registered venues whose codes are refused (``revoked``), however
    well signed; a set look-up, so it costs the hot path nothing measurable.
    """
    envelope = check_envelope(raw, rules, now_ms)
    if isinstance(envelope, Rejection):
        return envelope
    assert isinstance(raw, dict)  # check_envelope made sure
    # check_code twice, inlined: this runs for every event of every batch.
    now_s = now_ms / 1000
    venue_text = raw.get("venue_code")
    if not isinstance(venue_text, str):
        return _not_a_string(envelope, "venue_code")
    venue = verifier.verify(venue_text, "venue", now_s)
    if isinstance(venue, str):
        return _refused(envelope, "venue_code", venue)
    if venue.id in revoked_venues:
        return _revoked(envelope, "venue_code")
    person_text = raw.get("person_code")
    if not isinstance(person_text, str):
        return _not_a_string(envelope, "person_code")
    person = verifier.verify(person_text, "person", now_s)
    if isinstance(person, str):
        return _refused(envelope, "person_code", person)
    return ScanEvent(
        app_id,
        envelope.event_id,
        envelope.kind,
        venue.id,
        person.id,
        envelope.scanned_at_ms,
        now_ms,
        envelope.device_id,
    )


def check_code(
    raw: dict[str, object],
    field: str,
    verifier: CodeVerifier,
    envelope: Envelope,
    now_ms: int,
    revoked_venues: AbstractSet[str] = frozenset(),
) -> Code | Rejection:
    """Verify ``raw[field]`` ("venue_code" or "person_code") with the app's keys."""
    text = raw.get(field)
    if not isinstance(text, str):
        return _not_a_string(envelope, field)
    expected: CodeType = "venue" if field == "venue_code" else "person"
    verdict = verifier.verify(text, expected, now_ms / 1000)
    if isinstance(verdict, str):
        return _refused(envelope, field, verdict)
    if verdict.id in revoked_venues and expected == "venue":
        return _revoked(envelope, field)
    return verdict


def _not_a_string(envelope: Envelope, field: str) -> Rejection:
    return Rejection(
        envelope.event_id, "invalid_event", f"{field}: missing or not a string", envelope.kind
    )


def _refused(envelope: Envelope, field: str, reason: str) -> Rejection:
    return Rejection(envelope.event_id, reason, f"{field}: {REASON_TEXT[reason]}", envelope.kind)


def _revoked(envelope: Envelope, field: str) -> Rejection:
    return Rejection(
        envelope.event_id, "revoked", f"{field}: the venue's code was revoked", envelope.kind
    )


REASON_TEXT: Final[dict[str, str]] = {
    "malformed_code": "not a well-formed code",
    "wrong_app": "issued by another app",
    "wrong_type": "a code of the other type (venue or person)",
    "unknown_key": "signed with a key this app does not have (retired?)",
    "bad_signature": "the signature does not match",
    "expired": "the code has expired",
}


def encode_event(event: ScanEvent) -> bytes:
    """One event's line in a stream entry: a JSON array, smaller than a field per column."""
    encoded = orjson.dumps(
        [
            event.app_id,
            event.event_id,
            _KIND_CODE[event.kind],
            event.venue_id,
            event.person_id,
            event.scanned_at_ms,
            event.received_at_ms,
            event.device_id,
        ]
    )
    # Copied to a bytes object of its own size: orjson's keeps the 4 KiB it was written in,
    # and an encoded event waits for its group commit (48 batches of 100 held 19.6 MB so).
    # b"%b" makes a real copy; bytes(encoded) would hand back the same object.
    return b"%b" % encoded


def encode_lines(events: Iterable[ScanEvent]) -> bytes:
    """Events as a stream entry holds them: ``encode_event``'s values, one per line (JSON
    as orjson writes it holds no newline). One copy, the join, which also frees orjson's
    buffers at once."""
    dumps, kind_code = orjson.dumps, _KIND_CODE
    return b"\n".join(
        [
            dumps(
                [
                    event.app_id,
                    event.event_id,
                    kind_code[event.kind],
                    event.venue_id,
                    event.person_id,
                    event.scanned_at_ms,
                    event.received_at_ms,
                    event.device_id,
                ]
            )
            for event in events
        ]
    )


def decode_event(value: bytes) -> ScanEvent:
    """The inverse of ``encode_event``; raises ValueError for anything else."""
    try:
        app_id, event_id, kind, venue_id, person_id, scanned, received, device = orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not an encoded scan event: {exc}") from None
    fields_ok = (
        isinstance(app_id, str)
        and isinstance(event_id, str)
        and kind in _CODE_KIND
        and isinstance(venue_id, str)
        and isinstance(person_id, str)
        and type(scanned) is int
        and type(received) is int
        and (device is None or isinstance(device, str))
    )
    if not fields_ok:
        raise ValueError("not an encoded scan event: a field has the wrong type")
    return ScanEvent(
        app_id, event_id, _CODE_KIND[kind], venue_id, person_id, scanned, received, device
    )
