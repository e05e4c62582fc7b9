"""The registration side of storage: venues, door-staff tokens, people, declarations and
the sealed data key, written once for both backends.

These tables are small and read by key, so one SQL text serves SQLite and PostgreSQL
(``storage.sql``: ``$1`` parameters, run through the backend's primitives). Each method
is one statement, atomic by itself; where two requests could race (the same national id
declared twice at once) a unique key decides and the loser is told so.

Personal fields arrive here already encrypted (``*_enc``) or as blind indexes
(``*_index``): storage never sees them in the clear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from .sql import SharedSql


class VenueRecord(NamedTuple):
    venue_id: str
    app_id: str
    name: str
    phone_enc: bytes
    address: str
    province: str
    kind: str
    created_at_ms: int
    revoked_at_ms: int | None = None


class VenueLabel(NamedTuple):
    """A venue as its poster names it: public, unlike the rest of its record."""

    name: str
    address: str
    province: str


# Venue ids per look-up (SQLite allows 32,766 parameters; PostgreSQL 65,535).
LABEL_CHUNK: Final = 500


class StaffTokenRecord(NamedTuple):
    token_id: str
    venue_id: str
    app_id: str
    created_at_ms: int
    revoked_at_ms: int | None = None


class ClaimRecord(NamedTuple):
    """A declaration's claim that a national id is this person's (see migration 5)."""

    claim_id: str
    national_id_index: str
    person_id: str
    phone_index: str  # the verified phone that declared
    claimed_at_ms: int
    state: str  # "open", "accepted" or "rejected"
    resolved_by: str | None = None
    resolved_at_ms: int | None = None


CLAIM_STATES: Final = ("open", "accepted", "rejected")


class PersonRecord(NamedTuple):
    person_id: str
    national_id_enc: bytes | None
    full_name_enc: bytes
    name_index: str
    birth_year: int | None
    gender: str | None
    phone_enc: bytes | None
    address_enc: bytes | None
    province: str | None
    insurance_enc: bytes | None
    code_app_id: str | None
    code_issued_s: int | None
    code_expires_s: int | None
    created_at_ms: int
    updated_at_ms: int


_VENUE_COLUMNS: Final = ", ".join(VenueRecord._fields).replace("_ms", "")
_STAFF_COLUMNS: Final = ", ".join(StaffTokenRecord._fields).replace("_ms", "")
_PERSON_COLUMNS: Final = ", ".join(PersonRecord._fields).replace("_ms", "")
_CLAIM_COLUMNS: Final = ", ".join(ClaimRecord._fields).replace("_ms", "")


def _placeholders(n: int, start: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(start, start + n))


class Registry(SharedSql):
    """The registration side of ``Storage``."""

    # -- the data key ----------------------------------------------------------------------

    async def sealed_data_key(self) -> bytes | None:
        rows = await self._fetch("SELECT sealed FROM data_keys WHERE key_id = 1")
        return bytes(rows[0][0]) if rows else None

    async def offer_sealed_data_key(self, sealed: bytes, now_ms: int) -> bytes:
        """Store ``sealed`` as the data key unless one is stored already; the stored one.
        Two processes starting at once both offer a key and both end up with the winner's."""
        await self._execute(
            "INSERT INTO data_keys (key_id, sealed, created_at) VALUES (1, $1, $2) "
            "ON CONFLICT DO NOTHING",
            sealed,
            now_ms,
        )
        stored = await self.sealed_data_key()
        assert stored is not None
        return stored

    # -- venues ----------------------------------------------------------------------------

    async def add_venue(self, venue: VenueRecord) -> None:
        await self._execute(
            f"INSERT INTO venues ({_VENUE_COLUMNS}) VALUES ({_placeholders(len(venue))})",
            *venue,
        )

    async def venue(self, venue_id: str) -> VenueRecord | None:
        rows = await self._fetch(
            f"SELECT {_VENUE_COLUMNS} FROM venues WHERE venue_id = $1", venue_id
        )
        if not rows:
            return None
        values = list(rows[0])
        values[3] = bytes(values[3])  # phone_enc
        return VenueRecord._make(values)

    async def revoke_venue(self, venue_id: str, now_ms: int) -> bool:
        """Revoke a registered venue's code; False when no such venue (or already revoked)."""
        changed = await self._execute(
            "UPDATE venues SET revoked_at = $2 WHERE venue_id = $1 AND revoked_at IS NULL",
            venue_id,
            now_ms,
        )
        return changed > 0

    async def revoked_venue_ids(self) -> frozenset[str]:
        rows = await self._fetch("SELECT venue_id FROM venues WHERE revoked_at IS NOT NULL")
        return frozenset(r[0] for r in rows)

    async def venue_kinds(self) -> dict[str, str]:
        """Registered venue id -> kind (the flusher's maximum stay per kind)."""
        rows = await self._fetch("SELECT venue_id, kind FROM venues")
        return {r[0]: r[1] for r in rows}

    async def venue_labels(self, venue_ids: Sequence[str]) -> dict[str, VenueLabel]:
        """What a venue's poster shows of it, by id, for the registered ones among
        ``venue_ids``: its name, address and province. Public, whichever app registered
        it; nothing else of a venue (its phone, its staff) is ever read with it."""
        wanted = sorted(set(venue_ids))
        labels: dict[str, VenueLabel] = {}
        for i in range(0, len(wanted), LABEL_CHUNK):
            chunk = wanted[i : i + LABEL_CHUNK]
            marks = ", ".join(f"${n + 1}" for n in range(len(chunk)))
            rows = await self._fetch(
                f"SELECT venue_id, name, address, province FROM venues WHERE venue_id IN ({marks})",
                *chunk,
            )
            labels.update({r[0]: VenueLabel(r[1], r[2], r[3]) for r in rows})
        return labels

    async def venue_places(self) -> dict[str, tuple[str, str]]:
        """Registered venue id -> (province, kind): how reports group venues."""
        rows = await self._fetch("SELECT venue_id, province, kind FROM venues")
        return {r[0]: (r[1], r[2]) for r in rows}

    # -- door staff ------------------------------------------------------------------------

    async def add_staff_token(self, token: StaffTokenRecord, token_sha256: str) -> None:
        await self._execute(
            f"INSERT INTO staff_tokens ({_STAFF_COLUMNS}, token_sha256) "
            f"VALUES ({_placeholders(len(token) + 1)})",
            *token,
            token_sha256,
        )

    async def staff_token(self, token_sha256: str) -> StaffTokenRecord | None:
        """The live (not revoked) staff token with this hash."""
        rows = await self._fetch(
            f"SELECT {_STAFF_COLUMNS} FROM staff_tokens "
            "WHERE token_sha256 = $1 AND revoked_at IS NULL",
            token_sha256,
        )
        return StaffTokenRecord(*rows[0]) if rows else None

    async def staff_tokens(self, venue_id: str) -> list[StaffTokenRecord]:
        rows = await self._fetch(
            f"SELECT {_STAFF_COLUMNS} FROM staff_tokens WHERE venue_id = $1 "
            "ORDER BY created_at, token_id",
            venue_id,
        )
        return [StaffTokenRecord(*r) for r in rows]

    async def revoke_staff_token(self, token_id: str, now_ms: int) -> bool:
        changed = await self._execute(
            "UPDATE staff_tokens SET revoked_at = $2 WHERE token_id = $1 AND revoked_at IS NULL",
            token_id,
            now_ms,
        )
        return changed > 0

    # -- app tokens' last use --------------------------------------------------------------

    async def record_token_use(self, minutes: Mapping[str, int]) -> None:
        """Each app token's last use (epoch ms of its minute), in one transaction. A time
        older than the stored one changes nothing: several processes, on several hosts,
        write the same tokens, in no particular order. Rows go in sorted by token id, so
        two writers lock them in the same order."""
        await self._execute_in_transaction(
            [
                (
                    "INSERT INTO app_token_use (token_id, last_used_at) VALUES ($1, $2) "
                    "ON CONFLICT (token_id) DO UPDATE SET last_used_at = excluded.last_used_at "
                    "WHERE excluded.last_used_at > app_token_use.last_used_at",
                    sorted(minutes.items()),
                )
            ]
        )

    async def token_last_use(self, token_ids: Sequence[str]) -> dict[str, int]:
        """Token id -> epoch ms of the minute it was last used, for those ever used."""
        if not token_ids:
            return {}
        rows = await self._fetch(
            "SELECT token_id, last_used_at FROM app_token_use "
            f"WHERE token_id IN ({_placeholders(len(token_ids))})",
            *token_ids,
        )
        return {str(r[0]): int(r[1]) for r in rows}

    # -- people ----------------------------------------------------------------------------

    async def insert_person(self, person: PersonRecord) -> None:
        await self._execute(
            f"INSERT INTO persons ({_PERSON_COLUMNS}) VALUES ({_placeholders(len(person))})",
            *person,
        )

    async def forget_person(self, person_id: str) -> None:
        """Delete a person nothing refers to yet (a declaration that lost a race)."""
        await self._execute("DELETE FROM persons WHERE person_id = $1", person_id)

    async def update_person(self, person: PersonRecord) -> None:
        """Replace every field of a stored person but its id and creation."""
        kept = ("person_id", "created_at_ms")
        columns = [c for c in PersonRecord._fields if c not in kept]
        assignments = ", ".join(
            f"{c.removesuffix('_ms')} = ${i}" for i, c in enumerate(columns, start=2)
        )
        await self._execute(
            f"UPDATE persons SET {assignments} WHERE person_id = $1",
            person.person_id,
            *(getattr(person, c) for c in columns),
        )

    async def person(self, person_id: str) -> PersonRecord | None:
        found = await self.persons([person_id])
        return found[0] if found else None

    async def persons(self, person_ids: Sequence[str]) -> list[PersonRecord]:
        if not person_ids:
            return []
        rows = await self._fetch(
            f"SELECT {_PERSON_COLUMNS} FROM persons "
            f"WHERE person_id IN ({_placeholders(len(person_ids))}) ORDER BY person_id",
            *person_ids,
        )
        return [_person(r) for r in rows]

    # -- identity claims and ID cards seen at the door ----------------------------------

    async def add_id_claim(self, claim: ClaimRecord) -> bool:
        """Record a claim; False when this phone already claims this id."""
        rows = await self._fetch(
            f"INSERT INTO id_claims ({_CLAIM_COLUMNS}) VALUES ({_placeholders(len(claim))}) "
            "ON CONFLICT DO NOTHING RETURNING claim_id",
            *claim,
        )
        return bool(rows)

    async def id_claim_of_phone(self, national_index: str, phone_index: str) -> ClaimRecord | None:
        rows = await self._fetch(
            f"SELECT {_CLAIM_COLUMNS} FROM id_claims "
            "WHERE national_id_index = $1 AND phone_index = $2",
            national_index,
            phone_index,
        )
        return ClaimRecord(*rows[0]) if rows else None

    async def id_claims(self, national_indexes: Sequence[str]) -> list[ClaimRecord]:
        """Every claim on these ids, oldest first."""
        if not national_indexes:
            return []
        rows = await self._fetch(
            f"SELECT {_CLAIM_COLUMNS} FROM id_claims "
            f"WHERE national_id_index IN ({_placeholders(len(national_indexes))}) "
            "ORDER BY claimed_at, claim_id",
            *national_indexes,
        )
        return [ClaimRecord(*r) for r in rows]

    async def id_claim(self, claim_id: str) -> ClaimRecord | None:
        rows = await self._fetch(
            f"SELECT {_CLAIM_COLUMNS} FROM id_claims WHERE claim_id = $1", claim_id
        )
        return ClaimRecord(*rows[0]) if rows else None

    async def contested_claims(
        self, include_resolved: bool = False, after_index: str = "", groups: int | None = None
    ) -> list[ClaimRecord]:
        """The claims on every id claimed more than once, grouped by id (its blind index),
        oldest first: only ids with no accepted claim yet unless ``include_resolved``; the
        ids after ``after_index``, the first ``groups`` of them (all when None), each
        group whole."""
        unresolved = (
            ""
            if include_resolved
            else "AND NOT EXISTS (SELECT 1 FROM id_claims a WHERE "
            "a.national_id_index = g.national_id_index AND a.state = 'accepted') "
        )
        limit = "" if groups is None else f"LIMIT {int(groups)}"
        rows = await self._fetch(
            f"SELECT {', '.join('c.' + col for col in _CLAIM_COLUMNS.split(', '))} "
            "FROM id_claims c JOIN ("
            "  SELECT g.national_id_index FROM id_claims g WHERE g.national_id_index > $1 "
            f"  {unresolved}GROUP BY g.national_id_index HAVING count(*) > 1 "
            f"  ORDER BY g.national_id_index {limit}"
            ") ids ON c.national_id_index = ids.national_id_index "
            "ORDER BY c.national_id_index, c.claimed_at, c.claim_id",
            after_index,
        )
        return [ClaimRecord(*r) for r in rows]

    async def accept_id_claim(self, claim_id: str, actor: str, now_ms: int) -> None:
        """Accept one claim and reject every other claim on the same id, together."""
        others = (
            "UPDATE id_claims SET state = 'rejected', resolved_by = $2, resolved_at = $3 "
            "WHERE national_id_index = (SELECT national_id_index FROM id_claims "
            "WHERE claim_id = $1) AND claim_id <> $1"
        )
        this = (
            "UPDATE id_claims SET state = 'accepted', resolved_by = $2, resolved_at = $3 "
            "WHERE claim_id = $1"
        )
        row = [(claim_id, actor, now_ms)]
        await self._execute_in_transaction([(others, row), (this, row)])

    async def door_card_holder(self, card_indexes: Sequence[str]) -> str | None:
        """The pseudonymous person an ID card was recorded under at a door, if seen."""
        if not card_indexes:
            return None
        rows = await self._fetch(
            "SELECT person_id FROM door_cards "
            f"WHERE card_index IN ({_placeholders(len(card_indexes))}) "
            "ORDER BY first_seen_at, person_id",
            *card_indexes,
        )
        return str(rows[0][0]) if rows else None

    async def add_door_card(self, card_indexes: Sequence[str], person_id: str, now_ms: int) -> str:
        """Record a card (each id number it carries) under ``person_id`` unless one of them
        was recorded already; the person it is recorded under."""
        for index in card_indexes:
            await self._execute(
                "INSERT INTO door_cards (card_index, person_id, first_seen_at) "
                "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                index,
                person_id,
                now_ms,
            )
        holder = await self.door_card_holder(card_indexes)
        assert holder is not None
        return holder

    # -- phones ------------------------------------------------------------------------

    async def link_phone(self, phone_index: str, person_id: str) -> None:
        """Let a verified phone act for a person and find them at the door."""
        await self._execute(
            "INSERT INTO person_phones (phone_index, person_id, verified) "
            "VALUES ($1, $2, TRUE) "
            "ON CONFLICT (phone_index, person_id) DO UPDATE SET verified = TRUE",
            phone_index,
            person_id,
        )

    async def phone_linked(self, phone_index: str, person_id: str) -> bool:
        """Whether this verified phone acts for the person."""
        rows = await self._fetch(
            "SELECT 1 FROM person_phones WHERE phone_index = $1 AND person_id = $2 AND verified",
            phone_index,
            person_id,
        )
        return bool(rows)

    async def persons_by_phone(self, phone_index: str) -> list[PersonRecord]:
        """The persons a verified phone acts for: whom the door finds by that phone."""
        rows = await self._fetch(
            f"SELECT {', '.join('p.' + c for c in _PERSON_COLUMNS.split(', '))} "
            "FROM person_phones l JOIN persons p ON p.person_id = l.person_id "
            "WHERE l.phone_index = $1 AND l.verified ORDER BY p.created_at, p.person_id",
            phone_index,
        )
        return [_person(r) for r in rows]

    async def add_declaration(
        self,
        person_id: str,
        app_id: str,
        declared_at_ms: int,
        declared_by_index: str,
        answers_enc: bytes,
    ) -> None:
        await self._execute(
            "INSERT INTO declarations "
            "(person_id, app_id, declared_at, declared_by_index, answers_enc) "
            "VALUES ($1, $2, $3, $4, $5)",
            person_id,
            app_id,
            declared_at_ms,
            declared_by_index,
            answers_enc,
        )

    async def declaration_count(self, person_id: str) -> int:
        rows = await self._fetch(
            "SELECT count(*) FROM declarations WHERE person_id = $1", person_id
        )
        return int(rows[0][0])


_BLOB_FIELDS: Final = frozenset(i for i, f in enumerate(PersonRecord._fields) if f.endswith("_enc"))


def _person(row: Sequence[Any]) -> PersonRecord:
    # Ciphertexts as bytes whatever the driver hands back (memoryview, bytearray).
    values = [bytes(v) if i in _BLOB_FIELDS and v is not None else v for i, v in enumerate(row)]
    return PersonRecord._make(values)
