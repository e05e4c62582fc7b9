"""State shared through PostgreSQL: two gateway processes, each with a data dir of its own,
see a key rotation, a retirement and a venue revocation made with the CLI on a third
directory within 5 seconds; and the keyring's table, made by the keyring store itself
before migration 8, is adopted by that migration with the keyring in it."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from signing import Code, FileKeyringStore, Keyring, Sealer
from storage import migrations
from storage.keyring_store import keyring_store
from storage.postgres import PostgresStorage

from .servers import free_loopback_port, scangate_env
from .test_faults import wait_ready

PROPAGATION_S = 5.0


def env_for(storage_url: str, redis_url: str, master_key: bytes) -> dict[str, str]:
    return scangate_env(
        SCANGATE_STORAGE_URL=storage_url,
        SCANGATE_REDIS_URL=redis_url,
        SCANGATE_MASTER_KEY=base64.b64encode(master_key).decode(),
        SCANGATE_SHARDS="4",
    )


def cli(data_dir: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def start_gateway(data_dir: Path, port: int, env: dict[str, str]) -> Any:
    log = data_dir / "serve.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--data-dir", str(data_dir), "serve",
             "--port", str(port), "--no-flusher"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    proc.log = log  # type: ignore[attr-defined]
    return proc


async def verdict(url: str, token: str, venue: str, person: str) -> str:
    event = {
        "event_id": f"SH-{uuid.uuid4().hex[:12]}",
        "kind": "checkin",
        "venue_code": venue,
        "person_code": person,
        "scanned_at": int(time.time() * 1000),
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/scans",
            json={"events": [event]},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        body = await resp.json()
        assert resp.status == 200, body
        result = body["results"][0]
        return str(result.get("reason") or result["status"])


async def within(seconds: float, check: Callable[[], Any]) -> float:
    """How long until ``await check()`` is true; fails after ``seconds``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_two_gateways_see_rotation_retirement_and_revocation_within_5_s(
    tmp_path: Path, postgres_url: str, private_redis: Any, master_key: bytes
) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    redis = private_redis("valkey", appendonly=False)
    env = env_for(f"{postgres_url}?search_path={schema}", redis.url, master_key)
    dirs = [tmp_path / name for name in ("cli", "a", "b")]
    for d in dirs:
        d.mkdir()
    procs: list[Any] = []
    try:
        token = json.loads(cli(dirs[0], env, "apps", "add", "vhd"))["token"]
        assert not (dirs[0] / "keyring.json").exists()  # kept in the database
        urls = []
        for d in dirs[1:]:
            port = free_loopback_port()
            proc = start_gateway(d, port, env)
            procs.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            await wait_ready(url, proc)

        venue_k1 = cli(dirs[0], env, "codes", "issue", "--app", "vhd", "--venue", "V1")
        person_k1 = cli(dirs[0], env, "codes", "issue", "--app", "vhd", "--person", "P1")
        for url in urls:
            assert await verdict(url, token, venue_k1, person_k1) == "accepted"

        # A rotation: codes of the new key verify on both.
        assert json.loads(cli(dirs[0], env, "apps", "rotate", "vhd"))["kid"] == "K2"
        person_k2 = cli(dirs[0], env, "codes", "issue", "--app", "vhd", "--person", "P2")
        for url in urls:
            await within(
                PROPAGATION_S,
                lambda url=url: _is(verdict(url, token, venue_k1, person_k2), "accepted"),
            )

        # A retirement: codes of the old key are refused on both.
        cli(dirs[0], env, "apps", "retire", "vhd", "K1")
        for url in urls:
            await within(
                PROPAGATION_S,
                lambda url=url: _is(verdict(url, token, venue_k1, person_k2), "unknown_key"),
            )

        # A revocation of a registered venue, made with the CLI.
        venue = json.loads(
            cli(
                dirs[0],
                env,
                "venues",
                "add",
                "--app",
                "vhd",
                "--name",
                "Chợ",
                "--phone",
                "0912345678",
                "--address",
                "A",
                "--province",
                "P",
            )
        )
        for url in urls:
            assert await verdict(url, token, venue["code"], person_k2) == "accepted"
        cli(dirs[0], env, "venues", "revoke", venue["venue_id"])
        for url in urls:
            await within(
                PROPAGATION_S,
                lambda url=url: _is(verdict(url, token, venue["code"], person_k2), "revoked"),
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


async def _is(answer: Any, expected: str) -> bool:
    return bool(await answer == expected)


# What the keyring store ran on opening, and wrote, before migration 8 made its table:
# a database from then has the schema up to migration 7 and this table beside it.
KEYRING_TABLE_BEFORE_8 = (
    "CREATE TABLE IF NOT EXISTS keyring_document ("
    " id integer PRIMARY KEY CHECK (id = 1),"
    " document bytea NOT NULL,"
    " version bigint NOT NULL)"
)
KEYRING_WRITE_BEFORE_8 = (
    "INSERT INTO keyring_document (id, document, version) VALUES (1, $1, 1) "
    "ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document, "
    "version = keyring_document.version + 1"
)


@pytest.mark.parametrize("opened_first", ["keyring", "storage"])
async def test_a_keyring_table_from_before_migration_8_is_adopted_with_its_keyring(
    tmp_path: Path, postgres_url: str, master_key: bytes, opened_first: str
) -> None:
    """A database as the code before migration 8 left it: migrations 1 to 7, and the
    keyring table the store made itself, holding a keyring written twice. Whichever opens
    first after the upgrade (the keyring store, as the CLI and ``serve`` do, or storage)
    applies migration 8, which keeps the table and its document: the keyring reads its
    apps and keys as before, and its writes go on from the stored version."""
    sealer = Sealer(master_key)
    old_file = tmp_path / "before.json"
    old = Keyring(FileKeyringStore(old_file), sealer)
    app = old.add_app("vhd")
    code = old.issue("vhd", "venue", "V1", now_s=1_790_000_000)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = f"{postgres_url}?search_path={schema}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        conn = await asyncpg.connect(postgres_url, server_settings={"search_path": schema})
        try:
            await conn.execute(
                "CREATE TABLE schema_migrations "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            for version, statements in migrations.POSTGRES:
                if version < 8:
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)
            await conn.execute(KEYRING_TABLE_BEFORE_8)
            document = old_file.read_bytes()
            await conn.execute(KEYRING_WRITE_BEFORE_8, b"an older keyring")
            await conn.execute(KEYRING_WRITE_BEFORE_8, document)
        finally:
            await conn.close()

        if opened_first == "storage":
            storage = await PostgresStorage.connect(url, timezone="Asia/Ho_Chi_Minh")
            try:
                # 8 adopts the table; the ones after it apply as on any database.
                applied = await storage.migrate()
                assert applied[0] == 8 and applied == sorted(applied)
                assert applied == [v for v, _ in migrations.POSTGRES if v >= 8]
            finally:
                await storage.close()
        store = keyring_store(url, tmp_path / "no-keyring-file.json")
        try:
            assert store.read() == (document, "2")  # adopted as it was
            keyring = Keyring(store, sealer)
            assert keyring.app_for_token(app.token) == "vhd"
            assert isinstance(keyring.verifier("vhd").verify(code, "venue", 1_790_000_000), Code)
            assert keyring.rotate("vhd") == "K2"
            assert store.version() == "3"
        finally:
            store.close()
        storage = await PostgresStorage.connect(url, timezone="Asia/Ho_Chi_Minh")
        try:
            assert await storage.migrate() == []  # nothing left for storage to do
        finally:
            await storage.close()
        reader = keyring_store(url, tmp_path / "no-keyring-file.json")
        try:
            assert Keyring(reader, sealer).rotate("vhd") == "K3"  # K2 was kept
        finally:
            reader.close()
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()
