"""SMS senders for one-time codes, behind one interface.

``LogSmsSender`` (the default, for development and tests) appends each message to a file
in the data dir; ``HttpSmsSender`` posts it to a provider's JSON API. A message carries a
phone number and a one-time code, so neither ever goes into a log line or an error.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from gateway.settings import Settings

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S: Final = 10.0
_PLACEHOLDER: Final = re.compile(r"\{(to|text|id)\}")
_HEADERS: Final = {"Content-Type": "application/json"}


class SmsError(Exception):
    """The message could not be delivered; the text is safe to log (no phone, no message)."""


class SmsSender(Protocol):
    async def send(self, to: str, text: str, ref: str = "") -> None:
        """Deliver ``text`` to the phone ``to``; raises SmsError when it cannot. ``ref``
        names the message (an exposure notice's id) for a provider that drops repeats."""
        ...

    async def close(self) -> None: ...


class LogSmsSender:
    """Appends ``{"to": ..., "text": ...}`` lines to a file that stands in for the provider.

    The file holds phone numbers and codes: it is created readable by its owner only. Each
    line is one write under an exclusive lock, so several gateway processes never
    interleave their lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, to: str, text: str, ref: str = "") -> None:
        message = {"to": to, "text": text} | ({"id": ref} if ref else {})
        line = orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
        try:
            await asyncio.to_thread(self._append, line)
        except OSError as exc:
            raise SmsError(f"SMS log write failed: {exc.strerror or type(exc).__name__}") from None

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(line)
            while view:  # one write, unless the disk is short of space
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)  # closing releases the lock

    async def close(self) -> None:
        pass


class HttpSmsSender:
    """Posts each message to an SMS provider, retrying what may succeed on a retry.

    ``template`` is the JSON body with ``{to}`` and ``{text}`` inside string literals; they
    are replaced by the JSON-escaped values. Connection errors, timeouts, 5xx and 429 are
    retried after the ``backoff_s`` delays (the last one repeats; a 429's numeric
    ``Retry-After``, up to ``MAX_RETRY_AFTER_S``, replaces the delay), at most ``attempts``
    tries in all; any other answer but a 2xx fails at once. Redirects are not followed:
    the message goes to the configured URL only.

    A retry after a timeout may deliver the message twice, which a one-time code survives.
    """

    def __init__(
        self,
        url: str,
        template: str,
        timeout_s: float,
        attempts: int = 4,
        backoff_s: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> None:
        parsed = urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("the SMS provider URL must be an http or https URL")
        if "{to}" not in template or "{text}" not in template:
            raise ValueError("the SMS template must contain {to} and {text}")
        try:
            orjson.loads(_fill(template, "x", "x"))  # bare x: not JSON outside a string
        except orjson.JSONDecodeError:
            raise ValueError(
                "the SMS template must be JSON with {to} and {text} inside strings"
            ) from None
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._url = url
        self._template = template
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._backoff_s = tuple(backoff_s) or (0.0,)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, to: str, text: str, ref: str = "") -> None:
        body = _fill(self._template, to, text, ref).encode()
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s)
            )
        session = self._session
        for attempt in range(1, self._attempts + 1):
            delay_s = self._backoff_s[min(attempt, len(self._backoff_s)) - 1]
            try:
                async with session.post(
                    self._url, data=body, headers=_HEADERS, allow_redirects=False
                ) as response:
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except TimeoutError:  # before ClientError: aiohttp's timeouts are both
                problem = f"did not answer within {self._timeout_s:g}s"
            except aiohttp.ClientError as exc:
                problem = f"could not be reached ({type(exc).__name__})"
            else:
                if 200 <= status < 300:
                    return
                if status != 429 and status < 500:
                    # The request itself is wrong (credentials, template): retrying won't help.
                    raise SmsError(f"SMS provider refused the message with {status}")
                problem = f"answered {status}"
                if status == 429 and retry_after is not None:
                    delay_s = _retry_after_s(retry_after, delay_s)
            log.warning("SMS provider %s (attempt %d of %d)", problem, attempt, self._attempts)
            if attempt == self._attempts:
                raise SmsError(f"SMS provider {problem}; gave up after {attempt} attempts")
            await asyncio.sleep(delay_s)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def make_sms_sender(settings: Settings) -> SmsSender:
    """The sender ``settings.sms`` names."""
    if settings.sms == "log":
        return LogSmsSender(settings.data_dir / "sms.log")
    if settings.sms == "http":
        if not settings.sms_url:
            raise ValueError("SCANGATE_SMS=http needs SCANGATE_SMS_URL")
        return HttpSmsSender(settings.sms_url, settings.sms_template, settings.sms_timeout_s)
    raise ValueError(f"unknown SMS sender {settings.sms!r}: use log or http")


def _fill(template: str, to: str, text: str, ref: str = "") -> str:
    """The template with ``{to}``, ``{text}`` and ``{id}`` replaced by JSON string contents,
    in one pass (a value that contains ``{text}`` is not filled in again)."""
    values = {
        "to": _json_string_contents(to),
        "text": _json_string_contents(text),
        "id": _json_string_contents(ref),
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _json_string_contents(value: str) -> str:
    return orjson.dumps(value).decode()[1:-1]


def _retry_after_s(header: str, default_s: float) -> float:
    """A numeric ``Retry-After`` (seconds), capped; ``default_s`` for a date or junk."""
    value = header.strip()
    if not (value.isascii() and value.isdigit()):
        return default_s
    return min(float(value), MAX_RETRY_AFTER_S)
