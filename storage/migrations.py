"""Schema migrations, per backend: an ordered list of (version, statements), and the two
functions that apply them (``apply_sqlite``, ``apply_postgres``).

Applied by ``scangate migrate`` and at start-up, each version once, recorded in
``schema_migrations``; on PostgreSQL also by the shared keyring's store when it opens
(``storage.keyring_store``). Never edit a released version: add the next one.

SQLite keeps times as integer epoch milliseconds; PostgreSQL as ``timestamptz``, with
``scan_events`` and ``visits`` partitioned by day (partitions are created as days come,
see ``storage.postgres``). A unique key of a partitioned table must include the partition
column, so on PostgreSQL the (app_id, event_id) key lives in ``scan_event_ids``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import sqlite3

    import asyncpg

Migration = tuple[int, tuple[str, ...]]
# Held while PostgreSQL migrates: storage in every process and the keyring store all
# migrate at start-up, and only the first may apply a version.
MIGRATION_LOCK: Final = 0x5C4A_0001


def _registry(blob: str, big: str, serial_pk: str) -> tuple[str, ...]:
    """Migration 2 for either backend: the registration side (venues, door staff, people,
    declarations, the data key). Times are epoch milliseconds in both backends here: these
    tables are small, are read by id, and are never partitioned by time. Personal fields are
    ciphertexts (``*_enc``) and blind indexes (``*_index``); see ``signing.personal``."""
    return (
        f"""CREATE TABLE data_keys (
            key_id integer PRIMARY KEY,
            sealed {blob} NOT NULL,
            created_at {big} NOT NULL
        )""",
        f"""CREATE TABLE venues (
            venue_id text PRIMARY KEY,
            app_id text NOT NULL,
            name text NOT NULL,
            phone_enc {blob} NOT NULL,
            address text NOT NULL,
            province text NOT NULL,
            kind text NOT NULL,
            created_at {big} NOT NULL,
            revoked_at {big}
        )""",
        "CREATE INDEX venues_revoked ON venues (revoked_at) WHERE revoked_at IS NOT NULL",
        f"""CREATE TABLE staff_tokens (
            token_id text PRIMARY KEY,
            token_sha256 text NOT NULL UNIQUE,
            venue_id text NOT NULL REFERENCES venues (venue_id),
            app_id text NOT NULL,
            created_at {big} NOT NULL,
            revoked_at {big}
        )""",
        f"""CREATE TABLE persons (
            person_id text PRIMARY KEY,
            national_id_index text UNIQUE,
            old_id_index text UNIQUE,
            national_id_enc {blob},
            full_name_enc {blob} NOT NULL,
            name_index text NOT NULL,
            birth_year integer,
            gender text,
            phone_enc {blob},
            address_enc {blob},
            province text,
            insurance_enc {blob},
            code_app_id text,
            code_issued_s {big},
            code_expires_s {big},
            created_at {big} NOT NULL,
            updated_at {big} NOT NULL
        )""",
        # Which phones may act for a person: the phone that declared (its OTP session),
        # and the person's own phone. A look-up by phone at the door goes through here.
        """CREATE TABLE person_phones (
            phone_index text NOT NULL,
            person_id text NOT NULL REFERENCES persons (person_id),
            PRIMARY KEY (phone_index, person_id)
        )""",
        f"""CREATE TABLE declarations (
            id {serial_pk},
            person_id text NOT NULL REFERENCES persons (person_id),
            app_id text NOT NULL,
            declared_at {big} NOT NULL,
            declared_by_index text NOT NULL,
            answers_enc {blob} NOT NULL
        )""",
        "CREATE INDEX declarations_person ON declarations (person_id, declared_at)",
    )


def _cases(blob: str, big: str) -> tuple[str, ...]:
    """Migration 3 for either backend: confirmed cases, the venue windows they make risky
    (no person id there), and the outbox of exposure notices. Times are epoch
    milliseconds in both backends, as in the registry: small tables, read by key."""
    return (
        f"""CREATE TABLE cases (
            case_id text PRIMARY KEY,
            person_id text NOT NULL,
            confirmed_at {big} NOT NULL,
            note_enc {blob},
            created_at {big} NOT NULL,
            created_by text NOT NULL,
            contacts integer NOT NULL,
            notices integer NOT NULL,
            UNIQUE (person_id, confirmed_at)
        )""",
        "CREATE INDEX cases_created ON cases (created_at)",
        f"""CREATE TABLE case_windows (
            case_id text NOT NULL REFERENCES cases (case_id),
            venue_id text NOT NULL,
            from_at {big} NOT NULL,
            to_at {big} NOT NULL,
            level text NOT NULL CHECK (level IN ('high', 'low'))
        )""",
        "CREATE INDEX case_windows_to ON case_windows (to_at)",
        # One row per notice to send: the outbox. The unique key is what "never twice"
        # means: (case, contact, venue, exposure start, channel and app).
        f"""CREATE TABLE notices (
            notice_id text PRIMARY KEY,
            case_id text NOT NULL REFERENCES cases (case_id),
            person_id text NOT NULL,
            venue_id text NOT NULL,
            exposure_start {big} NOT NULL,
            exposure_end {big} NOT NULL,
            overlap_minutes double precision NOT NULL,
            channel text NOT NULL CHECK (channel IN ('webhook', 'sms')),
            app_id text NOT NULL,
            state text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts integer NOT NULL,
            next_attempt_at {big} NOT NULL,
            lease_owner text,
            lease_until {big},
            last_error text,
            delivered_at {big},
            created_at {big} NOT NULL,
            UNIQUE (case_id, person_id, venue_id, exposure_start, channel, app_id)
        )""",
        "CREATE INDEX notices_due ON notices (state, next_attempt_at)",
        "CREATE INDEX notices_case ON notices (case_id)",
    )


# Percent of each visits page that inserts fill on PostgreSQL (see migration 5).
VISITS_FILLFACTOR: Final = 80

# Migration 4 for either backend: where retention last cut. Events scanned before it are
# gone, so pairing never resumes from before it (see ``Storage.purge``).
RETENTION_BOUNDARY: Final = (
    """CREATE TABLE retention_boundary (
        id integer PRIMARY KEY CHECK (id = 1),
        purged_before bigint NOT NULL
    )""",
)


def _identity(blob: str, big: str, boolean: str) -> tuple[str, ...]:
    """Migration 5 (SQLite) / 6 (PostgreSQL): identities are claims, not facts (issue 16).

    Before it, a national id named one person (``persons.national_id_index`` was unique),
    so whoever claimed an id first, by declaring it or by showing its card at a door,
    locked its owner out for good. Now:

    - ``id_claims``: a declaration binds (verified phone, national id) to a person. Several
      claims on one id compete until an official accepts one (the others are rejected);
      nobody's declaration is refused because of another's claim.
    - ``door_cards``: an ID card shown at a door says "this card was seen here", under a
      pseudonymous person of its own; it claims nothing.
    - ``person_phones.verified``: only a phone proved by a one-time code acts for a
      person or finds them at the door. Links made from the declaration form's ``phone``
      field, which nobody verified, stay as records but are not verified.

    Existing rows move over: declared persons become one open claim each (by the phone
    whose session first declared them); persons created from ID cards become door cards
    (their new and old id numbers). ``persons.national_id_index`` and ``old_id_index`` are
    then emptied and no longer written (SQLite cannot drop a UNIQUE column in place)."""
    return (
        f"""CREATE TABLE id_claims (
            claim_id text PRIMARY KEY,
            national_id_index text NOT NULL,
            person_id text NOT NULL REFERENCES persons (person_id),
            phone_index text NOT NULL,
            claimed_at {big} NOT NULL,
            state text NOT NULL CHECK (state IN ('open', 'accepted', 'rejected')),
            resolved_by text,
            resolved_at {big},
            UNIQUE (national_id_index, phone_index)
        )""",
        "CREATE INDEX id_claims_person ON id_claims (person_id)",
        f"""CREATE TABLE door_cards (
            card_index text PRIMARY KEY,
            person_id text NOT NULL REFERENCES persons (person_id),
            first_seen_at {big} NOT NULL
        )""",
        "CREATE INDEX door_cards_person ON door_cards (person_id)",
        f"ALTER TABLE person_phones ADD COLUMN verified {boolean} NOT NULL DEFAULT FALSE",
        "INSERT INTO door_cards (card_index, person_id, first_seen_at) "
        "SELECT national_id_index, person_id, created_at FROM persons p "
        "WHERE national_id_index IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM declarations d WHERE d.person_id = p.person_id)",
        "INSERT INTO door_cards (card_index, person_id, first_seen_at) "
        "SELECT old_id_index, person_id, created_at FROM persons p "
        "WHERE old_id_index IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM declarations d WHERE d.person_id = p.person_id)",
        "INSERT INTO id_claims "
        "(claim_id, national_id_index, person_id, phone_index, claimed_at, state) "
        "SELECT 'K' || p.person_id, p.national_id_index, p.person_id, "
        "(SELECT d.declared_by_index FROM declarations d WHERE d.person_id = p.person_id "
        "ORDER BY d.declared_at, d.id LIMIT 1), p.created_at, 'open' FROM persons p "
        "WHERE p.national_id_index IS NOT NULL "
        "AND EXISTS (SELECT 1 FROM declarations d WHERE d.person_id = p.person_id)",
        "UPDATE person_phones SET verified = TRUE WHERE EXISTS (SELECT 1 FROM declarations d "
        "WHERE d.person_id = person_phones.person_id "
        "AND d.declared_by_index = person_phones.phone_index)",
        "UPDATE persons SET national_id_index = NULL, old_id_index = NULL",
    )


def _tokens_and_audit(moment: str) -> tuple[str, ...]:
    """Migration 6 on SQLite, 7 on PostgreSQL: revocable admin tokens (``moment`` is the
    admins table's time type), each app token's minute of last use (epoch ms in both
    backends: a small table read by key), and the indexes that reading the audit log by
    time, actor or action, and its retention, need."""
    return (
        f"ALTER TABLE admins ADD COLUMN revoked_at {moment}",
        """CREATE TABLE app_token_use (
            token_id text PRIMARY KEY,
            last_used_at bigint NOT NULL
        )""",
        "CREATE INDEX audit_log_at ON audit_log (at)",
        "CREATE INDEX audit_log_actor ON audit_log (actor, at)",
        "CREATE INDEX audit_log_action ON audit_log (action, at)",
    )


# Migration 8 on PostgreSQL: the shared keyring's document (one row; storage.keyring_store).
# The store used to make this table itself, with this same statement, before it was part
# of the migrations: IF NOT EXISTS adopts such a table as it is, with the keyring in it.
KEYRING_DOCUMENT: Final = (
    "CREATE TABLE IF NOT EXISTS keyring_document ("
    " id integer PRIMARY KEY CHECK (id = 1),"
    " document bytea NOT NULL,"
    " version bigint NOT NULL)"
)


SQLITE: Final[tuple[Migration, ...]] = (
    (
        1,
        (
            """CREATE TABLE scan_events (
                app_id TEXT NOT NULL,
                event_id TEXT NOT NULL,
                kind TEXT NOT NULL CHECK (kind IN ('checkin', 'checkout')),
                venue_id TEXT NOT NULL,
                person_id TEXT NOT NULL,
                scanned_at INTEGER NOT NULL,
                received_at INTEGER NOT NULL,
                device_id TEXT,
                stored_at INTEGER NOT NULL,
                PRIMARY KEY (app_id, event_id)
            ) WITHOUT ROWID""",
            "CREATE INDEX scan_events_person ON scan_events (person_id, scanned_at)",
            "CREATE INDEX scan_events_scanned ON scan_events (scanned_at)",
            """CREATE TABLE visits (
                person_id TEXT NOT NULL,
                venue_id TEXT NOT NULL,
                checkin_at INTEGER NOT NULL,
                checkout_at INTEGER NOT NULL,
                closed_by TEXT NOT NULL
                    CHECK (closed_by IN ('checkout', 'next_checkin', 'auto', 'orphan')),
                source_at INTEGER NOT NULL
            )""",
            "CREATE INDEX visits_person ON visits (person_id, source_at)",
            "CREATE INDEX visits_venue ON visits (venue_id, checkin_at)",
            "CREATE INDEX visits_source ON visits (source_at)",
            """CREATE TABLE admins (
                name TEXT PRIMARY KEY,
                token_sha256 TEXT NOT NULL UNIQUE,
                created_at INTEGER NOT NULL
            )""",
            """CREATE TABLE audit_log (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                at INTEGER NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                subject TEXT NOT NULL,
                detail TEXT NOT NULL
            )""",
        ),
    ),
    (2, _registry("BLOB", "INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT")),
    (3, _cases("BLOB", "INTEGER")),
    (4, RETENTION_BOUNDARY),
    (5, _identity("BLOB", "INTEGER", "INTEGER")),
    (6, _tokens_and_audit("INTEGER")),
    (7, ("ALTER TABLE notices ADD COLUMN checkout_recorded INTEGER NOT NULL DEFAULT 1",)),
)


POSTGRES: Final[tuple[Migration, ...]] = (
    (
        1,
        (
            """CREATE TABLE scan_event_ids (
                app_id text NOT NULL,
                event_id text NOT NULL,
                scanned_at timestamptz NOT NULL,
                PRIMARY KEY (app_id, event_id)
            )""",
            "CREATE INDEX scan_event_ids_scanned ON scan_event_ids (scanned_at)",
            """CREATE TABLE scan_events (
                app_id text NOT NULL,
                event_id text NOT NULL,
                kind text NOT NULL CHECK (kind IN ('checkin', 'checkout')),
                venue_id text NOT NULL,
                person_id text NOT NULL,
                scanned_at timestamptz NOT NULL,
                received_at timestamptz NOT NULL,
                device_id text,
                stored_at timestamptz NOT NULL
            ) PARTITION BY RANGE (scanned_at)""",
            "CREATE INDEX scan_events_person ON scan_events (person_id, scanned_at)",
            """CREATE TABLE visits (
                person_id text NOT NULL,
                venue_id text NOT NULL,
                checkin_at timestamptz NOT NULL,
                checkout_at timestamptz NOT NULL,
                closed_by text NOT NULL
                    CHECK (closed_by IN ('checkout', 'next_checkin', 'auto', 'orphan')),
                source_at timestamptz NOT NULL
            ) PARTITION BY RANGE (source_at)""",
            "CREATE INDEX visits_person ON visits (person_id, source_at)",
            "CREATE INDEX visits_venue ON visits (venue_id, checkin_at)",
            """CREATE TABLE admins (
                name text PRIMARY KEY,
                token_sha256 text NOT NULL UNIQUE,
                created_at timestamptz NOT NULL
            )""",
            """CREATE TABLE audit_log (
                id bigserial PRIMARY KEY,
                at timestamptz NOT NULL,
                actor text NOT NULL,
                action text NOT NULL,
                subject text NOT NULL,
                detail text NOT NULL
            )""",
        ),
    ),
    (2, _registry("bytea", "bigint", "bigserial PRIMARY KEY")),
    (3, _cases("bytea", "bigint")),
    (4, RETENTION_BOUNDARY),
    (
        5,
        (
            # Only the daily purge read it, and every event paid an index insert for it: the
            # purge now scans the table once a day instead.
            "DROP INDEX scan_event_ids_scanned",
            # Room in each page for the new version of a visit whose end moves (a check-out
            # closing it), so the update is HOT and touches no index. New day partitions are
            # made with it (storage.postgres); this sets it on those that exist (80 is
            # VISITS_FILLFACTOR, written out: a migration is frozen once released).
            """DO $$
            DECLARE child regclass;
            BEGIN
                FOR child IN SELECT inhrelid::regclass FROM pg_inherits
                             WHERE inhparent = 'visits'::regclass LOOP
                    EXECUTE format('ALTER TABLE %s SET (fillfactor = 80)', child);
                END LOOP;
            END $$""",
        ),
    ),
    (6, _identity("bytea", "bigint", "boolean")),
    (7, _tokens_and_audit("timestamptz")),
    (8, (KEYRING_DOCUMENT,)),
    # An exposure that rests on an assumed end (no check-out scanned) says so (issue 19).
    (9, ("ALTER TABLE notices ADD COLUMN checkout_recorded boolean NOT NULL DEFAULT true",)),
)

# The tables partitioned by day on PostgreSQL, with their partition column and the storage
# parameters of each day's partition.
POSTGRES_DAY_PARTITIONED: Final = (
    ("scan_events", "scanned_at", ""),
    ("visits", "source_at", f" WITH (fillfactor = {VISITS_FILLFACTOR})"),
)


def apply_sqlite(db: sqlite3.Connection) -> list[int]:
    """Apply the pending SQLite migrations, inside the caller's write transaction; the
    versions applied now."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )
    done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, statements in SQLITE:
        if version in done:
            continue
        for statement in statements:
            db.execute(statement)
        now_ms = int(time.time() * 1000)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, now_ms))
        applied.append(version)
    return applied


async def apply_postgres(conn: asyncpg.Connection) -> list[int]:
    """Apply the pending PostgreSQL migrations, inside the caller's transaction and under
    ``MIGRATION_LOCK``; the versions applied now."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
    )
    done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    applied = []
    for version, statements in POSTGRES:
        if version in done:
            continue
        for statement in statements:
            await conn.execute(statement)
        await conn.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)
        applied.append(version)
    return applied
