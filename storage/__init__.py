"""Durable storage: the storage interface and its backends (SQLite, PostgreSQL), schema
migrations, pairing into visits, tracing and retention. May import ``signing``, never
``gateway``."""

from __future__ import annotations

from .base import (
    AdminRecord,
    AuditEntry,
    AuditQuery,
    AuditRecord,
    BatchResult,
    PurgeResult,
    Storage,
)
from .connect import connect_storage
from .errors import StorageError, StorageUnavailable
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
