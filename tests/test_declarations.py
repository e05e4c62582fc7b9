"""Registration end to end on a real Redis and real storage: venues, OTP by the log
sender, declarations, personal codes, manual check-ins at the door, revocation, and
personal data kept out of everything stored."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
import zxingcpp
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image

from gateway import Settings
from gateway.http.keys import PERSONAL, REVOKED_VENUES, STORAGE
from gateway.metrics import FlusherMetrics
from gateway.pipeline.flusher import Flusher
from signing import Keyring, KeyringError
from storage import Storage

from .harness import GatewayStarter

PHONE = "0912345678"
PHONE_INTL = "+84912345678"
OTHER_PHONE = "0387654321"
NAME = "Nguyễn Thị Hồng Nhung"
NATIONAL_ID = "079123456789"


def declaration(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "full_name": NAME,
        "national_id": NATIONAL_ID,
        "birth_year": 1990,
        "gender": "female",
        "phone": PHONE,
        "address": "12 Lê Lợi, Phường Bến Nghé, Quận 1",
        "province": "Hồ Chí Minh",
        "health_insurance_no": "DN4797912345678",
        "answers": {
            "fever": False,
            "cough": False,
            "shortness_of_breath": False,
            "sore_throat": True,
            "loss_of_taste_or_smell": False,
            "contact_with_case": False,
            "visited_outbreak_area": False,
        },
    }
    doc.update(over)
    return doc


@dataclass
class Desk:
    """A gateway on a real Redis and storage, with two apps, and the log SMS sender."""

    client: TestClient[Any, Any]
    keyring: Keyring
    redis: aioredis.Redis
    tokens: dict[str, str]
    settings: Settings
    app: web.Application
    # The PostgreSQL schema of its storage (storage="postgresql"), else None.
    postgres_schema: str | None = None

    def auth(self, app: str = "vhd", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[app]}", **extra}

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        app: str = "vhd",
    ) -> tuple[int, Any, Any]:
        response = await self.client.request(
            method, path, json=body, headers=headers or self.auth(app)
        )
        raw = await response.read()
        is_json = response.content_type == "application/json"
        return response.status, orjson.loads(raw) if is_json else raw, response.headers

    @property
    def storage(self) -> Storage:
        return self.app[STORAGE]

    def sms(self) -> list[dict[str, str]]:
        path = self.settings.data_dir / "sms.log"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]

    async def ask_code(self, phone: str, app: str = "vhd") -> str:
        """Ask for an OTP and read it from the log sender's file."""
        before = len(self.sms())
        status, body, _ = await self.call("POST", "/v1/otp", {"phone": phone}, app=app)
        assert status == 202, body
        for _ in range(200):
            messages = self.sms()
            if len(messages) > before:
                message = messages[-1]
                assert message["to"] == "+84" + phone.removeprefix("0").removeprefix("+84")
                codes = re.findall(r"\b\d{6}\b", message["text"])
                assert len(codes) == 1, message["text"]
                code: str = codes[0]
                return code
            await asyncio.sleep(0.01)
        raise AssertionError("no SMS was written")

    async def session(self, phone: str = PHONE, app: str = "vhd") -> str:
        code = await self.ask_code(phone, app)
        status, body, _ = await self.call(
            "POST", "/v1/otp/verify", {"phone": phone, "code": code}, app=app
        )
        assert status == 200, body
        session: str = body["session"]
        return session

    async def declare(self, session: str, app: str = "vhd", **over: Any) -> tuple[int, Any]:
        status, body, _ = await self.call(
            "POST",
            "/v1/declarations",
            declaration(**over),
            headers=self.auth(app, **{"X-Session": session}),
        )
        return status, body

    async def venue(self, app: str = "vhd", **over: Any) -> dict[str, str]:
        doc = {
            "name": "Chợ Bến Thành",
            "phone": "098 382 9927",
            "address": "Lê Lợi, Quận 1",
            "province": "Hồ Chí Minh",
            "kind": "market",
        }
        doc.update(over)
        status, body, _ = await self.call("POST", "/v1/venues", doc, app=app)
        assert status == 201, body
        venue: dict[str, str] = body
        return venue

    async def manual(self, token: str | None = None, **fields: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else self.auth()
        doc = {
            "event_id": f"MAN-{uuid.uuid4().hex[:12]}",
            "kind": "checkin",
            "scanned_at": int(time.time() * 1000) - 1000,
        }
        doc.update(fields)
        status, body, _ = await self.call("POST", "/v1/scans/manual", doc, headers=headers)
        return status, body

    async def flush_all(self) -> None:
        flusher = Flusher(self.redis, self.storage, self.settings, FlusherMetrics())
        while await flusher.step():
            pass


DeskFactory = Callable[..., Any]


@pytest.fixture
def make_desk(gateway_under_test: GatewayStarter, keyring: Keyring, redis_url: str) -> DeskFactory:
    tokens = {
        "vhd": keyring.add_app("vhd", name="Vietnam Health Declaration").token,
        "bluezone": keyring.add_app("bluezone", prefix="BZ").token,
    }

    async def make(**settings_over: Any) -> Desk:
        settings = {"shards": 4, "flush_max_age_s": 0.01, **settings_over}
        g = await gateway_under_test(redis_url, **settings)
        return Desk(g.client, keyring, g.redis, tokens, g.settings, g.app, g.postgres_schema)

    return make


@pytest.fixture
async def desk(make_desk: DeskFactory) -> Desk:
    made: Desk = await make_desk()
    return made


def scan(desk: Desk, venue_code: str, person_code: str, n: int = 1) -> dict[str, Any]:
    return {
        "event_id": f"EVT-{uuid.uuid4().hex[:8]}-{n}",
        "kind": "checkin",
        "venue_code": venue_code,
        "person_code": person_code,
        "scanned_at": int(time.time() * 1000) - 1000,
    }


# -- OTP -------------------------------------------------------------------------------------


async def test_a_declaration_made_through_otp_checks_in_through_scans(desk: Desk) -> None:
    session = await desk.session()
    status, created = await desk.declare(session)
    assert status == 201, created
    assert set(created) == {"person_id", "code", "expires_at"}
    assert created["code"].startswith("VHD:")
    venue = await desk.venue()
    status, body, _ = await desk.call(
        "POST", "/v1/scans", {"events": [scan(desk, venue["code"], created["code"])]}
    )
    assert (status, body["accepted"]) == (200, 1), body
    await desk.flush_all()
    visits = await desk.storage.person_visits(created["person_id"], 0, 2**62)
    assert [v.venue_id for v in visits] == [venue["venue_id"]]


async def test_both_phone_forms_are_the_same_phone_and_others_are_refused(desk: Desk) -> None:
    code = await desk.ask_code(PHONE)
    status, body, _ = await desk.call("POST", "/v1/otp/verify", {"phone": PHONE_INTL, "code": code})
    assert status == 200, body
    for bad in ("0212345678", "+14155552671", "091234567", "09123456789", "0912 34a 678", 912):
        status, body, _ = await desk.call("POST", "/v1/otp", {"phone": bad})
        assert (status, body["error"]) == (400, "invalid_phone"), bad


async def test_a_code_is_single_use_and_wrong_codes_stop_the_guessing_address(
    desk: Desk,
) -> None:
    code = await desk.ask_code(PHONE)
    assert (await desk.call("POST", "/v1/otp/verify", {"phone": PHONE, "code": code}))[0] == 200
    again = await desk.call("POST", "/v1/otp/verify", {"phone": PHONE, "code": code})
    assert (again[0], again[1]["error"], again[1]["tries_left"]) == (401, "otp_invalid", 4)

    code = await desk.ask_code(PHONE)
    wrong = "000000" if code != "000000" else "111111"
    lefts = []
    for _ in range(3):
        status, body, _ = await desk.call("POST", "/v1/otp/verify", {"phone": PHONE, "code": wrong})
        assert status == 401
        lefts.append(body["tries_left"])
    assert lefts == [3, 2, 1]  # the count survives a new code
    status, body, headers = await desk.call(
        "POST", "/v1/otp/verify", {"phone": PHONE, "code": wrong}
    )
    assert (status, body["error"]) == (429, "otp_locked")
    assert 800 <= int(headers["Retry-After"]) <= 900
    # This address may not guess at this phone now, even the right code. Wrong guesses never
    # refuse a send (issue 16): a new code is sent, but only another address could use it.
    status, body, _ = await desk.call("POST", "/v1/otp/verify", {"phone": PHONE, "code": code})
    assert (status, body["error"]) == (429, "otp_locked")
    status, body, _ = await desk.call("POST", "/v1/otp", {"phone": PHONE})
    assert status == 202, body
    status, body, _ = await desk.call(
        "POST", "/v1/otp/verify", {"phone": PHONE, "code": code, "challenge": body["challenge"]}
    )
    assert (status, body["error"]) == (429, "otp_locked")


async def test_sends_are_limited_per_phone_and_per_client_address(make_desk: DeskFactory) -> None:
    desk = await make_desk(otp_address_limit=5)
    for _ in range(3):
        await desk.ask_code(PHONE)
    status, body, headers = await desk.call("POST", "/v1/otp", {"phone": PHONE})
    assert (status, body["error"]) == (429, "rate_limited")
    assert "phone" in body["detail"]
    assert 1 <= int(headers["Retry-After"]) <= 900
    await desk.ask_code(OTHER_PHONE)
    await desk.ask_code("0977000222")  # the 5th send from this address: a refusal costs none
    status, body, headers = await desk.call("POST", "/v1/otp", {"phone": "0977000111"})
    assert (status, body["error"]) == (429, "rate_limited")
    assert "address" in body["detail"]


async def test_a_session_is_bound_to_its_app_and_cannot_be_forged(desk: Desk) -> None:
    session = await desk.session()
    status, body = await desk.declare(session, app="bluezone")
    assert status == 401, body
    payload = session.split(".")[1]
    forged = f"s1.{payload}.{base64.urlsafe_b64encode(b'x' * 32).decode().rstrip('=')}"
    for bad in (forged, "", "s1.x.y", session[:-2], "s2" + session[2:]):
        status, body = await desk.declare(bad)
        assert (status, body["error"]) == (401, "unauthorized"), bad


# -- declarations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("full_name", ""),
        ("full_name", "Robert'); DROP TABLE persons;--"),
        ("full_name", "x" * 101),
        ("national_id", "12345"),
        ("national_id", 79123456789),
        ("birth_year", 1850),
        ("birth_year", "1990"),
        ("birth_year", True),
        ("gender", "f"),
        ("phone", "12345"),
        ("address", ""),
        ("province", None),
        ("health_insurance_no", "12"),
        ("on_behalf", "x" * 40),
        ("answers", {"fever": "no"}),
        ("answers", None),
    ],
)
async def test_every_field_is_validated_with_its_name(desk: Desk, field: str, value: Any) -> None:
    session = await desk.session()
    status, body = await desk.declare(session, **{field: value})
    assert status == 400, body
    assert body["error"] == "invalid_field"
    assert body["field"].split(".")[0] == field, body
    # The error names the field, never echoes what was sent (it may be personal data).
    if isinstance(value, str) and len(value) > 3:
        assert value not in orjson.dumps(body).decode()


async def test_a_family_on_one_phone_and_a_door_check_in_by_phone(desk: Desk) -> None:
    session = await desk.session()
    status, me = await desk.declare(session)
    assert status == 201
    status, child = await desk.declare(
        session,
        full_name="Trần Minh Khôi",
        national_id="079223456789",
        birth_year=2015,
        gender="male",
        on_behalf="con",
    )
    assert status == 201 and child["person_id"] != me["person_id"]

    venue = await desk.venue()
    status, body = await desk.manual(venue_code=venue["code"], phone=PHONE)
    assert (status, body["error"]) == (409, "ambiguous_person")
    status, body = await desk.manual(
        venue_code=venue["code"], phone=PHONE_INTL, full_name="  trần minh  KHÔI "
    )
    assert (status, body["status"]) == (200, "accepted")
    assert "person_id" not in body  # the door learns it was recorded, not who
    status, body = await desk.manual(venue_code=venue["code"], phone=OTHER_PHONE)
    assert (status, body["error"]) == (404, "not_found")
    await desk.flush_all()
    visits = await desk.storage.person_visits(child["person_id"], 0, 2**62)
    assert [v.venue_id for v in visits] == [venue["venue_id"]]


async def test_redeclaring_updates_from_the_same_phone_and_another_phone_makes_its_own_claim(
    desk: Desk,
) -> None:
    session = await desk.session()
    status, first = await desk.declare(session)
    assert status == 201
    status, again = await desk.declare(session, address="34 Hai Bà Trưng")
    assert status == 201
    assert again["person_id"] == first["person_id"]
    assert await desk.storage.declaration_count(first["person_id"]) == 2

    # The same id from another phone: a claim of its own (a person and a code of its own),
    # which takes nothing from the first; the two compete until an official decides.
    other = await desk.session(OTHER_PHONE)
    status, body = await desk.declare(other, phone=OTHER_PHONE)
    assert status == 201 and body["person_id"] != first["person_id"]
    assert await desk.storage.declaration_count(first["person_id"]) == 2


async def test_the_personal_code_image_prints_5_cm_and_decodes(desk: Desk) -> None:
    session = await desk.session()
    _, created = await desk.declare(session)
    path = f"/v1/people/{created['person_id']}/code.png"
    status, png, headers = await desk.call("GET", path, headers=desk.auth(**{"X-Session": session}))
    assert status == 200 and headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(png))
    assert abs(image.size[0] / image.info["dpi"][0] * 2.54 - 5.0) < 0.05
    decoded = [r.text for r in zxingcpp.read_barcodes(image)]
    assert decoded == [created["code"]]  # the code issued at declaration, unchanged

    status, svg, _ = await desk.call(
        "GET", path.replace(".png", ".svg"), headers=desk.auth(**{"X-Session": session})
    )
    assert status == 200 and b'width="50.0mm"' in svg

    stranger = await desk.session(OTHER_PHONE)
    status, body, _ = await desk.call("GET", path, headers=desk.auth(**{"X-Session": stranger}))
    assert (status, body["error"]) == (404, "not_found")


# -- the door --------------------------------------------------------------------------------

ID_CARD = "079099001234|025123456|Lê Văn Tám|15031985|Nam|45 Nguyễn Huệ, Quận 1, TP.HCM|01072021"


async def test_id_card_check_ins_find_or_create_the_holder(desk: Desk) -> None:
    venue = await desk.venue()
    status, first = await desk.manual(venue_code=venue["code"], id_card=ID_CARD)
    assert (status, first["status"]) == (200, "accepted"), first
    status, second = await desk.manual(venue_code=venue["code"], id_card=ID_CARD, kind="checkout")
    assert (status, second["status"]) == (200, "accepted")
    for bad in ("079099001234|x", "12|025123456|A|15031985|Nam|X|01072021", 42):
        status, body = await desk.manual(venue_code=venue["code"], id_card=bad)
        assert (status, body["field"]) == (400, "id_card"), bad
    await desk.flush_all()
    # Both scans went to the one person the card is recorded under.
    personal = desk.app[PERSONAL]
    holder = await desk.storage.door_card_holder([personal.blind_index("national_id", "025123456")])
    assert holder is not None
    visits = await desk.storage.person_visits(holder, 0, 2**62)
    assert [(v.venue_id, v.closed_by) for v in visits] == [(venue["venue_id"], "checkout")]


async def test_a_staff_token_checks_in_at_its_venue_only_and_can_be_revoked(desk: Desk) -> None:
    session = await desk.session()
    await desk.declare(session)
    venue, other = await desk.venue(), await desk.venue(name="Nhà hàng Ngon")
    status, staff, _ = await desk.call("POST", f"/v1/venues/{venue['venue_id']}/staff-tokens")
    assert status == 201 and staff["token"].startswith("sgs_")

    status, body = await desk.manual(staff["token"], venue_code=venue["code"], phone=PHONE)
    assert (status, body["status"]) == (200, "accepted")
    status, body = await desk.manual(staff["token"], venue_code=other["code"], phone=PHONE)
    assert (status, body["error"]) == (403, "forbidden")
    # A staff token is not an app token.
    status, body, _ = await desk.call(
        "POST", "/v1/venues", {}, headers={"Authorization": f"Bearer {staff['token']}"}
    )
    assert status == 401
    # Another app cannot hand out tokens for this venue, or revoke them.
    status, _, _ = await desk.call(
        "POST", f"/v1/venues/{venue['venue_id']}/staff-tokens", app="bluezone"
    )
    assert status == 404
    path = f"/v1/venues/{venue['venue_id']}/staff-tokens/{staff['token_id']}"
    assert (await desk.call("DELETE", path, app="bluezone"))[0] == 404
    assert (await desk.call("DELETE", path))[0] == 200
    status, body = await desk.manual(staff["token"], venue_code=venue["code"], phone=PHONE)
    assert (status, body["error"]) == (401, "unauthorized")
    await desk.flush_all()
    stored = await desk.storage.event_identities()
    assert len(stored) == 1


async def test_a_revoked_venue_is_refused_at_scan_time(make_desk: DeskFactory) -> None:
    desk = await make_desk()
    session = await desk.session()
    _, person = await desk.declare(session)
    venue = await desk.venue()
    # Revoked the way `scangate venues revoke` does it: in storage, from outside this
    # process, which picks it up within its refresh interval.
    assert await desk.storage.revoke_venue(venue["venue_id"], int(time.time() * 1000))
    for _ in range(100):
        if venue["venue_id"] in desk.app[REVOKED_VENUES].ids:
            break
        await asyncio.sleep(0.05)
    status, body, _ = await desk.call(
        "POST", "/v1/scans", {"events": [scan(desk, venue["code"], person["code"])]}
    )
    assert status == 200
    assert (body["results"][0]["status"], body["results"][0]["reason"]) == ("rejected", "revoked")
    status, body = await desk.manual(venue_code=venue["code"], phone=PHONE)
    assert (status, body["status"], body["reason"]) == (200, "rejected", "revoked")
    # A venue code that verifies but was never registered here is accepted.
    unregistered = desk.keyring.issue("vhd", "venue", "VELSEWHERE1")
    status, body, _ = await desk.call(
        "POST", "/v1/scans", {"events": [scan(desk, unregistered, person["code"])]}
    )
    assert body["accepted"] == 1


async def test_venue_registration_validates_and_the_poster_carries_the_code(desk: Desk) -> None:
    venue = await desk.venue(name='Quán "Phở" <Hà Nội> & Co', kind="restaurant")
    assert venue["venue_id"].startswith("V") and venue["code"].startswith("VHD:")
    for field, value in (("kind", "zoo"), ("name", ""), ("province", 3)):
        status, body, _ = await desk.call(
            "POST",
            "/v1/venues",
            {"name": "A", "phone": PHONE, "address": "B", "province": "C", field: value},
        )
        assert (status, body["error"], body["field"]) == (400, "invalid_field", field)
    status, body, _ = await desk.call(
        "POST", "/v1/venues", {"name": "A", "phone": "123", "address": "B", "province": "C"}
    )
    assert (status, body["error"]) == (400, "invalid_phone")

    path = f"/v1/venues/{venue['venue_id']}/poster"
    status, png, headers = await desk.call("GET", path + ".png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    decoded = [r.text for r in zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))]
    assert len(decoded) == 1
    code = desk.keyring.verifier("vhd").verify(decoded[0], "venue", time.time())
    assert not isinstance(code, str) and code.id == venue["venue_id"]
    for fmt, magic in (("svg", b"<"), ("pdf", b"%PDF")):
        status, body, headers = await desk.call("GET", f"{path}.{fmt}")
        assert status == 200 and body.startswith(magic), fmt
    assert (await desk.call("GET", path + ".gif"))[0] == 400
    assert (await desk.call("GET", path + ".png", app="bluezone"))[0] == 404


# -- personal data stays out of what is kept -------------------------------------------------

PLANTED = (NAME, NATIONAL_ID, PHONE, PHONE_INTL, "912345678", "Lê Văn Tám", "079099001234")


async def _plant(desk: Desk) -> None:
    session = await desk.session()
    status, _ = await desk.declare(session)
    assert status == 201
    venue = await desk.venue(phone=PHONE)
    await desk.manual(venue_code=venue["code"], id_card=ID_CARD)
    await desk.manual(venue_code=venue["code"], phone=PHONE)
    status, _ = await desk.declare(session, national_id="BAD")  # an error body
    assert status == 400
    await desk.flush_all()


def _absent(blob: bytes, where: str) -> None:
    for value in PLANTED:
        for form in {value, value.upper(), value.casefold()}:
            assert form.encode() not in blob, f"{value!r} found in {where}"


async def _redis_dump(r: aioredis.Redis) -> bytes:
    parts: list[bytes] = []
    async for key in r.scan_iter(count=1000):
        parts.append(key)
        kind = (await r.type(key)).decode()
        if kind == "string":
            parts.append(await r.get(key) or b"")
        elif kind == "hash":
            parts += [b for kv in (await r.hgetall(key)).items() for b in kv]
        elif kind == "zset":
            parts += await r.zrange(key, 0, -1)
        elif kind == "stream":
            for _id, fields in await r.xrange(key):
                parts += [b for kv in fields.items() for b in kv]
    return b"\n".join(parts)


async def test_no_personal_data_in_sqlite_redis_or_logs(
    desk: Desk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _plant(desk)
    db = Path(desk.settings.resolved_storage_url.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(FULL)")
    files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
    assert files
    for path in files:
        _absent(path.read_bytes(), path.name)
    _absent(await _redis_dump(desk.redis), "Redis")
    _absent(caplog.text.encode(), "logs")
    metrics = await (await desk.client.get("/metrics")).read()
    _absent(metrics, "metrics")


async def test_no_personal_data_in_a_postgresql_dump(
    make_desk: DeskFactory, postgres_url: str
) -> None:
    desk = await make_desk(storage="postgresql")
    schema = desk.postgres_schema
    conn = await asyncpg.connect(postgres_url)
    try:
        await _plant(desk)
        assert await desk.storage.declaration_count(await _any_person(conn, schema)) >= 1
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        dump: list[bytes] = []
        for (table,) in tables:
            rows = await conn.fetch(f"SELECT t::text FROM {schema}.{table} t")
            dump += [r[0].encode() for r in rows]
        assert len(dump) > 10
        _absent(b"\n".join(dump), "the PostgreSQL tables")
    finally:
        await conn.close()


async def _any_person(conn: asyncpg.Connection, schema: str) -> str:
    person: str = await conn.fetchval(f"SELECT person_id FROM {schema}.declarations LIMIT 1")
    return person


async def test_tracing_reveals_contact_details_only_when_asked_and_audits_it(desk: Desk) -> None:
    session = await desk.session()
    _, case = await desk.declare(session)
    _, contact = await desk.declare(
        await desk.session(OTHER_PHONE),
        full_name="Phạm Văn Đồng",
        national_id="079111222333",
        phone=OTHER_PHONE,
    )
    venue = await desk.venue()
    start = int(time.time() * 1000) - 3_600_000
    events = []
    for n, person in enumerate((case, contact)):
        for kind, at in (("checkin", start), ("checkout", start + 1_800_000)):
            event = scan(desk, venue["code"], person["code"], n)
            event.update(kind=kind, scanned_at=at, event_id=f"TR-{n}-{kind}")
            events.append(event)
    status, body, _ = await desk.call("POST", "/v1/scans", {"events": events})
    assert body["accepted"] == 4, body
    await desk.flush_all()
    token = await desk.storage.add_admin("officer")
    admin = {"Authorization": f"Bearer {token}"}
    path = f"/v1/trace/{case['person_id']}"

    status, page, _ = await desk.call("GET", path, headers=admin)
    rows = page["rows"]
    assert status == 200 and [r["person_id"] for r in rows] == [contact["person_id"]]
    assert "full_name" not in rows[0] and "phone" not in rows[0]
    assert not [e for e in await desk.storage.audit_entries() if e.action == "reveal"]

    status, page, _ = await desk.call("GET", path + "?reveal=1", headers=admin)
    assert status == 200
    rows = page["rows"]
    assert (rows[0]["full_name"], rows[0]["phone"]) == ("Phạm Văn Đồng", "+84387654321")
    reveals = [e for e in await desk.storage.audit_entries() if e.action == "reveal"]
    assert [(e.actor, e.subject) for e in reveals] == [("admin:officer", case["person_id"])]
    assert (await desk.call("GET", path + "?reveal=yes", headers=admin))[0] == 400


async def test_a_venue_kind_with_a_longer_stay_pairs_with_it(desk: Desk) -> None:
    session = await desk.session()
    _, person = await desk.declare(session)
    hospital = await desk.venue(name="Bệnh viện Chợ Rẫy", kind="hospital")
    market = await desk.venue(name="Chợ Lớn", kind="market")
    ten_hours_ago = int(time.time() * 1000) - 10 * 3_600_000
    events = []
    for n, (venue, at) in enumerate(
        ((market, ten_hours_ago - 3_600_000 * 20), (hospital, ten_hours_ago))
    ):
        event = scan(desk, venue["code"], person["code"], n)
        event["scanned_at"] = at
        events.append(event)
    status, body, _ = await desk.call("POST", "/v1/scans", {"events": events})
    assert (status, body["accepted"]) == (200, 2), body
    await desk.flush_all()
    visits = await desk.storage.person_visits(person["person_id"], 0, 2**62)
    stays = {v.venue_id: (v.checkout_at_ms - v.checkin_at_ms, v.closed_by) for v in visits}
    assert stays == {
        market["venue_id"]: (4 * 3_600_000, "auto"),  # SCANGATE_MAX_STAY
        hospital["venue_id"]: (24 * 3_600_000, "auto"),  # hospital=24h
    }


# Unassigned (Cn), private use (Co), a right-to-left override (Cf), a control (Cc).
UNPRINTABLE: Final = ["\u0378\u0379", "Chợ \ue000", "Chợ \u202eabc", "Chợ\u0007"]


@pytest.mark.parametrize("text", UNPRINTABLE)
async def test_unprintable_text_is_refused_in_every_text_field_naming_it(
    desk: Desk, keyring: Keyring, text: str
) -> None:
    for field in ("name", "address", "province"):
        doc = {
            "name": "Chợ Bến Thành",
            "phone": "098 382 9927",
            "address": "Lê Lợi, Quận 1",
            "province": "Hồ Chí Minh",
            "kind": "market",
            field: text,
        }
        status, body, _ = await desk.call("POST", "/v1/venues", doc, app="vhd")
        assert (status, body["error"], body["field"]) == (400, "invalid_field", field), body
    session = await desk.session()
    for field in ("full_name", "address", "province"):
        status, body = await desk.declare(session, **{field: text})
        assert (status, body["error"], body["field"]) == (400, "invalid_field", field), body
    venue = await desk.venue()
    status, body = await desk.manual(venue_code=venue["code"], phone=PHONE, full_name=text)
    assert (status, body["error"], body["field"]) == (400, "invalid_field", "full_name"), body
    with pytest.raises(KeyringError, match="app name"):
        keyring.add_app("other", name=text)
