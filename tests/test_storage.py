"""Storage on SQLite and PostgreSQL: batches, exactly-once rows, visits, tracing, retention."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import multiprocessing
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from storage import (
    PairingRules,
    ScanEvent,
    Storage,
    StorageUnavailable,
    TraceQuery,
    Visit,
    derive_visits,
)
from storage.errors import translated_errors
from storage.models import FUTURE_SCAN_LIMIT_MS
from storage.sqlite import SqliteStorage

RULES = PairingRules()
DAY = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
_ids = itertools.count()


def at(hhmm: str, day: int = 0) -> int:
    h, m = map(int, hhmm.split(":"))
    return int((DAY + dt.timedelta(days=day, hours=h, minutes=m)).timestamp() * 1000)


def ev(
    kind: str, venue: str, hhmm: str, person: str = "P1", day: int = 0, app: str = "vhd"
) -> ScanEvent:
    t = at(hhmm, day)
    return ScanEvent(app, f"E{next(_ids):012d}", kind, venue, person, t, t + 5, None)  # type: ignore[arg-type]


def visit(venue: str, start: str, end: str, closed_by: str, person: str = "P1") -> Visit:
    source = at(end) if closed_by == "orphan" else at(start)
    return Visit(person, venue, at(start), at(end), closed_by, source)  # type: ignore[arg-type]


WORKED_EXAMPLES = [
    (
        [("checkin", "V1", "10:00"), ("checkout", "V1", "11:00")],
        [visit("V1", "10:00", "11:00", "checkout")],
    ),
    (
        [("checkin", "V1", "10:30"), ("checkin", "V2", "12:00"), ("checkout", "V2", "13:00")],
        [visit("V1", "10:30", "12:00", "next_checkin"), visit("V2", "12:00", "13:00", "checkout")],
    ),
    ([("checkout", "V3", "09:00")], [visit("V3", "08:00", "09:00", "orphan")]),
    (
        [("checkin", "V1", "08:00"), ("checkin", "V1", "08:02"), ("checkout", "V1", "08:30")],
        [visit("V1", "08:00", "08:30", "checkout")],
    ),
    ([("checkin", "V2", "06:00")], [visit("V2", "06:00", "10:00", "auto")]),
    (
        [("checkin", "V1", "10:00"), ("checkout", "V1", "15:00")],
        [visit("V1", "10:00", "14:00", "auto"), visit("V1", "14:00", "15:00", "orphan")],
    ),
]


@pytest.mark.parametrize(("events", "expected"), WORKED_EXAMPLES)
async def test_worked_examples_in_every_order_and_split(
    storage: Storage, events: list[tuple[str, str, str]], expected: list[Visit]
) -> None:
    made = [ev(k, v, t) for k, v, t in events]
    # Last event first, one at a time: every arrival re-derives what it touches.
    for e in reversed(made):
        await storage.store_batch([e], RULES)
    assert sorted(await storage.all_visits()) == sorted(expected)
    # Redelivery of everything at once changes nothing.
    result = await storage.store_batch(made, RULES)
    assert (result.inserted, result.duplicates) == (0, len(made))
    assert sorted(await storage.all_visits()) == sorted(expected)


async def test_identities_are_stored_once_and_duplicates_counted(storage: Storage) -> None:
    a, b = ev("checkin", "V1", "10:00"), ev("checkout", "V1", "11:00")
    same_id_other_app = a._replace(app_id="bluezone")
    first = await storage.store_batch([a, b, a], RULES)
    assert (first.inserted, first.duplicates) == (2, 1)
    second = await storage.store_batch([a, same_id_other_app], RULES)
    assert (second.inserted, second.duplicates) == (1, 1)
    assert sorted(await storage.event_identities()) == sorted(
        [("vhd", a.event_id), ("vhd", b.event_id), ("bluezone", a.event_id)]
    )


async def test_late_events_re_derive_the_visits_they_touch(storage: Storage) -> None:
    # Today's visits exist; a check-in uploaded late from yesterday's offline queue, and one
    # from this morning that now splits today's first visit.
    await storage.store_batch(
        [ev("checkin", "V1", "08:00"), ev("checkin", "V2", "09:00"), ev("checkout", "V2", "10:00")],
        RULES,
    )
    await storage.store_batch(
        [ev("checkin", "V3", "08:30"), ev("checkin", "V9", "22:00", day=-1)], RULES
    )
    visits = await storage.all_visits()
    assert [(v.venue_id, v.closed_by) for v in visits] == [
        ("V9", "auto"),
        ("V1", "next_checkin"),
        ("V3", "next_checkin"),
        ("V2", "checkout"),
    ]
    assert visits[1].checkout_at_ms == at("08:30")


async def test_visits_of_many_persons_match_the_pure_function(storage: Storage) -> None:
    events = []
    for p in range(20):
        for i, (kind, venue, hhmm) in enumerate(
            [
                ("checkin", "V1", "07:00"),
                ("checkin", "V2", "09:10"),
                ("checkout", "V2", "09:40"),
                ("checkout", "V3", "18:00"),
                ("checkin", "V1", "20:00"),
            ]
        ):
            if (p + i) % 4:
                events.append(ev(kind, venue, hhmm, person=f"P{p}"))
    for i in range(0, len(events), 7):
        await storage.store_batch(events[i : i + 7], RULES)
    expected = sorted(
        v
        for p in {e.person_id for e in events}
        for v in derive_visits([e for e in events if e.person_id == p], RULES)
    )
    assert sorted(await storage.all_visits()) == expected


async def test_tracing_finds_the_planted_contact_not_the_early_leaver(storage: Storage) -> None:
    await storage.store_batch(
        [
            ev("checkin", "MARKET", "10:00", person="CASE"),
            ev("checkout", "MARKET", "11:00", person="CASE"),
            # Overlaps the case for 30 minutes.
            ev("checkin", "MARKET", "10:30", person="NEAR"),
            ev("checkout", "MARKET", "12:00", person="NEAR"),
            # Left at 08:30, 90 minutes before the case arrived: beyond the 60 min margin.
            ev("checkin", "MARKET", "08:00", person="EARLY"),
            ev("checkout", "MARKET", "08:30", person="EARLY"),
            # Left at 09:05: 5 minutes inside the margin, under the 10 minute minimum.
            ev("checkin", "MARKET", "08:40", person="BRUSH"),
            ev("checkout", "MARKET", "09:05", person="BRUSH"),
            # Same time, another venue.
            ev("checkin", "SCHOOL", "10:00", person="ELSEWHERE"),
            ev("checkout", "SCHOOL", "11:00", person="ELSEWHERE"),
            # A contact of NEAR, later, for depth 2.
            ev("checkin", "CAFE", "13:00", person="NEAR"),
            ev("checkout", "CAFE", "14:00", person="NEAR"),
            ev("checkin", "CAFE", "13:30", person="SECOND"),
            ev("checkout", "CAFE", "14:30", person="SECOND"),
        ],
        RULES,
    )
    query = TraceQuery(person_id="CASE", now_ms=at("23:00"))
    rows = await storage.trace(query, actor="test")
    assert [
        (
            r.person_id,
            r.venue_id,
            r.overlap_start_ms,
            r.overlap_end_ms,
            r.overlap_minutes,
            r.depth,
            r.via,
        )
        for r in rows
    ] == [("NEAR", "MARKET", at("10:30"), at("12:00"), 90.0, 1, None)]
    deep = await storage.trace(TraceQuery(person_id="CASE", now_ms=at("23:00"), depth=2), "test")
    assert [(r.person_id, r.depth, r.via) for r in deep] == [
        ("NEAR", 1, None),
        ("SECOND", 2, "NEAR"),
    ]
    audit = await storage.audit_entries()
    assert [(a.actor, a.action, a.subject) for a in audit] == [
        ("test", "trace", "CASE"),
        ("test", "trace", "CASE"),
    ]


async def test_retention_deletes_what_is_older_and_keeps_the_rest(storage: Storage) -> None:
    old = [ev("checkin", "V1", "10:00", person=f"OLD{i}", day=-30) for i in range(3)]
    edge = [ev("checkin", "V1", "10:00", person="EDGE", day=-21)]
    recent = [ev("checkin", "V1", "10:00", person=f"NEW{i}", day=-1) for i in range(3)]
    await storage.store_batch(old + edge + recent, RULES)
    cutoff = at("12:00", day=-21)  # after EDGE's check-in, in the same day
    result = await storage.purge(cutoff, RULES)
    assert result.events == 4
    # EDGE's visit (10:00 to 14:00 auto) is still open at the cutoff: it carries pairing's
    # state across the boundary, so it stays until a later purge.
    assert result.visits == 3
    kept = await storage.event_identities()
    assert sorted(e for _a, e in kept) == sorted(e.event_id for e in recent)
    assert sorted(v.person_id for v in await storage.all_visits()) == [
        "EDGE",
        "NEW0",
        "NEW1",
        "NEW2",
    ]
    # A purged identity is gone from the unique key too: nothing is left to block.
    assert (await storage.purge(cutoff, RULES)).events == 0
    assert (await storage.purge(at("12:00", day=-20), RULES)).visits == 1


async def test_visits_at_the_retention_boundary_stay_what_they_were(storage: Storage) -> None:
    """A purge cuts a person's history in the middle of a visit and inside a check-out's
    repeat window; events that come after it (late uploads) pair as if nothing had been
    cut, and one scanned before the cut changes nothing after it."""
    cut = at("12:00", day=-21)
    minute = 60_000

    def scan(kind: str, venue: str, offset_min: int) -> ScanEvent:
        return ev(kind, venue, "00:00", person="STAFF")._replace(
            scanned_at_ms=cut + offset_min * minute
        )

    before_cut = [
        scan("checkin", "V1", -180),
        scan("checkin", "V1", -177),  # a repeat: changes nothing
        scan("checkout", "V1", -120),
        scan("checkout", "V3", -2),  # an orphan; its repeat window runs past the cut
        scan("checkin", "V2", -40),  # still inside at the cut
    ]
    after_cut = [scan("checkin", "V4", 200), scan("checkout", "V4", 230)]
    await storage.store_batch(before_cut + after_cut, RULES)
    await storage.purge(cut, RULES)
    late = [
        scan("checkout", "V3", 2),  # a repeat of the orphan at -2: changes nothing
        scan("checkout", "V2", 30),  # closes the visit that began before the cut
    ]
    await storage.store_batch(late, RULES)
    # An upload scanned before the cut is stored, not paired: what it would pair with is gone.
    await storage.store_batch([scan("checkin", "V9", -10)], RULES)

    full = derive_visits(before_cut + after_cut + late, RULES)
    expected = [v for v in full if v.source_at_ms >= cut or v.checkout_at_ms >= cut - 5 * minute]
    assert sorted(await storage.all_visits()) == sorted(expected)
    assert (
        Visit("STAFF", "V2", cut - 40 * minute, cut + 30 * minute, "checkout", cut - 40 * minute)
        in expected
    )


async def test_admin_tokens_are_stored_hashed(storage: Storage) -> None:
    token = await storage.add_admin("officer1")
    assert await storage.admin_for_token(token) == "officer1"
    assert await storage.admin_for_token(token + "x") is None
    with pytest.raises(Exception, match="already exists"):
        await storage.add_admin("officer1")


async def test_the_next_days_are_prepared_before_their_first_scan(storage: Storage) -> None:
    await storage.prepare_days(7)  # SQLite: nothing to prepare, and no error
    if storage.kind != "postgresql":
        return
    from storage.postgres import PostgresStorage

    assert isinstance(storage, PostgresStorage)
    async with storage._pool.acquire() as conn:
        names = {
            r[0]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'scan_events'::regclass"
            )
        }
    today = dt.datetime.now(storage._tz).date()
    wanted = {f"scan_events_p{today + dt.timedelta(days=i):%Y%m%d}" for i in range(8)}
    assert wanted <= names, sorted(wanted - names)
    # A batch a week from now goes straight in: its day exists.
    week = [ev("checkin", "V1", "10:00", person="LATER", day=7)]
    assert (await storage.store_batch(week, RULES)).inserted == 1


async def test_a_scan_stored_as_far_ahead_of_its_receipt_as_any_can_be_is_still_paired(
    storage: Storage,
) -> None:
    """Re-derivation reads no further ahead than ``FUTURE_SCAN_LIMIT_MS`` after the latest
    receipt (on PostgreSQL that keeps it out of the partitions made for the days ahead). A
    check-out scanned just inside that limit, then a check-in before it, make one visit."""
    now = int(time.time() * 1000)
    ahead = now + FUTURE_SCAN_LIMIT_MS - 60_000
    checkout = ScanEvent("vhd", "AHEAD00001", "checkout", "V1", "AHEAD", ahead, now, None)
    checkin = checkout._replace(
        event_id="AHEAD00002", kind="checkin", scanned_at_ms=ahead - 1_800_000
    )
    await storage.store_batch([checkout], RULES)
    await storage.store_batch([checkin], RULES)
    stored = await storage.person_visits("AHEAD", now - 86_400_000, now + 86_400_000)
    assert stored == derive_visits([checkout, checkin], RULES)
    assert [v.closed_by for v in stored] == ["checkout"]


async def test_a_person_who_scans_all_day_long_re_derives_from_their_newest_visits(
    storage: Storage,
) -> None:
    """Door staff scan every 20 minutes around the clock, so their history has no quiet gap
    to re-derive from: each batch resumes from the state the stored visits record. Late
    uploads land in the middle of the chain, and the visits stay the pure function's."""
    venues = ["V1", "V2", "V3"]
    chain = [
        ev("checkin" if i % 3 else "checkout", venues[i % 3], "00:00", person="STAFF")._replace(
            scanned_at_ms=at("00:00", day=-2) + i * 20 * 60_000
        )
        for i in range(3 * 72)  # three days, every 20 minutes
    ]
    late = chain[::11]
    on_time = [e for e in chain if e not in late]
    for i in range(0, len(on_time), 5):
        await storage.store_batch(on_time[i : i + 5], RULES)
        if i % 40 == 0 and late:
            await storage.store_batch([late.pop()], RULES)
    await storage.store_batch(late, RULES)
    assert sorted(await storage.all_visits()) == sorted(derive_visits(chain, RULES))


def test_a_locked_sqlite_database_is_unavailable_and_a_bad_statement_is_not(
    tmp_path: Path,
) -> None:
    """What storage raises in place of SQLite's errors: "database is locked" (another
    process held the write lock past the busy timeout) is StorageUnavailable, with the
    driver's error as its cause; a statement's own error goes through as it is."""
    path = tmp_path / "locked.db"
    with (
        contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as holder,
        contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as other,
    ):
        holder.execute("BEGIN EXCLUSIVE")
        with (
            pytest.raises(StorageUnavailable, match="database is locked") as caught,
            translated_errors("SQLite"),
        ):
            other.execute("CREATE TABLE t (x)")
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        holder.execute("ROLLBACK")
        with (
            pytest.raises(sqlite3.OperationalError, match="no such table"),
            translated_errors("SQLite"),
        ):
            other.execute("SELECT * FROM nowhere")


def _open_sqlite_at_once(path: Path, start: Any) -> None:
    start.wait()
    try:
        SqliteStorage(str(path))
    except StorageUnavailable:
        sys.exit(1)


def test_workers_that_open_a_new_sqlite_database_at_the_same_moment_all_start(
    tmp_path: Path,
) -> None:
    """A server's workers open the embedded database together on its first start. One of
    them switching the new file to WAL mode used to make another fail with "database is
    locked" (SQLite does not wait for that lock), and the server refused to start."""
    fork = multiprocessing.get_context("fork")
    failed = 0
    for round_ in range(30):
        path = tmp_path / f"new-{round_}.db"
        start = fork.Barrier(6)
        workers = [fork.Process(target=_open_sqlite_at_once, args=(path, start)) for _ in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        failed += sum(w.exitcode != 0 for w in workers)
    assert failed == 0
