"""The script that appends events to their shards' streams, de-duplicated, and how it is
called (``gateway.pipeline.buffer`` calls it by its SHA; the buffer's docstring says how the
seen-buckets remember identities).

One call carries one or more *sections*: a section is one shard's events in one time
bucket. On a single server a whole group commit is one call, so the per-call work (the
server's command dispatch, the script's start) is paid once, not once per shard. On a Redis
Cluster every key of a call must sit in one slot, so each section is a call of its own.

Atomic per call: the identity checks, the records and the appends run as one script, so a
retried request finds exactly what the first attempt wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from gateway.pipeline.keyspace import CONSUMER_GROUP

APPEND_SCRIPT: Final = (
    b"""
-- KEYS: per section, ARGV[3] keys: the shard's stream, its current seen-bucket, the bucket
--   after it, then its older seen-buckets.
-- ARGV[1]: bucket lifetime (ms); ARGV[2]: the stream field; ARGV[3]: keys per section;
--   then per section: its event count n, then n (identity, value) pairs.
-- Returns, per section in order: the stream's length, then per event 1 appended,
--   0 duplicate.
local ttl, field, per = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- unpack() fails past the C stack's limit (8000 values): look up and record in chunks.
local CHUNK = 1000
local out = {}
local a = 4
for base = 0, #KEYS - per, per do
  local stream, current = KEYS[base + 1], KEYS[base + 2]
  local n = tonumber(ARGV[a])
  local first = a + 1  -- event i: identity ARGV[first + 2i - 2], value ARGV[first + 2i - 1]
  a = first + 2 * n
  -- A new stream gets its consumer group at once: creating one later is refused once
  -- Redis is at maxmemory, and then no flusher could ever drain the stream.
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, '"""
    + CONSUMER_GROUP.encode()
    + b"""', '0', 'MKSTREAM')
  end
  local ids = {}
  for i = 1, n do ids[i] = ARGV[first + 2 * i - 2] end
  -- Seen: held by one of the buckets (one HMGET per bucket and chunk), or earlier in this
  -- section. The bucket after the current one holds identities only when another writer's
  -- clock runs ahead, or a later group reached Redis first: looked in only if it exists.
  local seen = {}
  for k = base + 2, base + per do
    if k ~= base + 3 or redis.call('EXISTS', KEYS[k]) == 1 then
      for from = 1, n, CHUNK do
        local got = redis.call('HMGET', KEYS[k], unpack(ids, from, math.min(from + CHUNK - 1, n)))
        for j = 1, #got do
          if got[j] then seen[from + j - 1] = true end
        end
      end
    end
  end
  local at = #out + 1
  out[at] = 0
  local here, fresh = {}, {}
  for i = 1, n do
    local identity = ids[i]
    if seen[i] or here[identity] then
      out[#out + 1] = 0
    else
      here[identity] = true
      fresh[#fresh + 1] = identity
      redis.call('XADD', stream, '*', field, ARGV[first + 2 * i - 1])
      out[#out + 1] = 1
    end
  end
  for from = 1, #fresh, CHUNK do
    local record = {}
    for j = from, math.min(from + CHUNK - 1, #fresh) do
      record[#record + 1] = fresh[j]
      record[#record + 1] = ''
    end
    redis.call('HSET', current, unpack(record))
  end
  if #fresh > 0 then redis.call('PEXPIRE', current, ttl) end
  out[at] = redis.call('XLEN', stream)
end
return out
"""
)
APPEND_SHA: Final = hashlib.sha1(APPEND_SCRIPT, usedforsecurity=False).hexdigest()


def append_call(
    keys: Sequence[Sequence[Any]],
    pairs: Sequence[Sequence[bytes]],
    ttl_ms: bytes,
    field: bytes,
) -> list[Any]:
    """EVALSHA's arguments for sections with these keys (each the same number: stream,
    current bucket, older buckets) and these flattened (identity, value) pairs."""
    per = len(keys[0])
    call: list[Any] = [APPEND_SHA, per * len(keys)]
    for section_keys in keys:
        call += section_keys
    call += (ttl_ms, field, per)
    for flat in pairs:
        call.append(len(flat) // 2)
        call += flat
    return call


def split_reply(reply: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """A call's reply cut into its sections' replies: [stream length, flag per event]."""
    sections: list[list[Any]] = []
    at = 0
    for size in sizes:
        sections.append(list(reply[at : at + 1 + size]))
        at += 1 + size
    if at != len(reply):
        raise ValueError(f"append script answered {len(reply)} values, expected {at}")
    return sections
