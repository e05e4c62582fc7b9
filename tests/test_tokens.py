"""Leaked tokens, as an attacker holding one and an operator revoking it would meet them:
real HTTP requests with the token, the real CLI, on SQLite and on PostgreSQL.

- a revoked app token gets 401 on every worker of a host within 2 s (``scangate serve
  --workers 2``) and on every host sharing PostgreSQL within 5 s; the app's other tokens
  keep working; a keyring written before tokens had ids keeps working, and its tokens can
  be revoked;
- a revoked admin token gets 401 at once, on every admin endpoint;
- ``apps tokens`` lists ids, creation and the minute of last use, never a token, and that
  last use is written in the background, not once per request;
- reading a case is audit-logged and answered ``no-store``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import fields as fields_of
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway import Settings
from signing import FileKeyringStore, Keyring, Sealer
from storage import Storage
from storage.keyring_store import DatabaseKeyringStore

from .harness import GatewayStarter, GatewayUnderTest
from .servers import free_loopback_port, scangate_env
from .test_faults import wait_ready

# The Redis kind changes nothing here: one is enough.
ONE_REDIS: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)

WORKERS_DEADLINE_S: Final = 2.0  # every worker of a host
HOSTS_DEADLINE_S: Final = 5.0  # every host sharing PostgreSQL
# Fresh connections after the deadline: SO_REUSEPORT spreads them over the workers, so
# 40 all landing on one of two workers has a chance of 2**-39.
CONNECTIONS_AFTER_DEADLINE: Final = 40
A_SCAN: Final = {"events": [{"event_id": "LEAK-1"}]}  # rejected, but only once authorised
CLI_ACTOR: Final = f"cli:{getpass.getuser()}"  # who the CLI writes into the audit log


# -- a deployment on either backend ------------------------------------------------------------


@dataclass
class Deployment:
    """A data dir and storage (SQLite in the data dir, or a schema of its own in the test
    PostgreSQL), a CLI pointed at them, and in-process gateways on a real port."""

    kind: str
    data_dir: Path
    storage_url: str
    settings: Settings
    env: dict[str, str]
    start_gateway: GatewayStarter
    started: list[GatewayUnderTest] = field(default_factory=list)

    async def cli(
        self, *args: str, env: dict[str, str] | None = None, data_dir: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        directory = str(data_dir or self.data_dir)
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "--data-dir", directory, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**self.env, **(env or {})},
        )

    async def cli_json(
        self, *args: str, env: dict[str, str] | None = None, data_dir: Path | None = None
    ) -> Any:
        result = await self.cli(*args, env=env, data_dir=data_dir)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1, result.stdout
        return json.loads(lines[0])

    async def cli_fails(self, *args: str, env: dict[str, str] | None = None) -> str:
        """The one line a refused command prints (exit 2, nothing on stdout)."""
        result = await self.cli(*args, env=env)
        assert (result.returncode, result.stdout) == (2, ""), result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    async def gateway(self, **settings: Any) -> TestClient[Any, Any]:
        """A gateway on this deployment's data dir and storage (the shared fixture's)."""
        ours = {f.name: getattr(self.settings, f.name) for f in fields_of(Settings)}
        redis_url = ours.pop("redis_url")
        started = await self.start_gateway(redis_url, **{**ours, **settings})
        self.started.append(started)
        return started.client

    async def sql(self, sqlite_statement: str, postgres_statement: str, *args: Any) -> list[Any]:
        """Rows of a statement run with the backend's own driver, beside scangate: for
        planting and inspecting rows, never for acting."""
        if self.kind == "sqlite":

            def run() -> list[Any]:
                with contextlib.closing(sqlite3.connect(self.data_dir / "scangate.db")) as db:
                    rows = db.execute(sqlite_statement, args).fetchall()
                    db.commit()
                    return rows

            return await asyncio.to_thread(run)
        conn = await asyncpg.connect(self.storage_url)
        try:
            return list(await conn.fetch(postgres_statement, *args))
        finally:
            await conn.close()

    async def count(self, table: str) -> int:
        sql = f"SELECT count(*) FROM {table}"
        rows = await self.sql(sql, sql)
        return int(rows[0][0])

    @contextlib.contextmanager
    def keyring_versions(self) -> Iterator[Callable[[], str]]:
        """A (blocking) reader of the stored keyring document's version tag."""
        if self.kind == "sqlite":
            yield FileKeyringStore(self.data_dir / "keyring.json").version
            return
        store = DatabaseKeyringStore(self.storage_url)
        try:
            yield store.version
        finally:
            store.close()


@pytest.fixture
async def deployment(
    storage_kind: str,
    tmp_path: Path,
    redis_url: str,
    master_key: bytes,
    request: pytest.FixtureRequest,
    gateway_under_test: GatewayStarter,
) -> AsyncIterator[Deployment]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    key = base64.b64encode(master_key).decode()
    schema = None
    if storage_kind == "sqlite":
        storage_url = f"sqlite:///{(data_dir / 'scangate.db').resolve()}"
    else:
        postgres_url: str = request.getfixturevalue("postgres_url")
        schema = f"t_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f"CREATE SCHEMA {schema}")
        finally:
            await conn.close()
        storage_url = f"{postgres_url}?search_path={schema}"
    settings = Settings(
        data_dir=data_dir,
        redis_url=redis_url,
        master_key=key,
        storage_url=storage_url,
        shards=4,
        flush_max_age_s=0.01,
    )
    env = scangate_env(
        SCANGATE_STORAGE_URL=storage_url, SCANGATE_MASTER_KEY=key, SCANGATE_SHARDS="4"
    )
    made = Deployment(storage_kind, data_dir, storage_url, settings, env, gateway_under_test)
    try:
        yield made
    finally:
        # Before the schema goes: a gateway writes its buffered last uses as it stops.
        for gateway in reversed(made.started):
            await gateway.close()
        if schema is not None:
            conn = await asyncpg.connect(request.getfixturevalue("postgres_url"))
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def until(check: Callable[[], Any], timeout_s: float) -> float:
    """Seconds until ``await check()`` is true; fails after ``timeout_s``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# -- app tokens --------------------------------------------------------------------------------


@ONE_REDIS
async def test_a_revoked_app_token_gets_401_and_the_apps_other_tokens_keep_working(
    deployment: Deployment,
) -> None:
    leaked = await deployment.cli_json("apps", "add", "vhd")
    kept = await deployment.cli_json("apps", "token", "vhd")
    # The id is public, and whoever finds a leaked token can tell which id to revoke.
    digest = hashlib.sha256(leaked["token"].encode()).hexdigest()
    assert leaked["token_id"] == "tok_" + digest[:12]
    client = await deployment.gateway()
    for token in (leaked["token"], kept["token"]):
        assert (await client.post("/v1/scans", json=A_SCAN, headers=bearer(token))).status == 200

    listed = await deployment.cli_json("apps", "tokens", "vhd")
    assert [t["token_id"] for t in listed] == [leaked["token_id"], kept["token_id"]]
    assert all(t["revoked_at"] is None for t in listed)
    text = json.dumps(listed)
    for token in (leaked["token"], kept["token"]):
        assert token not in text and token.removeprefix("sga_") not in text

    revoked = await deployment.cli_json("apps", "revoke-token", leaked["token_id"])
    assert revoked == {
        "token_id": leaked["token_id"],
        "app_id": "vhd",
        "revoked": True,
        "already": False,
    }

    async def refused() -> bool:
        resp = await client.post("/v1/scans", json=A_SCAN, headers=bearer(leaked["token"]))
        return resp.status == 401

    await until(refused, WORKERS_DEADLINE_S)
    # Every endpoint an app token opens is shut to it.
    for method, path, body in (
        ("POST", "/v1/scans", A_SCAN),
        ("GET", "/v1/risky-venues", None),
        ("POST", "/v1/venues", {"name": "X"}),
        ("POST", "/v1/otp", {"phone": "0912345678"}),
    ):
        resp = await client.request(method, path, json=body, headers=bearer(leaked["token"]))
        assert resp.status == 401, (method, path)
        assert (await resp.json())["error"] == "unauthorized"
    resp = await client.post("/v1/scans", json=A_SCAN, headers=bearer(kept["token"]))
    assert resp.status == 200

    again = await deployment.cli_json("apps", "revoke-token", leaked["token_id"])
    assert again["already"] is True
    listed = await deployment.cli_json("apps", "tokens", "vhd")
    assert [t["revoked_at"] is not None for t in listed] == [True, False]
    assert (await deployment.cli_json("apps", "list"))[0]["tokens"] == 1
    assert "no app token" in await deployment.cli_fails("apps", "revoke-token", "tok_000000000000")
    assert "not a token id" in await deployment.cli_fails("apps", "revoke-token", leaked["token"])
    await deployment.cli_fails("apps", "tokens", "nope")
    audited = await deployment.cli_json("audit", "--action", "app_token_revoked")
    assert [(e["actor"], e["subject"], e["detail"]) for e in audited] == [
        (CLI_ACTOR, leaked["token_id"], "app_id=vhd"),
        (CLI_ACTOR, leaked["token_id"], "app_id=vhd already"),
    ]


@ONE_REDIS
async def test_a_keyring_from_before_token_ids_keeps_working_and_its_tokens_can_be_revoked(
    deployment: Deployment, master_key: bytes
) -> None:
    """A data dir's keyring.json written before tokens had ids (format 1): on PostgreSQL it
    is imported into the database as it is."""
    keyring = Keyring(FileKeyringStore(deployment.data_dir / "keyring.json"), Sealer(master_key))
    old = keyring.add_app("vhd").token
    keyring.store.close()
    path = deployment.data_dir / "keyring.json"
    doc = json.loads(path.read_bytes())
    for token in doc["apps"]["vhd"]["tokens"]:
        del token["id"]
    doc["format"] = 1
    path.write_text(json.dumps(doc))

    client = await deployment.gateway()
    assert (await client.post("/v1/scans", json=A_SCAN, headers=bearer(old))).status == 200
    listed = await deployment.cli_json("apps", "tokens", "vhd")
    old_id = "tok_" + hashlib.sha256(old.encode()).hexdigest()[:12]
    assert [t["token_id"] for t in listed] == [old_id]
    await deployment.cli_json("apps", "revoke-token", old_id)

    async def refused() -> bool:
        resp = await client.post("/v1/scans", json=A_SCAN, headers=bearer(old))
        return resp.status == 401

    await until(refused, WORKERS_DEADLINE_S)


def start_serve(data_dir: Path, port: int, env: dict[str, str], *args: str) -> Any:
    log = data_dir / f"serve-{port}.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--data-dir", str(data_dir), "serve",
             "--port", str(port), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    proc.log = log  # type: ignore[attr-defined]
    return proc


@contextlib.asynccontextmanager
async def served(data_dir: Path, env: dict[str, str], *args: str) -> AsyncIterator[str]:
    """``scangate serve`` as its own process; its base URL once it is ready."""
    port = free_loopback_port()
    proc = start_serve(data_dir, port, env, *args)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)


async def status_on_a_new_connection(url: str, token: str) -> int:
    """POST /v1/scans on a connection of its own, so that it may reach any worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url + "/v1/scans", json=A_SCAN, headers=bearer(token)) as resp,
    ):
        await resp.read()
        return resp.status


async def revoke_and_watch(
    deployment: Deployment, token_id: str, env: dict[str, str], data_dir: Path | None = None
) -> float:
    """Revoke ``token_id`` with the CLI; the monotonic time at which the stored keyring was
    seen to change (polled every 10 ms, so at most that after the write): the deadlines
    count from there."""
    with deployment.keyring_versions() as version:
        before = version()
        revoking = asyncio.create_task(
            deployment.cli("apps", "revoke-token", token_id, env=env, data_dir=data_dir)
        )
        started = time.monotonic()
        while await asyncio.to_thread(version) == before:
            assert not revoking.done() or revoking.result().returncode == 0, revoking.result()
            assert time.monotonic() - started < 60, "the keyring never changed"
            await asyncio.sleep(0.01)
        changed = time.monotonic()
    result = await revoking
    assert result.returncode == 0, result.stderr
    return changed


async def refused_everywhere_by(
    urls: list[str], token: str, changed: float, deadline_s: float
) -> None:
    """Keep asking every gateway, each time on a new connection, until well past the
    deadline: an answer to a request sent after ``changed + deadline_s`` must be 401."""
    after_deadline: list[tuple[str, int]] = []
    last_accepted = {url: -1.0 for url in urls}  # seconds after the change
    end = changed + deadline_s + 1.0
    while len(after_deadline) < CONNECTIONS_AFTER_DEADLINE * len(urls) or time.monotonic() < end:
        for url in urls:
            sent = time.monotonic()
            status = await status_on_a_new_connection(url, token)
            assert status in (200, 401), status
            if status == 200:
                last_accepted[url] = sent - changed
            if sent >= changed + deadline_s:
                after_deadline.append((url, status))
    late = [(url, s) for url, s in after_deadline if s != 401]
    assert late == [], (
        f"{len(late)} of {len(after_deadline)} answers after {deadline_s} s were not 401; "
        f"last accepted (s after the change): {last_accepted}"
    )


@ONE_REDIS
async def test_every_worker_of_a_host_refuses_a_revoked_app_token_within_2_s(
    deployment: Deployment,
) -> None:
    leaked = await deployment.cli_json("apps", "add", "vhd")
    kept = await deployment.cli_json("apps", "token", "vhd")
    env = deployment.env  # no SCANGATE_REDIS_URL: serve starts its own Valkey
    async with served(deployment.data_dir, env, "--workers", "2", "--no-flusher") as url:
        for _ in range(10):
            assert await status_on_a_new_connection(url, leaked["token"]) == 200
        changed = await revoke_and_watch(deployment, leaked["token_id"], env)
        await refused_everywhere_by([url], leaked["token"], changed, WORKERS_DEADLINE_S)
        for _ in range(10):
            assert await status_on_a_new_connection(url, kept["token"]) == 200


@ONE_REDIS
@pytest.mark.parametrize("storage_kind", ["postgresql"], indirect=True)
async def test_every_host_sharing_postgresql_refuses_a_revoked_app_token_within_5_s(
    deployment: Deployment, redis_url: str
) -> None:
    """Two gateway hosts (data dirs of their own) and an operator's machine (a third), all
    on one PostgreSQL and one Redis."""
    env = {**deployment.env, "SCANGATE_REDIS_URL": redis_url}
    operator, host_a, host_b = (deployment.data_dir / d for d in ("operator", "a", "b"))
    for d in (operator, host_a, host_b):
        d.mkdir()
    leaked = await deployment.cli_json("apps", "add", "vhd", env=env, data_dir=operator)
    async with (
        served(host_a, env, "--no-flusher") as url_a,
        served(host_b, env, "--no-flusher") as url_b,
    ):
        for url in (url_a, url_b):
            assert await status_on_a_new_connection(url, leaked["token"]) == 200
        changed = await revoke_and_watch(deployment, leaked["token_id"], env, operator)
        await refused_everywhere_by([url_a, url_b], leaked["token"], changed, HOSTS_DEADLINE_S)


# -- admin tokens ------------------------------------------------------------------------------


ADMIN_READS: Final = (
    ("GET", "/v1/trace/P1", None),
    ("GET", "/v1/cases/C1", None),
    ("POST", "/v1/cases", {"person_id": "P1", "confirmed_at": 0}),
    ("GET", "/v1/reports/daily?from=2026-01-01&to=2026-01-02", None),
    ("GET", "/v1/audit", None),
)


@ONE_REDIS
async def test_a_revoked_admin_token_gets_401_at_once_on_every_admin_endpoint(
    deployment: Deployment,
) -> None:
    leaked = await deployment.cli_json("admins", "add", "officer1")
    other = await deployment.cli_json("admins", "add", "officer2")
    client = await deployment.gateway()
    assert (await client.get("/v1/audit", headers=bearer(leaked["token"]))).status == 200

    revoked = await deployment.cli_json("admins", "revoke", "officer1")
    assert revoked == {"name": "officer1", "revoked": True, "already": False}
    # At once: the very next request, with no wait for any refresh.
    for method, path, body in ADMIN_READS:
        resp = await client.request(method, path, json=body, headers=bearer(leaked["token"]))
        assert resp.status == 401, (method, path)
        assert (await resp.json())["error"] == "unauthorized"
    assert (await client.get("/v1/audit", headers=bearer(other["token"]))).status == 200

    listed = await deployment.cli_json("admins", "list")
    assert [(a["name"], a["revoked_at"] is not None) for a in listed] == [
        ("officer1", True),
        ("officer2", False),
    ]
    assert all(a["created_at"].endswith("Z") for a in listed)
    assert leaked["token"] not in json.dumps(listed)
    assert (await deployment.cli_json("admins", "revoke", "officer1"))["already"] is True
    assert "no admin" in await deployment.cli_fails("admins", "revoke", "nobody")
    # The live name cannot be taken; the revoked one is given a new token.
    assert "already exists" in await deployment.cli_fails("admins", "add", "officer2")
    renewed = await deployment.cli_json("admins", "add", "officer1")
    assert (await client.get("/v1/audit", headers=bearer(renewed["token"]))).status == 200
    assert (await client.get("/v1/audit", headers=bearer(leaked["token"]))).status == 401
    actions = [
        (e["action"], e["subject"])
        for e in await deployment.cli_json("audit", "--actor", CLI_ACTOR)
        if e["action"].startswith("admin_")
    ]
    assert actions == [
        ("admin_added", "officer1"),
        ("admin_added", "officer2"),
        ("admin_revoked", "officer1"),
        ("admin_revoked", "officer1"),
        ("admin_added", "officer1"),
    ]


# -- last use ----------------------------------------------------------------------------------


@ONE_REDIS
async def test_last_use_is_kept_to_the_minute_and_written_in_the_background_not_per_request(
    deployment: Deployment,
) -> None:
    used = await deployment.cli_json("apps", "add", "vhd")
    idle = await deployment.cli_json("apps", "token", "vhd")
    # A write interval far beyond the test: anything stored now was written per request.
    client = await deployment.gateway(last_use_flush_s=3600)
    first_minute = int(time.time()) // 60 * 60
    for _ in range(300):
        resp = await client.post("/v1/scans", json=A_SCAN, headers=bearer(used["token"]))
        assert resp.status == 200
    last_minute = int(time.time()) // 60 * 60
    assert await deployment.count("app_token_use") == 0
    listed = await deployment.cli_json("apps", "tokens", "vhd")
    assert [t["last_used_at"] for t in listed] == [None, None]

    # Stopping the gateway writes what it holds: one row for the one token used.
    await client.close()
    assert await deployment.count("app_token_use") == 1
    listed = {t["token_id"]: t for t in await deployment.cli_json("apps", "tokens", "vhd")}
    assert listed[idle["token_id"]]["last_used_at"] is None
    shown = listed[used["token_id"]]["last_used_at"]
    assert shown.endswith(":00.000Z"), shown  # to the minute
    minutes = {
        time.strftime("%Y-%m-%dT%H:%M:00.000Z", time.gmtime(m)) for m in (first_minute, last_minute)
    }
    assert shown in minutes

    # With a short interval it appears while the gateway runs.
    client = await deployment.gateway(last_use_flush_s=0.2)
    resp = await client.post("/v1/scans", json=A_SCAN, headers=bearer(idle["token"]))
    assert resp.status == 200

    async def written() -> bool:
        tokens = await deployment.cli_json("apps", "tokens", "vhd")
        return all(t["last_used_at"] is not None for t in tokens)

    await until(written, 15)


async def test_last_use_never_moves_back(storage: Storage) -> None:
    """Workers and hosts write the same token in any order: the later minute stays."""
    await storage.record_token_use({"tok_aaaaaaaaaaaa": 120_000, "tok_bbbbbbbbbbbb": 60_000})
    await storage.record_token_use({"tok_aaaaaaaaaaaa": 60_000, "tok_bbbbbbbbbbbb": 180_000})
    assert await storage.token_last_use(["tok_aaaaaaaaaaaa", "tok_bbbbbbbbbbbb", "tok_x"]) == {
        "tok_aaaaaaaaaaaa": 120_000,
        "tok_bbbbbbbbbbbb": 180_000,
    }


# -- reading a case ----------------------------------------------------------------------------


@ONE_REDIS
async def test_reading_a_case_is_audit_logged_and_answered_no_store(
    deployment: Deployment,
) -> None:
    await deployment.cli_json("apps", "add", "vhd")
    officer = await deployment.cli_json("admins", "add", "officer1")
    client = await deployment.gateway()
    auth = bearer(officer["token"])
    resp = await client.post(
        "/v1/cases",
        json={"person_id": "CASE", "confirmed_at": int(time.time() * 1000), "note": "F0"},
        headers=auth,
    )
    assert resp.status == 201, await resp.text()
    case_id = (await resp.json())["case_id"]

    resp = await client.get(f"/v1/cases/{case_id}", headers=auth)
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert (await resp.json())["note"] == "F0"
    resp = await client.get("/v1/cases/CNOSUCH", headers=auth)
    assert resp.status == 404
    shown = await deployment.cli_json("cases", "show", case_id)
    assert shown["case_id"] == case_id
    await deployment.cli_fails("cases", "show", "CNOSUCH2")

    reads = await deployment.cli_json("audit", "--action", "case_read")
    assert [(e["actor"], e["subject"], e["detail"]) for e in reads] == [
        ("admin:officer1", case_id, ""),
        ("admin:officer1", "CNOSUCH", "no such case"),
        (CLI_ACTOR, case_id, ""),
        (CLI_ACTOR, "CNOSUCH2", "no such case"),
    ]


# -- help ---------------------------------------------------------------------------------------


def test_every_new_command_has_help(tmp_path: Path) -> None:
    for args in (
        ["apps", "tokens", "--help"],
        ["apps", "revoke-token", "--help"],
        ["admins", "list", "--help"],
        ["admins", "revoke", "--help"],
        ["audit", "--help"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=scangate_env(),
        )
        assert result.returncode == 0 and "usage: scangate" in result.stdout, args
