"""Where PostgreSQL's time goes during a drain: ``bench_flush.py --statements``.

The private cluster then runs with ``pg_stat_statements`` (and I/O timing) loaded. Before
a drain the statement and WAL statistics are reset; after it, each statement's execution
time, buffers and WAL are divided by the events drained. The statements are the
flushers' own (the benchmark's reads come after the snapshot).

Execution time is the server's time inside the statement (not the commit, not the client's
parse and send), so the per-statement figures add up to less than the database's CPU per
event that the main table reports; the WAL figures include the commits'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

# What the private cluster loads for the profile (over deploy/postgresql/postgresql.conf).
SERVER_SETTINGS: Final = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "top",
    "pg_stat_statements.max": "1000",
    "track_io_timing": "on",
}
TOP: Final = 12
QUERY_CHARS: Final = 90


@dataclass(frozen=True)
class StatementCost:
    """One statement's cost per event drained."""

    query: str
    calls: int
    exec_us: float
    rows: float
    blocks_hit: float
    blocks_read: float
    blocks_dirtied: float
    wal_bytes: float
    wal_fpi: float

    def record(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Profile:
    statements: list[StatementCost]
    exec_us: float  # every statement's, per event
    wal_bytes: float  # the whole server's, per event (commits included)
    wal_fpi: float
    wal_sync_us: float

    def record(self) -> dict[str, Any]:
        return {
            "statements": [s.record() for s in self.statements],
            "exec_us": self.exec_us,
            "wal_bytes": self.wal_bytes,
            "wal_fpi": self.wal_fpi,
            "wal_sync_us": self.wal_sync_us,
        }


async def reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
        await conn.execute("SELECT pg_stat_reset_shared('wal')")
    finally:
        await conn.close()


async def take(url: str, events: int) -> Profile:
    """The statements since ``reset``, per event of a drain of ``events``."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT query, calls, total_exec_time, rows, shared_blks_hit, shared_blks_read, "
            "shared_blks_dirtied, wal_bytes, wal_fpi FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC"
        )
        wal = await conn.fetchrow("SELECT wal_bytes, wal_fpi, wal_sync_time FROM pg_stat_wal")
    finally:
        await conn.close()
    # One statement can have several entries (one per plan cache of each connection that
    # prepared it, or per user): they are summed by their text.
    sums: dict[str, list[float]] = {}
    for r in rows:
        total = sums.setdefault(r[0], [0.0] * 8)
        for i in range(8):
            total[i] += float(r[i + 1])
    per = 1.0 / events
    costs = sorted(
        (
            StatementCost(
                query=_short(query),
                calls=int(t[0]),
                exec_us=t[1] * 1000 * per,
                rows=t[2] * per,
                blocks_hit=t[3] * per,
                blocks_read=t[4] * per,
                blocks_dirtied=t[5] * per,
                wal_bytes=t[6] * per,
                wal_fpi=t[7] * per,
            )
            for query, t in sums.items()
        ),
        key=lambda c: -c.exec_us,
    )
    assert wal is not None
    return Profile(
        statements=costs[:TOP],
        exec_us=sum(c.exec_us for c in costs),
        wal_bytes=float(wal[0]) * per,
        wal_fpi=float(wal[1]) * per,
        wal_sync_us=float(wal[2]) * 1000 * per,
    )


def _short(query: str) -> str:
    one_line = re.sub(r"\s+", " ", query).strip()
    if len(one_line) <= QUERY_CHARS:
        return one_line
    return one_line[: QUERY_CHARS - 1] + "…"


def table(label: str, profile: Profile) -> str:
    """A markdown table of ``profile``, per event drained."""
    lines = [
        f"PostgreSQL statements during the {label} drain, per event drained: "
        f"{profile.exec_us:.1f} µs of execution in all; WAL {profile.wal_bytes:,.0f} bytes "
        f"({profile.wal_fpi:.3f} full-page images), WAL sync {profile.wal_sync_us:.1f} µs.",
        "",
        "| statement | calls | exec µs | rows | blocks hit / read / dirtied | WAL bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in profile.statements:
        query = s.query.replace("|", "\\|")
        lines.append(
            f"| `{query}` | {s.calls:,} | {s.exec_us:.2f} | {s.rows:.2f} | "
            f"{s.blocks_hit:.2f} / {s.blocks_read:.3f} / {s.blocks_dirtied:.3f} | "
            f"{s.wal_bytes:,.0f} |"
        )
    return "\n".join(lines)
