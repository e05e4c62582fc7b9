"""What an operator asks first: is the buffer draining, and what has reached storage?
(``scangate status``, ``GET /v1/status``.)

- the buffer: each shard's backlog (events accepted and not yet stored: the append script
  counts them in, a flusher counts them off as it deletes the entries its batch committed)
  and the age of its oldest entry (a stream entry's id is its arrival time in
  milliseconds), and when a flusher last committed a batch;
- storage: the events and visits it holds (estimated on a large PostgreSQL database);
- the outbox: exposure notices waiting to be delivered.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import RedisError

from gateway.pipeline.keyspace import LAST_FLUSH_KEY, backlog_key, stream_key
from storage import Storage
from storage.times import format_time_ms


async def buffer_status(client: Any, shards: int, now_ms: int) -> dict[str, Any]:
    """The buffer's part of the status, in one round trip; ``{"error": ...}`` when Redis
    does not answer."""
    try:
        pipe = client.pipeline(transaction=False)
        for shard in range(shards):
            pipe.get(backlog_key(shard))
            pipe.xrange(stream_key(shard), count=1)
        pipe.get(LAST_FLUSH_KEY)
        *replies, last_flush = await pipe.execute()
    except (RedisError, OSError) as exc:
        return {"error": f"Redis does not answer: {type(exc).__name__}"}
    rows = []
    for shard in range(shards):
        length, first = int(replies[2 * shard] or 0), replies[2 * shard + 1]
        oldest_ms = int(first[0][0].split(b"-")[0]) if first else None
        rows.append(
            {
                "shard": shard,
                "backlog": length,
                "oldest_age_s": None if oldest_ms is None else _age_s(now_ms, oldest_ms),
            }
        )
    ages = [r["oldest_age_s"] for r in rows if r["oldest_age_s"] is not None]
    last_ms = int(last_flush) if last_flush is not None else None
    return {
        "backlog": sum(r["backlog"] for r in rows),
        "oldest_age_s": max(ages) if ages else None,
        "last_flush": None if last_ms is None else format_time_ms(last_ms),
        "last_flush_age_s": None if last_ms is None else _age_s(now_ms, last_ms),
        "shards": rows,
    }


async def storage_status(storage: Storage) -> dict[str, Any]:
    events, visits, exact = await storage.stored_counts()
    return {
        "storage": {"kind": storage.kind, "events": events, "visits": visits, "exact": exact},
        "outbox": {"pending": await storage.pending_notices()},
    }


def _age_s(now_ms: int, then_ms: int) -> float:
    return round(max(0, now_ms - then_ms) / 1000, 3)


def status_table(doc: dict[str, Any]) -> str:
    """The status as a person reads it."""
    lines = []
    buffer = doc["buffer"]
    if "error" in buffer:
        lines.append(f"buffer         {buffer['error']}")
    else:
        oldest = buffer["oldest_age_s"]
        flushed = buffer["last_flush"]
        lines += [
            f"backlog        {buffer['backlog']:,} events"
            + ("" if oldest is None else f", the oldest {oldest:.1f} s old"),
            "last flush     "
            + (
                "never"
                if flushed is None
                else f"{flushed} ({buffer['last_flush_age_s']:.1f} s ago)"
            ),
        ]
    stored = doc["storage"]
    about = "" if stored["exact"] else "about "
    lines += [
        f"storage        {stored['kind']}: {about}{stored['events']:,} events, "
        f"{about}{stored['visits']:,} visits",
        f"outbox         {doc['outbox']['pending']:,} notices pending",
    ]
    if "error" not in buffer:
        lines += ["", "shard  backlog  oldest (s)"]
        for row in buffer["shards"]:
            age = "-" if row["oldest_age_s"] is None else f"{row['oldest_age_s']:.1f}"
            lines.append(f"{row['shard']:>5}  {row['backlog']:>7,}  {age:>10}")
    return "\n".join(lines) + "\n"
