"""SMS senders: the log file as another process would read it, and the HTTP sender against
a real local provider server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from gateway.outbox.sms import HttpSmsSender, LogSmsSender, SmsError, make_sms_sender
from gateway.settings import Settings

PHONE = "+84901234567"
TEXT = 'Mã OTP: "123456"\nHết hạn sau 5 phút \\ ok'
TEMPLATE = Settings().sms_template
FAST = (0.01, 0.01, 0.01)


# -- the log sender -------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


async def test_log_sender_appends_one_json_line_per_message(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "sms.log"
    sender = LogSmsSender(path)
    await sender.send(PHONE, TEXT)
    await sender.send("+84987654321", "second")
    await sender.close()

    assert read_lines(path) == [
        {"to": PHONE, "text": TEXT},
        {"to": "+84987654321", "text": "second"},
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_log_sender_concurrent_sends_give_intact_lines(tmp_path: Path) -> None:
    path = tmp_path / "sms.log"
    # Two senders on one file: two processes would hold one each.
    senders = [LogSmsSender(path), LogSmsSender(path)]
    texts = [f"code {i:03d} " + "x" * 5000 for i in range(50)]
    await asyncio.gather(*(senders[i % 2].send(f"+8490{i:07d}", t) for i, t in enumerate(texts)))

    lines = read_lines(path)
    assert len(lines) == 50
    assert sorted(line["text"] for line in lines) == texts
    assert all(line["to"] == f"+8490{int(line['text'][5:8]):07d}" for line in lines)


async def test_log_sender_failure_is_an_sms_error(tmp_path: Path) -> None:
    (tmp_path / "sms.log").mkdir()  # a directory where the file should be
    with pytest.raises(SmsError) as info:
        await LogSmsSender(tmp_path / "sms.log").send(PHONE, TEXT)
    assert PHONE not in str(info.value)


# -- a real provider server -----------------------------------------------------------------


@dataclass
class Provider:
    """A local SMS provider: answers ``statuses`` in turn (the last one repeats)."""

    url: str
    statuses: Sequence[int]
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    bodies: list[bytes] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.content_types.append(request.headers.get("Content-Type", ""))
        status = self.statuses[min(len(self.bodies), len(self.statuses)) - 1]
        if self.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.delay_s)
        return web.Response(status=status, headers=self.headers if status == 429 else None)


StartProvider = Callable[..., Awaitable[Provider]]


@pytest.fixture
async def start_provider() -> AsyncIterator[StartProvider]:
    runners: list[tuple[web.AppRunner, Provider]] = []

    async def start(
        *statuses: int, headers: dict[str, str] | None = None, delay_s: float = 0.0
    ) -> Provider:
        provider = Provider("", statuses or (200,), headers or {}, delay_s)
        app = web.Application()
        app.router.add_post("/send", provider.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        provider.url = f"http://127.0.0.1:{port}/send"
        runners.append((runner, provider))
        return provider

    yield start
    for runner, provider in runners:
        provider.released.set()
        await runner.cleanup()


@pytest.fixture
async def make_sender() -> AsyncIterator[Callable[..., HttpSmsSender]]:
    senders: list[HttpSmsSender] = []

    def make(url: str, **kwargs: object) -> HttpSmsSender:
        options: dict[str, object] = {"template": TEMPLATE, "timeout_s": 5, "backoff_s": FAST}
        options.update(kwargs)
        sender = HttpSmsSender(url, **options)  # type: ignore[arg-type]
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        await sender.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def assert_no_personal_data(*texts: str) -> None:
    for text in texts:
        for secret in (PHONE, PHONE[3:], "123456", "OTP", "Hết hạn"):
            assert secret not in text


# -- the HTTP sender ------------------------------------------------------------------------


async def test_http_sender_posts_the_filled_in_template(
    start_provider: StartProvider, make_sender: Callable[..., HttpSmsSender]
) -> None:
    provider = await start_provider(200)
    await make_sender(provider.url).send(PHONE, TEXT)

    assert len(provider.bodies) == 1
    assert json.loads(provider.bodies[0]) == {"to": PHONE, "text": TEXT}
    assert provider.content_types == ["application/json"]


async def test_http_sender_custom_template(
    start_provider: StartProvider, make_sender: Callable[..., HttpSmsSender]
) -> None:
    provider = await start_provider(200)
    template = '{"msisdn": "{to}", "body": "{text}", "sender": "SCANGATE"}'
    sender = make_sender(provider.url, template=template)
    # A value holding a placeholder is not filled in again.
    await sender.send(PHONE, TEXT + " {to} {text}")

    assert json.loads(provider.bodies[0]) == {
        "msisdn": PHONE,
        "body": TEXT + " {to} {text}",
        "sender": "SCANGATE",
    }


async def test_http_sender_retries_5xx(
    start_provider: StartProvider, make_sender: Callable[..., HttpSmsSender]
) -> None:
    provider = await start_provider(503, 503, 200)
    await make_sender(provider.url).send(PHONE, TEXT)
    assert len(provider.bodies) == 3
    assert all(json.loads(body) == {"to": PHONE, "text": TEXT} for body in provider.bodies)


async def test_http_sender_honours_retry_after_on_429(
    start_provider: StartProvider, make_sender: Callable[..., HttpSmsSender]
) -> None:
    provider = await start_provider(429, 200, headers={"Retry-After": "0"})
    # The backoff would wait a minute: Retry-After: 0 must replace it.
    sender = make_sender(provider.url, backoff_s=(60,))
    async with asyncio.timeout(5):
        await sender.send(PHONE, TEXT)
    assert len(provider.bodies) == 2


async def test_http_sender_429_with_a_date_uses_the_backoff(
    start_provider: StartProvider, make_sender: Callable[..., HttpSmsSender]
) -> None:
    provider = await start_provider(
        429, 200, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    )
    await make_sender(provider.url).send(PHONE, TEXT)
    assert len(provider.bodies) == 2


async def test_http_sender_gives_up_after_attempts_without_leaking(
    start_provider: StartProvider,
    make_sender: Callable[..., HttpSmsSender],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = await start_provider(500)
    with pytest.raises(SmsError) as info:
        await make_sender(provider.url, attempts=3).send(PHONE, TEXT)

    assert len(provider.bodies) == 3
    assert "500" in str(info.value)
    assert info.value.__cause__ is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.outbox.sms"]
    assert warnings == [f"SMS provider answered 500 (attempt {n} of 3)" for n in (1, 2, 3)]
    assert_no_personal_data(str(info.value), repr(info.value), caplog.text)


async def test_http_sender_does_not_retry_other_4xx(
    start_provider: StartProvider, make_sender: Callable[..., HttpSmsSender]
) -> None:
    provider = await start_provider(400, 200)
    with pytest.raises(SmsError, match="400") as info:
        await make_sender(provider.url).send(PHONE, TEXT)
    assert len(provider.bodies) == 1
    assert_no_personal_data(str(info.value))


async def test_http_sender_does_not_follow_redirects(
    start_provider: StartProvider, make_sender: Callable[..., HttpSmsSender]
) -> None:
    provider = await start_provider(307)
    with pytest.raises(SmsError, match="307"):
        await make_sender(provider.url).send(PHONE, TEXT)
    assert len(provider.bodies) == 1


async def test_http_sender_times_out_and_retries(
    start_provider: StartProvider,
    make_sender: Callable[..., HttpSmsSender],
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = await start_provider(200, delay_s=5)
    sender = make_sender(provider.url, timeout_s=0.2, attempts=2)
    async with asyncio.timeout(3):
        with pytest.raises(SmsError, match="gave up after 2 attempts"):
            await sender.send(PHONE, TEXT)
    assert len(provider.bodies) == 2
    assert "did not answer within 0.2s (attempt 2 of 2)" in caplog.text
    assert_no_personal_data(caplog.text)


async def test_http_sender_unreachable_provider(
    make_sender: Callable[..., HttpSmsSender], caplog: pytest.LogCaptureFixture
) -> None:
    sender = make_sender(f"http://127.0.0.1:{free_port()}/send", attempts=2)
    with pytest.raises(SmsError, match="could not be reached") as info:
        await sender.send(PHONE, TEXT)
    assert "attempt 2 of 2" in caplog.text
    assert_no_personal_data(str(info.value), caplog.text)


async def test_http_sender_works_again_after_close(
    start_provider: StartProvider, make_sender: Callable[..., HttpSmsSender]
) -> None:
    provider = await start_provider(200)
    sender = make_sender(provider.url)
    await sender.close()  # never used: nothing to close
    await sender.send(PHONE, "one")
    await sender.close()
    await sender.send(PHONE, "two")
    assert [json.loads(body)["text"] for body in provider.bodies] == ["one", "two"]


@pytest.mark.parametrize(
    ("url", "template"),
    [
        ("ftp://sms.example/send", TEMPLATE),
        ("sms.example/send", TEMPLATE),
        ("http:///send", TEMPLATE),
        ("https://sms.example/send", '{"to": "{to}"}'),
        ("https://sms.example/send", '{"to": {to}, "text": "{text}"}'),
    ],
)
def test_http_sender_rejects_bad_configuration(url: str, template: str) -> None:
    with pytest.raises(ValueError):
        HttpSmsSender(url, template, 5)


# -- choosing a sender ----------------------------------------------------------------------


def test_make_sms_sender_log(tmp_path: Path) -> None:
    sender = make_sms_sender(Settings(data_dir=tmp_path))
    assert isinstance(sender, LogSmsSender)
    assert sender.path == tmp_path / "sms.log"


async def test_make_sms_sender_http(start_provider: StartProvider, tmp_path: Path) -> None:
    provider = await start_provider(200)
    settings = Settings(data_dir=tmp_path, sms="http", sms_url=provider.url, sms_timeout_s=2)
    sender = make_sms_sender(settings)
    try:
        assert isinstance(sender, HttpSmsSender)
        await sender.send(PHONE, TEXT)
    finally:
        await sender.close()
    assert json.loads(provider.bodies[0]) == {"to": PHONE, "text": TEXT}
    assert not (tmp_path / "sms.log").exists()


def test_make_sms_sender_http_needs_a_url() -> None:
    with pytest.raises(ValueError, match="SCANGATE_SMS_URL"):
        make_sms_sender(Settings(sms="http"))
