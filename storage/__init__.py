"""Durable storage: the storage interface and its backends, migrations, pairing into
visits, tracing, reports and retention. May import ``signing``, never ``gateway``."""

from __future__ import annotations

__all__: list[str] = []
