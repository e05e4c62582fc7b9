"""Trust between the parties (issue 16, parts 1 to 3): each attack that worked before, made
the way an attacker makes it (over HTTP, with the tokens and sessions that party holds),
on SQLite and on PostgreSQL.

- A national id squatted, by declaring it from another phone or by showing its card at a
  door, no longer locks its owner out; the claims are kept, listed and resolved.
- A declaration's phone is the session's verified phone.
- The door fallback tells the door only recorded / unknown / ambiguous, records only
  "now", is limited per staff token and per venue, audit-logs every look-up and keeps
  the staff token's attribution.
- An exposure notice names only what the app holds already.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from gateway.http.keys import METRICS, PERSONAL
from signing import Keyring
from signing.personal import PersonalData, new_data_key
from storage import PairingRules, ScanEvent, connect_storage, migrations

from .servers import scangate_env
from .test_cases import FAST, HOUR, MINUTE, Receiver, admin, all_settled, receiver
from .test_declarations import (
    ID_CARD,
    NAME,
    NATIONAL_ID,
    OTHER_PHONE,
    PHONE,
    Desk,
    DeskFactory,
    make_desk,
    scan,
)

__all__ = ["make_desk", "receiver"]  # fixtures used here

CARD_ID = "079099001234"  # the 12-digit id on ID_CARD
THIRD_PHONE = "0701234567"


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Settings overrides for this backend: nothing (SQLite in the data dir), or a fresh
    schema of the test PostgreSQL database, dropped afterwards."""
    if request.param == "sqlite":
        yield {}
        return
    url: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        yield {"storage_url": f"{url}?search_path={schema}"}
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


@pytest.fixture
async def desk(make_desk: DeskFactory, backend: dict[str, Any]) -> Desk:
    made: Desk = await make_desk(**backend)
    return made


async def scan_with(desk: Desk, venue_code: str, person_code: str) -> str:
    """Post one check-in with a personal code, as the citizen's app would: its verdict."""
    status, body, _ = await desk.call(
        "POST", "/v1/scans", {"events": [scan(desk, venue_code, person_code)]}
    )
    assert status == 200, body
    verdict: str = body["results"][0]["status"]
    return verdict


async def staff_token(desk: Desk, venue_id: str) -> dict[str, str]:
    status, staff, _ = await desk.call("POST", f"/v1/venues/{venue_id}/staff-tokens")
    assert status == 201, staff
    made: dict[str, str] = staff
    return made


def national_index(desk: Desk, number: str) -> str:
    index: str = desk.app[PERSONAL].blind_index("national_id", number)
    return index


# -- 1. a national id can no longer be squatted ------------------------------------------------


async def test_a_card_shown_at_a_door_does_not_block_its_owners_declaration(desk: Desk) -> None:
    venue = await desk.venue()
    staff = await staff_token(desk, venue["venue_id"])
    # Door staff check someone in by an ID card nobody declared.
    status, body = await desk.manual(staff["token"], venue_code=venue["code"], id_card=ID_CARD)
    assert (status, body["status"]) == (200, "accepted")

    # The card's owner declares that id later, from their own phone: it works, and the
    # code scans.
    owner = await desk.session()
    status, made = await desk.declare(owner, national_id=CARD_ID, full_name="Lê Văn Tám")
    assert status == 201, made
    assert await scan_with(desk, venue["code"], made["code"]) == "accepted"
    await desk.flush_all()

    # Tracing by the id finds the claimant and the visit the door recorded under the card.
    auth = await admin(desk)
    status, found, headers = await desk.call(
        "POST", "/v1/trace/national-id", {"national_id": CARD_ID}, headers=auth
    )
    assert status == 200 and headers["Cache-Control"] == "no-store"
    kinds = {p["found_as"]: p["person_id"] for p in found["persons"]}
    assert set(kinds) == {"claim", "door_card"} and kinds["claim"] == made["person_id"]
    # Contacts come as the first page of each person's trace: here all of them.
    assert all(p["contacts_next"] is None for p in found["persons"])
    by_person = Counter(v["person_id"] for v in found["visits"])
    assert by_person == {made["person_id"]: 1, kinds["door_card"]: 1}
    # The number is never in the audit log.
    entries = await desk.storage.audit_entries()
    assert [e.action for e in entries].count("trace_search") == 1
    assert not [e for e in entries if CARD_ID in f"{e.subject} {e.detail}"]


async def test_declaring_someone_elses_id_first_does_not_lock_its_owner_out(desk: Desk) -> None:
    venue = await desk.venue()
    # The attacker declares the victim's id from the attacker's own phone, first.
    attacker = await desk.session(OTHER_PHONE)
    status, squat = await desk.declare(attacker, phone=OTHER_PHONE)
    assert status == 201
    # The owner declares it afterwards: a person and a working code of their own.
    owner = await desk.session(PHONE)
    status, mine = await desk.declare(owner)
    assert status == 201 and mine["person_id"] != squat["person_id"]
    assert await scan_with(desk, venue["code"], mine["code"]) == "accepted"
    # The owner's phone still finds the owner at the door (the squat used another phone).
    status, body = await desk.manual(venue_code=venue["code"], phone=PHONE)
    assert (status, body["status"]) == (200, "accepted")

    # Officials see the two competing claims, and accept the owner's.
    auth = await admin(desk)
    status, listed, headers = await desk.call("GET", "/v1/claims", headers=auth)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    claims = {c["person_id"]: c for c in listed["claims"]}
    assert set(claims) == {squat["person_id"], mine["person_id"]}
    assert len({c["competing_group"] for c in claims.values()}) == 1
    assert NATIONAL_ID not in str(listed)
    owners_claim = claims[mine["person_id"]]["claim_id"]
    status, accepted, _ = await desk.call("POST", f"/v1/claims/{owners_claim}/accept", headers=auth)
    assert status == 200 and accepted["rejected"] == [claims[squat["person_id"]]["claim_id"]]
    status, listed, _ = await desk.call("GET", "/v1/claims", headers=auth)
    assert listed["claims"] == []  # resolved
    status, listed, _ = await desk.call("GET", "/v1/claims?all=1", headers=auth)
    assert {c["state"] for c in listed["claims"]} == {"accepted", "rejected"}
    # Only officials: an app's token gets 401 from both.
    assert (await desk.call("GET", "/v1/claims"))[0] == 401
    assert (await desk.call("POST", f"/v1/claims/{owners_claim}/accept"))[0] == 401

    actions = Counter(e.action for e in await desk.storage.audit_entries())
    assert actions["id_claim_conflict"] == 1 and actions["id_claim_accept"] == 1


async def test_a_declaration_names_only_the_sessions_verified_phone(desk: Desk) -> None:
    """A fake person with the victim's phone made the victim ambiguous at every door."""
    owner = await desk.session(PHONE)
    status, _ = await desk.declare(owner)
    assert status == 201
    attacker = await desk.session(OTHER_PHONE)
    status, body = await desk.declare(
        attacker, full_name=NAME, national_id="079555666777", phone=PHONE
    )
    assert (status, body["error"], body["field"]) == (400, "invalid_field", "phone")
    venue = await desk.venue()
    status, body = await desk.manual(venue_code=venue["code"], phone=PHONE)
    assert (status, body["status"]) == (200, "accepted")


async def test_a_relatives_own_phone_is_linked_only_with_both_phones_verified(desk: Desk) -> None:
    family = await desk.session(PHONE)
    status, grandma = await desk.declare(
        family, full_name="Nguyễn Thị Lan", national_id="079000111222", on_behalf="bà"
    )
    assert status == 201
    path = f"/v1/people/{grandma['person_id']}/phones"
    her_phone = await desk.session(THIRD_PHONE)
    # A stranger's session cannot link a phone to her, nor can a forged session.
    stranger = await desk.session(OTHER_PHONE)
    status, body, _ = await desk.call(
        "POST", path, {"session": her_phone}, headers=desk.auth(**{"X-Session": stranger})
    )
    assert (status, body["error"]) == (404, "not_found")
    status, body, _ = await desk.call(
        "POST", path, {"session": "s1.forged.tag"}, headers=desk.auth(**{"X-Session": family})
    )
    assert (status, body["field"]) == (400, "session")
    # Another app's session for her phone does not count either.
    other_app = await desk.session(THIRD_PHONE, app="bluezone")
    status, body, _ = await desk.call(
        "POST", path, {"session": other_app}, headers=desk.auth(**{"X-Session": family})
    )
    assert (status, body["field"]) == (400, "session")

    venue = await desk.venue()
    status, _ = await desk.manual(venue_code=venue["code"], phone=THIRD_PHONE)
    assert status == 404
    status, body, _ = await desk.call(
        "POST", path, {"session": her_phone}, headers=desk.auth(**{"X-Session": family})
    )
    assert (status, body["status"]) == (201, "linked")
    status, body = await desk.manual(venue_code=venue["code"], phone=THIRD_PHONE)
    assert (status, body["status"]) == (200, "accepted")


# -- 3. the door fallback ------------------------------------------------------------------------


async def test_the_door_cannot_learn_who_someone_is_nor_write_history(desk: Desk) -> None:
    owner = await desk.session()
    await desk.declare(owner)
    venue = await desk.venue()
    staff = await staff_token(desk, venue["venue_id"])
    now_ms = int(time.time() * 1000)

    # Recorded: the answer names nobody.
    status, body = await desk.manual(staff["token"], venue_code=venue["code"], phone=PHONE)
    assert (status, set(body)) == (200, {"event_id", "status"})
    # Six days back, or ten minutes back: refused, and nothing is buffered. (Ahead of
    # the clock, any scan beyond the allowed skew is refused as clock_skew already.)
    for at, reason in (
        (now_ms - 6 * 24 * HOUR, "not_now"),
        (now_ms - 10 * MINUTE, "not_now"),
        (now_ms + 10 * MINUTE, "clock_skew"),
    ):
        status, body = await desk.manual(
            staff["token"], venue_code=venue["code"], phone=PHONE, scanned_at=at
        )
        assert (status, body["status"], body["reason"]) == (200, "rejected", reason)
    # A device_id in the body does not replace the staff token's attribution; an app's
    # own manual scans can never pass for a staff token's.
    status, _ = await desk.manual(
        staff["token"], venue_code=venue["code"], phone=PHONE, device_id="staff:SOMEONE"
    )
    assert status == 200
    status, _ = await desk.manual(venue_code=venue["code"], phone=PHONE, device_id="staff:X")
    assert status == 200
    await desk.flush_all()
    assert len(await desk.storage.event_identities()) == 3
    devices = await stored_devices(desk)
    assert sorted(devices) == sorted(
        [f"staff:{staff['token_id']}", f"staff:{staff['token_id']}", "manual:staff:X"]
    )


async def stored_devices(desk: Desk) -> list[str]:
    url = desk.settings.resolved_storage_url
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return [r[0] for r in db.execute("SELECT device_id FROM scan_events")]
    base, _, schema = url.partition("?search_path=")
    conn = await asyncpg.connect(base)
    try:
        rows = await conn.fetch(f"SELECT device_id FROM {schema}.scan_events")
    finally:
        await conn.close()
    return [r[0] for r in rows]


async def test_door_look_ups_are_limited_per_staff_token_and_per_venue(
    make_desk: DeskFactory, backend: dict[str, Any]
) -> None:
    desk: Desk = await make_desk(door_lookups_per_token=3, door_lookups_per_venue=5, **backend)
    owner = await desk.session()
    await desk.declare(owner)
    venue, elsewhere = await desk.venue(), await desk.venue(name="Nhà sách Phương Nam")
    first = await staff_token(desk, venue["venue_id"])
    second = await staff_token(desk, venue["venue_id"])
    third = await staff_token(desk, elsewhere["venue_id"])

    async def look_up(staff: dict[str, str], at: dict[str, str], phone: str = PHONE) -> int:
        doc = {
            "event_id": f"MAN-{uuid.uuid4().hex[:12]}",
            "kind": "checkin",
            "scanned_at": int(time.time() * 1000),
            "venue_code": at["code"],
            "phone": phone,
        }
        auth = {"Authorization": f"Bearer {staff['token']}"}
        status, body, headers = await desk.call("POST", "/v1/scans/manual", doc, headers=auth)
        if status == 429:
            assert body["error"] == "rate_limited" and int(headers["Retry-After"]) >= 1
        return status

    # A leaked token probing phones one by one stops at its own limit ...
    assert [await look_up(first, venue, OTHER_PHONE) for _ in range(4)] == [404, 404, 404, 429]
    # ... and spends only its share of the venue's: the venue's other door still works,
    # up to the venue's limit.
    assert [await look_up(second, venue) for _ in range(3)] == [200, 200, 429]
    # Another venue's door is not touched.
    assert await look_up(third, elsewhere) == 200

    desk.app[METRICS].publish()
    text = desk.app[METRICS].exposition().decode()
    for outcome, count in (
        ("unknown", 3),
        ("recorded", 3),
        ("refused_token", 1),
        ("refused_venue", 1),
    ):
        assert f'scangate_door_lookups_total{{app="vhd",outcome="{outcome}"}} {count}.0' in text
    # Every look-up made is audit-logged, by staff token; a refused one is only counted.
    lookups = [e for e in await desk.storage.audit_entries() if e.action == "door_lookup"]
    assert Counter(e.actor for e in lookups) == {
        f"staff:{first['token_id']}": 3,
        f"staff:{second['token_id']}": 2,
        f"staff:{third['token_id']}": 1,
    }
    assert all(PHONE not in e.detail and OTHER_PHONE not in e.detail for e in lookups)


# -- notices -----------------------------------------------------------------------------------


async def test_a_notice_tells_an_app_only_its_own_events(
    make_desk: DeskFactory, backend: dict[str, Any], keyring: Keyring, receiver: Receiver
) -> None:
    """The contact scanned with vhd and with bluezone; vhd's webhook hears of vhd's
    events only, with no person id and no case id."""
    receiver.secret = keyring.set_webhook("vhd", receiver.url).encode()
    desk: Desk = await make_desk(**FAST, **backend)
    start = int(time.time() * 1000) - 5 * HOUR
    rows = [
        ("vhd", "CASE", "checkin", start),
        ("vhd", "CASE", "checkout", start + HOUR),
        ("vhd", "CONTACT", "checkin", start + 10 * MINUTE),
        ("bluezone", "CONTACT", "checkout", start + 50 * MINUTE),
    ]
    await desk.storage.store_batch(
        [
            ScanEvent(app, f"EV{i:06d}", kind, "MARKET", who, t, t, None)  # type: ignore[arg-type]
            for i, (app, who, kind, t) in enumerate(rows)
        ],
        PairingRules(),
    )
    auth = await admin(desk)
    status, made, _ = await desk.call(
        "POST", "/v1/cases", {"person_id": "CASE", "confirmed_at": start + 3 * HOUR}, headers=auth
    )
    assert status == 201, made
    await all_settled(desk, made["case_id"], auth)
    assert [d["event_ids"] for d in receiver.arrivals] == [["EV000002"]]
    raw = str(receiver.arrivals)
    assert "CONTACT" not in raw and made["case_id"] not in raw


# -- existing data -------------------------------------------------------------------------------


async def test_existing_persons_and_phone_links_are_migrated(
    tmp_path: Path, backend: dict[str, Any], master_key: bytes
) -> None:
    """A database from before migration 5 (SQLite) / 6 (PostgreSQL), as issue 15 left
    it: a person made from an ID card at a door, a declared person whose form named
    another phone (unverified), and the declaring phone's link. After migrating: the card
    is a door card, the declaration a claim, only the declaring phone acts for the person,
    and nobody is locked out."""
    personal = PersonalData(new_data_key())
    idx = personal.blind_index
    card_person, declared = "PCARD0000001", "PDECL0000001"
    declarer, unverified = idx("phone", "+84912345678"), idx("phone", "+84387654321")
    rows = {
        "persons": [
            (card_person, idx("national_id", CARD_ID), idx("national_id", "025123456"), b"n"),
            (declared, idx("national_id", NATIONAL_ID), None, b"n"),
        ],
        "person_phones": [(declarer, declared), (unverified, declared)],
        "declarations": [(declared, "vhd", 1, declarer, b"a")],
    }
    url = backend.get("storage_url") or f"sqlite:///{tmp_path / 'old.db'}"
    await build_at_migration_4(url, rows)
    storage = await connect_storage(url)
    try:
        assert await storage.door_card_holder([idx("national_id", "025123456")]) == card_person
        assert await storage.door_card_holder([idx("national_id", CARD_ID)]) == card_person
        claims = await storage.id_claims([idx("national_id", NATIONAL_ID)])
        assert [(c.person_id, c.phone_index, c.state) for c in claims] == [
            (declared, declarer, "open")
        ]
        assert await storage.phone_linked(declarer, declared)
        assert not await storage.phone_linked(unverified, declared)
        assert [p.person_id for p in await storage.persons_by_phone(declarer)] == [declared]
        assert await storage.persons_by_phone(unverified) == []
        assert await storage.id_claims([idx("national_id", CARD_ID)]) == []
    finally:
        await storage.close()


async def build_at_migration_4(url: str, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    """The schema as it was before the identity migration, then the old rows."""
    person_sql = (
        "INSERT INTO persons (person_id, national_id_index, old_id_index, full_name_enc, "
        "name_index, created_at, updated_at) VALUES ($1, $2, $3, $4, 'n', 1, 1)"
    )
    phone_sql = "INSERT INTO person_phones (phone_index, person_id) VALUES ($1, $2)"
    declaration_sql = (
        "INSERT INTO declarations (person_id, app_id, declared_at, declared_by_index, "
        "answers_enc) VALUES ($1, $2, $3, $4, $5)"
    )
    inserts = [
        (person_sql, rows["persons"]),
        (phone_sql, rows["person_phones"]),
        (declaration_sql, rows["declarations"]),
    ]
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                "applied_at INTEGER NOT NULL)"
            )
            for version, statements in migrations.SQLITE[:4]:
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations VALUES (?, 1)", (version,))
            for sql, values in inserts:
                db.executemany(sql.replace("$", "?"), values)
        return
    base, _, schema = url.partition("?search_path=")
    conn = await asyncpg.connect(base, server_settings={"search_path": schema})
    try:
        # Let storage make its bookkeeping table, then roll back to before migration 5.
        storage = await connect_storage(url)
        await storage.close()
        await conn.execute(
            "DROP TABLE id_claims, door_cards; ALTER TABLE person_phones DROP COLUMN verified; "
            "DELETE FROM schema_migrations WHERE version = 6"
        )
        for sql, values in inserts:
            await conn.executemany(sql, values)
    finally:
        await conn.close()


# -- officials' CLI ------------------------------------------------------------------------------


def cli(desk: Desk, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"SCANGATE_MASTER_KEY": str(desk.settings.master_key)}
    if desk.settings.storage_url:
        env["SCANGATE_STORAGE_URL"] = desk.settings.storage_url
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--data-dir", str(desk.settings.data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=scangate_env(**env),
    )


async def test_officials_list_and_accept_claims_and_trace_by_id_from_the_cli(desk: Desk) -> None:
    squat = await desk.declare(await desk.session(OTHER_PHONE), phone=OTHER_PHONE)
    mine = await desk.declare(await desk.session(PHONE))
    assert squat[0] == mine[0] == 201

    done = await asyncio.to_thread(cli, desk, "claims", "list", "--reveal")
    assert done.returncode == 0, done.stderr
    listed = {c["person_id"]: c for c in orjson.loads(done.stdout)["claims"]}
    assert set(listed) == {squat[1]["person_id"], mine[1]["person_id"]}
    assert listed[mine[1]["person_id"]]["phone"] == "+84912345678"  # revealed, audit-logged

    owners_claim = listed[mine[1]["person_id"]]["claim_id"]
    done = await asyncio.to_thread(cli, desk, "claims", "accept", owners_claim)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["rejected"] == [listed[squat[1]["person_id"]]["claim_id"]]
    done = await asyncio.to_thread(cli, desk, "claims", "accept", "KNOSUCHCLAIM")
    assert (done.returncode, done.stdout) == (2, "") and "no claim KNOSUCHCLAIM" in done.stderr

    done = await asyncio.to_thread(cli, desk, "trace", "--national-id", NATIONAL_ID)
    assert done.returncode == 0, done.stderr
    found = orjson.loads(done.stdout)["persons"]
    assert {(p["person_id"], p["state"]) for p in found} == {
        (mine[1]["person_id"], "accepted"),
        (squat[1]["person_id"], "rejected"),
    }
    for wrong in (
        ("trace",),
        ("trace", "P1", "--national-id", NATIONAL_ID),
        ("trace", "--national-id", NATIONAL_ID, "--format", "csv"),
        ("trace", "--national-id", "12"),
    ):
        done = await asyncio.to_thread(cli, desk, *wrong)
        assert done.returncode == 2 and done.stderr.strip(), wrong
    actions = Counter(e.action for e in await desk.storage.audit_entries())
    assert actions["id_claims_read"] == 1 and actions["reveal"] == 1
    assert actions["id_claim_accept"] == 1 and actions["trace_search"] == 1


def test_every_test_the_threat_model_names_exists() -> None:
    """The threat model (docs/security.md) names its evidence; a renamed test must not
    leave it pointing at nothing."""
    page = Path(__file__).parent.parent / "docs" / "security.md"
    section = page.read_text(encoding="utf-8").split("## Threat model", 1)[1].split("\n## ", 1)[0]
    named: list[tuple[str, str]] = []
    current = ""  # a `::test` cell belongs to the file named last before it
    for file, test in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)`", section):
        current = file or current
        named.append((current, test))
    assert len(named) >= 25, named
    for file, test in named:
        source = (Path(__file__).parent / file).read_text(encoding="utf-8")
        assert re.search(rf"^(async )?def {test}\(", source, re.M), f"{file}::{test}"


async def test_claims_come_in_pages_of_whole_ids(desk: Desk) -> None:
    first, second = await desk.session(PHONE), await desk.session(OTHER_PHONE)
    for i in range(5):
        for session, phone, name in (
            (first, PHONE, "Lê Văn Tám"),
            (second, OTHER_PHONE, "Trần Thị Mai"),
        ):
            status, made = await desk.declare(
                session, phone=phone, national_id=f"07920000{i:04d}", full_name=name
            )
            assert status == 201, made
    auth = await admin(desk)
    pages: list[list[dict[str, object]]] = []
    status, listed, _ = await desk.call("GET", "/v1/claims?limit=2", headers=auth)
    while True:
        assert status == 200, listed
        pages.append(listed["claims"])
        if listed["next"] is None:
            break
        status, listed, _ = await desk.call(
            "GET", f"/v1/claims?limit=2&cursor={listed['next']}", headers=auth
        )
    assert [len(page) for page in pages] == [4, 4, 2]  # two ids of two claims, a page
    groups = [{c["competing_group"] for c in page} for page in pages]
    assert [len(g) for g in groups] == [2, 2, 1] and not set.intersection(*groups)
    for bad in ("limit=0", "limit=5001", "cursor=nothing", "cursor=YWJj"):
        status, doc, _ = await desk.call("GET", f"/v1/claims?{bad}", headers=auth)
        assert (status, doc["error"]) == (400, "invalid_request"), bad


# -- finding people the way officials know them (issue 19) ------------------------------------


async def test_a_phone_finds_everyone_declared_from_it_with_their_contacts(desk: Desk) -> None:
    """A family shares a phone: the search by it finds each member, each with contacts;
    with the mother's id too, one search, nobody twice."""
    session = await desk.session(PHONE)
    status, mother = await desk.declare(session, national_id="079185001111", full_name="Lê Thị Hoa")
    assert status == 201, mother
    status, child = await desk.declare(session, national_id="079212002222", full_name="Lê Văn An")
    assert status == 201, child
    start = int(time.time() * 1000) - 5 * HOUR
    await desk.storage.store_batch(
        [
            ScanEvent("vhd", f"F{n}", kind, venue, person, start + at, start + at, None)
            for n, (person, venue, kind, at) in enumerate(
                [
                    (mother["person_id"], "MARKET", "checkin", 0),
                    (mother["person_id"], "MARKET", "checkout", HOUR),
                    ("NEIGHBOUR", "MARKET", "checkin", 10 * MINUTE),
                    ("NEIGHBOUR", "MARKET", "checkout", HOUR),
                    (child["person_id"], "SCHOOL", "checkin", 2 * HOUR),
                    (child["person_id"], "SCHOOL", "checkout", 3 * HOUR),
                    ("CLASSMATE", "SCHOOL", "checkin", 2 * HOUR),
                    ("CLASSMATE", "SCHOOL", "checkout", 3 * HOUR),
                ]
            )
        ],
        PairingRules(),
    )
    auth = await admin(desk)
    status, found, headers = await desk.call(
        "POST", "/v1/trace/search", {"phone": "+84 912 345 678"}, headers=auth
    )
    assert status == 200 and headers["Cache-Control"] == "no-store", found
    assert {(p["person_id"], p["found_as"]) for p in found["persons"]} == {
        (mother["person_id"], "phone"),
        (child["person_id"], "phone"),
    }
    contacts = {(c["case_person_id"], c["person_id"]) for c in found["contacts"]}
    assert contacts == {(mother["person_id"], "NEIGHBOUR"), (child["person_id"], "CLASSMATE")}
    # Both numbers: one search; the mother is found by her claim first, and only once.
    status, both, _ = await desk.call(
        "POST",
        "/v1/trace/search",
        {"phone": PHONE, "national_id": "079185001111"},
        headers=auth,
    )
    assert status == 200
    assert [(p["person_id"], p["found_as"]) for p in both["persons"]] == [
        (mother["person_id"], "claim"),
        (child["person_id"], "phone"),
    ]
    # The numbers are in no URL and no audit entry; each search and trace is logged.
    entries = await desk.storage.audit_entries()
    assert [e.action for e in entries].count("trace_search") == 2
    assert not [e for e in entries if "912" in f"{e.subject} {e.detail}"]
    assert not [e for e in entries if "079185001111" in f"{e.subject} {e.detail}"]


async def test_nobody_found_is_unknown_person_never_an_empty_list(desk: Desk) -> None:
    auth = await admin(desk)
    for body in ({"phone": OTHER_PHONE}, {"national_id": "079000000000"}):
        status, doc, _ = await desk.call("POST", "/v1/trace/search", body, headers=auth)
        assert (status, doc["error"]) == (404, "unknown_person"), body
    status, doc, _ = await desk.call("GET", "/v1/trace/NOBODY", headers=auth)
    assert (status, doc["error"]) == (404, "unknown_person")
    status, doc, _ = await desk.call("GET", "/v1/visits/NOBODY", headers=auth)
    assert (status, doc["error"]) == (404, "unknown_person")
    status, doc, _ = await desk.call("POST", "/v1/trace/search", {}, headers=auth)
    assert (status, doc["error"]) == (400, "invalid_request")
    # The look-ups are audit-logged all the same.
    actions = Counter(e.action for e in await desk.storage.audit_entries())
    assert actions["trace_search"] == 2 and actions["trace"] == 1
    for args in (
        ("trace", "NOBODY"),
        ("trace", "--phone", OTHER_PHONE),
        ("trace", "--national-id", "079000000000"),
        ("visits", "NOBODY"),
    ):
        done = await asyncio.to_thread(cli, desk, *args)
        assert done.returncode == 1 and done.stdout == "", (args, done.stdout)
        assert len(done.stderr.strip().splitlines()) == 1 and "unknown person" in done.stderr


async def test_the_cli_searches_by_phone(desk: Desk) -> None:
    status, made = await desk.declare(await desk.session(PHONE))
    assert status == 201
    done = await asyncio.to_thread(cli, desk, "trace", "--phone", "0912 345 678")
    assert done.returncode == 0, done.stderr
    found = orjson.loads(done.stdout)
    assert [p["person_id"] for p in found["persons"]] == [made["person_id"]]
    bad = await asyncio.to_thread(cli, desk, "trace", "--phone", "12")
    assert bad.returncode == 2 and "--phone" in bad.stderr


async def test_a_poster_from_the_cli_names_the_app_and_the_province(desk: Desk) -> None:
    """Issue 19, point 6, on the desk's storage (SQLite and PostgreSQL)."""
    venue = await desk.venue(province="Đà Nẵng")
    named = await asyncio.to_thread(cli, desk, "apps", "set-name", "vhd", "PC-Covid")
    assert named.returncode == 0, named.stderr
    out = desk.settings.data_dir / "poster.svg"
    done = await asyncio.to_thread(cli, desk, "venues", "poster", venue["venue_id"], "-o", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text(encoding="utf-8")
    assert "Dùng ứng dụng PC-Covid để quét" in text and "Đà Nẵng" in text
