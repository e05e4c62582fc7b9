"""Log lines (``gateway.logs``): the two formats, the levels, a log call that never raises,
the request id (taken when sane, made otherwise, returned on every answer and carried by
every line logged while its request is handled) and the access log, on a real gateway.
A full ``scangate serve`` is searched for personal data in ``test_logs_served.py``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any, Final

import pytest

from gateway import Settings
from gateway.logs import (
    JsonLines,
    RequestIdStamp,
    StderrLines,
    TextLines,
    bind_request_id,
    configure_logging,
    current_request_id,
    log_access,
)
from signing import Keyring

from .harness import GatewayStarter, GatewayUnderTest
from .test_hostile import parse_responses, read_until_closed

ONE_REDIS: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)
UTC_MS: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
PHONE: Final = "0912345678"


class Lines(logging.Handler):
    """The lines a configured process would write, kept in a list."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.addFilter(RequestIdStamp())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def json_lines(caplog: pytest.LogCaptureFixture) -> Iterator[Lines]:
    """Every record logged during the test, as the JSON format writes it."""
    caplog.set_level(logging.INFO)  # restored after the test
    lines = Lines(JsonLines())
    logging.getLogger().addHandler(lines)
    try:
        yield lines
    finally:
        logging.getLogger().removeHandler(lines)


def record(msg: str, *args: object, **over: Any) -> logging.LogRecord:
    made = logging.LogRecord("gateway.test", logging.WARNING, __file__, 1, msg, args, None)
    made.__dict__.update(over)
    return made


# -- formats ---------------------------------------------------------------------------------


def test_json_lines_are_one_object_with_time_level_logger_pid_message_and_request_id() -> None:
    formatter = JsonLines()
    try:
        raise ValueError("the detail")
    except ValueError:
        failed = record("step %s failed", "two", exc_info=sys.exc_info(), request_id="ab12")
    line = formatter.format(failed)
    assert "\n" not in line
    doc = json.loads(line)
    assert UTC_MS.fullmatch(doc.pop("time")), line
    exception = doc.pop("exception")
    assert exception.startswith("Traceback") and "ValueError: the detail" in exception
    assert doc == {
        "level": "warning",
        "logger": "gateway.test",
        "pid": failed.process,
        "message": "step two failed",
        "request_id": "ab12",
    }
    # Outside a request, no request_id at all.
    assert "request_id" not in json.loads(formatter.format(record("plain")))


def test_text_lines_read_time_level_logger_pid_message_and_request_id() -> None:
    line = TextLines().format(record("step %s failed", "two", request_id="ab12"))
    stamp, rest = line.split(" ", 1)
    assert UTC_MS.fullmatch(stamp)
    assert rest == f"WARNING gateway.test[{record('x').process}]: step two failed request_id=ab12"


def test_the_access_log_s_fields_are_fields_of_its_json_line(json_lines: Lines) -> None:
    log_access("GET", "/v1/trace/{person_id}", 401, 0.01234, 97, None)
    log_access("POST", "/v1/scans", 200, 0.002, 40, "vhd")
    first, second = json_lines.docs()
    assert first["logger"] == "gateway.access" and first["level"] == "info"
    assert {k: first[k] for k in ("method", "route", "status", "duration_ms", "bytes")} == {
        "method": "GET",
        "route": "/v1/trace/{person_id}",
        "status": 401,
        "duration_ms": 12.3,
        "bytes": 97,
    }
    assert first["message"] == "GET /v1/trace/{person_id} 401 12.3ms 97B"
    assert second["app"] == "vhd" and second["message"].endswith(" app=vhd")


def test_a_log_call_never_raises_and_never_prints_its_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Arguments that do not fit their format: the template, and a note.
    wrong = record("%d people at %s", "many")
    for formatter in (JsonLines(), TextLines()):
        assert "%d people at %s (its arguments did not fit: not logged)" in formatter.format(wrong)
    # A lone surrogate (bytes decoded with surrogateescape) is still valid JSON.
    assert json.loads(
        JsonLines().format(record("bytes: %s", b"\xff".decode("utf-8", "surrogateescape")))
    )
    # A stderr that cannot be written: the line is dropped and counted, nothing printed.
    handler = StderrLines()
    handler.setFormatter(JsonLines())
    closed = io.StringIO()
    closed.close()
    with contextlib.redirect_stderr(closed):
        handler.handle(record("phone %s", PHONE))
    assert handler.dropped == 1
    assert capsys.readouterr().err == ""


# -- configure_logging: every process ------------------------------------------------------


def test_configure_logging_writes_json_lines_to_stderr_at_the_level_set(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    own, library = logging.getLogger("gateway.test"), logging.getLogger("aiosqlite")
    configure_logging(Settings(log_format="json", log_level="warning"))
    configure_logging(Settings(log_format="json", log_level="warning"))  # replaces, not adds
    own.info("not at warning")
    own.warning("at warning")
    log_access("GET", "/healthz", 200, 0.001, 2, None)  # not asked for
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "at warning"
    # Asked for, the access log is written whatever the level.
    configure_logging(Settings(log_format="json", log_level="warning", access_log=True))
    log_access("GET", "/healthz", 200, 0.001, 2, None)
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["route"] == "/healthz"

    configure_logging(Settings(log_format="text", log_level="debug"))
    own.debug("own debug line")
    library.debug("a library's debug line: it may quote SQL parameters")
    library.info("a library's info line")
    err = capsys.readouterr().err
    assert "DEBUG gateway.test[" in err and "own debug line" in err
    assert "SQL parameters" not in err and "a library's info line" in err


def test_the_level_and_format_are_settings_of_their_own() -> None:
    env = {"SCANGATE_LOG_FORMAT": "json", "SCANGATE_LOG_LEVEL": "debug"}
    settings = Settings.from_env({**env, "SCANGATE_ACCESS_LOG": "true"})
    assert (settings.log_format, settings.log_level, settings.access_log) == ("json", "debug", True)
    defaults = Settings()
    assert (defaults.log_format, defaults.log_level, defaults.access_log) == ("text", "info", False)
    for name, value in (("SCANGATE_LOG_FORMAT", "xml"), ("SCANGATE_LOG_LEVEL", "verbose")):
        with pytest.raises(ValueError, match=name):
            Settings.from_env({name: value})


# -- the request id --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offered",
    ["abc", "0af7651916cd43dd8448eb211c80319c", "req-1.2_3:4", "x" * 128],
)
def test_a_sane_request_id_is_taken(offered: str) -> None:
    assert asyncio.run(_bound(offered)) == (offered, offered)


@pytest.mark.parametrize(
    "offered",
    [None, "", "x" * 129, "has space", "new\nline", "tab\t", "0912345678 <script>", "١٢٣", "ß"],
)
def test_any_other_request_id_is_replaced_by_a_new_one(offered: str | None) -> None:
    made, bound = asyncio.run(_bound(offered))
    assert re.fullmatch(r"[0-9a-f]{16}", made) and made == bound


async def _bound(offered: str | None) -> tuple[str, str | None]:
    # In a task of its own, as each request is: the binding stays inside it.
    made = bind_request_id(offered)
    return made, current_request_id()


# -- on a gateway ----------------------------------------------------------------------------


async def raw_exchange(gateway: GatewayUnderTest, data: bytes) -> tuple[int, dict[str, str]]:
    """``data`` written on a connection of its own; the first answer's status and headers."""
    server = gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(data)
        await writer.drain()
        answer = parse_responses(await read_until_closed(reader, 3.0))[0]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer.status, answer.headers


@ONE_REDIS
async def test_every_answer_carries_its_request_id(
    gateway_under_test: GatewayStarter, redis_url: str
) -> None:
    gateway = await gateway_under_test(redis_url, web_app="vhd")
    client = gateway.client
    for path, status in (("/healthz", 200), ("/v1/trace/P1", 401), ("/nowhere", 404), ("/", 200)):
        response = await client.get(path, headers={"X-Request-Id": "caller-7"})
        assert response.status == status, path
        assert response.headers["X-Request-Id"] == "caller-7", path
        response = await client.get(path, headers={"X-Request-Id": "no good"})
        assert re.fullmatch(r"[0-9a-f]{16}", response.headers["X-Request-Id"]), path
        made = (await client.get(path)).headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{16}", made), path
        assert made != (await client.get(path)).headers["X-Request-Id"]
    # aiohttp's own 400, for bytes that are not HTTP (its headers were never read).
    status, headers = await raw_exchange(
        gateway, b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: mine\r\nno colon\r\n\r\n"
    )
    assert status == 400 and re.fullmatch(r"[0-9a-f]{16}", headers["x-request-id"]), headers


@ONE_REDIS
async def test_lines_logged_while_a_request_is_handled_carry_its_id(
    gateway_under_test: GatewayStarter, redis_url: str, keyring: Keyring, json_lines: Lines
) -> None:
    token = keyring.add_app("vhd").token
    gateway = await gateway_under_test(redis_url)
    # An SMS that cannot be sent (the log sender's file is a directory): the warning comes
    # from a task the request left running, after a thread's write failed.
    (gateway.settings.data_dir / "sms.log").mkdir()
    response = await gateway.client.post(
        "/v1/otp",
        json={"phone": PHONE},
        headers={"Authorization": f"Bearer {token}", "X-Request-Id": "otp-1"},
    )
    assert response.status == 202, await response.text()
    for _ in range(200):
        warned = [d for d in json_lines.docs() if "SMS was not delivered" in d["message"]]
        if warned:
            break
        await asyncio.sleep(0.01)
    assert [d.get("request_id") for d in warned] == ["otp-1"], warned
    # aiohttp's line about a request it could not parse has the id its 400 answer has.
    _, headers = await raw_exchange(gateway, b"GET / HTTP/1.1\r\nHost: x\r\nbad\r\n\r\n")
    malformed = [d for d in json_lines.docs() if "malformed HTTP request" in d["message"]]
    assert [d.get("request_id") for d in malformed] == [headers["x-request-id"]]
    assert PHONE not in "\n".join(json_lines.lines)


@ONE_REDIS
async def test_the_access_log_names_the_route_and_the_app_and_nothing_of_the_client(
    gateway_under_test: GatewayStarter, redis_url: str, keyring: Keyring, json_lines: Lines
) -> None:
    token = keyring.add_app("vhd").token
    gateway = await gateway_under_test(redis_url, access_log=True)
    client = gateway.client
    auth = {"Authorization": f"Bearer {token}"}
    await client.get(f"/v1/trace/{PHONE}?phone={PHONE}", headers={"X-Request-Id": "t-1"})
    await client.post("/v1/scans", json={"events": []}, headers={**auth, "X-Request-Id": "s-1"})
    await client.request("PROPFIND", "/healthz")  # a method HTTP's parser knows; we do not
    await client.request("PHONE" + PHONE, "/healthz")  # one it does not: aiohttp's 400
    await client.get(f"/static/{PHONE}.css")
    await raw_exchange(gateway, f"GET /{PHONE} HTTP/1.1\r\nHost: x\r\n{PHONE}\r\n\r\n".encode())
    for _ in range(100):  # the last line comes once its answer is written
        access = [d for d in json_lines.docs() if d["logger"] == "gateway.access"]
        if len(access) == 6:
            break
        await asyncio.sleep(0.01)
    seen = [(d["method"], d["route"], d["status"], d.get("app")) for d in access]
    assert seen == [
        ("GET", "/v1/trace/{person_id}", 401, None),
        ("POST", "/v1/scans", 400, "vhd"),
        ("OTHER", "unmatched", 405, None),
        ("-", "-", 400, None),
        ("GET", "/static", 404, None),
        ("-", "-", 400, None),
    ]
    assert [d["request_id"] for d in access[:2]] == ["t-1", "s-1"]
    assert all(d["request_id"] and d["bytes"] > 0 and d["duration_ms"] >= 0 for d in access)
    text = "\n".join(json_lines.lines)
    assert PHONE not in text and "127.0.0.1" not in text and token not in text
    assert not [d for d in json_lines.docs() if d["logger"] == "aiohttp.access"]


@ONE_REDIS
async def test_there_is_no_access_log_unless_asked_and_aiohttp_s_own_never(
    gateway_under_test: GatewayStarter, redis_url: str, json_lines: Lines
) -> None:
    gateway = await gateway_under_test(redis_url)
    assert (await gateway.client.get("/healthz")).status == 200
    assert (await gateway.client.get("/nowhere")).status == 404
    await asyncio.sleep(0.05)
    assert [d for d in json_lines.docs() if d["logger"].endswith(".access")] == []


async def test_the_group_commit_carries_no_single_requests_id() -> None:
    """The group commit serves many requests at once: what it logs must not be filed under
    the id of whichever request started it."""
    from gateway.pipeline.buffer import RedisBuffer
    from gateway.pipeline.client import connect_redis

    client = connect_redis("redis://127.0.0.1:1/0")  # never reached: the commit is replaced
    buffer = RedisBuffer(client, shards=1, retry_memory_s=600)
    seen: list[str | None] = []

    async def commit(group: list[Any], *_: Any) -> list[dict[int, list[bool]]]:
        seen.append(current_request_id())
        return [{0: [True]} for _ in group]

    buffer._commit = commit  # type: ignore[method-assign]
    try:
        bind_request_id("the-first-request")
        assert await buffer.append_encoded({0: [(b"identity", b"value")]}, 0) == {0: [True]}
        assert current_request_id() == "the-first-request"  # the request keeps its own
        assert seen == [None]
    finally:
        await client.aclose()
