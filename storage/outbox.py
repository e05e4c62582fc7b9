"""Confirmed cases, the venue windows they make risky, and the outbox of exposure notices,
written once for both backends (``storage.sql``).

The outbox is how a notice is never lost and never sent twice by scangate:

- a case, its risky windows and all its notices are stored in one transaction, so a notice
  exists exactly when its case does;
- a notice's id is derived from what makes it unique (case, contact, venue, exposure
  start, channel and app), and that tuple is also a unique key;
- a worker *claims* due notices by taking a lease (an owner and an expiry) in one
  statement that re-checks the lease, so two workers never hold the same notice; it
  marks the notice delivered only while it still holds the lease;
- a worker that dies leaves its lease to expire; the notice is then claimed again. So a
  notice whose delivery was in flight when its worker died is sent again: receivers must
  treat the notice id (sent as ``Idempotency-Key``) as the identity of the notice.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from .sql import SharedSql


class CaseRecord(NamedTuple):
    case_id: str
    person_id: str
    confirmed_at_ms: int
    note_enc: bytes | None
    created_at_ms: int
    created_by: str
    contacts: int
    notices: int


class CaseWindow(NamedTuple):
    """A venue and the time a case may have been there (widened by the tracing margin)."""

    venue_id: str
    from_ms: int
    to_ms: int
    level: str  # "high": the case stayed at least the minimum overlap; else "low"


class NoticeRecord(NamedTuple):
    notice_id: str
    case_id: str
    person_id: str
    venue_id: str
    exposure_start_ms: int
    exposure_end_ms: int
    overlap_minutes: float
    channel: str  # "webhook" or "sms"
    app_id: str  # the app whose webhook is called; "" for an SMS
    state: str  # "pending", "delivered" or "failed"
    attempts: int
    next_attempt_at_ms: int
    last_error: str | None
    delivered_at_ms: int | None
    created_at_ms: int
    # False when the exposure rests on an assumed end (``ContactRow.checkout_recorded``).
    checkout_recorded: bool = True


_CASE_COLUMNS: Final = ", ".join(CaseRecord._fields).replace("_ms", "")
_NOTICE_COLUMNS: Final = (
    ", ".join(NoticeRecord._fields)
    .replace("_start_ms", "_start")
    .replace("_end_ms", "_end")
    .replace("_ms", "")
)


def notice_id(
    case_id: str, person_id: str, venue_id: str, exposure_start_ms: int, channel: str, app_id: str
) -> str:
    """The id of a notice: the same for the same unique tuple, whoever computes it."""
    key = "\x00".join((case_id, person_id, venue_id, str(exposure_start_ms), channel, app_id))
    digest = hashlib.sha256(key.encode()).digest()[:15]
    return "N" + base64.b32encode(digest).decode()


def _numbered(n: int) -> str:
    return ", ".join(f"${i}" for i in range(1, n + 1))


class Outbox(SharedSql):
    """Cases and the notices' outbox, of ``Storage``."""

    # How a claim locks the rows it picks: PostgreSQL skips rows another claimer holds
    # (else concurrent workers pick the same first rows and all but one come back short);
    # SQLite has one writer at a time and no row locks.
    _claim_lock: str = ""

    async def add_case(
        self, case: CaseRecord, windows: Sequence[CaseWindow], notices: Sequence[NoticeRecord]
    ) -> None:
        """The case, its windows and its notices, all or nothing."""
        await self._execute_in_transaction(
            [
                (
                    f"INSERT INTO cases ({_CASE_COLUMNS}) VALUES ({_numbered(len(case))})",
                    [tuple(case)],
                ),
                (
                    "INSERT INTO case_windows (case_id, venue_id, from_at, to_at, level) "
                    "VALUES ($1, $2, $3, $4, $5)",
                    [(case.case_id, *w) for w in windows],
                ),
                (
                    f"INSERT INTO notices ({_NOTICE_COLUMNS}) "
                    f"VALUES ({_numbered(len(NoticeRecord._fields))}) ON CONFLICT DO NOTHING",
                    [tuple(n) for n in notices],
                ),
            ]
        )

    async def confirmations(self, start_ms: int, end_ms: int) -> list[int]:
        """When each case confirmed in [start, end) was confirmed (epoch ms), oldest first."""
        return [case.confirmed_at_ms for case in await self.cases_between(start_ms, end_ms)]

    async def cases_between(self, start_ms: int, end_ms: int) -> list[CaseRecord]:
        """The cases confirmed in [start, end), oldest first."""
        rows = await self._fetch(
            f"SELECT {_CASE_COLUMNS} FROM cases WHERE confirmed_at >= $1 AND confirmed_at < $2 "
            "ORDER BY confirmed_at, case_id",
            start_ms,
            end_ms,
        )
        return [CaseRecord(*r) for r in rows]

    async def notice_outcomes(self, case_ids: Sequence[str]) -> list[tuple[str, str, str, str]]:
        """(case id, contact, venue, state) of every notice of these cases."""
        found: list[tuple[str, str, str, str]] = []
        ids = list(case_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ", ".join(f"${n + 1}" for n in range(len(chunk)))
            rows = await self._fetch(
                "SELECT case_id, person_id, venue_id, state FROM notices "
                f"WHERE case_id IN ({marks})",
                *chunk,
            )
            found += [(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]
        return found

    async def case_confirmed(self, person_id: str, confirmed_at_ms: int) -> CaseRecord | None:
        """The case already recorded for this person and confirmation time (a request
        repeated after a timeout must not notify everyone twice)."""
        rows = await self._fetch(
            f"SELECT {_CASE_COLUMNS} FROM cases WHERE person_id = $1 AND confirmed_at = $2",
            person_id,
            confirmed_at_ms,
        )
        return CaseRecord(*rows[0]) if rows else None

    async def purge_cases(self, cutoff_ms: int) -> int:
        """Delete cases recorded before ``cutoff_ms``, with their windows and notices (they
        name contacts and times: kept no longer than the visits they came from)."""
        old = await self._fetch("SELECT case_id FROM cases WHERE created_at < $1", cutoff_ms)
        ids = [(r[0],) for r in old]
        if ids:
            await self._execute_in_transaction(
                [
                    ("DELETE FROM notices WHERE case_id = $1", ids),
                    ("DELETE FROM case_windows WHERE case_id = $1", ids),
                    ("DELETE FROM cases WHERE case_id = $1", ids),
                ]
            )
        return len(ids)

    async def case(self, case_id: str) -> CaseRecord | None:
        rows = await self._fetch(f"SELECT {_CASE_COLUMNS} FROM cases WHERE case_id = $1", case_id)
        return CaseRecord(*rows[0]) if rows else None

    async def case_notices(self, case_id: str) -> list[NoticeRecord]:
        rows = await self._fetch(
            f"SELECT {_NOTICE_COLUMNS} FROM notices WHERE case_id = $1 "
            "ORDER BY exposure_start, person_id, venue_id, channel, app_id",
            case_id,
        )
        return [_notice(r) for r in rows]

    async def risky_windows(
        self, since_ms: int, after_venue: str = "", venues: int | None = None
    ) -> list[CaseWindow]:
        """Windows that end at or after ``since_ms``, of every case, by venue: those of
        the first ``venues`` venues (all, when None) whose ids sort after ``after_venue``,
        each venue's windows whole (a page never cuts a venue's windows apart)."""
        if venues is None:
            rows = await self._fetch(
                "SELECT venue_id, from_at, to_at, level FROM case_windows "
                "WHERE to_at >= $1 AND venue_id > $2 ORDER BY venue_id, from_at",
                since_ms,
                after_venue,
            )
        else:
            rows = await self._fetch(
                "SELECT w.venue_id, w.from_at, w.to_at, w.level FROM case_windows w "
                "JOIN (SELECT DISTINCT venue_id FROM case_windows "
                "      WHERE to_at >= $1 AND venue_id > $2 ORDER BY venue_id LIMIT $3) v "
                "ON w.venue_id = v.venue_id WHERE w.to_at >= $1 ORDER BY w.venue_id, w.from_at",
                since_ms,
                after_venue,
                venues,
            )
        return [CaseWindow(*r) for r in rows]

    async def claim_notices(
        self, owner: str, now_ms: int, lease_ms: int, limit: int
    ) -> list[NoticeRecord]:
        """Take up to ``limit`` due notices for ``owner`` until ``now_ms + lease_ms``.

        On PostgreSQL the inner SELECT skips rows another claimer has locked, and the outer
        WHERE repeats its conditions, so a row is taken by one claimer only; SQLite runs
        one writer at a time."""
        # Most rounds find nothing due: find that out with a read, so an idle outbox never
        # takes a write lock (on SQLite, one shared with the flusher) every poll.
        due = await self._fetch(
            "SELECT 1 FROM notices WHERE state = 'pending' AND next_attempt_at <= $1 "
            "AND (lease_until IS NULL OR lease_until < $1) LIMIT 1",
            now_ms,
        )
        if not due:
            return []
        rows = await self._fetch(
            "UPDATE notices SET lease_owner = $1, lease_until = $2, attempts = attempts + 1 "
            "WHERE notice_id IN ("
            "  SELECT notice_id FROM notices WHERE state = 'pending' AND next_attempt_at <= $3"
            "  AND (lease_until IS NULL OR lease_until < $3)"
            f"  ORDER BY next_attempt_at LIMIT $4{self._claim_lock}"
            ") AND state = 'pending' AND (lease_until IS NULL OR lease_until < $3) "
            f"RETURNING {_NOTICE_COLUMNS}",
            owner,
            now_ms + lease_ms,
            now_ms,
            limit,
        )
        return [_notice(r) for r in rows]

    async def notice_delivered(self, notice_id: str, owner: str, now_ms: int) -> bool:
        """Mark delivered, if ``owner`` still holds the lease (else another worker may)."""
        changed = await self._execute(
            "UPDATE notices SET state = 'delivered', delivered_at = $3, lease_owner = NULL, "
            "lease_until = NULL, last_error = NULL "
            "WHERE notice_id = $1 AND lease_owner = $2 AND state = 'pending'",
            notice_id,
            owner,
            now_ms,
        )
        return changed == 1

    async def notice_not_delivered(
        self, notice_id: str, owner: str, error: str, next_attempt_at_ms: int | None
    ) -> bool:
        """Release the lease after a failed try: to try again at ``next_attempt_at_ms``, or
        for good (``None``: state ``failed``)."""
        changed = await self._execute(
            "UPDATE notices SET lease_owner = NULL, lease_until = NULL, last_error = $3, "
            "state = CASE WHEN CAST($4 AS bigint) IS NULL THEN 'failed' ELSE 'pending' END, "
            "next_attempt_at = COALESCE(CAST($4 AS bigint), next_attempt_at) "
            "WHERE notice_id = $1 AND lease_owner = $2 AND state = 'pending'",
            notice_id,
            owner,
            error[:200],
            next_attempt_at_ms,
        )
        return changed == 1

    async def pending_notices(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM notices WHERE state = 'pending'")
        return int(rows[0][0])


def _notice(row: Sequence[Any]) -> NoticeRecord:
    record = NoticeRecord(*row)
    # SQLite gives the flag back as 0 or 1.
    return record._replace(
        overlap_minutes=float(record.overlap_minutes),
        checkout_recorded=bool(record.checkout_recorded),
    )
