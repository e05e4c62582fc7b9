"""One-time codes by SMS, and the short-lived phone sessions they buy.

State lives in Redis, so every gateway process sees the same tries, locks and limits, and
each step is one Lua script (atomic: two guesses at once cannot both use the last try).
Nothing in Redis names the phone: keys carry the phone's blind index, and the code is kept
only as an HMAC under the OTP key (``PersonalData.otp_key``) of the phone index and the
code. The script compares two such HMACs: its timing can say nothing about the code.

Rules (issue 6): 6 digits from ``secrets``, valid 5 minutes, single use; 5 wrong tries
lock the phone for 15 minutes (the count survives new codes, so asking for another code
does not buy more guesses); at most 3 sends per phone per 15 minutes; and a limit of sends
per client address per 15 minutes.

A session is ``s1.<payload>.<tag>``: the phone index, the app and an expiry, signed with
HMAC-SHA256 under ``PersonalData.session_key``; checked with ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .buffer import BufferUnavailable

CODE_DIGITS: Final = 6
CODE_TTL_MS: Final = 5 * 60_000
MAX_WRONG_TRIES: Final = 5
LOCK_MS: Final = 15 * 60_000
WINDOW_MS: Final = 15 * 60_000
MAX_SENDS_PER_PHONE: Final = 3
SESSION_PREFIX: Final = "s1"

# KEYS: state, sends, lock. ARGV: now_ms, code_hash, code_ttl_ms, window_ms, max_sends.
# -> {"ok"} | {"locked", ms left} | {"rate", ms until a send is allowed}
_SEND: Final = """
local left = redis.call('PTTL', KEYS[3])
if left > 0 then return {'locked', left} end
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {'rate', tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('PEXPIRE', KEYS[2], window)
redis.call('HSET', KEYS[1], 'h', ARGV[2], 'exp', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return {'ok', 0}
"""

# KEYS: state, fails, lock. ARGV: now_ms, code_hash, max_wrong, lock_ms, window_ms.
# -> {"ok"} | {"locked", ms left} | {"invalid", tries left}
_VERIFY: Final = """
local left = redis.call('PTTL', KEYS[3])
if left > 0 then return {'locked', left} end
local state = redis.call('HMGET', KEYS[1], 'h', 'exp')
if state[1] and tonumber(state[2]) >= tonumber(ARGV[1]) and state[1] == ARGV[2] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return {'ok', 0}
end
local fails = redis.call('INCR', KEYS[2])
if fails == 1 then redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5])) end
if fails >= tonumber(ARGV[3]) then
  redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[4]))
  redis.call('DEL', KEYS[1], KEYS[2])
  return {'locked', tonumber(ARGV[4])}
end
return {'invalid', tonumber(ARGV[3]) - fails}
"""

# KEYS: counter. ARGV: now_ms, window_ms, limit, member. -> ms until allowed (0: allowed)
_WINDOW_LIMIT: Final = """
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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a send or a check came to. ``wait_ms`` for "locked" and "rate";
    ``tries_left`` for "invalid"."""

    status: str  # "ok", "locked", "rate", "invalid"
    wait_ms: int = 0
    tries_left: int = 0


def _keys(phone_index: str) -> tuple[str, str, str, str]:
    # One hash tag per phone: a script's keys share a Redis Cluster slot.
    base = f"sg:otp:{{{phone_index}}}"
    return f"{base}:state", f"{base}:sends", f"{base}:fails", f"{base}:lock"


class OtpService:
    def __init__(
        self, client: aioredis.Redis, otp_key: bytes, session_key: bytes, address_limit: int
    ) -> None:
        self._client = client
        self._otp_key = otp_key
        self._session_key = session_key
        self._address_limit = address_limit
        self._send = client.register_script(_SEND)
        self._verify = client.register_script(_VERIFY)
        self._window_limit = client.register_script(_WINDOW_LIMIT)

    def _code_hash(self, phone_index: str, code: str) -> str:
        message = f"{phone_index}:{code}".encode()
        return hmac.new(self._otp_key, message, hashlib.sha256).hexdigest()

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise BufferUnavailable(f"Redis does not answer ({type(exc).__name__})") from exc

    async def address_allowed(self, address_index: str, now_ms: int) -> int:
        """Count one send from a client address; 0 when allowed, else ms to wait."""
        if self._address_limit <= 0:
            return 0
        wait: Any = await self._run(
            self._window_limit,
            [f"sg:otp:addr:{{{address_index}}}"],
            [now_ms, WINDOW_MS, self._address_limit, f"{now_ms}-{secrets.token_hex(4)}"],
        )
        return int(wait)

    async def issue(self, phone_index: str, now_ms: int) -> tuple[Outcome, str | None]:
        """A new code for the phone (to send), unless it is locked or over its sends."""
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        state, sends, _fails, lock = _keys(phone_index)
        reply: Any = await self._run(
            self._send,
            [state, sends, lock],
            [
                now_ms,
                self._code_hash(phone_index, code),
                CODE_TTL_MS,
                WINDOW_MS,
                MAX_SENDS_PER_PHONE,
            ],
        )
        status = _text(reply[0])
        if status == "ok":
            return Outcome("ok"), code
        return Outcome(status, wait_ms=int(reply[1])), None

    async def check(self, phone_index: str, code: str, now_ms: int) -> Outcome:
        """Use the phone's code: right, wrong (with tries left) or locked."""
        state, _sends, fails, lock = _keys(phone_index)
        reply: Any = await self._run(
            self._verify,
            [state, fails, lock],
            [now_ms, self._code_hash(phone_index, code), MAX_WRONG_TRIES, LOCK_MS, WINDOW_MS],
        )
        status = _text(reply[0])
        if status == "invalid":
            return Outcome(status, tries_left=int(reply[1]))
        if status == "locked":
            return Outcome(status, wait_ms=int(reply[1]))
        return Outcome("ok")

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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def otp_message(code: str) -> str:
    """The SMS, in Vietnamese: the code, its lifetime, and not to share it. Written without
    diacritics, as Vietnamese operators' SMS are: with them a message is UCS-2, 70 characters
    a part instead of 160, and some older phones show boxes."""
    return (
        f"Ma xac thuc khai bao y te cua ban: {code}. "
        "Hieu luc 5 phut. Khong chia se ma nay cho bat ky ai."
    )
