"""Shared fixtures. Servers are real: see ``servers.py`` for Redis/Valkey and PostgreSQL."""

from __future__ import annotations

import logging
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.logs import OWN_LOGGERS
from signing import FileKeyringStore, Keyring, Sealer

from .harness import GatewayStarter, GatewayUnderTest, StorageKind, start_gateway

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


@pytest.fixture
async def gateway_under_test(
    tmp_path: Path, master_key: bytes, request: pytest.FixtureRequest
) -> AsyncIterator[GatewayStarter]:
    """Start gateways in this test's process, on a TestServer each:
    ``await gateway_under_test(redis_url, *, storage="sqlite", **settings)`` returns a
    started ``GatewayUnderTest`` (``tests/harness.py``): its app, a client, its settings,
    and a Redis client of the test's own.

    - Settings: the data dir is ``tmp_path`` (so its keyring is the ``keyring`` fixture's),
      the master key is ``master_key``'s, and Redis is at ``redis_url`` (the ``redis_url``
      fixture's, or a private server's); keyword arguments set any other field, or these.
    - Storage: ``"sqlite"``, the data dir's file (or whatever ``storage_url=`` names);
      ``"postgresql"``, a schema of its own in the test database
      (``SCANGATE_TEST_POSTGRES_URL``), dropped afterwards.

    What the test has not closed itself (``GatewayUnderTest.close``) is closed at teardown,
    the last started first.
    """
    started: list[GatewayUnderTest] = []

    def postgres_url() -> str:
        # Asked for only when needed: a test on SQLite must not need PostgreSQL.
        url: str = request.getfixturevalue("postgres_url")
        return url

    async def start(
        redis_url: str, *, storage: StorageKind = "sqlite", **settings: Any
    ) -> GatewayUnderTest:
        gateway = await start_gateway(
            tmp_path, master_key, redis_url, storage, postgres_url, settings
        )
        started.append(gateway)
        return gateway

    yield start
    for gateway in reversed(started):
        await gateway.close()


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """``configure_logging`` changes the process's logging: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    own = {name: logging.getLogger(name).level for name in (*OWN_LOGGERS, "gateway.access")}
    hook = sys.excepthook
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, own_level in own.items():
            logging.getLogger(name).setLevel(own_level)
        sys.excepthook = hook
        logging.captureWarnings(False)
