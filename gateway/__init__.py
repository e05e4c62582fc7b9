"""The gateway: settings, CLI, HTTP app, Redis buffer, flusher, metrics, embedded server."""

from __future__ import annotations

from gateway.settings import Settings, SettingsError, parse_duration_s

__all__ = ["Settings", "SettingsError", "parse_duration_s"]
