"""The registration side of storage: venues, door-staff tokens, people, declarations and
the sealed data key, written once for both backends.

These tables are small and read by key, so one SQL text serves SQLite and PostgreSQL: it is
written with PostgreSQL's ``$1`` parameters, which SQLite reads as numbered ``?1``
parameters after one substitution (``sqlite_params``). A backend supplies two primitives,
``_registry_fetch`` and ``_registry_execute``. Each method is one statement, atomic by
itself; where two requests could race (the same national id declared twice at once) a
unique key decides and the loser is told so.

Personal fields arrive here already encrypted (``*_enc``) or as blind indexes
(``*_index``): storage never sees them in the clear.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

_PARAM: Final = re.compile(r"\$(\d+)")


def sqlite_params(sql: str) -> str:
    """``$1`` -> ``?1``: the registry's SQL as SQLite's numbered parameters."""
    return _PARAM.sub(r"?\1", sql)


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


class StaffTokenRecord(NamedTuple):
    token_id: str
    venue_id: str
    app_id: str
    created_at_ms: int
    revoked_at_ms: int | None = None


class PersonRecord(NamedTuple):
    person_id: str
    national_id_index: str | None
    old_id_index: str | None  # the 9-digit id an ID card also carries
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


def _placeholders(n: int, start: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(start, start + n))


class Registry(abc.ABC):
    """Mixed into each ``Storage`` backend."""

    @abc.abstractmethod
    async def _registry_fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of one statement (which may write: ``INSERT ... RETURNING``)."""

    @abc.abstractmethod
    async def _registry_execute(self, sql: str, *args: Any) -> int:
        """Run one writing statement; the number of rows it changed."""

    @abc.abstractmethod
    async def _registry_transaction(
        self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]
    ) -> None:
        """Run each statement once per row of its parameters, all in one transaction."""

    # -- the data key ----------------------------------------------------------------------

    async def sealed_data_key(self) -> bytes | None:
        rows = await self._registry_fetch("SELECT sealed FROM data_keys WHERE key_id = 1")
        return bytes(rows[0][0]) if rows else None

    async def offer_sealed_data_key(self, sealed: bytes, now_ms: int) -> bytes:
        """Store ``sealed`` as the data key unless one is stored already; the stored one.
        Two processes starting at once both offer a key and both end up with the winner's."""
        await self._registry_execute(
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
        await self._registry_execute(
            f"INSERT INTO venues ({_VENUE_COLUMNS}) VALUES ({_placeholders(len(venue))})",
            *venue,
        )

    async def venue(self, venue_id: str) -> VenueRecord | None:
        rows = await self._registry_fetch(
            f"SELECT {_VENUE_COLUMNS} FROM venues WHERE venue_id = $1", venue_id
        )
        if not rows:
            return None
        values = list(rows[0])
        values[3] = bytes(values[3])  # phone_enc
        return VenueRecord._make(values)

    async def revoke_venue(self, venue_id: str, now_ms: int) -> bool:
        """Revoke a registered venue's code; False when no such venue (or already revoked)."""
        changed = await self._registry_execute(
            "UPDATE venues SET revoked_at = $2 WHERE venue_id = $1 AND revoked_at IS NULL",
            venue_id,
            now_ms,
        )
        return changed > 0

    async def revoked_venue_ids(self) -> frozenset[str]:
        rows = await self._registry_fetch(
            "SELECT venue_id FROM venues WHERE revoked_at IS NOT NULL"
        )
        return frozenset(r[0] for r in rows)

    async def venue_kinds(self) -> dict[str, str]:
        """Registered venue id -> kind (the flusher's maximum stay per kind)."""
        rows = await self._registry_fetch("SELECT venue_id, kind FROM venues")
        return {r[0]: r[1] for r in rows}

    async def venue_places(self) -> dict[str, tuple[str, str]]:
        """Registered venue id -> (province, kind): how reports group venues."""
        rows = await self._registry_fetch("SELECT venue_id, province, kind FROM venues")
        return {r[0]: (r[1], r[2]) for r in rows}

    # -- door staff ------------------------------------------------------------------------

    async def add_staff_token(self, token: StaffTokenRecord, token_sha256: str) -> None:
        await self._registry_execute(
            f"INSERT INTO staff_tokens ({_STAFF_COLUMNS}, token_sha256) "
            f"VALUES ({_placeholders(len(token) + 1)})",
            *token,
            token_sha256,
        )

    async def staff_token(self, token_sha256: str) -> StaffTokenRecord | None:
        """The live (not revoked) staff token with this hash."""
        rows = await self._registry_fetch(
            f"SELECT {_STAFF_COLUMNS} FROM staff_tokens "
            "WHERE token_sha256 = $1 AND revoked_at IS NULL",
            token_sha256,
        )
        return StaffTokenRecord(*rows[0]) if rows else None

    async def staff_tokens(self, venue_id: str) -> list[StaffTokenRecord]:
        rows = await self._registry_fetch(
            f"SELECT {_STAFF_COLUMNS} FROM staff_tokens WHERE venue_id = $1 "
            "ORDER BY created_at, token_id",
            venue_id,
        )
        return [StaffTokenRecord(*r) for r in rows]

    async def revoke_staff_token(self, token_id: str, now_ms: int) -> bool:
        changed = await self._registry_execute(
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
        await self._registry_transaction(
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
        rows = await self._registry_fetch(
            "SELECT token_id, last_used_at FROM app_token_use "
            f"WHERE token_id IN ({_placeholders(len(token_ids))})",
            *token_ids,
        )
        return {str(r[0]): int(r[1]) for r in rows}

    # -- people ----------------------------------------------------------------------------

    async def insert_person(self, person: PersonRecord) -> bool:
        """Insert; False when a person with that national id index exists already."""
        rows = await self._registry_fetch(
            f"INSERT INTO persons ({_PERSON_COLUMNS}) VALUES ({_placeholders(len(person))}) "
            "ON CONFLICT DO NOTHING RETURNING person_id",
            *person,
        )
        return bool(rows)

    async def update_person(self, person: PersonRecord) -> None:
        """Replace every field of a stored person but its id, national id and creation."""
        kept = (
            "person_id",
            "national_id_index",
            "old_id_index",
            "national_id_enc",
            "created_at_ms",
        )
        columns = [c for c in PersonRecord._fields if c not in kept]
        assignments = ", ".join(
            f"{c.removesuffix('_ms')} = ${i}" for i, c in enumerate(columns, start=2)
        )
        await self._registry_execute(
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
        rows = await self._registry_fetch(
            f"SELECT {_PERSON_COLUMNS} FROM persons "
            f"WHERE person_id IN ({_placeholders(len(person_ids))}) ORDER BY person_id",
            *person_ids,
        )
        return [_person(r) for r in rows]

    async def person_by_national_index(self, indexes: Sequence[str]) -> PersonRecord | None:
        """The person whose national id (or old id, from an ID card) has one of these
        indexes (an ID card carries the new 12-digit number and the old 9-digit one)."""
        if not indexes:
            return None
        listed = _placeholders(len(indexes))
        rows = await self._registry_fetch(
            f"SELECT {_PERSON_COLUMNS} FROM persons WHERE national_id_index IN ({listed}) "
            f"OR old_id_index IN ({listed}) ORDER BY created_at",
            *indexes,
        )
        return _person(rows[0]) if rows else None

    async def link_phone(self, phone_index: str, person_id: str) -> None:
        await self._registry_execute(
            "INSERT INTO person_phones (phone_index, person_id) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING",
            phone_index,
            person_id,
        )

    async def phone_linked(self, phone_index: str, person_id: str) -> bool:
        rows = await self._registry_fetch(
            "SELECT 1 FROM person_phones WHERE phone_index = $1 AND person_id = $2",
            phone_index,
            person_id,
        )
        return bool(rows)

    async def persons_by_phone(self, phone_index: str) -> list[PersonRecord]:
        rows = await self._registry_fetch(
            f"SELECT {', '.join('p.' + c for c in _PERSON_COLUMNS.split(', '))} "
            "FROM person_phones l JOIN persons p ON p.person_id = l.person_id "
            "WHERE l.phone_index = $1 ORDER BY p.created_at, p.person_id",
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
        await self._registry_execute(
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
        rows = await self._registry_fetch(
            "SELECT count(*) FROM declarations WHERE person_id = $1", person_id
        )
        return int(rows[0][0])


_BLOB_FIELDS: Final = frozenset(i for i, f in enumerate(PersonRecord._fields) if f.endswith("_enc"))


def _person(row: Sequence[Any]) -> PersonRecord:
    # Ciphertexts as bytes whatever the driver hands back (memoryview, bytearray).
    values = [bytes(v) if i in _BLOB_FIELDS and v is not None else v for i, v in enumerate(row)]
    return PersonRecord._make(values)
