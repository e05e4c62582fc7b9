"""Every Redis key, stream and consumer-group name scangate uses, and how shards are chosen.

Each key that one script call touches carries its shard as a hash tag (``{7}``), so a call
stays in one Redis Cluster slot and the same code runs on a cluster unchanged.
"""

from __future__ import annotations

import zlib
from typing import Final

KEY_PREFIX: Final = "sg"
CONSUMER_GROUP: Final = "scangate-flushers"
# When a flusher last committed a batch (epoch ms): what ``scangate status`` shows.
LAST_FLUSH_KEY: Final = f"{KEY_PREFIX}:last-flush"
# The one field of a stream entry: up to EVENTS_PER_ENTRY events, each a compact JSON array
# (see gateway.pipeline.events), one per line. One entry per section of a group commit, not
# one per event: Valkey's work per event fell by two fifths (benchmarks/RESULTS.md).
EVENTS_FIELD: Final = b"events"
EVENTS_PER_ENTRY: Final = 100
# The field of an entry written before entries held several events: one event, not counted
# in the backlog counter. Flushers still read it, so a backlog left by an upgrade drains.
EVENT_FIELD: Final = b"e"


def entry_values(fields: dict[bytes, bytes]) -> list[bytes]:
    """The encoded events a stream entry holds, in order ([] for neither field)."""
    packed = fields.get(EVENTS_FIELD)
    if packed is not None:
        return packed.split(b"\n")
    single = fields.get(EVENT_FIELD)
    return [] if single is None else [single]


def shard_of(app_id: str, event_id: str, shards: int) -> int:
    """The shard of an event: stable across processes and hosts (``hash()`` is salted)."""
    return zlib.crc32(f"{app_id}\x00{event_id}".encode()) % shards


def stream_key(shard: int) -> str:
    """The stream buffering a shard's accepted events until the flusher stores them."""
    return f"{KEY_PREFIX}:{{{shard}}}:events"


def seen_key(shard: int, bucket: int) -> str:
    """A hash of the event identities a shard accepted in one time bucket (de-duplication)."""
    return f"{KEY_PREFIX}:{{{shard}}}:seen:{bucket}"


def backlog_key(shard: int) -> str:
    """How many events of the shard's stream are not yet stored: raised by the append script
    as it appends, lowered by a flusher as it deletes what it stored. The stream's own length
    counts entries, which hold a varying number of events."""
    return f"{KEY_PREFIX}:{{{shard}}}:backlog"


def dead_letter_key(shard: int) -> str:
    """Events of a shard's stream that could not be decoded, kept for a person to look at."""
    return f"{KEY_PREFIX}:{{{shard}}}:dead"


def seen_field(app_id: str, event_id: str) -> bytes:
    """An event's identity inside a seen-bucket hash."""
    return f"{app_id}:{event_id}".encode()


def door_lookups_key(venue_id: str, who: str, window: int) -> str:
    """Person look-ups at a venue's door in one fixed window: ``who`` is ``venue`` or
    ``token:<staff token id>``. Hash-tagged by venue, so both of a look-up's counters are
    in one slot (a staff token belongs to one venue)."""
    return f"{KEY_PREFIX}:{{door:{venue_id}}}:lookups:{who}:{window}"


# -- one-time codes (gateway.http.otp) ------------------------------------------------------------
# Keys name a phone and a client address only by their blind indexes. A phone's keys carry
# the phone's index as their hash tag, a client address's keys the address's, so each
# script call stays in one slot.


def otp_phone_sent_key(phone_index: str) -> str:
    """The codes sent to a phone within the SMS-cost cap's window (a sorted set by time)."""
    return f"{KEY_PREFIX}:otp:{{{phone_index}}}:sent"


def otp_pair_key(phone_index: str, address_index: str, what: str) -> str:
    """What one client address did for one phone: ``sent`` (codes asked, by time),
    ``wrong`` (wrong codes, by time), ``latest`` (the id of the latest code it asked)."""
    return f"{KEY_PREFIX}:otp:{{{phone_index}}}:a:{address_index}:{what}"


def otp_code_key(phone_index: str, code_id: str) -> str:
    """One code of a phone: its HMAC, expiry and wrong tries left (a hash)."""
    return f"{KEY_PREFIX}:otp:{{{phone_index}}}:code:{code_id}"


def otp_address_key(address_index: str, what: str) -> str:
    """What one client address did for every phone: ``sent`` or ``wrong``, by time."""
    return f"{KEY_PREFIX}:otp:addr:{{{address_index}}}:{what}"
