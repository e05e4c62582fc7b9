"""Admins and the audit log: who may act as an official, and the record of what they did.

An admin token is shown once and stored hashed; a revoked one is refused at once, since
``admin_for_token`` reads storage on every call. The gateway and the CLI write an entry
for every audited act; entries are read back a page at a time (``read_audit``) and
deleted by retention (``purge_audit``). Written once for both backends (``storage.sql``):
these tables keep their times as ``timestamptz`` on PostgreSQL, so their SQL goes through
the dialect's time expressions.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Final, NamedTuple

from .errors import StorageError
from .sql import SharedSql

ADMIN_TOKEN_PREFIX: Final = "sgadm_"  # noqa: S105 - a label, not a secret


class AuditEntry(NamedTuple):
    at_ms: int
    actor: str
    action: str
    subject: str
    detail: str


class AuditRecord(NamedTuple):
    """An audit entry as read back, with its id (the order entries were written in)."""

    id: int
    at_ms: int
    actor: str
    action: str
    subject: str
    detail: str


class AuditQuery(NamedTuple):
    """Which audit entries to read: written at or after ``since_ms``, by ``actor`` and of
    ``action`` when given, with an id above ``after_id``; at most ``limit``, by id."""

    since_ms: int
    actor: str | None = None
    action: str | None = None
    after_id: int = 0
    limit: int = 100


class AdminRecord(NamedTuple):
    """An admin as listed: never the token."""

    name: str
    created_at_ms: int
    revoked_at_ms: int | None


def hash_admin_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_admin_token() -> str:
    return ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


class AuditLog(SharedSql):
    """Admins and the audit log, of ``Storage``."""

    # -- admins ----------------------------------------------------------------------------

    async def add_admin(self, name: str) -> str:
        """Register an admin; its token (shown once, stored hashed). A revoked admin's name
        may be added again: it gets a new token (the audit log tells the two apart by
        time). StorageError when the name has a live token."""
        token = new_admin_token()
        # A revoked name is taken over by the new token; a live one is left alone.
        changed = await self._execute(
            f"INSERT INTO admins (name, token_sha256, created_at) VALUES ($1, $2, {self._now()}) "
            "ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256, "
            "created_at = excluded.created_at, revoked_at = NULL "
            "WHERE admins.revoked_at IS NOT NULL",
            name,
            hash_admin_token(token),
        )
        if changed == 0:
            raise StorageError(f"admin {name!r} already exists")
        return token

    async def admin_for_token(self, token: str) -> str | None:
        """The name of a live (not revoked) admin token, read from storage on every call:
        a revocation holds at once."""
        rows = await self._fetch(
            "SELECT name FROM admins WHERE token_sha256 = $1 AND revoked_at IS NULL",
            hash_admin_token(token),
        )
        return str(rows[0][0]) if rows else None

    async def admins(self) -> list[AdminRecord]:
        """Every admin, revoked ones too, by name."""
        rows = await self._fetch(
            f"SELECT name, {self._epoch_ms('created_at')}, {self._epoch_ms('revoked_at')} "
            "FROM admins ORDER BY name"
        )
        return [AdminRecord(*r) for r in rows]

    async def revoke_admin(self, name: str) -> bool | None:
        """Refuse the admin's token from now on: True when revoked now, False when it was
        already, None when there is no such admin."""
        # Asked first, then revoked: an admin is never deleted, so one found here is still
        # there for the update, which then tells a live token from one already revoked.
        if not await self._fetch("SELECT 1 FROM admins WHERE name = $1", name):
            return None
        changed = await self._execute(
            f"UPDATE admins SET revoked_at = {self._now()} WHERE name = $1 AND revoked_at IS NULL",
            name,
        )
        return changed > 0

    # -- the audit log ---------------------------------------------------------------------

    async def audit(self, actor: str, action: str, subject: str, detail: str = "") -> None:
        await self._execute(
            "INSERT INTO audit_log (at, actor, action, subject, detail) "
            f"VALUES ({self._now()}, $1, $2, $3, $4)",
            actor,
            action,
            subject,
            detail,
        )

    async def audit_entries(self) -> list[AuditEntry]:
        rows = await self._fetch(
            f"SELECT {self._epoch_ms('at')}, actor, action, subject, detail "
            "FROM audit_log ORDER BY id"
        )
        return [AuditEntry(*r) for r in rows]

    async def read_audit(self, query: AuditQuery) -> list[AuditRecord]:
        """A page of the audit log (``AuditQuery``), oldest first."""
        # A statement per combination of filters (not "$3 IS NULL OR actor = $3"), so
        # each one's plan can use the index of its filter.
        where = [f"at >= {self._time('$1')}", "id > $2"]
        params: list[object] = [query.since_ms, query.after_id]
        for column, value in (("actor", query.actor), ("action", query.action)):
            if value is not None:
                params.append(value)
                where.append(f"{column} = ${len(params)}")
        params.append(query.limit)
        rows = await self._fetch(
            f"SELECT id, {self._epoch_ms('at')}, actor, action, subject, detail FROM audit_log "
            f"WHERE {' AND '.join(where)} ORDER BY id LIMIT ${len(params)}",
            *params,
        )
        return [AuditRecord(*r) for r in rows]

    async def purge_audit(self, cutoff_ms: int) -> int:
        """Delete audit entries written before ``cutoff_ms``; how many."""
        return await self._execute(
            f"DELETE FROM audit_log WHERE at < {self._time('$1')}", cutoff_ms
        )
