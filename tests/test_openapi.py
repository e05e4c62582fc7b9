"""The OpenAPI document: equal to the router, a valid OpenAPI 3.1 document, served at
``/openapi.json``, and true of a live gateway (schemathesis, bounded and deterministic)."""

from __future__ import annotations

import asyncio
import base64
import re
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import hypothesis
import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import Settings
from gateway.http.app import create_app
from gateway.http.keys import REDIS, SETTINGS, STORAGE
from gateway.http.openapi import OPENAPI_BODY, TAGS, openapi_document
from gateway.http.people import ANSWER_KEYS
from gateway.http.protocol import ConnectionLimits, GuardedRunner
from gateway.http.web import is_web_route
from gateway.metrics import FlusherMetrics
from gateway.pipeline.flusher import Flusher
from signing import Keyring
from storage.times import format_time_ms

from .servers import free_loopback_port

T = TypeVar("T")

HTTP_METHODS: Final = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PHONE: Final = "0912345678"
OTHER_PHONE: Final = "0387654321"
ID_CARD: Final = "079200001234||Trần Văn Bình|02031985|Nam|3 Hai Bà Trưng, Hà Nội|01012021"
# Per operation and generation mode (positive, negative), plus a few with real ids.
MAX_EXAMPLES: Final = 20
MAX_EXAMPLES_REAL_IDS: Final = 5
# The answer is one the document lists, in status, content type, headers and body.
CONFORMANCE: Final = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CALL_TIMEOUT_S: Final = 10.0
LOOP_TIMEOUT_S: Final = 30.0


def _settings(
    data_dir: Path, master_key: bytes, redis_url: str | None = None, **over: Any
) -> Settings:
    return Settings(
        data_dir=data_dir,
        redis_url=redis_url,
        master_key=base64.b64encode(master_key).decode(),
        shards=4,
        flush_max_age_s=0.01,
        **over,
    )


def _deref(value: Any, document: dict[str, Any]) -> Any:
    """What a ``#/components/...`` reference names (followed until it is no reference)."""
    while isinstance(value, dict) and "$ref" in value:
        ref: str = value["$ref"]
        assert ref.startswith("#/components/"), ref
        value = document
        for key in ref.removeprefix("#/").split("/"):
            value = value[key]
    return value


def _parameters(operation: dict[str, Any], document: dict[str, Any]) -> list[dict[str, Any]]:
    return [_deref(p, document) for p in operation.get("parameters", [])]


# Where an error answer's description names its codes (gateway.http.openapi.schemas._error).
ERROR_CODES: Final = re.compile(r"\. error: ((?:`\w+`(?:, )?)+)$")


def _error_codes(description: str) -> set[str]:
    found = ERROR_CODES.search(description)
    assert found is not None, description
    return set(re.findall(r"`(\w+)`", found.group(1)))


def error_code_conformance(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    """An error answer's code is one its operation's description of that status names: the
    document shares one Error schema, so the schema checks cannot tell."""
    if response.status_code < 400:
        return
    operation = openapi_document()["paths"][case.operation.path][case.operation.method.lower()]
    documented = operation["responses"].get(str(response.status_code))
    if documented is None:
        return  # status_code_conformance says so
    code = response.json().get("error")
    codes = _error_codes(documented["description"])
    assert code in codes, f"{response.status_code} {code!r}: the document names {sorted(codes)}"


CHECKS: Final = [not_a_server_error, *CONFORMANCE, error_code_conformance]


# -- the document and the router ---------------------------------------------------------------


@pytest.mark.parametrize("metrics_port", [0, 9464], ids=["metrics-here", "metrics-elsewhere"])
def test_the_document_has_every_route_and_no_other(
    tmp_path: Path, master_key: bytes, metrics_port: int
) -> None:
    """The document served is of this application's routes: with SCANGATE_METRICS_PORT,
    /metrics is on a listener of its own and not in it."""
    app = create_app(_settings(tmp_path, master_key, metrics_port=metrics_port))
    # The web pages and their same-origin endpoints are for browsers, not in the document.
    registered = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and not is_web_route(route.resource.canonical)
    }
    documented = {
        (method.upper(), path)
        for path, item in orjson.loads(app[OPENAPI_BODY])["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert documented == registered
    assert (("GET", "/metrics") in documented) == (not metrics_port)


def test_every_path_parameter_is_declared_and_every_declared_one_is_in_the_path() -> None:
    document = openapi_document()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            parameters = _parameters(operation, document)
            declared = {p["name"] for p in parameters if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)


def test_every_operation_has_one_tag_and_every_tag_a_description() -> None:
    document = openapi_document()
    declared = [tag["name"] for tag in TAGS]
    assert document["tags"] == TAGS and len(set(declared)) == len(declared)
    assert all(tag["description"] for tag in TAGS)
    used = set()
    operation_ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert len(operation["tags"]) == 1 and operation["tags"][0] in declared, (method, path)
            used.add(operation["tags"][0])
            operation_ids.append(operation["operationId"])
    assert used == set(declared)
    assert all(re.fullmatch(r"[a-z][A-Za-z]+", o) for o in operation_ids), operation_ids
    assert len(set(operation_ids)) == len(operation_ids)


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi_document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    # schemathesis loads it and finds every operation.
    schema = schemathesis.openapi.from_dict(doc, config=schemathesis.Config())
    assert [result.ok().label for result in schema.get_all_operations()]


def test_every_json_body_and_error_answer_is_described() -> None:
    doc = openapi_document()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert operation["operationId"], (method, path)
            for status, answer in operation["responses"].items():
                response = _deref(answer, doc)
                if int(status) >= 400:
                    # One Error schema for all, by reference: one model in a generated client.
                    assert answer["$ref"].startswith("#/components/responses/"), (path, status)
                    assert list(response["content"]) == ["application/json"], (path, status)
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, status)
                    assert _error_codes(answer["description"]), (path, status)
                if status in ("429", "503"):
                    assert "Retry-After" in response["headers"], (path, status)
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= set(operation["responses"]), (method, path)
            if operation["security"]:
                assert "401" in operation["responses"], (method, path)


# -- a live gateway --------------------------------------------------------------------------


class LiveGateway:
    """The gateway on a real TCP port of 127.0.0.1, on an event loop of its own thread, so
    synchronous clients (requests, schemathesis) can call it from the test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.runner: GuardedRunner | None = None
        self.base_url = ""

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(LOOP_TIMEOUT_S)

    def __enter__(self) -> LiveGateway:
        self.thread.start()
        try:
            self.base_url = self.run(self._start())
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.runner is not None:
                self.run(self.runner.cleanup())
        finally:
            self._close()

    async def _start(self) -> str:
        # As ``scangate serve`` runs it: a POST /v1/scans enters by the front door
        # (gateway.http.front_door), everything else by the router.
        self.runner = GuardedRunner(create_app(self.settings), ConnectionLimits.of(self.settings))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def _close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(LOOP_TIMEOUT_S)
        self.loop.close()

    @property
    def app(self) -> web.Application:
        assert self.runner is not None
        return self.runner.app


class Desk:
    """An HTTP client of a live gateway, as the "vhd" app."""

    def __init__(self, live: LiveGateway, app_token: str) -> None:
        self.live = live
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {app_token}"

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """The JSON answer of a call that must succeed."""
        response = self.http.request(
            method, self.live.base_url + path, timeout=CALL_TIMEOUT_S, **kw
        )
        assert response.status_code < 300, (method, path, response.status_code, response.text)
        return response.json()

    def session(self, phone: str) -> str:
        """A phone session, through the OTP flow: the code is read from the log sender's file."""
        log = self.live.settings.data_dir / "sms.log"
        before = len(log.read_bytes().splitlines()) if log.exists() else 0
        self.call("POST", "/v1/otp", json={"phone": phone})
        for _ in range(500):
            lines = log.read_bytes().splitlines() if log.exists() else []
            if len(lines) > before:
                codes = re.findall(r"\b\d{6}\b", orjson.loads(lines[-1])["text"])
                assert len(codes) == 1, lines[-1]
                verified = self.call(
                    "POST", "/v1/otp/verify", json={"phone": phone, "code": codes[0]}
                )
                session: str = verified["session"]
                return session
            time.sleep(0.01)
        raise AssertionError("no SMS was written")

    def venue(self, name: str) -> dict[str, str]:
        venue: dict[str, str] = self.call(
            "POST",
            "/v1/venues",
            json={
                "name": name,
                "phone": "098 382 9927",
                "address": "Lê Lợi, Quận 1",
                "province": "Hồ Chí Minh",
                "kind": "market",
            },
        )
        return venue

    def declare(self, session: str, national_id: str, full_name: str) -> str:
        created = self.call(
            "POST",
            "/v1/declarations",
            headers={"X-Session": session},
            json=declaration(national_id, full_name),
        )
        person_id: str = created["person_id"]
        return person_id


def declaration(national_id: str, full_name: str, phone: str = PHONE) -> dict[str, Any]:
    return {
        "full_name": full_name,
        "national_id": national_id,
        "birth_year": 1990,
        "gender": "female",
        "phone": phone,
        "address": "12 Lê Lợi, Quận 1",
        "province": "Hồ Chí Minh",
        "answers": dict.fromkeys(ANSWER_KEYS, False),
    }


@dataclass
class World:
    """One of each credential the API takes, and things that exist: a venue with a staff
    token, a person declared from PHONE's session."""

    app_token: str
    admin_token: str
    staff_token: str
    session: str
    venue_id: str
    venue_code: str
    token_id: str
    person_id: str

    @classmethod
    def make(cls, live: LiveGateway, desk: Desk, app_token: str) -> World:
        venue = desk.venue("Chợ Bến Thành")
        staff = desk.call("POST", f"/v1/venues/{venue['venue_id']}/staff-tokens")
        session = desk.session(PHONE)
        return cls(
            app_token=app_token,
            admin_token=live.run(live.app[STORAGE].add_admin("openapi")),
            staff_token=staff["token"],
            session=session,
            venue_id=venue["venue_id"],
            venue_code=venue["code"],
            token_id=staff["token_id"],
            person_id=desk.declare(session, "079123456789", "Nguyễn Thị Hồng Nhung"),
        )

    def schema(self) -> Any:
        """The document, loaded by schemathesis with these credentials for every scheme."""
        config = schemathesis.Config.from_dict(
            {
                "seed": 20261126,
                "generation": {
                    "max-examples": MAX_EXAMPLES,
                    "deterministic": True,
                    "database": "none",
                },
                "auth": {
                    "openapi": {
                        "appToken": {"bearer": self.app_token},
                        "adminToken": {"bearer": self.admin_token},
                        "staffToken": {"bearer": self.staff_token},
                        "session": {"api_key": self.session},
                    }
                },
            }
        )
        return schemathesis.openapi.from_dict(openapi_document(), config=config)


@pytest.fixture
def live(
    tmp_path: Path, keyring: Keyring, master_key: bytes, redis_url: str
) -> Iterator[tuple[LiveGateway, Desk, World]]:
    """A live gateway, a client of its app ("vhd"), and what exists in it."""
    app_token = keyring.add_app("vhd", name="Vietnam Health Declaration").token
    with LiveGateway(_settings(tmp_path, master_key, redis_url)) as gateway:
        desk = Desk(gateway, app_token)
        try:
            yield gateway, desk, World.make(gateway, desk, app_token)
        finally:
            desk.http.close()


# Against one server kind: the document does not depend on it, and the run is the slow part.
ONE_SERVER: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)


@ONE_SERVER
def test_openapi_json_serves_the_document(live: tuple[LiveGateway, Desk, World]) -> None:
    gateway, _, _ = live
    response = requests.get(gateway.base_url + "/openapi.json", timeout=CALL_TIMEOUT_S)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.content == orjson.dumps(openapi_document())


# -- schemathesis ----------------------------------------------------------------------------


@dataclass
class Findings:
    """What a run saw: answers per operation, and each distinct failure once."""

    statuses: Counter[tuple[str, int]]
    failures: dict[str, str]

    def record(self, case: schemathesis.Case, response: Any) -> None:
        label = case.operation.label
        self.statuses[(label, response.status_code)] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            for failure in group.exceptions:
                self.failures.setdefault(f"{label}: {failure.title}", str(group))


def _exercise(
    operation: Any,
    mode: schemathesis.GenerationMode,
    max_examples: int,
    base_url: str,
    http: requests.Session,
    findings: Findings,
    **fixed: Any,
) -> None:
    """Call ``operation`` with up to ``max_examples`` generated cases; record every answer."""
    settings = hypothesis.settings(
        operation.schema.config.get_hypothesis_settings(operation=operation),
        max_examples=max_examples,
        suppress_health_check=list(hypothesis.HealthCheck),
        # Failures are collected, not raised: nothing to shrink.
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )

    @settings
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode, **fixed))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=http, timeout=CALL_TIMEOUT_S)
        findings.record(case, response)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing of the operation can be made invalid (no parameters, no body, no auth).
        if mode is not schemathesis.GenerationMode.NEGATIVE:
            raise


@ONE_SERVER
def test_a_live_gateway_answers_as_the_document_says(
    live: tuple[LiveGateway, Desk, World],
) -> None:
    """Generated requests, valid and not, to every operation: no 5xx, and every answer's
    status, content type, headers and body are ones the document lists."""
    gateway, _, world = live
    real_ids = {
        "venue_id": world.venue_id,
        "person_id": world.person_id,
        "token_id": world.token_id,
    }
    findings = Findings(Counter(), {})
    labels = []
    with requests.Session() as http:
        for result in world.schema().get_all_operations():
            operation = result.ok()
            labels.append(operation.label)
            for mode in (
                schemathesis.GenerationMode.POSITIVE,
                schemathesis.GenerationMode.NEGATIVE,
            ):
                _exercise(operation, mode, MAX_EXAMPLES, gateway.base_url, http, findings)
            ids = {p.name for p in operation.path_parameters} & real_ids.keys()
            if ids:
                # Generated ids name nothing: with real ones the run reaches the 2xx answers.
                _exercise(
                    operation,
                    schemathesis.GenerationMode.POSITIVE,
                    MAX_EXAMPLES_REAL_IDS,
                    gateway.base_url,
                    http,
                    findings,
                    path_parameters={name: real_ids[name] for name in ids},
                )
    exercised = {label for label, _ in findings.statuses}
    assert exercised == set(labels), f"never called: {set(labels) - exercised}"
    assert not findings.failures, "\n\n".join(findings.failures.values())


# Values at and past the edges, put in place of each field of a valid request in turn. The
# generated ones seldom reach these: days at the ends of the calendar, numbers past 64 bits,
# and code points that are unassigned (Cn), private (Co), invisible (Cf), or controls.
EXTREME_TEXT: Final = [
    "9999-12-31",
    "0001-01-01",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59",
    "2026-02-30",
    "9" * 400,
    "-1",
    "1e400",
    "\u0378\u0379",
    "\U0010ffff",
    "\ue000",
    "\u202e\u200b",
    "\x00\x1b",
    "x" * 70_000,
]
EXTREME_NUMBERS: Final = [2**63, -(2**63) - 1, 10**30, -1, 0, 1e308, -1e308, 2**53 + 1]


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every scalar of a JSON value, with the keys and indexes that lead to it."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, (*path, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _leaves(inner, (*path, i))
    else:
        yield path, value


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def _extremes_for(leaf: Any) -> list[Any]:
    if isinstance(leaf, bool):
        return [*EXTREME_NUMBERS[:2], "\u0378"]
    if isinstance(leaf, int | float):
        return [*EXTREME_NUMBERS, "9999-12-31"]
    return [*EXTREME_TEXT, *EXTREME_NUMBERS[:3]]


def _one_valid_case(operation: Any, **fixed: Any) -> Any:
    """One generated valid request of ``operation`` (deterministic: the schema's seed)."""
    drawn: list[Any] = []

    @hypothesis.settings(
        operation.schema.config.get_hypothesis_settings(operation=operation),
        max_examples=1,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    @hypothesis.given(
        case=operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE, **fixed)
    )
    def draw(case: Any) -> None:
        drawn.append(case)

    draw()
    return drawn[0]


def _members(schema: Any, document: dict[str, Any]) -> dict[str, Any]:
    """The members an object schema describes, those of each of its alternatives too."""
    schema = _deref(schema, document)
    members = dict(schema.get("properties", {}))
    for alternative in schema.get("oneOf", []) + schema.get("anyOf", []):
        members.update(_members(alternative, document))
    return members


def _variants(operation: Any, case: Any, document: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(where, what) for each request to send: ``case`` with one field (or every date
    field at once) set to one extreme value. Fields the valid case left out (optional
    parameters and body members) are set too."""
    raw = operation.definition.raw
    query = dict(case.query or {})
    parameters = _parameters(raw, document)
    names = [p["name"] for p in parameters if p["in"] == "query"]
    dates = [
        p["name"]
        for p in parameters
        if p["in"] == "query" and p.get("schema", {}).get("format") in ("date", "date-time")
    ]
    for name in names:
        for extreme in [*EXTREME_TEXT, *EXTREME_NUMBERS[:3]]:
            yield f"query {name}", {"query": {**query, name: extreme}}
    if len(dates) > 1:
        for extreme in EXTREME_TEXT[:5]:
            yield f"query {dates}", {"query": {**query, **dict.fromkeys(dates, extreme)}}
    for name in case.path_parameters or {}:
        for extreme in EXTREME_TEXT:
            yield f"path {name}", {"path_parameters": {**case.path_parameters, name: extreme}}
    if not isinstance(case.body, dict):
        return
    content = raw.get("requestBody", {}).get("content", {}).get("application/json", {})
    members = _members(content.get("schema", {}), document)
    for name in members.keys() - case.body.keys():  # optional members left out
        for extreme in [*EXTREME_TEXT, *EXTREME_NUMBERS]:
            yield f"body {name}", {"body": {**case.body, name: extreme}}
    for path, leaf in _leaves(case.body):
        for extreme in _extremes_for(leaf):
            yield f"body {list(path)}", {"body": _replaced(case.body, path, extreme)}


@ONE_SERVER
def test_extreme_days_numbers_and_code_points_in_any_field_are_never_a_server_error(
    live: tuple[LiveGateway, Desk, World],
) -> None:
    """Every operation, from a valid request, each path, query and body field in turn
    set to each extreme value (optional ones too): no 5xx."""
    gateway, _, world = live
    document = openapi_document()
    real_ids = {
        "venue_id": world.venue_id,
        "person_id": world.person_id,
        "token_id": world.token_id,
    }
    failures: dict[str, str] = {}
    sent = 0
    with requests.Session() as http:
        for result in world.schema().get_all_operations():
            operation = result.ok()
            ids = {p.name for p in operation.path_parameters} & real_ids.keys()
            fixed = {"path_parameters": {n: real_ids[n] for n in ids}} if ids else {}
            case = _one_valid_case(operation, **fixed)
            for where, change in _variants(operation, case, document):
                parts = {
                    "path_parameters": case.path_parameters,
                    "query": case.query,
                    "headers": case.headers,
                    "body": case.body,
                    "media_type": case.media_type,
                }
                mutated = operation.Case(**{**parts, **change})
                response = mutated.call(
                    base_url=gateway.base_url, session=http, timeout=CALL_TIMEOUT_S
                )
                sent += 1
                if response.status_code >= 500:
                    value = str(next(iter(change.values())))[:60]
                    failures.setdefault(
                        f"{operation.label} {where}: {value!r}",
                        f"{response.status_code} {response.text[:300]}",
                    )
    print(f"{sent} requests with extreme values")
    assert sent > 1000
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


# -- answers generation rarely reaches -------------------------------------------------------


def _answer(
    schema: Any,
    base_url: str,
    method: str,
    path: str,
    token: str | None,
    *,
    headers: dict[str, str] | None = None,
    checks: list[Any] = CHECKS,
    **case: Any,
) -> tuple[int, Any]:
    """Send one request to a documented operation; the answer must conform to the document."""
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    made = schema[path][method].Case(headers={**sent, **(headers or {})}, **case)
    response = made.call(base_url=base_url, timeout=CALL_TIMEOUT_S)
    made.validate_response(response, checks=checks)
    # schemathesis's response: lowercase header names, a list of values each.
    is_json = response.headers.get("content-type", [""])[0].startswith("application/json")
    return response.status_code, response.json() if is_json else response.content


@ONE_SERVER
def test_success_and_refusal_answers_are_as_documented(
    live: tuple[LiveGateway, Desk, World], keyring: Keyring
) -> None:
    gateway, desk, world = live
    schema = world.schema()
    app = world.app_token

    def answer(method: str, path: str, token: str | None = app, **case: Any) -> tuple[int, Any]:
        return _answer(schema, gateway.base_url, method, path, token, **case)

    now_ms = int(time.time() * 1000) - 1000
    event = {
        "event_id": "EVT-openapi-1",
        "kind": "checkin",
        "venue_code": world.venue_code,
        "person_code": keyring.issue("vhd", "person", "P1", ttl_s=86400),
        "scanned_at": now_ms,
    }
    status, body = answer("POST", "/v1/scans", body={"events": [event]})
    assert (status, body["accepted"]) == (200, 1), body
    status, body = answer("POST", "/v1/scans", body={"events": [event, {"kind": 1}]})
    assert (status, body["duplicates"], body["rejected"]) == (200, 1, 1), body
    status, body = answer("POST", "/v1/scans", body={"events": [event] * 501})
    assert (status, body["error"]) == (413, "payload_too_large")
    big = {"events": [{**event, "device_id": "x" * (1024 * 1024)}]}
    assert answer("POST", "/v1/scans", body=big)[0] == 413
    status, body = answer("POST", "/v1/scans", body="events", media_type="text/plain")
    assert (status, body["error"]) == (415, "unsupported_media_type")
    assert answer("POST", "/v1/scans", token=None, body={"events": [event]})[0] == 401

    # Manual check-ins: by phone, by ID card, and the refusals.
    manual = {"event_id": "MAN-openapi-1", "kind": "checkin", "venue_code": world.venue_code}
    manual["scanned_at"] = now_ms
    status, body = answer("POST", "/v1/scans/manual", body={**manual, "phone": PHONE})
    assert (status, body["status"]) == (200, "accepted") and "person_id" not in body
    stale = {**manual, "event_id": "MAN-openapi-0", "scanned_at": now_ms - 3_600_000}
    status, body = answer("POST", "/v1/scans/manual", body={**stale, "phone": PHONE})
    assert (status, body["status"], body["reason"]) == (200, "rejected", "not_now")
    card = {**manual, "event_id": "MAN-openapi-2", "id_card": ID_CARD}
    status, body = answer("POST", "/v1/scans/manual", token=world.staff_token, body=card)
    assert (status, body["status"]) == (200, "accepted"), body
    status, body = answer("POST", "/v1/scans/manual", body={**manual, "phone": OTHER_PHONE})
    assert (status, body["error"]) == (404, "not_found")
    other_venue = desk.venue("Nhà sách")
    elsewhere = {**manual, "venue_code": other_venue["code"], "phone": PHONE}
    status, body = answer("POST", "/v1/scans/manual", token=world.staff_token, body=elsewhere)
    assert (status, body["error"]) == (403, "forbidden")
    status, body = answer(
        "POST", "/v1/scans/manual", body={**manual, "venue_code": "X:Y", "phone": PHONE}
    )
    assert (status, body["status"], body["reason"]) == (200, "rejected", "malformed_code")

    # Two people declared with one phone: a name is needed.
    desk.declare(world.session, "079123456780", "Nguyễn Văn Hùng")
    status, body = answer("POST", "/v1/scans/manual", body={**manual, "phone": PHONE})
    assert (status, body["error"]) == (409, "ambiguous_person")

    # Declarations and one-time codes.
    status, body = answer(
        "POST",
        "/v1/declarations",
        headers={"X-Session": world.session},
        body=declaration("079123456789", "Nguyễn Thị Hồng Nhung"),
    )
    assert (status, body["person_id"]) == (201, world.person_id)
    other_session = desk.session(OTHER_PHONE)
    status, body = answer(
        "POST",
        "/v1/declarations",
        headers={"X-Session": other_session},
        body=declaration("079123456789", "Nguyễn Thị Hồng Nhung", phone=OTHER_PHONE),
    )
    assert status == 201 and body["person_id"] != world.person_id  # a competing claim
    status, body = answer(
        "POST",
        "/v1/declarations",
        headers={"X-Session": other_session},
        body=declaration("079123456782", "Trần Văn Nam", phone=PHONE),
    )
    assert (status, body["error"], body["field"]) == (400, "invalid_field", "phone")
    status, body = answer("POST", "/v1/declarations", body=declaration("079123456781", "Lê Lan"))
    assert (status, body["error"]) == (401, "unauthorized")
    status, body = answer("POST", "/v1/otp/verify", body={"phone": PHONE, "code": "000000"})
    assert (status, body["error"], body["tries_left"]) == (401, "otp_invalid", 4)
    status, body = answer("POST", "/v1/otp/verify", body={"phone": PHONE, "code": "12"})
    assert (status, body["error"], body["field"]) == (400, "invalid_field", "code")

    # Images and tracing.
    for fmt in ("svg", "png"):
        path = "/v1/people/{person_id}/code.{format}"
        params = {"person_id": world.person_id, "format": fmt}
        status, _ = answer(
            "GET", path, headers={"X-Session": world.session}, path_parameters=params
        )
        assert status == 200
    # P1 met P2, who met P3: contacts at depth 1 and 2, revealed (never declared: null).
    visits = [("P1", 0, 60), ("P2", 10, 70), ("P3", 69, 90)]
    events = [
        {
            "event_id": f"EVT-trace-{person}-{kind}",
            "kind": kind,
            "venue_code": world.venue_code,
            "person_code": keyring.issue("vhd", "person", person, ttl_s=86400),
            "scanned_at": now_ms - (120 - minute) * 60_000,
        }
        for person, start, end in visits
        for kind, minute in (("checkin", start), ("checkout", end))
    ]
    assert answer("POST", "/v1/scans", body={"events": events})[1]["accepted"] == 6
    gateway.run(_flush(gateway.app))
    status, body = answer(
        "GET",
        "/v1/trace/{person_id}",
        token=world.admin_token,
        path_parameters={"person_id": "P1"},
        query={"reveal": 1, "depth": 2, "min_overlap": "1m"},
    )
    assert status == 200
    assert body["next"] is None
    rows = {(row["person_id"], row["depth"], row["full_name"]) for row in body["rows"]}
    assert ("P2", 1, None) in rows and ("P3", 2, None) in rows
    assert all("via" in row for row in body["rows"] if row["depth"] == 2)
    # The door check-ins above began at the very moment traced: no time with P1 yet, though
    # their assumed ends lie hours ahead (issue 19: no exposure in the future).
    assert world.person_id not in {row["person_id"] for row in body["rows"]}
    assert max(row["overlap_end"] for row in body["rows"]) <= format_time_ms(
        int(time.time() * 1000)
    )
    status, body = answer(
        "GET",
        "/v1/trace/{person_id}",
        token=world.admin_token,
        path_parameters={"person_id": world.person_id},
        query={"days": 61},
    )
    assert (status, body["error"]) == (400, "invalid_request")


async def _flush(app: web.Application) -> None:
    """Move everything buffered into storage, as the flusher process does."""
    flusher = Flusher(app[REDIS], app[STORAGE], app[SETTINGS], FlusherMetrics())
    while await flusher.step():
        pass


@ONE_SERVER
def test_a_huge_trace_margin_is_refused_not_a_server_error(
    live: tuple[LiveGateway, Desk, World],
) -> None:
    gateway, _, world = live
    for margin in ("1" + "0" * 400 + "ms", "9999999999999999s", "106751991167d", "25h"):
        status, body = _answer(
            world.schema(),
            gateway.base_url,
            "GET",
            "/v1/trace/{person_id}",
            world.admin_token,
            path_parameters={"person_id": "P1"},
            query={"margin": margin},
        )
        assert (status, body["error"]) == (400, "invalid_request"), margin


def _without_redis(data_dir: Path, master_key: bytes) -> LiveGateway:
    """A gateway whose Redis URL names a port nothing listens on: every Redis call fails."""
    return LiveGateway(_settings(data_dir, master_key, f"redis://127.0.0.1:{free_loopback_port()}"))


def test_with_redis_down_the_answers_are_the_documented_503s(
    tmp_path: Path, keyring: Keyring, master_key: bytes
) -> None:
    app_token = keyring.add_app("vhd").token
    config = schemathesis.Config.from_dict(
        {"auth": {"openapi": {"appToken": {"bearer": app_token}}}}
    )
    schema = schemathesis.openapi.from_dict(openapi_document(), config=config)
    event = {
        "event_id": "EVT-openapi-1",
        "kind": "checkin",
        "venue_code": keyring.issue("vhd", "venue", "V1"),
        "person_code": keyring.issue("vhd", "person", "P1", ttl_s=86400),
        "scanned_at": int(time.time() * 1000) - 1000,
    }
    manual = {k: v for k, v in event.items() if k != "person_code"} | {"id_card": ID_CARD}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/readyz", {}),
        ("POST", "/v1/scans", {"body": {"events": [event]}}),
        ("POST", "/v1/scans/manual", {"body": manual}),
        ("POST", "/v1/otp", {"body": {"phone": PHONE}}),
        ("POST", "/v1/otp/verify", {"body": {"phone": PHONE, "code": "123456"}}),
    ]
    with _without_redis(tmp_path, master_key) as gateway:
        for method, path, case in calls:
            token = None if path == "/readyz" else app_token
            # A 503 is the right answer here: only conformance is checked.
            status, body = _answer(
                schema, gateway.base_url, method, path, token, checks=CONFORMANCE, **case
            )
            assert (status, body["error"]) == (503, "unavailable"), (path, body)


def test_unknown_paths_and_methods_answer_the_error_body(tmp_path: Path, master_key: bytes) -> None:
    """Documented once, in info.description, as they can answer any request."""
    with _without_redis(tmp_path, master_key) as gateway:
        for method, path, status, code in [
            ("GET", "/v1/nowhere", 404, "not_found"),
            ("GET", "/v1/trace/", 404, "not_found"),
            ("PUT", "/healthz", 405, "method_not_allowed"),
            ("GET", "/v1/scans", 405, "method_not_allowed"),
        ]:
            response = requests.request(method, gateway.base_url + path, timeout=CALL_TIMEOUT_S)
            assert response.status_code == status
            assert response.json() == {"error": code, "detail": response.json()["detail"]}
