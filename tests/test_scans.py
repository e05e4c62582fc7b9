"""POST /v1/scans against a real Redis or Valkey: verdicts, whole-request errors, streams."""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import Settings
from gateway.http import scans
from gateway.http.access import CALLER_APP, ROUTE
from gateway.http.keys import KEYRING, METRICS
from gateway.logs import RequestIdStamp, bind_request_id
from gateway.pipeline.events import decode_event
from gateway.pipeline.keyspace import entry_values, stream_key
from signing import Keyring
from signing.codes import format_code, parse_code

from .harness import GatewayStarter

SHARDS = 4


@dataclass
class World:
    """A gateway on a real Redis, with two apps and their tokens."""

    client: TestClient[Any, Any]
    keyring: Keyring
    redis: aioredis.Redis
    tokens: dict[str, str]
    settings: Settings
    app: web.Application

    async def post(self, events: list[Any], app: str = "vhd", **kw: Any) -> Any:
        return await self.client.post(
            "/v1/scans", json={"events": events}, headers=self.auth(app), **kw
        )

    def auth(self, app: str = "vhd") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[app]}"}

    def event(self, n: int, kind: str = "checkin", app: str = "vhd", **over: Any) -> dict[str, Any]:
        e = {
            "event_id": f"EVT-{n:08d}",
            "kind": kind,
            "venue_code": self.keyring.issue(app, "venue", f"V{n % 7}"),
            "person_code": self.keyring.issue(app, "person", f"P{n}", ttl_s=86400),
            "scanned_at": int(time.time() * 1000) - 1000,
        }
        e.update(over)
        return e

    def sync_keys(self) -> None:
        """What the gateway's keyring refresh does every 2 s, now."""
        self.app[KEYRING].refresh()

    async def stored(self) -> list[Any]:
        """Every event in the streams, decoded."""
        out = []
        for shard in range(SHARDS):
            for _id, fields in await self.redis.xrange(stream_key(shard)):
                out.extend(decode_event(value) for value in entry_values(fields))
        return out


WorldFactory = Callable[..., Any]


@pytest.fixture
def make_world(
    gateway_under_test: GatewayStarter, keyring: Keyring, redis_url: str
) -> WorldFactory:
    tokens = {
        "vhd": keyring.add_app("vhd").token,
        "bluezone": keyring.add_app("bluezone", prefix="BZ").token,
    }

    async def make(url: str = redis_url, **settings_over: Any) -> World:
        g = await gateway_under_test(url, **{"shards": SHARDS, **settings_over})
        return World(g.client, keyring, g.redis, tokens, g.settings, g.app)

    return make


@pytest.fixture
async def world(make_world: WorldFactory) -> World:
    w: World = await make_world()
    return w


async def test_a_batch_is_accepted_and_the_streams_hold_exactly_it(world: World) -> None:
    events = [world.event(i, kind="checkin" if i % 2 else "checkout") for i in range(20)]
    resp = await world.post(events)
    assert resp.status == 200
    body = await resp.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (20, 0, 0)
    assert [r["event_id"] for r in body["results"]] == [e["event_id"] for e in events]
    assert all(r == {"event_id": r["event_id"], "status": "accepted"} for r in body["results"])
    stored = await world.stored()
    assert sorted(e.event_id for e in stored) == sorted(e["event_id"] for e in events)
    by_id = {e.event_id: e for e in stored}
    for e in events:
        s = by_id[e["event_id"]]
        assert (s.app_id, s.kind, s.scanned_at_ms) == ("vhd", e["kind"], e["scanned_at"])
        assert s.venue_id == parse_code(e["venue_code"]).id  # type: ignore[union-attr]
        assert s.person_id == parse_code(e["person_code"]).id  # type: ignore[union-attr]


async def test_a_retried_batch_is_all_duplicates(world: World) -> None:
    events = [world.event(i) for i in range(10)]
    assert (await (await world.post(events)).json())["accepted"] == 10
    again = await (await world.post(events)).json()
    assert (again["accepted"], again["duplicates"]) == (0, 10)
    assert {r["status"] for r in again["results"]} == {"duplicate"}
    assert len(await world.stored()) == 10


async def test_the_same_event_twice_in_one_request(world: World) -> None:
    e = world.event(1)
    body = await (await world.post([e, e])).json()
    assert [r["status"] for r in body["results"]] == ["accepted", "duplicate"]
    assert len(await world.stored()) == 1


async def test_event_identity_is_app_and_event_id(world: World) -> None:
    # The same event id from two apps: two different events; neither blocks the other.
    a = await (await world.post([world.event(1)], app="vhd")).json()
    b = await (await world.post([world.event(1, app="bluezone")], app="bluezone")).json()
    assert a["accepted"] == b["accepted"] == 1
    assert sorted(e.app_id for e in await world.stored()) == ["bluezone", "vhd"]


async def test_server_owned_fields_are_never_taken_from_the_body(world: World) -> None:
    e = world.event(1, app_id="bluezone", received_at=0, app="vhd")
    before = int(time.time() * 1000)
    assert (await (await world.post([e])).json())["accepted"] == 1
    (stored,) = await world.stored()
    assert stored.app_id == "vhd"
    assert stored.received_at_ms >= before


def forged(code: str) -> str:
    """The same code with a different tag: well-formed, wrongly signed."""
    parsed = parse_code(code)
    assert parsed is not None
    return format_code(parsed.prefix, parsed.signed, bytes(16))


async def test_every_reason_and_a_mixed_batch_accepts_exactly_the_good_ones(world: World) -> None:
    k = world.keyring
    now_ms = int(time.time() * 1000)
    k.rotate("vhd")
    old_key_venue = k.issue("vhd", "venue", "OLD")  # signed with K2
    k.rotate("vhd")
    k.retire("vhd", "K2")
    world.sync_keys()
    cases: list[tuple[dict[str, Any], str | None]] = [
        (world.event(1), None),
        (world.event(2, venue_code="VHD:NOTACODE"), "malformed_code"),
        (world.event(3, venue_code=k.issue("bluezone", "venue", "V1")), "wrong_app"),
        (world.event(4, venue_code=world.event(4)["person_code"]), "wrong_type"),
        (world.event(5, person_code=world.event(5)["venue_code"]), "wrong_type"),
        (world.event(6, venue_code=old_key_venue), "unknown_key"),
        (world.event(7, person_code=forged(world.event(7)["person_code"])), "bad_signature"),
        (
            world.event(
                8, person_code=k.issue("vhd", "person", "P8", now_s=1_700_000_000, ttl_s=60)
            ),
            "expired",
        ),
        (world.event(9, scanned_at=now_ms + 6 * 60_000), "clock_skew"),
        (world.event(10, scanned_at=now_ms - 8 * 86_400_000), "too_late"),
        (world.event(11, kind="enter"), "invalid_event"),
        (world.event(12, event_id="short"), "invalid_event"),
        (world.event(13, scanned_at=1.5), "invalid_event"),
        (world.event(14, scanned_at="2026-11-25T10:00:00"), "invalid_event"),
        (world.event(15, device_id=["x"]), "invalid_event"),
        ({k2: v for k2, v in world.event(16).items() if k2 != "person_code"}, "invalid_event"),
        ("not an object", "invalid_event"),
        (world.event(18, scanned_at="2026-11-25T10:00:00+07:00", device_id="scanner-7"), None),
        (world.event(19, scanned_at=now_ms + 4 * 60_000), None),  # within the 5 min skew
        (world.event(20), None),
    ]
    # Event 18's fixed time must sit inside the late window for this to be a good event.
    if now_ms - 1795575600000 > 7 * 86_400_000:
        cases[17] = (world.event(18, device_id="scanner-7"), None)
    resp = await world.post([c for c, _ in cases])
    assert resp.status == 200
    body = await resp.json()
    good = [c for c, reason in cases if reason is None]
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (
        len(good),
        0,
        len(cases) - len(good),
    )
    for (event, reason), result in zip(cases, body["results"], strict=True):
        if reason is None:
            assert result["status"] == "accepted", result
        else:
            assert result["status"] == "rejected"
            assert result["reason"] == reason, (event, result)
            assert isinstance(result["detail"], str) and result["detail"]
    # A detail says which field was wrong.
    assert body["results"][1]["detail"].startswith("venue_code")
    assert body["results"][6]["detail"].startswith("person_code")
    assert body["results"][11]["detail"].startswith("event_id")
    stored = await world.stored()
    assert sorted(e.event_id for e in stored) == sorted(c["event_id"] for c in good)


async def test_codes_of_app_a_posted_with_app_b_token_are_wrong_app(world: World) -> None:
    body = await (await world.post([world.event(1, app="vhd")], app="bluezone")).json()
    assert body["results"][0]["reason"] == "wrong_app"
    assert await world.stored() == []


@pytest.mark.parametrize(
    ("headers", "data", "status", "error"),
    [
        ({}, b'{"events": []}', 401, "unauthorized"),
        ({"Authorization": "Bearer sga_nope"}, b'{"events": []}', 401, "unauthorized"),
        ({"Authorization": "Basic abc"}, b'{"events": []}', 401, "unauthorized"),
        ("auth", b'{"events": [', 400, "malformed_json"),
        ("auth", b"\xff\xfe", 400, "malformed_json"),
        ("auth", b"[]", 400, "invalid_request"),
        ("auth", b'{"events": {}}', 400, "invalid_request"),
        ("auth", b'{"events": []}', 400, "invalid_request"),
        ("auth", b'{"nope": 1}', 400, "invalid_request"),
    ],
)
async def test_whole_request_errors(
    world: World, headers: Any, data: bytes, status: int, error: str
) -> None:
    h = world.auth() if headers == "auth" else headers
    resp = await world.client.post(
        "/v1/scans", data=data, headers={**h, "Content-Type": "application/json"}
    )
    assert resp.status == status
    body = await resp.json()
    assert body["error"] == error and body["detail"]


async def test_wrong_content_type_is_415(world: World) -> None:
    resp = await world.client.post(
        "/v1/scans", data=b'{"events": []}', headers={**world.auth(), "Content-Type": "text/plain"}
    )
    assert resp.status == 415
    assert (await resp.json())["error"] == "unsupported_media_type"


async def test_oversize_body_and_too_many_events_are_413(world: World) -> None:
    big = b'{"events": ["' + b"x" * (1024 * 1024) + b'"]}'
    resp = await world.client.post(
        "/v1/scans",
        data=io.BytesIO(big),
        headers={**world.auth(), "Content-Type": "application/json"},
    )
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"
    resp = await world.post([{"event_id": f"E{i:08d}"} for i in range(501)])
    assert resp.status == 413
    assert "500" in (await resp.json())["detail"]
    assert await world.stored() == []


async def test_rate_limit_answers_429_with_retry_after(make_world: WorldFactory) -> None:
    world: World = await make_world(rate_limit=10)
    # The burst allows one full batch; what follows within the second is over the rate.
    first = await world.post([world.event(i) for i in range(500)])
    assert first.status == 200
    resp = await world.post([world.event(1000 + i) for i in range(20)])
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"] == "rate_limited"
    # Another app has its own budget.
    assert (await world.post([world.event(5000, app="bluezone")], app="bluezone")).status == 200


async def test_backlog_over_high_water_is_503_and_nothing_is_stored(
    make_world: WorldFactory,
) -> None:
    world: World = await make_world(backlog_high_water=5)
    assert (await world.post([world.event(i) for i in range(5)])).status == 200
    resp = await world.post([world.event(100)])
    assert resp.status == 503
    assert resp.headers["Retry-After"]
    assert (await resp.json())["error"] == "backlog_full"
    assert len(await world.stored()) == 5
    metrics = await (await world.client.get("/metrics")).text()
    assert "scangate_backpressure_rejections_total 1.0" in metrics


async def test_redis_stopped_is_503_then_used_again_without_a_restart(
    make_world: WorldFactory, private_redis: Any
) -> None:
    server = private_redis("valkey", appendonly=True)
    world: World = await make_world(url=server.url)
    assert (await world.post([world.event(1)])).status == 200
    assert (await world.client.get("/readyz")).status == 200

    server.stop()
    resp = await world.post([world.event(2)])
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"] == "unavailable"
    assert (await world.client.get("/readyz")).status == 503

    server.start()
    resp = await world.post([world.event(2), world.event(1)])
    assert resp.status == 200
    body = await resp.json()
    # Event 1 survived the restart (append-only file) and is still remembered.
    assert [r["status"] for r in body["results"]] == ["accepted", "duplicate"]
    assert (await world.client.get("/readyz")).status == 200
    metrics = await (await world.client.get("/metrics")).text()
    assert "scangate_redis_errors_total" in metrics


async def test_health_readiness_and_metrics(world: World) -> None:
    assert (await world.client.get("/healthz")).status == 200
    assert (await world.client.get("/readyz")).status == 200
    await world.post([world.event(1), world.event(2, venue_code="VHD:X")])
    await world.post([world.event(1)])
    text = await (await world.client.get("/metrics")).text()
    for name in (
        "scangate_http_requests_total",
        "scangate_http_request_duration_seconds_bucket",
        "scangate_scan_events_total",
        "scangate_stream_backlog",
        "scangate_backpressure_rejections_total",
        "scangate_redis_errors_total",
    ):
        assert name in text, name
    assert 'scangate_http_requests_total{route="scans",status="200"} 2.0' in text
    assert (
        'scangate_scan_events_total{app="vhd",kind="checkin",outcome="accepted",reason=""} 1.0'
        in text
    )
    assert (
        'scangate_scan_events_total{app="vhd",kind="checkin",outcome="duplicate",reason=""} 1.0'
        in text
    )
    assert 'outcome="rejected",reason="malformed_code"} 1.0' in text


async def test_unknown_routes_and_methods_answer_json(world: World) -> None:
    resp = await world.client.get("/v1/nope")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
    resp = await world.client.get("/v1/scans")
    assert resp.status == 405
    assert (await resp.json())["error"] == "method_not_allowed"


async def test_a_new_app_added_by_the_cli_is_picked_up(world: World) -> None:
    token = world.keyring.add_app("ncovi").token
    world.tokens["ncovi"] = token
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        resp = await world.post([world.event(1, app="ncovi")], app="ncovi")
        if resp.status == 200:
            break
        await asyncio.sleep(0.2)
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 1


def test_entries_are_compact() -> None:
    # A guard on the stream entry format: one field, a short JSON array.
    from gateway.pipeline.events import ScanEvent, encode_event

    value = encode_event(ScanEvent("vhd", "E" * 16, "checkin", "V1", "P1", 1, 2, None))
    assert orjson.loads(value) == ["vhd", "E" * 16, "i", "V1", "P1", 1, 2, None]


def test_an_encoded_entry_holds_only_its_own_bytes() -> None:
    """Encoded events wait in memory for their group commit: 48 batches of 100 in flight held
    19.6 MB when each kept the 4 KiB buffer orjson wrote it in."""
    import tracemalloc

    from gateway.pipeline.events import ScanEvent, encode_event

    events = [
        ScanEvent("vhd", f"E{i:015d}", "checkin", "V1", "P1", 1, 2, None) for i in range(1000)
    ]
    tracemalloc.start()
    try:
        values = [encode_event(event) for event in events]
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(values) == 1000
    assert held < 1000 * 256  # about 100 bytes each, not 4 KiB


# -- the front door (gateway.http.front_door) -------------------------------------------------
# An exact POST /v1/scans is answered by the front door; with a query string the same request
# goes through the router, the middleware and the prepare signal. Both must answer alike.

ROUTED = "/v1/scans?via=router"
# What may differ between two answers to the same request.
PER_ANSWER_HEADERS = {"date", "content-length", "x-request-id"}


async def _both_ways(
    world: World, monkeypatch: pytest.MonkeyPatch, make: Callable[[str], Any]
) -> tuple[Any, Any]:
    """``make(path)`` posted at the front door and through the router: the two answers,
    after checking that each took the way it should (only a routed answer passes through
    the application's prepare signal, which stamps its headers)."""
    from gateway.http import headers

    routed_answers: list[int] = []
    stamp = headers.stamp_answer

    def counted(response: Any, request_id: str | None) -> None:
        routed_answers.append(response.status)
        stamp(response, request_id)

    monkeypatch.setattr(headers, "stamp_answer", counted)
    direct = await make("/v1/scans")
    assert routed_answers == [], "a request at the front door took the router"
    routed = await make(ROUTED)
    assert routed_answers, "a request with a query string took the front door"
    return direct, routed


async def _alike(direct: Any, routed: Any) -> dict[str, Any]:
    assert direct.status == routed.status
    names = {name.lower() for name in direct.headers} - PER_ANSWER_HEADERS
    assert names == {name.lower() for name in routed.headers} - PER_ANSWER_HEADERS
    for name in names:
        assert direct.headers[name] == routed.headers[name], name
    for answer in (direct, routed):
        assert answer.headers["Server"] == "scangate"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.headers["Content-Type"] == "application/json"
    body: dict[str, Any] = await direct.json()
    # The events of each way have ids of their own, ending in -d and -r.
    unmarked = (await direct.text()).replace('-d"', '"')
    assert unmarked == (await routed.text()).replace('-r"', '"')
    return body


@pytest.mark.parametrize(
    "case",
    ["accepted", "duplicate", "mixed", "no token", "unknown token", "text/plain", "not json",
     "no events", "501 events", "over 1 MiB", "rate limited"],
)  # fmt: skip
async def test_the_front_door_answers_as_the_router_does(
    make_world: WorldFactory, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    world: World = await make_world(rate_limit=1 if case == "rate limited" else 0)
    json_type = {"Content-Type": "application/json"}
    # Each way gets its own events, the same but for their ids (which the answer quotes).
    n = iter(range(0, 10_000, 1000))

    async def make(path: str) -> Any:
        base = next(n)
        events = [world.event(base + i, kind="checkout" if i % 3 else "checkin") for i in range(5)]
        for e in events:
            e["event_id"] = f"EVT-{i_of(e)}-{'r' if path == ROUTED else 'd'}"
        if case == "duplicate":
            await world.client.post(path, json={"events": events[:2]}, headers=world.auth())
        elif case == "mixed":
            events[1]["venue_code"] = "VHD:nope"
            events[3]["scanned_at"] = "yesterday"
        elif case == "rate limited" and path != ROUTED:  # the burst (a full batch) spent
            burst = [world.event(base + 100 + i) for i in range(scans.MAX_EVENTS)]
            spent = await world.client.post(path, json={"events": burst}, headers=world.auth())
            assert spent.status == 200
        payload = {"events": events}
        if case in ("accepted", "duplicate", "mixed", "rate limited"):
            return await world.client.post(path, json=payload, headers=world.auth())
        if case == "no token":
            return await world.client.post(path, json=payload)
        if case == "unknown token":
            return await world.client.post(
                path, json=payload, headers={"Authorization": "Bearer x"}
            )
        if case == "text/plain":
            text = {**world.auth(), "Content-Type": "text/plain"}
            return await world.client.post(path, data=orjson.dumps(payload), headers=text)
        if case == "not json":
            return await world.client.post(path, data=b'{"events": [',
                                            headers={**world.auth(), **json_type})  # fmt: skip
        if case == "no events":
            return await world.client.post(path, json={"events": []}, headers=world.auth())
        if case == "501 events":
            return await world.client.post(path, json={"events": [{}] * 501}, headers=world.auth())
        assert case == "over 1 MiB"
        big = b'{"events": ["' + b"x" * (1024 * 1024) + b'"]}'
        return await world.client.post(path, data=io.BytesIO(big),
                                        headers={**world.auth(), **json_type})  # fmt: skip

    def i_of(event: dict[str, Any]) -> str:
        return str(event["event_id"]).removeprefix("EVT-")[-3:]

    direct, routed = await _both_ways(world, monkeypatch, make)
    body = await _alike(direct, routed)
    expected = {
        "accepted": (200, None), "duplicate": (200, None), "mixed": (200, None),
        "no token": (401, "unauthorized"), "unknown token": (401, "unauthorized"),
        "text/plain": (415, "unsupported_media_type"), "not json": (400, "malformed_json"),
        "no events": (400, "invalid_request"), "501 events": (413, "payload_too_large"),
        "over 1 MiB": (413, "payload_too_large"), "rate limited": (429, "rate_limited"),
    }[case]  # fmt: skip
    assert (direct.status, body.get("error")) == expected
    if case == "duplicate":
        assert (body["accepted"], body["duplicates"]) == (3, 2)
    if case == "mixed":
        assert [r["status"] for r in body["results"]].count("rejected") == 2
    if case == "rate limited":
        assert direct.headers["Retry-After"] == routed.headers["Retry-After"]


async def test_the_front_door_keeps_the_request_id_metrics_and_access_log(
    make_world: WorldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.http.access import AccessLog

    world: World = await make_world(access_log=True)
    world.app[METRICS].publish()
    before = await (await world.client.get("/metrics")).text()
    logged: list[tuple[str, str, int]] = []
    monkeypatch.setattr(
        AccessLog, "log", lambda self, request, response, time: logged.append(
            (request.get(ROUTE), request.get(CALLER_APP), response.status)
        ),
    )  # fmt: skip

    async def make(path: str) -> Any:
        sent = "trace-1.2:3" if path == ROUTED else "trace-4.5:6"
        ok = await world.client.post(
            path, json={"events": [world.event(len(path))]},
            headers={**world.auth(), "X-Request-Id": sent},
        )  # fmt: skip
        assert ok.headers["X-Request-Id"] == sent
        # An id that is not sane is replaced, on an error answer too.
        refused = await world.client.post(
            path, json={"events": []}, headers={"X-Request-Id": "<script>"}
        )
        assert refused.status == 401
        assert re.fullmatch(r"[0-9a-f]{16}", refused.headers["X-Request-Id"])
        return ok

    await _both_ways(world, monkeypatch, make)
    world.app[METRICS].publish()
    after = await (await world.client.get("/metrics")).text()

    def count(text: str, status: str) -> float:
        line = rf'scangate_http_requests_total\{{route="scans",status="{status}"\}} (\S+)'
        found = re.search(line, text)
        return float(found.group(1)) if found else 0.0

    assert count(after, "200") - count(before, "200") == 2
    assert count(after, "401") - count(before, "401") == 2
    assert logged.count(("/v1/scans", "vhd", 200)) == 2
    assert logged.count(("/v1/scans", None, 401)) == 2


async def test_an_unexpected_failure_is_a_500_that_tells_nothing_on_both_ways(
    make_world: WorldFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the intake: both ways answer the same JSON 500 with every header, the
    request id included, and log the traceback under that id; the answer names nothing
    of what failed."""

    async def broken(self: Any, request: web.Request) -> bytes:
        raise RuntimeError("secret detail of the failure")

    # Before the gateway starts: the front door binds the intake's method once.
    monkeypatch.setattr(scans.ScanIntake, "take", broken)
    world: World = await make_world()
    sent = iter(["fail-front-1", "fail-routed-2"])

    async def make(path: str) -> Any:
        answer = await world.client.post(
            path, json={"events": [world.event(1)]},
            headers={**world.auth(), "X-Request-Id": next(sent)},
        )  # fmt: skip
        return answer

    caplog.handler.addFilter(RequestIdStamp())  # as the gateway's own log handler has it
    with caplog.at_level("ERROR", logger="gateway.http.front_door"):
        direct, routed = await _both_ways(world, monkeypatch, make)
    body = await _alike(direct, routed)  # the same status, headers and body both ways
    assert direct.status == 500 and body["error"] == "internal_error"
    for answer, request_id in ((direct, "fail-front-1"), (routed, "fail-routed-2")):
        assert answer.headers["X-Request-Id"] == request_id
        text = await answer.text()
        assert orjson.loads(text)["error"] == "internal_error"
        assert "secret" not in text and "RuntimeError" not in text
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 2
    assert all("secret detail" in str(r.exc_info[1]) for r in failures if r.exc_info)
    assert [getattr(r, "request_id", None) for r in failures] == ["fail-front-1", "fail-routed-2"]


async def test_expect_100_continue_and_other_methods_take_the_router(world: World) -> None:
    resp = await world.client.post(
        "/v1/scans", json={"events": [world.event(7)]}, headers=world.auth(), expect100=True
    )
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 1
    for method in ("GET", "PUT", "DELETE"):
        resp = await world.client.request(method, "/v1/scans", headers=world.auth())
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"] == "method_not_allowed"


async def test_a_body_that_arrives_in_pieces_is_read_whole(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunked, in pieces 10 ms apart: the handler starts before the body has arrived, so
    # it must take the awaited read (read_json), not the body as it lies.
    read_awaited: list[int] = []
    json_awaited = scans.json_awaited

    async def counted(request: Any) -> Any:
        read_awaited.append(1)
        return await json_awaited(request)

    monkeypatch.setattr(scans, "json_awaited", counted)

    def pieces(body: bytes, size: int) -> Any:
        async def chunks() -> Any:
            for start in range(0, len(body), size):
                yield body[start : start + size]
                await asyncio.sleep(0.01)

        return chunks()

    json_type = {**world.auth(), "Content-Type": "application/json"}
    body = orjson.dumps({"events": [world.event(i) for i in range(3)]})
    resp = await world.client.post("/v1/scans", data=pieces(body, 100), headers=json_type)
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 3
    assert read_awaited == [1]
    # Chunked again, no Content-Length to refuse it early: over 1 MiB is refused as read.
    big = b'{"events": ["' + b"x" * (1024 * 1024) + b'"]}'
    resp = await world.client.post("/v1/scans", data=pieces(big, 64 * 1024), headers=json_type)
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"
    assert len(await world.stored()) == 3


def test_the_all_accepted_template_is_the_json_of_the_general_answer() -> None:
    from gateway.http.scans import _all_accepted, _answer
    from gateway.metrics import Metrics
    from gateway.pipeline.events import ScanEvent

    for n in (1, 2, 100, 500):
        events = [
            ScanEvent("vhd", f"Ev_-{i:06d}" + "x" * (i % 50), "checkin" if i % 4 else "checkout",
                      "V1", "P1", 1, 2, None)
            for i in range(n)
        ]  # fmt: skip
        template, general = Metrics(), Metrics()
        body = _all_accepted("vhd", events, template)  # type: ignore[arg-type]
        assert orjson.loads(body) == orjson.loads(_answer("vhd", events, [True] * n, general))  # type: ignore[arg-type]
        assert body == orjson.dumps(orjson.loads(body))  # compact, as orjson writes it
        assert template._events == general._events


async def _raw_exchange(world: World, requests: list[bytes], answers: int) -> list[bytes]:
    """Send raw requests on one connection (pipelined) and read ``answers`` answers whole,
    or whatever came before the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", world.client.server.port)
    try:
        writer.write(b"".join(requests))
        got: list[bytes] = []
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            got.append(head + await asyncio.wait_for(reader.readexactly(length), 5))
        return got
    finally:
        writer.close()


def _raw_scan(world: World, path: str, n: int, *, version: str = "1.1", extra: str = "") -> bytes:
    body = orjson.dumps({"events": [world.event(n)]})
    return (
        f"POST {path} HTTP/{version}\r\nHost: x\r\nAuthorization: Bearer {world.tokens['vhd']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}"
        f"X-Request-Id: id-{n}\r\n\r\n"
    ).encode() + body


def _watch_scan_answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """How each ScanAnswer went out from now on: "template" (one write, aiohttp's writer
    never used) or "aiohttp" (its own writing)."""
    from gateway.http.front_door import ScanAnswer

    ways: list[str] = []
    prepare = ScanAnswer.prepare

    async def watched(self: ScanAnswer, request: Any) -> Any:
        writer = await prepare(self, request)
        ways.append("template" if writer is None and self._eof_sent else "aiohttp")
        return writer

    monkeypatch.setattr(ScanAnswer, "prepare", watched)
    return ways


def _head_lines(answer: bytes) -> list[bytes]:
    """The answer's status line, then its header lines in order of name (the order of
    headers means nothing in HTTP), the values that differ per answer blanked."""
    status, *lines = answer.split(b"\r\n\r\n")[0].split(b"\r\n")
    blanked = (re.sub(rb"^(Date|Content-Length|X-Request-Id): .*", rb"\1: -", line)
               for line in lines)  # fmt: skip
    return [status, *sorted(blanked)]


async def test_the_written_answer_has_the_head_aiohttp_writes(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pipelined on one keep-alive connection: the front door's written answer, the
    # router's (aiohttp's own writing), then the front door again.
    written = _watch_scan_answers(monkeypatch)
    direct, routed, again = await _raw_exchange(
        world, [_raw_scan(world, "/v1/scans", 1), _raw_scan(world, ROUTED, 2),
                _raw_scan(world, "/v1/scans", 3)], 3,
    )  # fmt: skip
    assert _head_lines(direct) == _head_lines(routed) == _head_lines(again)
    assert direct.startswith(b"HTTP/1.1 200 OK\r\n")
    # The two front-door answers went out through the template, in one write each.
    assert written == ["template", "template"]
    assert b"\r\nX-Request-Id: id-1\r\n" in direct and b"\r\nX-Request-Id: id-3\r\n" in again
    for answer, event_id in ((direct, "EVT-00000001"), (again, "EVT-00000003")):
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["results"] == [
            {"event_id": event_id, "status": "accepted"}
        ]
    assert len(await world.stored()) == 3


@pytest.mark.parametrize(
    ("version", "extra", "closes"),
    [("1.0", "", True), ("1.0", "Connection: keep-alive\r\n", False),
     ("1.1", "Connection: close\r\n", True)],
)  # fmt: skip
async def test_other_connections_get_aiohttp_s_own_answer(
    world: World, monkeypatch: pytest.MonkeyPatch, version: str, extra: str, closes: bool
) -> None:
    written = _watch_scan_answers(monkeypatch)
    request = _raw_scan(world, "/v1/scans", 5, version=version, extra=extra)
    reader, writer = await asyncio.open_connection("127.0.0.1", world.client.server.port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(f"HTTP/{version} 200 OK\r\n".encode())
        assert b"\r\nCache-Control: no-store\r\n" in head and b"\r\nX-Request-Id: id-5\r\n" in head
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert orjson.loads(await reader.readexactly(length))["accepted"] == 1
        assert written == ["aiohttp"]
        if closes:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
            if version == "1.1":
                assert b"\r\nConnection: close\r\n" in head
        else:
            assert b"\r\nConnection: keep-alive\r\n" in head
    finally:
        writer.close()


def test_a_request_id_that_could_break_a_head_is_replaced() -> None:
    # The written answer puts the id into its head unescaped (gateway.http.front_door).
    for offered in ("a\r\nSet-Cookie: x=1", "a\nb", "a\rb", "caf\u00e9", "a b", "", "x" * 129):
        kept = bind_request_id(offered)
        assert kept != offered and re.fullmatch(r"[0-9a-f]{16}", kept), offered
    assert bind_request_id("trace-1.2:3_x") == "trace-1.2:3_x"


async def test_a_client_that_is_not_reading_gets_aiohttp_s_writing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection whose writing is paused (its client stopped reading, the transport's
    # buffer is full): the answer waits for aiohttp's drain instead of piling up.
    from aiohttp.web_protocol import RequestHandler

    written = _watch_scan_answers(monkeypatch)
    monkeypatch.setattr(RequestHandler, "writing_paused", property(lambda self: True))
    resp = await world.post([world.event(21)])
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 1
    assert resp.headers["Cache-Control"] == "no-store"
    assert written == ["aiohttp"]


def test_a_batch_s_events_are_encoded_as_lines_that_hold_only_their_own_bytes() -> None:
    """A batch's events of one shard go to Redis as one value, one event per line: each line
    decodes as ``encode_event``'s value does, and the value keeps none of orjson's buffers."""
    import tracemalloc

    from gateway.pipeline.events import ScanEvent, decode_event, encode_event, encode_lines

    events = [
        ScanEvent("vhd", f"E{i:015d}", "checkout", "V1", "P\n1", 1, 2, "dev") for i in range(1000)
    ]
    tracemalloc.start()
    try:
        lines = encode_lines(events)
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1000 * 256
    assert lines.split(b"\n") == [encode_event(event) for event in events]
    assert [decode_event(line) for line in lines.split(b"\n")] == events
