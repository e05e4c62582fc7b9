"""The script that appends events to their shards' streams, de-duplicated, and how it is
called (``gateway.pipeline.buffer`` calls it by its SHA; the buffer's docstring says how the
seen-buckets remember identities).

One call carries one or more *sections*: a section is one shard's events in one time
bucket. On a single server a whole group commit is one call, so the per-call work (the
server's command dispatch, the script's start) is paid once, not once per shard. On a Redis
Cluster every key of a call must sit in one slot, so each section is a call of its own.

A section's new events go to its stream as one entry, one event per line (up to
``EVENTS_PER_ENTRY``), not one entry each: an entry's cost to the server (the XADD, its id,
its line in the append-only file) is then paid per section. The events come as one value,
so a section is n + 2 arguments, not 2n + 1. The call also raises the shard's backlog
counter by the events it appended, since the stream's length counts entries.

Atomic per call: the identity checks, the records and the appends run as one script, so a
retried request finds exactly what the first attempt wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from gateway.pipeline.keyspace import CONSUMER_GROUP, EVENTS_FIELD, EVENTS_PER_ENTRY

APPEND_SCRIPT: Final = (
    b"""
-- KEYS: per section, ARGV[3] keys: the shard's stream, its backlog counter, its current
--   seen-bucket, the bucket after it, then its older seen-buckets.
-- ARGV[1]: bucket lifetime (ms); ARGV[2]: the stream field; ARGV[3]: keys per section;
--   ARGV[4]: most events per stream entry; then per section: its event count n, the n
--   identities, and the n encoded events in one value, one per line.
-- Returns, per section in order: the shard's backlog, then per event 1 appended,
--   0 duplicate.
local ttl, field, per, most = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
-- unpack() fails past the C stack's limit (8000 values): look up and record in chunks.
local CHUNK = 1000
local out = {}
local a = 5
for base = 0, #KEYS - per, per do
  local stream, backlog, current = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3]
  local n = tonumber(ARGV[a])
  local first = a + 1  -- identity i: ARGV[first + i - 1]
  local lines = ARGV[first + n]
  a = first + n + 1
  -- A new stream gets its consumer group at once: creating one later is refused once
  -- Redis is at maxmemory, and then no flusher could ever drain the stream.
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, '"""
    + CONSUMER_GROUP.encode()
    + rb"""', '0', 'MKSTREAM')
  end
  local ids = {}
  for i = 1, n do ids[i] = ARGV[first + i - 1] end
  -- Seen: held by one of the buckets (one HMGET per bucket and chunk), or earlier in this
  -- section. The bucket after the current one holds identities only when another writer's
  -- clock runs ahead, or a later group reached Redis first: looked in only if it exists.
  local seen = {}
  for k = base + 3, base + per do
    if k ~= base + 4 or redis.call('EXISTS', KEYS[k]) == 1 then
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
      out[#out + 1] = 1
    end
  end
  -- The usual case, every event new and few enough for one entry, appends the value as
  -- it came; otherwise the new events' lines are cut out and appended in entries of at
  -- most `most` events.
  if #fresh > 0 and #fresh == n and n <= most then
    redis.call('XADD', stream, '*', field, lines)
  elseif #fresh > 0 then
    local kept, from = {}, 1
    for i = 1, n do
      local stop = string.find(lines, '\n', from, true) or #lines + 1
      local line = string.sub(lines, from, stop - 1)
      from = stop + 1
      if out[at + i] == 1 then
        kept[#kept + 1] = line
        if #kept == most then
          redis.call('XADD', stream, '*', field, table.concat(kept, '\n'))
          kept = {}
        end
      end
    end
    if #kept > 0 then redis.call('XADD', stream, '*', field, table.concat(kept, '\n')) end
  end
  for from = 1, #fresh, CHUNK do
    local record = {}
    for j = from, math.min(from + CHUNK - 1, #fresh) do
      record[#record + 1] = fresh[j]
      record[#record + 1] = ''
    end
    redis.call('HSET', current, unpack(record))
  end
  if #fresh > 0 then
    redis.call('PEXPIRE', current, ttl)
    out[at] = redis.call('INCRBY', backlog, #fresh)
  else
    out[at] = tonumber(redis.call('GET', backlog) or 0)
  end
end
return out
"""
)
APPEND_SHA: Final = hashlib.sha1(APPEND_SCRIPT, usedforsecurity=False).hexdigest()


def append_call(
    keys: Sequence[Sequence[Any]],
    sections: Sequence[tuple[Sequence[bytes], Sequence[bytes]]],
    ttl_ms: bytes,
) -> list[Any]:
    """EVALSHA's arguments for sections with these keys (each the same number: stream,
    backlog, current bucket, the next, older buckets): per section its identities and its
    events' lines, in one or more pieces (one per request), each one event per line."""
    per = len(keys[0])
    call: list[Any] = [APPEND_SHA, per * len(keys)]
    for section_keys in keys:
        call += section_keys
    call += (ttl_ms, EVENTS_FIELD, per, EVENTS_PER_ENTRY)
    for identities, pieces in sections:
        call.append(len(identities))
        call += identities
        call.append(pieces[0] if len(pieces) == 1 else b"\n".join(pieces))
    return call


def split_reply(reply: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    """A call's reply cut into its sections' replies: [backlog, flag per event]."""
    sections: list[list[Any]] = []
    at = 0
    for size in sizes:
        sections.append(list(reply[at : at + 1 + size]))
        at += 1 + size
    if at != len(reply):
        raise ValueError(f"append script answered {len(reply)} values, expected {at}")
    return sections
