"""Shared fixtures. Servers are real: see ``servers.py`` for Redis/Valkey and PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from signing import FileKeyringStore, Keyring, Sealer

pytest_plugins = ["tests.fixtures_servers"]

KeyringFactory = Callable[..., Keyring]


@pytest.fixture
def master_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def keyring_factory(tmp_path: Path, master_key: bytes) -> KeyringFactory:
    """Open (another view of) the keyring file under this test's data dir."""

    def open_keyring(key: bytes | None = None) -> Keyring:
        store = FileKeyringStore(tmp_path / "keyring.json")
        return Keyring(store, Sealer(key or master_key))

    return open_keyring


@pytest.fixture
def keyring(keyring_factory: KeyringFactory) -> Keyring:
    return keyring_factory()
