"""The outbox worker: delivers exposure notices (``storage.outbox``) by webhook or SMS.

Every gateway worker runs one (and ``scangate notify`` runs one alone). Each round it
claims due notices with a lease, delivers them, and records the outcome while it still
holds the lease; a failed try is retried with a doubling delay (``notice_retry_s`` up to
10 minutes) until ``notice_max_attempts``, then the notice is ``failed``. Workers share
nothing but the table, so any number may run.

A webhook notice is a POST of the JSON document below (``webhook_body``) to the app's
webhook, signed the Standard Webhooks way (``signing.webhooks``): ``webhook-id`` is the
notice id, the same on every try, ``webhook-timestamp`` the time of this try, and
``webhook-signature`` an HMAC-SHA256 of both and the body, so a receiver can refuse a
replayed delivery. It also carries, for receivers written before those headers,
``X-Scangate-Signature`` (of the body alone) and the notice id as ``Idempotency-Key``. A
worker that dies after the receiver took a notice but before recording it leaves it to be
sent again, and the receiver tells it by the notice id. Any 2xx answer is a delivery.
Receivers' side: docs/webhooks.md. An SMS goes to the phone the person declared, in
Vietnamese, through the configured sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import random
import secrets
import socket
import time
import unicodedata
import urllib.parse
from collections.abc import Sequence
from typing import Final
from zoneinfo import ZoneInfo

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from gateway.metrics import Metrics
from gateway.outbox.sms import SmsError, SmsSender
from gateway.settings import Settings
from signing import Keyring, signature_headers
from signing.personal import PersonalData
from storage import Storage
from storage.outbox import NoticeRecord
from storage.registry import VenueLabel
from storage.times import format_time_ms
from storage.tracing import venue_members

log = logging.getLogger(__name__)

CLAIM_BATCH: Final = 20
DELIVERY_TIMEOUT_S: Final = 10.0
MAX_RETRY_DELAY_S: Final = 600.0
ADVICE: Final = (
    "Bạn có thể đã tiếp xúc gần với một ca bệnh tại địa điểm và thời gian này. Hãy tự theo "
    "dõi sức khỏe trong 14 ngày, đeo khẩu trang, hạn chế tiếp xúc và liên hệ cơ sở y tế gần "
    "nhất nếu có sốt, ho hoặc khó thở."
)


class DeliveryFailed(Exception):
    """A try that did not deliver; the message says why, with no personal data."""


class PublicOnlyResolver(AbstractResolver):
    """Resolves a webhook's host and refuses any address that is not public (private,
    loopback, link-local, cloud metadata...), so a webhook URL cannot reach into the
    network scangate runs in. The connection uses the address checked here: a DNS answer
    that changes between check and connect (rebinding) gains nothing."""

    def __init__(self, allow_private: bool = False) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for result in results:
                if not ipaddress.ip_address(result["host"]).is_global:
                    raise DeliveryFailed("the webhook's address is not public")
        return results

    async def close(self) -> None:
        await self._inner.close()


def webhook_body(
    notice: NoticeRecord, event_ids: Sequence[str], venue: VenueLabel | None = None
) -> bytes:
    """The JSON a webhook receives for a notice (the bytes that are signed): only what the
    app holds already, its own event ids of the exposed person's scans at the venue, the
    venue, the window and the advice. No person id and no case id: a person id the app
    never posted would tell it who someone is, and a case id which exposures share a case.
    ``notice_id`` is the delivery's own id (also its webhook-id and Idempotency-Key)."""
    return orjson.dumps(
        {
            "notice_id": notice.notice_id,
            "event_ids": list(event_ids),
            "venue_id": notice.venue_id,
            **venue_members(venue),
            "exposure_start": format_time_ms(notice.exposure_start_ms),
            "exposure_end": format_time_ms(notice.exposure_end_ms),
            "overlap_minutes": notice.overlap_minutes,
            # false: one of the two visits had no check-out scanned; the exposure runs to
            # its assumed end, and no further than the case's confirmation.
            "checkout_recorded": notice.checkout_recorded,
            "advice": ADVICE,
        }
    )


def without_diacritics(text: str) -> str:
    """Vietnamese as SMS carry it (see ``otp.otp_message``): "Phở Hà Nội" -> "Pho Ha Noi"."""
    decomposed = unicodedata.normalize("NFD", text.replace("đ", "d").replace("Đ", "D"))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def sms_text(
    venue_name: str, start_ms: int, end_ms: int, tz: ZoneInfo, checkout_recorded: bool = True
) -> str:
    """The exposure SMS, in Vietnamese without diacritics. When no check-out was scanned,
    the end is "about" and the text says why ("no check-out time recorded")."""

    def local(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, tz).strftime("%H:%M %d/%m")

    place = without_diacritics(venue_name)[:40]
    end = local(end_ms) if checkout_recorded else f"khoang {local(end_ms)} (khong ghi nhan gio ra)"
    return (
        f"[Khai bao y te] Ban co the da tiep xuc voi ca benh tai {place} tu {local(start_ms)}"
        f" den {end}. Hay tu theo doi suc khoe 14 ngay, deo khau trang va lien he "
        "tram y te neu co sot, ho, kho tho."
    )


def retry_delay_s(attempts: int, first_s: float) -> float:
    """Doubling from ``first_s`` with each try, at most 10 minutes, with jitter (so many
    notices failing together do not retry together)."""
    delay = min(MAX_RETRY_DELAY_S, first_s * float(2 ** max(0, attempts - 1)))
    return delay * random.uniform(0.75, 1.0)


class Notifier:
    """Claims and delivers due notices, one round per ``step``."""

    def __init__(
        self,
        storage: Storage,
        keyring: Keyring,
        personal: PersonalData,
        sms: SmsSender,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self._storage = storage
        self._keyring = keyring
        self._personal = personal
        self._sms = sms
        self._settings = settings
        self._metrics = metrics
        self._tz = ZoneInfo(settings.timezone)
        self._longest_stay_s = max([settings.max_stay_s, *settings.kind_max_stay_s.values()])
        # Who holds a lease: unique per worker, readable in the table by an operator.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # A delivery ends well within its lease (a third of it), so no other worker can
        # claim a notice that is still being sent.
        self._timeout_s = min(DELIVERY_TIMEOUT_S, settings.notice_lease_s / 3)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def step(self) -> int:
        """Deliver what is due now (at most one batch); how many notices were tried."""
        now_ms = int(time.time() * 1000)
        lease_ms = int(self._settings.notice_lease_s * 1000)
        claimed = await self._storage.claim_notices(self.owner, now_ms, lease_ms, CLAIM_BATCH)
        if claimed:
            outcomes = await asyncio.gather(
                *(self._deliver(n) for n in claimed), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):  # recording failed: storage down
                    log.warning("recording a notice's outcome failed: %s", type(outcome).__name__)
        if self._metrics is not None:
            self._metrics.outbox_pending.set(await self._storage.pending_notices())
        return len(claimed)

    async def _deliver(self, notice: NoticeRecord) -> None:
        try:
            await asyncio.wait_for(self._send(notice), self._timeout_s)
        except Exception as exc:  # any failure to send is a try to repeat, never a crash
            await self._not_delivered(notice, _reason(exc))
            return
        now_ms = int(time.time() * 1000)
        if await self._storage.notice_delivered(notice.notice_id, self.owner, now_ms):
            self._count(notice, "delivered")
            await self._audit(notice, f"outcome=delivered attempts={notice.attempts}")
        else:
            # The lease ran out while sending (a stalled process): another worker may send
            # it again (the receiver dedupes by Idempotency-Key). Said, not hidden.
            log.warning("notice %s was delivered after its lease expired", notice.notice_id)
            self._count(notice, "late")
            await self._audit(notice, "outcome=delivered_after_lease")

    async def _not_delivered(self, notice: NoticeRecord, reason: str) -> None:
        give_up = notice.attempts >= self._settings.notice_max_attempts
        next_at = (
            None
            if give_up
            else int(
                (time.time() + retry_delay_s(notice.attempts, self._settings.notice_retry_s)) * 1000
            )
        )
        if not await self._storage.notice_not_delivered(
            notice.notice_id, self.owner, reason, next_at
        ):
            return
        self._count(notice, "failed" if give_up else "retry")
        if give_up:
            log.warning("notice %s given up after %d tries", notice.notice_id, notice.attempts)
            await self._audit(notice, f"outcome=failed attempts={notice.attempts} error={reason}")

    async def _audit(self, notice: NoticeRecord, outcome: str) -> None:
        """A notice's outcome in the audit log: ids, channel and outcome, no personal data."""
        await self._storage.audit(
            f"notifier:{self.owner}",
            "notice",
            notice.notice_id,
            f"case={notice.case_id} channel={notice.channel} app={notice.app_id} {outcome}",
        )

    def _count(self, notice: NoticeRecord, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.notices.labels(notice.channel, outcome).inc()

    async def _send(self, notice: NoticeRecord) -> None:
        if notice.channel == "webhook":
            await self._post(notice)
        else:
            await self._text(notice)

    async def _post(self, notice: NoticeRecord) -> None:
        hook = self._keyring.webhook(notice.app_id)
        if hook is None:
            raise DeliveryFailed(f"app {notice.app_id} has no webhook now")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    resolver=PublicOnlyResolver(allow_private=self._settings.webhook_private)
                ),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )
        host = urllib.parse.urlsplit(hook.url).hostname or ""
        if not self._settings.webhook_private and not _public_literal_or_name(host):
            # aiohttp connects to an address written in the URL without resolving it.
            raise DeliveryFailed("the webhook's address is not public")
        # The app's own scans of the exposed visit: the check-in at most the longest
        # maximum stay before the exposure, the check-out at most that after it.
        reach_ms = int(self._longest_stay_s * 1000)
        event_ids = await self._storage.app_event_ids(
            notice.app_id,
            notice.person_id,
            notice.venue_id,
            notice.exposure_start_ms - reach_ms,
            notice.exposure_end_ms + reach_ms,
        )
        venue = (await self._storage.venue_labels([notice.venue_id])).get(notice.venue_id)
        body = webhook_body(notice, event_ids, venue)
        async with self._session.post(
            hook.url,
            data=body,
            headers={
                "Content-Type": "application/json",
                # Signed as it is sent: a retry keeps the id and gets a fresh timestamp.
                **signature_headers(hook.secret, notice.notice_id, int(time.time()), body),
                "Idempotency-Key": notice.notice_id,
            },
            allow_redirects=False,
        ) as answer:
            if not 200 <= answer.status < 300:
                raise DeliveryFailed(f"webhook answered {answer.status}")

    async def _text(self, notice: NoticeRecord) -> None:
        person = await self._storage.person(notice.person_id)
        if person is None or person.phone_enc is None:
            raise DeliveryFailed("the person has no phone on record")
        phone = self._personal.decrypt(person.phone_enc, "person.phone", person.person_id)
        venue = await self._storage.venue(notice.venue_id)
        text = sms_text(
            venue.name if venue else notice.venue_id,
            notice.exposure_start_ms,
            notice.exposure_end_ms,
            self._tz,
            notice.checkout_recorded,
        )
        # The notice id goes with it: a provider that keeps message ids ({id} in
        # SCANGATE_SMS_TEMPLATE) drops a repeat sent after a worker died mid-send.
        await self._sms.send(phone, text, ref=notice.notice_id)


def private_addresses(url: str) -> list[str]:
    """The addresses a webhook URL's host has now that deliveries would refuse as not
    public (for ``apps set-webhook`` to warn of; blocking: it resolves names). A name that
    does not resolve counts as one such, named as itself."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return [] if ipaddress.ip_address(host).is_global else [host]
    except ValueError:
        pass  # a name
    try:
        found = {
            str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        }
    except (OSError, UnicodeError):
        return [host]
    return sorted(a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_global)


def _public_literal_or_name(host: str) -> bool:
    """False for an IP address written in a URL that is not public; True for a public one
    or a name (names are checked when resolved, by PublicOnlyResolver)."""
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DeliveryFailed | SmsError):
        return str(exc)  # written here, without personal data
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__  # never the message: it may carry a URL or a phone


async def run_until(stop: asyncio.Event, notifier: Notifier, poll_s: float) -> None:
    """Rounds until ``stop`` is set: at once again after a full batch, else after
    ``poll_s``. A round that fails (storage down) is logged and retried."""
    while not stop.is_set():
        try:
            tried = await notifier.step()
        except Exception as exc:  # storage down: log, wait, try again
            log.warning("notifier round failed: %s", type(exc).__name__)
            tried = 0
        if tried < CLAIM_BATCH:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
