"""Opening storage: the backend a URL names, migrated. The one place that knows every
backend, so the interface (``storage.base``) never imports its implementations."""

from __future__ import annotations

from storage.base import Storage
from storage.errors import StorageError
from storage.postgres import PostgresStorage
from storage.sqlite import SqliteStorage


async def connect_storage(
    url: str, *, timezone: str = "Asia/Ho_Chi_Minh", migrate: bool = True
) -> Storage:
    """Open the storage a URL names (``sqlite:///path`` or ``postgresql://...``) and apply
    pending migrations (not with ``migrate=False``: a read-only replica for tracing)."""
    storage: Storage
    if url.startswith("sqlite:///"):
        storage = SqliteStorage(url.removeprefix("sqlite:///"))
    elif url.startswith(("postgresql://", "postgres://")):
        storage = await PostgresStorage.connect(url, timezone=timezone)
    else:
        raise StorageError(
            "SCANGATE_STORAGE_URL must start with sqlite:/// or postgresql:// "
            f"(got {url.split(':', 1)[0]!r})"
        )
    if not migrate:
        return storage
    try:
        await storage.migrate()
    except BaseException:
        await storage.close()
        raise
    return storage
