"""Time at the edges: RFC 3339 or epoch milliseconds in, RFC 3339 UTC with milliseconds out.

Inside scangate a time is an integer of epoch milliseconds (UTC).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

_UTC: Final = dt.UTC
# RFC 3339 date-time: a "T" (or space) separator, optional fraction, and a mandatory offset.
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"  # ASCII digits only
    r"(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
# Epoch ms accepted as input: 1970 to year 9999, so arithmetic never overflows a timestamp.
MAX_EPOCH_MS: Final = 253_402_300_799_999


def parse_time_ms(value: object) -> int:
    """Epoch ms from RFC 3339 text with an offset or an integer of epoch ms.

    Raises ValueError with a message fit for an API ``detail``.
    """
    if type(value) is int:
        if not 0 <= value <= MAX_EPOCH_MS:
            raise ValueError("epoch milliseconds out of range")
        return value
    if isinstance(value, str):
        if len(value) > 40 or not _RFC3339.fullmatch(value):
            raise ValueError("not RFC 3339 with an offset (e.g. 2026-11-25T10:04:05+07:00)")
        text = value.replace("z", "Z").replace("t", "T")
        frac = re.search(r"\.([0-9]+)", text)
        if frac and len(frac.group(1)) > 6:  # fromisoformat takes at most microseconds
            text = text.replace(frac.group(0), "." + frac.group(1)[:6])
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("not a valid date and time") from None
        # Whole seconds and milliseconds apart: float seconds * 1000 can round wrong.
        ms = int(parsed.replace(microsecond=0).timestamp()) * 1000 + parsed.microsecond // 1000
        if not 0 <= ms <= MAX_EPOCH_MS:
            raise ValueError("time out of range")
        return ms
    raise ValueError("expected RFC 3339 text with an offset or integer epoch milliseconds")


def format_time_ms(ms: int) -> str:
    """``2026-11-25T03:04:05.678Z``."""
    moment = dt.datetime.fromtimestamp(ms // 1000, _UTC).replace(microsecond=(ms % 1000) * 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
