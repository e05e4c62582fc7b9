"""One-time codes by SMS, and the short-lived phone sessions they buy.

State lives in Redis (key names in ``gateway.pipeline.keyspace``), so every gateway process sees the
same codes, tries and limits, and each step on a phone is one Lua script (atomic: two
guesses at once cannot both use the last try). Nothing in Redis names the phone or the
client: keys carry blind indexes, and a code is kept only as an HMAC under the OTP key
(``PersonalData.otp_key``) of the phone index and the code. The script compares two such
HMACs: its timing can say nothing about the code.

Rules (issue 16, after NIST SP 800-63B's throttling: slow the guesser down, and never let
a third party lock the owner out):

- Every code asked for is a code of its own: 6 digits from ``secrets``, valid 5 minutes,
  single use, with its own id (the ``challenge``, given only to whoever asked) and its own
  tries: ``SCANGATE_OTP_CODE_TRIES`` (5) wrong codes aimed at it end it, and nothing else.
- A guess is aimed at one code: the one its ``challenge`` names, or else the latest code
  asked for that phone from the guesser's own address. A stranger does not know the
  owner's challenge and asks from another address, so a wrong guess can only end a code
  the guesser asked for itself, never the owner's.
- The limits count the client address (``gateway.http.addresses``: the peer, or the client a
  trusted proxy names; an IPv6 address by its /64) over a sliding window
  (``SCANGATE_OTP_WINDOW``, 15 minutes): codes asked per address (60) and per address for
  one phone (3); wrong codes per address (120) and per address for one phone (5, which a
  new code does not reset). A request a limit refuses costs nothing.
- Nothing counted per phone refuses a send or a right code, except the SMS-cost cap: at
  most ``SCANGATE_OTP_PHONE_CAP`` (20) codes sent to a phone per
  ``SCANGATE_OTP_PHONE_CAP_WINDOW`` (1 day), from all addresses together. Strangers who ask
  for that many codes keep the owner from getting one until the window moves on: the one
  lockout accepted, counted (``scangate_otp_sends_total{outcome="phone_cap"}``) and
  alerted on. It also bounds guessing: at most cap x tries (100) wrong codes a day can meet
  a live code of one phone.
- Each SMS carries a reference of 4 letters, also in the answer that asked for it, so a
  person who gets several codes (a stranger's among them) knows which one is theirs.

A session is ``s1.<payload>.<tag>``: the phone index, the app and an expiry, signed with
HMAC-SHA256 under ``PersonalData.session_key``; checked with ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.metrics import CheckOutcome, SendOutcome
from gateway.pipeline.buffer import BufferUnavailable
from gateway.pipeline.keyspace import (
    otp_address_key,
    otp_code_key,
    otp_pair_key,
    otp_phone_sent_key,
)
from gateway.settings import Settings

CODE_DIGITS: Final = 6
CODE_TTL_MS: Final = 5 * 60_000
SESSION_PREFIX: Final = "s1"
# A code's id, given to the client as its challenge: 128 random bits, base64url.
CHALLENGE: Final = re.compile(r"[A-Za-z0-9_-]{22}")
REFERENCE_LETTERS: Final = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O, which read as 1 and 0
REFERENCE_LENGTH: Final = 4


# A sliding-window count: KEYS: counter. ARGV: now_ms, window_ms, limit, member.
# -> 0 (counted) | ms until the oldest entry leaves the window (refused, not counted)
_TAKE: Final = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""

# KEYS: pair sent, phone sent, pair latest, new code.
# ARGV: now_ms, member, window_ms, pair limit, cap window_ms, cap, code hash, code ttl_ms,
# tries, code id.
# -> {"ok", 0} | {"phone_address_limit" | "phone_cap", ms until a send is allowed}
_ISSUE: Final = """
local now = tonumber(ARGV[1])
local function wait(key, window, limit)
  if limit <= 0 then return 0 end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) < limit then return 0 end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
local function count(key, window, limit)
  if limit <= 0 then return end
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, window)
end
local window, pair_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local cap_window, cap = tonumber(ARGV[5]), tonumber(ARGV[6])
local left = wait(KEYS[1], window, pair_limit)
if left > 0 then return {'phone_address_limit', left} end
left = wait(KEYS[2], cap_window, cap)
if left > 0 then return {'phone_cap', left} end
count(KEYS[1], window, pair_limit)
count(KEYS[2], cap_window, cap)
local ttl = tonumber(ARGV[8])
redis.call('HSET', KEYS[4], 'h', ARGV[7], 'exp', now + ttl, 'tries', ARGV[9])
redis.call('PEXPIRE', KEYS[4], ttl)
redis.call('SET', KEYS[3], ARGV[10], 'PX', ttl)
return {'ok', 0}
"""

# KEYS: pair wrong, the code aimed at. ARGV: now_ms, member, window_ms, pair limit, hash.
# -> {"ok"} | {"refused", ms to wait} (not counted)
#  | {"wrong", code tries left (-1: no live code), pair tries left (-1: no limit), ms to wait}
_CHECK: Final = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function wait()
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
local wrong = 0
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  wrong = redis.call('ZCARD', KEYS[1])
  if wrong >= limit then return {'refused', wait()} end
end
local code = redis.call('HMGET', KEYS[2], 'h', 'exp', 'tries')
local live = code[1] and tonumber(code[2]) >= now
if live and code[1] == ARGV[5] then
  redis.call('DEL', KEYS[2], KEYS[1])
  return {'ok'}
end
local code_left = -1
if live then
  code_left = redis.call('HINCRBY', KEYS[2], 'tries', -1)
  if code_left <= 0 then
    redis.call('DEL', KEYS[2])
    code_left = 0
  end
end
if limit <= 0 then return {'wrong', code_left, -1, 0} end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], window)
return {'wrong', code_left, limit - wrong - 1, wait()}
"""


@dataclass(frozen=True, slots=True)
class OtpLimits:
    """The OTP limits of ``Settings``, in milliseconds; a limit of 0 is off."""

    window_ms: int = 15 * 60_000
    address_sends: int = 60
    pair_sends: int = 3
    address_wrong: int = 120
    pair_wrong: int = 5
    code_tries: int = 5
    phone_cap: int = 20
    phone_cap_window_ms: int = 86_400_000

    @classmethod
    def from_settings(cls, settings: Settings) -> OtpLimits:
        return cls(
            window_ms=int(settings.otp_window_s * 1000),
            address_sends=settings.otp_address_limit,
            pair_sends=settings.otp_phone_address_limit,
            address_wrong=settings.otp_address_guess_limit,
            pair_wrong=settings.otp_phone_address_guess_limit,
            code_tries=settings.otp_code_tries,
            phone_cap=settings.otp_phone_cap,
            phone_cap_window_ms=int(settings.otp_phone_cap_window_s * 1000),
        )


@dataclass(frozen=True, slots=True)
class Sent:
    """What asking for a code came to: "sent" with the code (for the SMS), its challenge
    and reference; else the limit that refused it, and ``wait_ms`` until it would not."""

    outcome: SendOutcome
    wait_ms: int = 0
    code: str = ""
    challenge: str = ""
    reference: str = ""


@dataclass(frozen=True, slots=True)
class Checked:
    """What checking a code came to: "ok"; "invalid" with ``tries_left`` (wrong codes this
    client may still send for the phone before it must ask again or wait); or the limit
    that refused it, with ``wait_ms``."""

    outcome: CheckOutcome
    wait_ms: int = 0
    tries_left: int = 0


class OtpService:
    def __init__(
        self, client: aioredis.Redis, otp_key: bytes, session_key: bytes, limits: OtpLimits
    ) -> None:
        self._client = client
        self._otp_key = otp_key
        self._session_key = session_key
        self.limits = limits
        self._take_script = client.register_script(_TAKE)
        self._issue_script = client.register_script(_ISSUE)
        self._check_script = client.register_script(_CHECK)

    def _code_hash(self, phone_index: str, code: str) -> str:
        message = f"{phone_index}:{code}".encode()
        return hmac.new(self._otp_key, message, hashlib.sha256).hexdigest()

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await _answered(script(keys=keys, args=args))

    async def _take(self, key: str, limit: int, member: str, now_ms: int) -> int:
        """Count one in a sliding window: 0 when counted, else ms to wait."""
        if limit <= 0:
            return 0
        wait: Any = await self._run(
            self._take_script, [key], [now_ms, self.limits.window_ms, limit, member]
        )
        return int(wait)

    async def _give_back(self, key: str, limit: int, member: str) -> None:
        """Uncount what ``_take`` counted, for a request that came to nothing."""
        if limit > 0:
            await _answered(self._client.zrem(key, member))

    async def issue(self, phone_index: str, address_index: str, now_ms: int) -> Sent:
        """A new code for the phone, asked from a client address, unless a limit refuses."""
        limits, member = self.limits, _member(now_ms)
        address_key = otp_address_key(address_index, "sent")
        wait = await self._take(address_key, limits.address_sends, member, now_ms)
        if wait:
            return Sent("address_limit", wait_ms=wait)
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        challenge = secrets.token_urlsafe(16)
        reply: Any = await self._run(
            self._issue_script,
            [
                otp_pair_key(phone_index, address_index, "sent"),
                otp_phone_sent_key(phone_index),
                otp_pair_key(phone_index, address_index, "latest"),
                otp_code_key(phone_index, challenge),
            ],
            [
                now_ms,
                member,
                limits.window_ms,
                limits.pair_sends,
                limits.phone_cap_window_ms,
                limits.phone_cap,
                self._code_hash(phone_index, code),
                CODE_TTL_MS,
                limits.code_tries,
                challenge,
            ],
        )
        refused = _text(reply[0])
        if refused != "ok":
            await self._give_back(address_key, limits.address_sends, member)
            outcome: SendOutcome = "phone_cap" if refused == "phone_cap" else "phone_address_limit"
            return Sent(outcome, wait_ms=int(reply[1]))
        reference = "".join(secrets.choice(REFERENCE_LETTERS) for _ in range(REFERENCE_LENGTH))
        return Sent("sent", code=code, challenge=challenge, reference=reference)

    async def check(
        self,
        phone_index: str,
        address_index: str,
        code: str,
        challenge: str | None,
        now_ms: int,
    ) -> Checked:
        """Check a code aimed at the phone's code named by ``challenge``, or else at the
        latest code asked for it from this address."""
        limits, member = self.limits, _member(now_ms)
        address_key = otp_address_key(address_index, "wrong")
        wait = await self._take(address_key, limits.address_wrong, member, now_ms)
        if wait:
            return Checked("address_limit", wait_ms=wait)
        named = challenge is not None
        if challenge is None:
            latest: Any = await _answered(
                self._client.get(otp_pair_key(phone_index, address_index, "latest"))
            )
            challenge = _text(latest) if latest is not None else ""
        reply: Any = await self._run(
            self._check_script,
            [
                otp_pair_key(phone_index, address_index, "wrong"),
                otp_code_key(phone_index, challenge),
            ],
            [
                now_ms,
                member,
                limits.window_ms,
                limits.pair_wrong,
                self._code_hash(phone_index, code),
            ],
        )
        outcome = _text(reply[0])
        if outcome != "wrong":  # a right code, or a refused one: not a wrong guess
            await self._give_back(address_key, limits.address_wrong, member)
        if outcome == "ok":
            return Checked("ok")
        if outcome == "refused":
            return Checked("phone_address_limit", wait_ms=int(reply[1]))
        code_left, pair_left, wait = int(reply[1]), int(reply[2]), int(reply[3])
        if pair_left == 0:
            return Checked("phone_address_limit", wait_ms=wait)
        if named and code_left < 0:  # the code named is used, ended or expired
            code_left = 0
        lefts = [left for left in (code_left, pair_left) if left >= 0]
        return Checked("invalid", tries_left=min(lefts, default=0))

    # -- sessions --------------------------------------------------------------------------

    def new_session(self, phone_index: str, app_id: str, expires_s: int) -> str:
        payload = _b64(orjson.dumps({"p": phone_index, "a": app_id, "e": expires_s}))
        return f"{SESSION_PREFIX}.{payload}.{_b64(self._session_tag(payload))}"

    def session_phone(self, token: str, app_id: str, now_s: float) -> str | None:
        """The phone index of a valid, unexpired session of this app; None otherwise."""
        if len(token) > 512 or not token.isascii():  # header bytes that are not ASCII
            return None
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != SESSION_PREFIX:
            return None
        try:
            tag = _unb64(parts[2])
        except ValueError:
            return None
        if not hmac.compare_digest(tag, self._session_tag(parts[1])):
            return None
        try:
            payload = orjson.loads(_unb64(parts[1]))
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(payload, dict) or payload.get("a") != app_id:
            return None
        expires, phone = payload.get("e"), payload.get("p")
        if not isinstance(expires, int) or expires < now_s or not isinstance(phone, str):
            return None
        return phone

    def _session_tag(self, payload: str) -> bytes:
        return hmac.new(self._session_key, payload.encode(), hashlib.sha256).digest()


async def _answered(work: Awaitable[Any]) -> Any:
    """What Redis answers; BufferUnavailable when it does not."""
    try:
        return await work
    except (RedisError, OSError) as exc:
        raise BufferUnavailable(f"Redis does not answer ({type(exc).__name__})") from exc


def _member(now_ms: int) -> str:
    """A member of a sliding-window count: unique, so two at the same ms both count."""
    return f"{now_ms}-{secrets.token_hex(4)}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def otp_message(code: str, reference: str) -> str:
    """The SMS, in Vietnamese: the code, the reference of the request it answers ("tham
    chieu"), its lifetime, and not to share it. Written without diacritics, as Vietnamese
    operators' SMS are: with them a message is UCS-2, 70 characters a part instead of 160,
    and some older phones show boxes."""
    return (
        f"Ma xac thuc khai bao y te cua ban: {code} (tham chieu {reference}). "
        "Hieu luc 5 phut. Khong chia se ma nay cho bat ky ai."
    )
