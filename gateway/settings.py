"""One frozen settings object. The environment is read only by ``Settings.from_env``,
called at the entry point (the CLI); everything else receives a ``Settings``."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from signing.keyring import APP_ID_PATTERN
from storage.models import VENUE_KINDS

_DURATION: Final = re.compile(r"([0-9]+)(ms|s|m|h|d)")
MAX_DURATION_DIGITS: Final = 9  # 999999999d is far beyond any setting; more would overflow
MAX_CLOCK_SKEW_S: Final = 3600.0  # see Settings.check
_UNIT_S: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 192.0.2.7, 2001:db8::/32"`` as networks (an address is a /32 or /128);
    ValueError naming the entry that is not one."""
    networks: list[Network] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or a CIDR (10.0.0.0/8)") from None
    return tuple(networks)


SmsSender = Literal["log", "http"]
RedisFsync = Literal["everysec", "always"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


class SettingsError(ValueError):
    """A setting with a value that cannot be used; the message names the variable."""


def parse_duration_s(text: str) -> float:
    """``90s``, ``10m``, ``4h``, ``7d`` (or ``200ms``) in seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or len(m.group(1)) > MAX_DURATION_DIGITS:
        raise ValueError(f"{text!r} is not a duration (write it like 90s, 10m, 4h or 7d)")
    return float(int(m.group(1)) * _UNIT_S[m.group(2)])


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("./scangate-data")
    redis_url: str | None = None  # None: start the embedded Valkey server
    redis_cluster: bool = False
    # Answer 2xx only once this many replicas confirm the write (WAIT): see
    # docs/design.md, "What a 2xx promises".
    redis_wait_replicas: int = 0
    # "always": answer 2xx only once Redis has the events on disk (docs/design.md, "What a
    # 2xx promises").
    redis_fsync: RedisFsync = "everysec"
    storage_url: str | None = None  # None: SQLite in the data dir
    # Tracing reads visits from here when set (a read-only replica); audit goes to storage.
    trace_storage_url: str | None = None
    master_key: str | None = field(default=None, repr=False)  # base64; None: key file
    shards: int = 16
    retry_memory_s: float = 600
    repeat_window_s: float = 300
    max_stay_s: float = 4 * 3600
    orphan_stay_s: float = 3600
    late_window_s: float = 7 * 86400
    clock_skew_s: float = 300
    backlog_high_water: int = 1_000_000
    rate_limit: int = 0  # events per second per app; 0 is off
    retention_s: float = 21 * 86400
    # Age at which audit entries are deleted (by the same daily purge): who traced, read
    # or revealed what must be answerable long after the visits themselves are gone.
    audit_retention_s: float = 365 * 86400
    # How often each gateway process writes out its app tokens' minutes of last use.
    last_use_flush_s: float = 60
    # Large: a commit costs by the index pages it dirties more than by its events, so a
    # backlog drains faster in big batches (50,000 against 10,000: 13-18% more events/s on
    # PostgreSQL, 21-28% on SQLite; benchmarks/RESULTS.md). Below the backlog a batch closes
    # at flush_max_age long before it is full.
    flush_batch: int = 50_000
    flush_max_age_s: float = 0.2
    flush_claim_idle_s: float = 30  # a pending entry idle this long is claimed by another flusher
    timezone: str = "Asia/Ho_Chi_Minh"
    sms: SmsSender = "log"
    sms_url: str | None = None
    # The http sender's body: {to} and {text} are replaced by JSON string contents.
    sms_template: str = '{"to": "{to}", "text": "{text}"}'
    sms_timeout_s: float = 5
    # One-time codes (gateway.http.otp; a limit of 0 is off). Per client address (an IPv4
    # address, or an IPv6 /64) over a sliding window: codes asked, codes asked for one
    # phone, wrong codes, wrong codes for one phone. Sized for carrier-grade NAT, where
    # many phones share one IPv4 address (docs/api.md, "One-time codes").
    otp_window_s: float = 15 * 60
    otp_address_limit: int = 60
    otp_phone_address_limit: int = 3
    otp_address_guess_limit: int = 120
    otp_phone_address_guess_limit: int = 5
    otp_code_tries: int = 5  # wrong codes aimed at a code that end it
    # The SMS-cost cap: codes sent to one phone from all addresses per cap window. The one
    # lockout a stranger can cause (alerted on: ScangateOtpPhoneCap).
    otp_phone_cap: int = 20
    otp_phone_cap_window_s: float = 86400
    # Peers (load balancers, reverse proxies) whose Forwarded / X-Forwarded-For name the
    # client, as CIDRs: "10.0.0.0/8,2001:db8::/48". From any other peer both are ignored.
    trusted_proxies: str = ""
    session_ttl_s: float = 30 * 60  # a verified phone's session
    person_code_ttl_s: float = 30 * 86400  # a personal code's validity
    # Maximum stay per venue kind, over max_stay_s: "hospital=24h,lodging=24h".
    kind_max_stay: str = (
        "hospital=24h,lodging=24h,residential=24h,transport=12h,office=12h,school=12h"
    )
    # Exposure notices (gateway.outbox.notifier): how long a worker holds a notice it is
    # delivering, how often workers look for due ones, the first retry delay (doubling up
    # to 10 minutes) and how many tries before a notice is given up.
    notice_lease_s: float = 60
    notice_poll_s: float = 1
    notice_retry_s: float = 5
    notice_max_attempts: int = 30
    # Webhooks may reach private, loopback and link-local addresses (development and tests
    # only: otherwise a webhook URL could be aimed at services inside the network).
    webhook_private: bool = False
    # The door fallback (gateway.http.door): a manual scan is "now", its scanned_at within this
    # of receipt; person look-ups allowed per staff token and per venue in each window.
    door_scan_window_s: float = 300
    door_lookup_window_s: float = 60
    door_lookups_per_token: int = 30
    door_lookups_per_venue: int = 120
    # A gateway worker whose event loop has not run for this long is killed and replaced
    # by its supervisor (gunicorn's worker timeout): a handler stuck in a blocking call
    # must not hold the port while answering nothing.
    worker_timeout_s: float = 30
    # Each connection's deadlines (gateway.http.protocol): a request's head from its first
    # byte, its body from the end of the head; the idle time allowed between requests
    # (above a load balancer's own idle timeout, 60 s on most, so that it never reuses a
    # connection the gateway is closing); and a worker's cap on open connections.
    header_timeout_s: float = 5
    body_timeout_s: float = 10
    keepalive_timeout_s: float = 75
    max_connections: int = 1000
    # /metrics on a listener of its own (0: on the public port, as before), so the public
    # port need not show per-app volumes; Kubernetes scrapes the pod's address.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # The app the web pages act as (/khai-bao, /dang-ky-diem): None turns those pages off.
    web_app: str | None = None
    # Log lines (gateway.logs): text for people, json (one object per line) for collectors;
    # the level of scangate's own loggers (libraries stay at info or above).
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    # One line per request: method, route pattern, status, duration, bytes, request id, app.
    access_log: bool = False

    @property
    def keyring_path(self) -> Path:
        return self.data_dir / "keyring.json"

    @property
    def kind_max_stay_s(self) -> dict[str, float]:
        """``kind_max_stay`` parsed: venue kind -> maximum stay in seconds."""
        stays: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in self.kind_max_stay.split(","))):
            kind, sep, duration = item.partition("=")
            if not sep or kind.strip() not in VENUE_KINDS:
                raise ValueError(
                    f"{item!r}: write kind=duration, kind one of {', '.join(VENUE_KINDS)}"
                )
            stays[kind.strip()] = parse_duration_s(duration)
        return stays

    @property
    def trusted_proxy_networks(self) -> tuple[Network, ...]:
        """``trusted_proxies`` parsed."""
        return parse_networks(self.trusted_proxies)

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"sqlite:///{(self.data_dir / 'scangate.db').resolve()}"

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> Settings:
        """Settings from ``SCANGATE_*`` variables; ``overrides`` (CLI flags) win."""
        values: dict[str, object] = {}
        from_files: set[str] = set()  # variables whose value came from a file
        for f in dataclasses.fields(cls):
            var = "SCANGATE_" + f.name.upper()
            if var not in env and var + FILE_SUFFIX not in env:
                var = "SCANGATE_" + f.name.upper().removesuffix("_S")
            raw = _value_of(env, var)
            if raw is None or raw == "":
                continue
            if env.get(var + FILE_SUFFIX):
                from_files.add(var)
            try:
                values[f.name] = _convert(f.name, raw)
            except ValueError as exc:
                raise _refusal(var, str(exc), from_files) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        try:
            settings.check()
        except SettingsError as exc:
            var, _, why = str(exc).partition(": ")
            raise _refusal(var, why, from_files) from None
        return settings

    def check(self) -> None:
        if not 1 <= self.shards <= 16384:
            raise SettingsError("SCANGATE_SHARDS: use 1 to 16384")
        if not 0 <= self.clock_skew_s <= MAX_CLOCK_SKEW_S:
            # Storage reads no further ahead than two hours after the latest receipt
            # (storage.models.FUTURE_SCAN_LIMIT_MS): an hour of skew, an hour of margin.
            raise SettingsError("SCANGATE_CLOCK_SKEW: use 0 to 1h")
        if self.flush_batch < 1:
            raise SettingsError("SCANGATE_FLUSH_BATCH: use at least 1")
        if self.redis_cluster and not self.redis_url:
            raise SettingsError("SCANGATE_REDIS_CLUSTER=true needs SCANGATE_REDIS_URL (any node)")
        if self.redis_wait_replicas < 0:
            raise SettingsError("SCANGATE_REDIS_WAIT_REPLICAS: use 0 or more")
        if self.redis_fsync not in ("everysec", "always"):
            raise SettingsError("SCANGATE_REDIS_FSYNC: use everysec or always")
        if self.notice_max_attempts < 1:
            raise SettingsError("SCANGATE_NOTICE_MAX_ATTEMPTS: use at least 1")
        if self.notice_lease_s < 1:
            raise SettingsError("SCANGATE_NOTICE_LEASE: at least 1s (a delivery gets a third)")
        if self.audit_retention_s < 86400:
            raise SettingsError("SCANGATE_AUDIT_RETENTION: at least 1d")
        if self.worker_timeout_s < 2:
            raise SettingsError("SCANGATE_WORKER_TIMEOUT: at least 2s")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            if not 0.5 <= getattr(self, name) <= 3600:
                raise SettingsError(f"SCANGATE_{name.upper().removesuffix('_S')}: 500ms to 1h")
        if not 10 <= self.max_connections <= 1_000_000:
            raise SettingsError("SCANGATE_MAX_CONNECTIONS: 10 to 1000000")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError("SCANGATE_METRICS_PORT: 0 (on the public port) to 65535")
        if self.last_use_flush_s <= 0:
            raise SettingsError("SCANGATE_LAST_USE_FLUSH: over 0")
        if self.notice_poll_s <= 0 or self.notice_retry_s <= 0:
            raise SettingsError("SCANGATE_NOTICE_POLL and SCANGATE_NOTICE_RETRY: over 0")
        if self.door_lookups_per_token < 1 or self.door_lookups_per_venue < 1:
            raise SettingsError(
                "SCANGATE_DOOR_LOOKUPS_PER_TOKEN and SCANGATE_DOOR_LOOKUPS_PER_VENUE: at least 1"
            )
        if self.door_scan_window_s <= 0 or self.door_lookup_window_s < 1:
            raise SettingsError(
                "SCANGATE_DOOR_SCAN_WINDOW: over 0; SCANGATE_DOOR_LOOKUP_WINDOW: at least 1s"
            )
        if self.web_app is not None and not APP_ID_PATTERN.fullmatch(self.web_app):
            raise SettingsError("SCANGATE_WEB_APP: an app id, 2 to 16 of a-z0-9")
        if self.log_format not in ("text", "json"):
            raise SettingsError("SCANGATE_LOG_FORMAT: use text or json")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError("SCANGATE_LOG_LEVEL: use debug, info, warning or error")
        if self.sms not in ("log", "http"):
            raise SettingsError("SCANGATE_SMS: use log or http")
        if self.sms == "http" and not self.sms_url:
            raise SettingsError("SCANGATE_SMS=http needs SCANGATE_SMS_URL")
        if "{to}" not in self.sms_template or "{text}" not in self.sms_template:
            raise SettingsError("SCANGATE_SMS_TEMPLATE must contain {to} and {text}")
        self._check_otp()
        try:
            _ = self.kind_max_stay_s
        except ValueError as exc:
            raise SettingsError(f"SCANGATE_KIND_MAX_STAY: {exc}") from None
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise SettingsError(f"SCANGATE_TIMEZONE: unknown time zone {self.timezone!r}") from None

    def _check_otp(self) -> None:
        for name in _OTP_LIMITS:
            if getattr(self, name) < 0:
                raise SettingsError(f"SCANGATE_{name.upper()}: use 0 (off) or more")
        if self.otp_code_tries < 1:
            raise SettingsError("SCANGATE_OTP_CODE_TRIES: use at least 1")
        if self.otp_window_s < 1 or self.otp_phone_cap_window_s < 1:
            raise SettingsError("SCANGATE_OTP_WINDOW and SCANGATE_OTP_PHONE_CAP_WINDOW: 1s or more")
        try:
            _ = self.trusted_proxy_networks
        except ValueError as exc:
            raise SettingsError(f"SCANGATE_TRUSTED_PROXIES: {exc}") from None


_OTP_LIMITS: Final = (
    "otp_address_limit",
    "otp_phone_address_limit",
    "otp_address_guess_limit",
    "otp_phone_address_guess_limit",
    "otp_phone_cap",
)


FILE_SUFFIX: Final = "_FILE"


def _value_of(env: Mapping[str, str], var: str) -> str | None:
    """``var``'s value, or the contents of the file ``var_FILE`` names (trailing newlines
    dropped): how container platforms hand over secrets (a mounted Docker or Kubernetes
    secret), read here so every process and command sees them, ``compose exec`` included.
    Setting both is refused, as a guess between them could pick the stale one."""
    path = env.get(var + FILE_SUFFIX)
    if path is None or path == "":
        return env.get(var)
    if env.get(var):
        raise SettingsError(f"both {var} and {var}{FILE_SUFFIX} are set; use one")
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise SettingsError(f"{var}{FILE_SUFFIX}: cannot read {path}: {why}") from None


def _refusal(var: str, why: str, from_files: set[str]) -> SettingsError:
    """The error for a refused value. One read from a file is not quoted (the file may be
    a secret mounted under the wrong name, and the message goes to the logs): the message
    names the file's variable instead."""
    if var in from_files:
        return SettingsError(
            f"{var}{FILE_SUFFIX}: the file's contents are not a valid {var} (not shown: "
            "they may be a secret)"
        )
    return SettingsError(f"{var}: {why}")


def _convert(name: str, raw: str) -> object:
    """A variable's text as the type the field is declared with: a ``float`` field is a
    duration (``90s``, ``10m``; its name ends in ``_s``), an ``int`` a whole number, a
    ``bool`` true or false, a ``Literal`` one of its values, a ``Path`` a path; text
    otherwise."""
    kind = _field_types()[name]
    options = [t for t in typing.get_args(kind) if t is not type(None)]
    if isinstance(kind, types.UnionType) and len(options) == 1:
        kind = options[0]  # "X | None": the variable, when set, is an X
    if kind is float:
        return parse_duration_s(raw)
    if kind is int:
        if not raw.strip().isdecimal():
            raise ValueError(f"{raw!r} is not a whole number")
        return int(raw)
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{raw!r} is not true or false")
        return raw.lower() in ("true", "1", "yes")
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if raw not in allowed:
            raise ValueError(f"{raw!r}: use {' or '.join(allowed)}")
        return raw
    if kind is Path:
        return Path(raw)
    return raw


@functools.cache
def _field_types() -> dict[str, Any]:
    """Each settings field's declared type (the annotations are strings until resolved)."""
    return typing.get_type_hints(Settings)
