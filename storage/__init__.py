"""Durable storage: the storage interface (split by concern: events and visits, registry,
outbox, audit) and its backends (SQLite, PostgreSQL), schema migrations, pairing into
visits, tracing, reports and retention. May import ``signing``, never ``gateway``."""

from __future__ import annotations

from .audit import AdminRecord, AuditEntry, AuditQuery, AuditRecord
from .base import Storage
from .connect import connect_storage
from .errors import StorageError, StorageUnavailable
from .events import BatchResult, PurgeResult
from .models import CLOSED_BY, ContactRow, Kind, PairingRules, ScanEvent, Visit
from .pairing import derive_visits
from .tracing import TraceQuery

__all__ = [
    "CLOSED_BY",
    "AdminRecord",
    "AuditEntry",
    "AuditQuery",
    "AuditRecord",
    "BatchResult",
    "ContactRow",
    "Kind",
    "PairingRules",
    "PurgeResult",
    "ScanEvent",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "TraceQuery",
    "Visit",
    "connect_storage",
    "derive_visits",
]
