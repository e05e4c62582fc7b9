"""Cases and exposure notices end to end, on a real Redis and storage, with a local webhook
receiver: who is notified and how, signatures (checked with a Standard Webhooks library
too), retries, dry runs, the outbox's leases on both backends, a notifier killed
mid-delivery, risky venues and occupancy."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook, WebhookVerificationError

from gateway.http.cases import merge_windows
from gateway.http.keys import METRICS
from gateway.outbox.notifier import ADVICE, sms_text, without_diacritics
from signing import Keyring, KeyringError, signature_headers, standard_secret
from storage import PairingRules, ScanEvent, Storage, connect_storage
from storage.outbox import CaseRecord, CaseWindow, NoticeRecord, notice_id
from storage.times import format_time_ms, parse_time_ms

from .servers import scangate_env
from .test_declarations import Desk, DeskFactory, make_desk

__all__ = ["make_desk"]  # the fixture, used here

MINUTE = 60_000
HOUR = 60 * MINUTE
FAST = {"notice_poll_s": 0.05, "notice_retry_s": 0.1, "webhook_private": True}


@dataclass
class Receiver:
    """A webhook endpoint: records every POST; answers ``fail_first`` of them 503 and
    holds each answer ``delay_s``. Like a real receiver it acts on a notice the first time
    its Idempotency-Key comes (``processed``) and answers 2xx to a repeat without acting;
    ``answered_ok`` counts every 2xx it sent for a notice. It checks X-Scangate-Signature
    under ``secret`` and, when ``standard`` is set, the Standard Webhooks headers with that
    library as it arrives; ``deliveries`` keeps each signed POST's body and headers."""

    secret: bytes = b""
    standard: Webhook | None = None
    fail_first: int = 0
    delay_s: float = 0.0
    # Hold the answers to arrivals number slow_after+1 to slow_until (default: all).
    slow_after: int = 0
    slow_until: int = 1 << 30
    arrivals: list[dict[str, Any]] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    answered_ok: Counter[str] = field(default_factory=Counter)
    deliveries: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    bad_signatures: int = 0
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        doc = orjson.loads(body)
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Scangate-Signature", ""), expected):
            self.bad_signatures += 1
            return web.Response(status=401)
        headers = dict(request.headers)
        if self.standard is not None:
            try:
                self.standard.verify(body, headers)
            except WebhookVerificationError:
                self.bad_signatures += 1
                return web.Response(status=401)
        assert request.headers["Idempotency-Key"] == doc["notice_id"]
        assert request.headers["webhook-id"] == doc["notice_id"]
        self.deliveries.append((body, headers))
        self.arrivals.append(doc)
        if len(self.arrivals) <= self.fail_first:
            return web.Response(status=503)
        if self.slow_after < len(self.arrivals) <= self.slow_until:
            await asyncio.sleep(self.delay_s)
        if doc["notice_id"] not in self.processed:
            self.processed.append(doc["notice_id"])
        self.answered_ok[doc["notice_id"]] += 1
        return web.Response(status=204)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook"))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver()
    app = web.Application()
    app.router.add_post("/hook", made.handle)
    made.server = TestServer(app, host="127.0.0.1")
    await made.server.start_server()
    yield made
    await made.server.close()


async def plant_visits(storage: Storage, start: int) -> None:
    """The case CASE at MARKET for an hour from ``start``, and around it:
    A (vhd) and B (vhd and bluezone) overlap it; E (bluezone, no phone) overlaps it;
    D (vhd) was there the day before."""
    rows = [
        ("vhd", "CASE", "MARKET", "checkin", start),
        ("vhd", "CASE", "MARKET", "checkout", start + HOUR),
        ("vhd", "A", "MARKET", "checkin", start + 10 * MINUTE),
        ("vhd", "A", "MARKET", "checkout", start + 50 * MINUTE),
        ("vhd", "B", "MARKET", "checkin", start + 30 * MINUTE),
        ("bluezone", "B", "MARKET", "checkout", start + 2 * HOUR),
        ("bluezone", "E", "MARKET", "checkin", start - 20 * MINUTE),
        ("bluezone", "E", "MARKET", "checkout", start + 20 * MINUTE),
        ("vhd", "D", "MARKET", "checkin", start - 24 * HOUR),
        ("vhd", "D", "MARKET", "checkout", start - 23 * HOUR),
    ]
    await storage.store_batch(
        [
            ScanEvent(app, f"P{i:07d}", kind, venue, person, t, t, None)  # type: ignore[arg-type]
            for i, (app, person, venue, kind, t) in enumerate(rows)
        ],
        PairingRules(),
    )


async def plant_phone_contact(desk: Desk, start: int) -> str:
    """C: declared with a phone, scanned only through bluezone (no webhook): SMS."""
    session = await desk.session(phone="0912345678")
    status, made = await desk.declare(session)
    assert status == 201, made
    person = made["person_id"]
    await desk.storage.store_batch(
        [
            ScanEvent(
                "bluezone", "C0000001", "checkin", "MARKET", person, start + 5 * MINUTE, start, None
            ),
            ScanEvent(
                "bluezone",
                "C0000002",
                "checkout",
                "MARKET",
                person,
                start + 40 * MINUTE,
                start,
                None,
            ),
        ],
        PairingRules(),
    )
    return str(person)


async def admin(desk: Desk) -> dict[str, str]:
    token = await desk.storage.add_admin(f"so-y-te-{time.monotonic_ns()}")
    return {"Authorization": f"Bearer {token}"}


async def until(check: Callable[[], Any], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def all_settled(desk: Desk, case_id: str, auth: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = {}

    async def settled() -> bool:
        nonlocal doc
        status, doc, _ = await desk.call("GET", f"/v1/cases/{case_id}", headers=auth)
        assert status == 200, doc
        return all(n["state"] != "pending" for n in doc["notices"])

    await until(settled)
    return doc


# -- who is notified, and how ------------------------------------------------------------------


async def case_desk(
    make_desk: DeskFactory, keyring: Keyring, receiver: Receiver, **over: Any
) -> tuple[Desk, int, dict[str, str]]:
    """A gateway whose vhd app has the receiver as webhook, the visits of
    ``plant_visits`` from five hours ago, and an admin: (desk, start, admin headers)."""
    receiver.secret = keyring.set_webhook("vhd", receiver.url).encode()
    receiver.standard = Webhook(standard_secret(receiver.secret))
    desk: Desk = await make_desk(**{**FAST, **over})
    start = int(time.time() * 1000) - 5 * HOUR
    await plant_visits(desk.storage, start)
    return desk, start, await admin(desk)


async def post_case(
    desk: Desk, auth: dict[str, str], start: int, query: str = ""
) -> tuple[int, Any]:
    """POST /v1/cases for CASE, confirmed three hours after ``start``: (status, body)."""
    status, body, _ = await desk.call(
        "POST",
        f"/v1/cases{query}",
        {"person_id": "CASE", "confirmed_at": start + 3 * HOUR},
        headers=auth,
    )
    return status, body


async def test_a_case_notifies_exactly_its_contacts_by_their_apps_or_by_sms(
    make_desk: DeskFactory, keyring: Keyring, receiver: Receiver
) -> None:
    desk, start, auth = await case_desk(make_desk, keyring, receiver)
    phone_person = await plant_phone_contact(desk, start)

    status, made, _ = await desk.call(
        "POST",
        "/v1/cases",
        {"person_id": "CASE", "confirmed_at": start + 3 * HOUR, "note": "F0 xét nghiệm PCR"},
        headers=auth,
    )
    assert status == 201, made
    # A, B, C, E are contacts (D was there the day before); E can be reached by nothing.
    assert (made["contacts"], made["notices"]) == (4, 3)
    case = await all_settled(desk, made["case_id"], auth)
    assert case["note"] == "F0 xét nghiệm PCR"
    states = {(n["person_id"], n["channel"], n["app_id"]): n["state"] for n in case["notices"]}
    assert states == {
        ("A", "webhook", "vhd"): "delivered",
        ("B", "webhook", "vhd"): "delivered",
        (phone_person, "sms", None): "delivered",
    }

    # The receiver got the two webhook notices, signed, once each, as documented. Each
    # names only what vhd holds already: its own events of the exposed visit (not B's
    # check-out, which bluezone posted), the venue and the window; no person or case id.
    assert receiver.bad_signatures == 0
    assert sorted(d["event_ids"] for d in receiver.arrivals) == [
        ["P0000002", "P0000003"],  # A's check-in and check-out, both through vhd
        ["P0000004"],  # B's check-in through vhd
    ]
    first = next(d for d in receiver.arrivals if d["event_ids"][0] == "P0000002")
    assert set(first) == {
        "notice_id",
        "event_ids",
        "venue_id",
        "venue_name",
        "venue_address",
        "venue_province",
        "exposure_start",
        "exposure_end",
        "overlap_minutes",
        "checkout_recorded",
        "advice",
    }
    assert (first["venue_id"], first["advice"]) == ("MARKET", ADVICE)
    assert first["checkout_recorded"] is True  # both visits were checked out
    assert first["overlap_minutes"] == 40.0
    # C got an SMS in Vietnamese (without diacritics, as operators send them).
    texts = [m["text"] for m in desk.sms() if m["to"] == "+84912345678"]
    assert any(
        t.startswith("[Khai bao y te] Ban co the da tiep xuc voi ca benh tai MARKET") for t in texts
    )

    # Everything is audit-logged: the trace behind the case, the case, each notice.
    actions = Counter(e.action for e in await desk.storage.audit_entries())
    assert actions["case"] == 1 and actions["notice"] == 3 and actions["trace"] >= 1
    metrics = (await (await desk.client.get("/metrics")).text()).splitlines()
    desk.app[METRICS].publish()
    text = desk.app[METRICS].exposition().decode()
    assert "scangate_cases_total 1.0" in text
    assert 'scangate_notices_total{channel="webhook",outcome="delivered"} 2.0' in text
    assert 'scangate_notices_total{channel="sms",outcome="delivered"} 1.0' in text
    assert any(line.startswith("scangate_outbox_pending") for line in metrics)


async def test_a_dry_run_lists_the_contacts_and_stores_and_sends_nothing(
    make_desk: DeskFactory, keyring: Keyring, receiver: Receiver
) -> None:
    desk, start, auth = await case_desk(make_desk, keyring, receiver)
    status, preview = await post_case(desk, auth, start, "?dry_run=1")
    assert status == 200, preview
    assert (preview["contacts"], preview["notices"], preview["unreachable"]) == (3, 2, 1)
    listed = {
        (e["person_id"], tuple(c["app_id"] for c in e["channels"])) for e in preview["exposures"]
    }
    assert listed == {("A", ("vhd",)), ("B", ("vhd",)), ("E", ())}
    await asyncio.sleep(0.5)  # several notifier rounds
    assert receiver.arrivals == []
    assert await desk.storage.pending_notices() == 0
    assert await desk.storage.case_confirmed("CASE", start + 3 * HOUR) is None
    assert await desk.storage.risky_windows(0) == []
    entries = await desk.storage.audit_entries()
    assert [e.action for e in entries if e.action.startswith("case")] == ["case_preview"]


async def test_a_receiver_that_fails_for_a_while_gets_every_notice_once(
    make_desk: DeskFactory, keyring: Keyring, receiver: Receiver
) -> None:
    desk, start, auth = await case_desk(make_desk, keyring, receiver)
    receiver.fail_first = 5
    status, made = await post_case(desk, auth, start)
    assert status == 201
    case = await all_settled(desk, made["case_id"], auth)
    ids = {n["notice_id"] for n in case["notices"]}
    assert {n["state"] for n in case["notices"]} == {"delivered"}
    assert len(receiver.arrivals) == 5 + len(ids)  # five refusals, then each once
    assert receiver.answered_ok == Counter(dict.fromkeys(ids, 1))
    assert sum(n["attempts"] for n in case["notices"]) == 5 + len(ids)
    text = desk.app[METRICS].exposition().decode()
    assert 'scangate_notices_total{channel="webhook",outcome="retry"} 5.0' in text


async def test_deliveries_are_signed_the_standard_way_and_a_library_checks_them(
    make_desk: DeskFactory, keyring: Keyring, receiver: Receiver
) -> None:
    """Every try carries webhook-id (the notice id, the same on a retry), a webhook-timestamp
    of its own and webhook-signature, and the standardwebhooks package accepts it under the
    whsec_ secret; it refuses the delivery tampered with, under another secret, replayed
    after its five minutes, or with its timestamp moved up."""
    # Retries come at least 1.1 s apart, so a retry's timestamp (whole seconds) is new.
    desk, start, auth = await case_desk(make_desk, keyring, receiver, notice_retry_s=1.5)
    receiver.fail_first = 2
    sent_from = int(time.time())
    status, made = await post_case(desk, auth, start)
    assert status == 201
    await all_settled(desk, made["case_id"], auth)
    assert receiver.bad_signatures == 0  # every try passed both checks as it arrived
    tries: dict[str, list[int]] = {}
    for _, headers in receiver.deliveries:
        stamp = headers["webhook-timestamp"]
        assert stamp.isdecimal() and sent_from <= int(stamp) <= time.time()
        tries.setdefault(headers["webhook-id"], []).append(int(stamp))
    assert len(tries) == 2 and sum(len(t) for t in tries.values()) == 4  # 2 refused, 2 taken
    assert max(len(t) for t in tries.values()) >= 2
    assert all(t == sorted(set(t)) for t in tries.values())  # each try a later timestamp

    body, headers = receiver.deliveries[-1]
    library = Webhook(standard_secret(receiver.secret))
    assert library.verify(body, headers) == orjson.loads(body)
    tampered = body.replace(b'"MARKET"', b'"MARKEU"')
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        library.verify(tampered, headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(standard_secret(secrets.token_bytes(32))).verify(body, headers)
    # The secret as X-Scangate-Signature receivers hold it starts with whsec_ but is not
    # base64 of the key: a library given it derives another key (or none) and refuses.
    with pytest.raises((ValueError, WebhookVerificationError)):
        Webhook(receiver.secret.decode()).verify(body, headers)
    # The same delivery as the notifier signed it six minutes ago, replayed now: too old
    # (four minutes ago is within the tolerance); its timestamp moved up: a bad signature.
    notice, now_s = headers["webhook-id"], int(time.time())
    assert library.verify(body, signature_headers(receiver.secret, notice, now_s - 240, body))
    replay = signature_headers(receiver.secret, notice, now_s - 360, body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        library.verify(body, replay)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        library.verify(body, {**replay, "webhook-timestamp": str(now_s)})


async def test_notices_to_an_app_that_never_answers_are_given_up_and_said_so(
    make_desk: DeskFactory, keyring: Keyring, receiver: Receiver
) -> None:
    desk, start, auth = await case_desk(make_desk, keyring, receiver, notice_max_attempts=3)
    receiver.fail_first = 1_000
    _, made = await post_case(desk, auth, start)
    case = await all_settled(desk, made["case_id"], auth)
    assert {(n["state"], n["attempts"], n["last_error"]) for n in case["notices"]} == {
        ("failed", 3, "webhook answered 503")
    }


async def test_case_requests_are_checked(make_desk: DeskFactory) -> None:
    desk: Desk = await make_desk(**FAST)
    auth = await admin(desk)
    now = int(time.time() * 1000)
    for body, field_ in (
        ({"person_id": "case", "confirmed_at": now}, "person_id"),
        ({"person_id": "CASE", "confirmed_at": "yesterday"}, "confirmed_at"),
        ({"person_id": "CASE", "confirmed_at": now + HOUR}, "confirmed_at"),
        ({"person_id": "CASE", "confirmed_at": now - 30 * 24 * HOUR}, "confirmed_at"),
        ({"person_id": "CASE", "confirmed_at": now, "note": "x" * 501}, "note"),
        ({"person_id": "CASE", "confirmed_at": now, "note": "\u0378\u0379"}, "note"),
        ({"person_id": "CASE", "confirmed_at": now, "note": "a\u202eb"}, "note"),
    ):
        status, doc, _ = await desk.call("POST", "/v1/cases", body, headers=auth)
        assert (status, doc["error"], doc["field"]) == (400, "invalid_field", field_), body
    status, doc, _ = await desk.call("POST", "/v1/cases", {"person_id": "CASE"}, app="vhd")
    assert (status, doc["error"]) == (401, "unauthorized")  # an app token is not an admin's
    status, doc, _ = await desk.call("GET", "/v1/cases/CNOSUCH", headers=auth)
    assert (status, doc["error"]) == (404, "not_found")


def test_webhooks_must_be_https_but_for_loopback(keyring: Keyring) -> None:
    keyring.add_app("vhd")
    assert keyring.webhook("vhd") is None
    for bad in ("http://example.org/hook", "ftp://x/y", "https://user:pw@x.org/h", "/hook"):
        with pytest.raises(KeyringError):
            keyring.set_webhook("vhd", bad)
    secret = keyring.set_webhook("vhd", "https://hooks.example.org/scangate")
    hook = keyring.webhook("vhd")
    assert hook is not None and hook.secret == secret.encode()
    assert secret not in repr(keyring.list_apps())  # listing shows no secret
    assert keyring.set_webhook("vhd", "http://127.0.0.1:9/h") != secret  # a new secret


def test_the_message_texts() -> None:
    assert without_diacritics("Quán Phở Đầu Ngõ") == "Quan Pho Dau Ngo"
    from zoneinfo import ZoneInfo

    text = sms_text(
        "Chợ Bến Thành", 1_764_000_000_000, 1_764_003_600_000, ZoneInfo("Asia/Ho_Chi_Minh")
    )
    assert "Cho Ben Thanh" in text and text.isascii() and len(text) <= 200


# -- the outbox on both backends ---------------------------------------------------------------


def _case_with_notices(n: int, now_ms: int) -> tuple[CaseRecord, list[NoticeRecord]]:
    case = CaseRecord("CTEST", "CASE", now_ms, None, now_ms, "test", n, n)
    notices = [
        NoticeRecord(
            notice_id("CTEST", f"P{i}", "V1", now_ms - i, "webhook", "vhd"),
            "CTEST",
            f"P{i}",
            "V1",
            now_ms - i,
            now_ms,
            1.5,
            "webhook",
            "vhd",
            "pending",
            0,
            now_ms,
            None,
            None,
            now_ms,
        )
        for i in range(n)
    ]
    return case, notices


async def test_concurrent_claims_never_share_a_notice_and_leases_run_out(storage: Storage) -> None:
    now = int(time.time() * 1000)
    case, notices = _case_with_notices(40, now)
    # The same notice twice is one notice: the unique tuple decides.
    await storage.add_case(case, [CaseWindow("V1", now - HOUR, now, "high")], notices + notices[:3])
    assert await storage.pending_notices() == 40
    claims = await asyncio.gather(
        *(storage.claim_notices(f"w{i}", now, 60_000, 15) for i in range(4))
    )
    taken = [n.notice_id for claim in claims for n in claim]
    assert len(taken) == len(set(taken)) == 40
    # Nobody else may finish a notice it does not hold.
    first = claims[0][0]
    assert not await storage.notice_delivered(first.notice_id, "intruder", now)
    assert await storage.notice_delivered(first.notice_id, "w0", now)
    assert not await storage.notice_delivered(first.notice_id, "w0", now)  # once
    # A dead worker's notices come back when its lease runs out, with their tries counted.
    assert await storage.claim_notices("w9", now + 1_000, 60_000, 100) == []
    again = await storage.claim_notices("w9", now + 61_000, 60_000, 100)
    assert len(again) == 39 and {n.attempts for n in again} == {2}
    # A failed try waits for its time; the last one gives up.
    n = again[0]
    assert await storage.notice_not_delivered(
        n.notice_id, "w9", "webhook answered 500", now + 200_000
    )
    assert await storage.notice_not_delivered(again[1].notice_id, "w9", "gave up", None)
    rows = {r.notice_id: r for r in await storage.case_notices("CTEST")}
    assert (rows[n.notice_id].state, rows[n.notice_id].next_attempt_at_ms) == (
        "pending",
        now + 200_000,
    )
    assert (rows[again[1].notice_id].state, rows[again[1].notice_id].last_error) == (
        "failed",
        "gave up",
    )
    assert await storage.risky_windows(now - 1) == [CaseWindow("V1", now - HOUR, now, "high")]
    assert await storage.risky_windows(now + 1) == []


def test_windows_of_several_cases_at_a_venue_merge() -> None:
    windows = [
        CaseWindow("V1", 0, 10, "low"),
        CaseWindow("V1", 5, 20, "high"),
        CaseWindow("V1", 30, 40, "low"),
        CaseWindow("V2", 0, 10, "low"),
    ]
    assert merge_windows(windows) == [
        CaseWindow("V1", 0, 20, "high"),
        CaseWindow("V1", 30, 40, "low"),
        CaseWindow("V2", 0, 10, "low"),
    ]


# -- risky venues and occupancy --------------------------------------------------------------


async def test_risky_venues_carry_no_person_id(make_desk: DeskFactory, keyring: Keyring) -> None:
    desk: Desk = await make_desk(**FAST)
    start = int(time.time() * 1000) - 5 * HOUR
    await plant_visits(desk.storage, start)
    auth = await admin(desk)
    _, made = await post_case(desk, auth, start)
    status, body, _ = await desk.call("GET", f"/v1/risky-venues?since={start - 24 * HOUR}")
    assert status == 200
    assert body == {
        "windows": [
            {
                "venue_id": "MARKET",
                # MARKET is registered with no app here: no name to show.
                "venue_name": None,
                "venue_address": None,
                "venue_province": None,
                "from": start - HOUR,
                "to": start + 2 * HOUR,
                "level": "high",
            }
        ],
        "next": None,
    }
    raw = json.dumps(body)
    for person in ("CASE", "A", "B", "E", made["case_id"]):
        assert f'"{person}"' not in raw
    status, body, _ = await desk.call("GET", f"/v1/risky-venues?since={start + 3 * HOUR}")
    assert body == {"windows": [], "next": None}
    status, doc, _ = await desk.call("GET", "/v1/risky-venues?since=yesterday")
    assert (status, doc["error"]) == (400, "invalid_request")
    status, doc, _ = await desk.call("GET", "/v1/risky-venues", headers=auth)
    assert status == 401  # an app's token, not an admin's


async def test_occupancy_counts_the_visits_in_progress(make_desk: DeskFactory) -> None:
    desk: Desk = await make_desk(**FAST)
    venue = await desk.venue()
    now = int(time.time() * 1000)
    events = [
        ScanEvent("vhd", "O1", "checkin", venue["venue_id"], "IN1", now - 30 * MINUTE, now, None),
        ScanEvent("vhd", "O2", "checkin", venue["venue_id"], "IN2", now - 10 * MINUTE, now, None),
        ScanEvent("vhd", "O3", "checkin", venue["venue_id"], "OUT", now - 50 * MINUTE, now, None),
        ScanEvent("vhd", "O4", "checkout", venue["venue_id"], "OUT", now - 5 * MINUTE, now, None),
    ]
    await desk.storage.store_batch(events, PairingRules())
    status, doc, _ = await desk.call("GET", f"/v1/venues/{venue['venue_id']}/occupancy")
    assert status == 200 and doc["inside"] == 2 and doc["venue_id"] == venue["venue_id"]
    status, doc, _ = await desk.call(
        "GET", f"/v1/venues/{venue['venue_id']}/occupancy", app="bluezone"
    )
    assert status == 404  # another app's registered venue
    status, doc, _ = await desk.call("GET", "/v1/venues/NOTREGISTERED/occupancy")
    assert (status, doc["error"]) == (404, "not_found")  # only registered venues


# -- a notifier killed mid-delivery --------------------------------------------------------------


def _cli(data_dir: Path, *args: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=scangate_env(**env),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _notify(data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--data-dir", str(data_dir), "notify"],
            env=scangate_env(
                SCANGATE_NOTICE_LEASE="6s",  # a delivery gets 2s of it
                SCANGATE_NOTICE_POLL="100ms",
                SCANGATE_NOTICE_RETRY="200ms",
                SCANGATE_WEBHOOK_PRIVATE="true",
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_notifier_killed_mid_delivery_loses_nothing_and_the_receiver_sees_each_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    """``scangate notify`` is killed (SIGKILL) while the receiver holds its deliveries;
    another takes over when the leases run out. Every notice is delivered and recorded
    once; the only ones POSTed twice are those in flight at the kill, and the receiver,
    keying on Idempotency-Key, takes each once."""
    data_dir = tmp_path / "data"
    for app in ("vhd", "bluezone"):
        _cli(data_dir, "apps", "add", app)
    # Both forms of the secret as the CLI prints them: the receiver checks both signatures.
    hook = json.loads(_cli(data_dir, "apps", "set-webhook", "vhd", receiver.url))
    receiver.secret = hook["secret"].encode()
    receiver.standard = Webhook(hook["standard_webhooks_secret"])
    # Of the first worker's 14 POSTs, 7 are answered at once and 7 held 1.5 s: the kill
    # comes when the first 7 are recorded and the rest are in flight. Later POSTs (the
    # second worker's) are answered at once.
    receiver.delay_s, receiver.slow_after, receiver.slow_until = 1.5, 7, 14
    storage = await connect_storage(f"sqlite:///{data_dir / 'scangate.db'}")
    try:
        start = int(time.time() * 1000) - 5 * HOUR
        await plant_visits(storage, start)
        # More contacts through vhd, so several deliveries are in flight at once.
        extra = [
            ScanEvent("vhd", f"X{i:06d}{k}", kind, "MARKET", f"X{i}", start + t, start, None)  # type: ignore[arg-type]
            for i in range(12)
            for k, (kind, t) in enumerate((("checkin", 5 * MINUTE), ("checkout", 45 * MINUTE)))
        ]
        await storage.store_batch(extra, PairingRules())
    finally:
        await storage.close()
    made = json.loads(
        _cli(data_dir, "cases", "add", "CASE", "--confirmed-at", str(start + 3 * HOUR))
    )
    assert made["notices"] == 14

    first = _notify(data_dir, tmp_path / "notify.log")
    try:
        await until(lambda: _true(delivered_rows(data_dir) >= 7 and len(receiver.arrivals) >= 14))
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    # In flight at the kill: POSTed by the dead worker, not recorded delivered. Those, and
    # only those, must be sent again.
    posted_before = {d["notice_id"] for d in receiver.arrivals}
    shown = json.loads(_cli(data_dir, "cases", "show", made["case_id"]))
    recorded = {n["notice_id"] for n in shown["notices"] if n["state"] == "delivered"}
    in_flight = posted_before - recorded
    assert len(recorded) >= 7 and in_flight, "the kill should come between the two"
    second = _notify(data_dir, tmp_path / "notify.log")
    try:

        async def delivered() -> bool:
            shown = json.loads(_cli(data_dir, "cases", "show", made["case_id"]))
            return all(n["state"] == "delivered" for n in shown["notices"])

        await until(delivered, timeout_s=60)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
    shown = json.loads(_cli(data_dir, "cases", "show", made["case_id"]))
    ids = {n["notice_id"] for n in shown["notices"]}
    assert len(ids) == 14
    assert sorted(receiver.processed) == sorted(ids)  # each acted on once, nothing lost
    posted = Counter(d["notice_id"] for d in receiver.arrivals)
    repeated = {i for i, n in posted.items() if n > 1}
    assert repeated <= in_flight  # resent only if in flight at the kill
    assert receiver.bad_signatures == 0 and repeated
    # Sent again by the second worker: the same webhook-id, a timestamp of its own.
    for notice in repeated:
        stamps = [
            h["webhook-timestamp"] for _, h in receiver.deliveries if h["webhook-id"] == notice
        ]
        assert len(stamps) == len(set(stamps)) >= 2
    print(  # the figures RELIABILITY.md quotes (pytest -s shows them)
        f"notify killed with {len(recorded)} notices recorded and {len(in_flight)} in flight; "
        f"{len(ids)} notices, "
        f"{len(receiver.arrivals)} POSTs, {len(repeated)} POSTed twice, all delivered once"
    )


async def _true(value: bool) -> bool:
    return value


def delivered_rows(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(data_dir / "scangate.db", timeout=10)) as db:
        ((n,),) = db.execute("SELECT count(*) FROM notices WHERE state = 'delivered'").fetchall()
        return int(n)


async def test_the_same_case_posted_again_is_the_same_case(
    make_desk: DeskFactory, keyring: Keyring, receiver: Receiver
) -> None:
    desk, start, auth = await case_desk(make_desk, keyring, receiver)
    body = {"person_id": "CASE", "confirmed_at": start + 3 * HOUR}
    status, made, _ = await desk.call("POST", "/v1/cases", body, headers=auth)
    assert status == 201
    # A client retrying after a timeout: the same case, nothing queued again.
    status, again, _ = await desk.call("POST", "/v1/cases", body, headers=auth)
    assert (status, again) == (200, made)
    case = await all_settled(desk, made["case_id"], auth)
    assert len(case["notices"]) == 2
    assert (
        sorted(receiver.processed) == sorted(receiver.answered_ok) and len(receiver.arrivals) == 2
    )


async def test_a_webhook_to_a_private_address_is_refused(
    make_desk: DeskFactory, keyring: Keyring, receiver: Receiver
) -> None:
    """Without SCANGATE_WEBHOOK_PRIVATE a webhook may not reach into the network: the
    receiver on 127.0.0.1 is never called."""
    desk, start, auth = await case_desk(
        make_desk, keyring, receiver, webhook_private=False, notice_max_attempts=2
    )
    _, made = await post_case(desk, auth, start)
    case = await all_settled(desk, made["case_id"], auth)
    assert {(n["state"], n["last_error"]) for n in case["notices"]} == {
        ("failed", "the webhook's address is not public")
    }
    assert receiver.arrivals == []


async def test_an_sms_that_cannot_be_sent_is_retried_then_given_up(
    make_desk: DeskFactory,
) -> None:
    # An SMS provider nobody listens on: every try fails (after the sender's own retries).
    desk: Desk = await make_desk(
        **FAST, notice_max_attempts=2, sms="http", sms_url="http://127.0.0.1:9/sms"
    )
    start = int(time.time() * 1000) - 5 * HOUR
    await plant_visits(desk.storage, start)
    # The phone contact needs an OTP, which the same (dead) provider would carry: store
    # the person the way a declaration does, through a desk with the log sender.
    # (Its own notifier must stay out of the way: it looks once an hour.)
    phone_desk: Desk = await make_desk(notice_poll_s=3600)
    person = await plant_phone_contact(phone_desk, start)
    auth = await admin(desk)
    _, made = await post_case(desk, auth, start)
    assert made["notices"] == 1  # C by SMS; A and B have no webhook here, and no phone
    case = await all_settled(desk, made["case_id"], auth)
    ((notice,),) = [case["notices"]]
    assert (notice["person_id"], notice["channel"], notice["state"], notice["attempts"]) == (
        person,
        "sms",
        "failed",
        2,
    )
    assert notice["last_error"].startswith("SMS provider could not be reached")
    entries = [e for e in await desk.storage.audit_entries() if e.action == "notice"]
    assert len(entries) == 1 and "outcome=failed" in entries[0].detail
    assert "+84" not in entries[0].detail  # no phone in the audit log


@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_risky_venues_come_in_pages_of_whole_venues(
    make_desk: DeskFactory, storage_kind: str
) -> None:
    desk: Desk = await make_desk(storage=storage_kind, **FAST)
    now = int(time.time() * 1000)
    # 25 venues, two cases each: overlapping windows (merged) and a later one.
    for case in range(2):
        record = CaseRecord(f"C{case}", f"P{case}", now, None, now, "test", 0, 0)
        windows = [
            CaseWindow(f"V{v:03d}", now - 3 * HOUR + case * HOUR, now - HOUR + case * HOUR, "high")
            for v in range(25)
        ] + [
            CaseWindow(f"V{v:03d}", now + 5 * HOUR, now + 6 * HOUR, "low") for v in range(0, 25, 5)
        ]
        await desk.storage.add_case(record, windows, [])
    since = now - 24 * HOUR
    pages, windows = 0, []
    status, body, _ = await desk.call("GET", f"/v1/risky-venues?since={since}&limit=10")
    while True:
        assert status == 200, body
        pages += 1
        windows += body["windows"]
        assert len({w["venue_id"] for w in body["windows"]}) <= 10
        if body["next"] is None:
            break
        status, body, _ = await desk.call("GET", f"/v1/risky-venues?cursor={body['next']}&limit=10")
    assert pages == 3
    assert [w["venue_id"] for w in windows] == sorted(w["venue_id"] for w in windows)
    # Each venue's two overlapping windows merged into one, whichever page it fell on.
    assert len([w for w in windows if w["level"] == "high"]) == 25
    assert len([w for w in windows if w["level"] == "low"]) == 5
    for bad in ("limit=0", "limit=5001", "cursor=W10=", "cursor=nothing"):
        status, body, _ = await desk.call("GET", f"/v1/risky-venues?{bad}")
        assert (status, body["error"]) == (400, "invalid_request"), bad


@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
async def test_an_exposure_with_no_check_out_ends_at_the_confirmation_and_says_so(
    make_desk: DeskFactory, keyring: Keyring, storage_kind: str
) -> None:
    """A case and a contact who both checked in and never out: their stored visits end
    four hours on (the assumed stay), but the exposure stops at the confirmation."""
    keyring.set_webhook("vhd", "http://127.0.0.1:9/hook")
    desk: Desk = await make_desk(notice_poll_s=60, webhook_private=True, storage=storage_kind)
    now = int(time.time() * 1000)
    await desk.storage.store_batch(
        [
            ScanEvent("vhd", "OPEN1", "checkin", "MARKET", "CASE", now - 30 * 60_000, now, None),
            ScanEvent("vhd", "OPEN2", "checkin", "MARKET", "NEAR", now - 20 * 60_000, now, None),
        ],
        PairingRules(),
    )
    confirmed = now - 5 * 60_000
    auth = await admin(desk)
    status, made, _ = await desk.call(
        "POST", "/v1/cases", {"person_id": "CASE", "confirmed_at": confirmed}, headers=auth
    )
    assert status == 201, made
    status, shown, _ = await desk.call("GET", f"/v1/cases/{made['case_id']}", headers=auth)
    (notice,) = shown["notices"]
    assert notice["exposure_end"] == format_time_ms(confirmed)  # not four hours on
    assert notice["overlap_minutes"] == 15.0
    assert notice["checkout_recorded"] is False
    (window,) = await desk.storage.risky_windows(0)
    assert window.to_ms == confirmed


def test_the_sms_says_in_words_when_no_check_out_was_recorded() -> None:
    zone = ZoneInfo("Asia/Ho_Chi_Minh")
    start = parse_time_ms("2026-12-05T02:00:00Z")
    recorded = sms_text("Chợ Bến Thành", start, start + HOUR, zone)
    assumed = sms_text("Chợ Bến Thành", start, start + HOUR, zone, checkout_recorded=False)
    assert "den 10:00 05/12." in recorded and "khong ghi nhan" not in recorded
    assert "den khoang 10:00 05/12 (khong ghi nhan gio ra)." in assumed
