"""The script that appends a request's events to a shard's stream, de-duplicated
(``gateway.pipeline.buffer`` calls it by its SHA; the buffer's docstring says how the
seen-buckets remember identities).

Atomic per call: the identity checks, the records and the appends of one shard's events run
as one script, so a retried request finds exactly what the first attempt wrote.
"""

from __future__ import annotations

import hashlib
from typing import Final

from gateway.pipeline.keyspace import CONSUMER_GROUP

APPEND_SCRIPT: Final = (
    b"""
-- KEYS[1]: the shard's stream; KEYS[2]: the current seen-bucket; KEYS[3..]: older buckets.
-- ARGV[1]: bucket lifetime (ms); ARGV[2]: the stream field; then (identity, value) pairs.
-- Returns {stream length, then per event: 1 appended, 0 duplicate}.
-- A new stream gets its consumer group at once: creating one later is refused once
-- Redis is at maxmemory, and then no flusher could ever drain the stream.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], '"""
    + CONSUMER_GROUP.encode()
    + b"""', '0', 'MKSTREAM')
end
local out = {0}
local added = false
-- An identity is seen when an older bucket holds it, or the current one already does:
-- HSETNX checks and records it there in one call (a new event: one HEXISTS per older
-- bucket, the HSETNX, the XADD).
for i = 3, #ARGV, 2 do
  local identity = ARGV[i]
  local seen = false
  for k = 3, #KEYS do
    if redis.call('HEXISTS', KEYS[k], identity) == 1 then seen = true; break end
  end
  if not seen and redis.call('HSETNX', KEYS[2], identity, '') == 1 then
    redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i + 1])
    out[#out + 1] = 1
    added = true
  else
    out[#out + 1] = 0
  end
end
if added then redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
out[1] = redis.call('XLEN', KEYS[1])
return out
"""
)
APPEND_SHA: Final = hashlib.sha1(APPEND_SCRIPT, usedforsecurity=False).hexdigest()
