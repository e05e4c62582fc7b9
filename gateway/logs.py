"""Log lines, the same in every process (``scangate serve``'s supervisor, its workers and
flushers, every other command): ``configure_logging(settings)``; and the request id, which
every line logged while a request is handled carries.

Two formats (``SCANGATE_LOG_FORMAT``), both stamped in UTC to the millisecond:

- ``text``: ``2026-05-09T07:35:25.123Z INFO gateway.run.server[812]: message``, then
  ``request_id=…`` when there is one, and a traceback on the lines that follow;
- ``json``: one object per line: ``time``, ``level``, ``logger``, ``pid``, ``message``, and
  ``request_id``, ``exception`` and the access log's fields when there are.

``SCANGATE_LOG_LEVEL`` sets the level of scangate's own loggers (``gateway``, ``storage``,
``signing``). Libraries log at info and above whatever it says: their debug lines quote SQL
parameters, Redis commands and request bytes, which can hold personal data. The access log
(``SCANGATE_ACCESS_LOG``), asked for by its own setting, is written at any level.

A line is formatted whole and written in one call under the handler's lock, so lines of
threads never interleave, and those of processes sharing a pipe do not either while shorter
than the pipe's atomic write (4 KiB on Linux). A log call never raises: arguments that do
not fit their format give a line that says so, and a line that cannot be written is
dropped (logging's own fallback would print the record's arguments to stderr).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import time
from types import TracebackType
from typing import Final

import orjson

from gateway.settings import Settings

REQUEST_ID_HEADER: Final = "X-Request-Id"
# A caller's id is kept when it is this (what tracing systems and load balancers send);
# anything else could be a vehicle for log injection or personal data, and is replaced.
# The scans' written answer puts it into its head unescaped (gateway.http.front_door):
# ASCII only, never CR or LF.
SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_BITS: Final = 64  # 16 hex digits

OWN_LOGGERS: Final = ("gateway", "storage", "signing")
LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# The access log's logger: one line per request (SCANGATE_ACCESS_LOG).
ACCESS: Final = logging.getLogger("gateway.access")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# A request id only tells log lines apart: it grants nothing, so it need not be
# unpredictable (never make it a key or a secret: a caller sees many and may send its
# own), and drawing it from the OS's random source cost a system call per request (2% of
# a single-event scan). The generator is seeded from that source once per process, and
# again in a forked child, so no two processes draw the same ids.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def bind_request_id(offered: str | None) -> str:
    """The id of the request now being handled: ``offered`` (its ``X-Request-Id``) when
    sane, else a new one. It is bound to the current context, so every line logged from
    here on in this task, and in the tasks and threads it starts, carries it. Every route
    calls this first, whatever serves it."""
    request_id = (
        offered
        if offered is not None and SANE_REQUEST_ID.fullmatch(offered)
        else f"{_ids.getrandbits(REQUEST_ID_BITS):016x}"
    )
    _request_id.set(request_id)
    return request_id


def current_request_id() -> str | None:
    """The id ``bind_request_id`` bound in this context; None outside a request."""
    return _request_id.get()


def log_access(
    method: str,
    route: str,
    status: int,
    duration_s: float,
    body_bytes: int,
    app_id: str | None,
) -> None:
    """The access log's line for one answer. ``route`` is the route's pattern, never the
    path (which can hold ids); nothing about the client, its headers or its query."""
    duration_ms = round(duration_s * 1000, 1)
    ACCESS.info(
        "%s %s %d %.1fms %dB%s",
        method,
        route,
        status,
        duration_ms,
        body_bytes,
        f" app={app_id}" if app_id else "",
        extra={
            "fields": {
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": duration_ms,
                "bytes": body_bytes,
                "app": app_id,
            }
        },
    )


def configure_logging(settings: Settings) -> None:
    """Send this process's log lines to stderr in the settings' format and level. Called
    again (a command that runs a flusher in-process), it replaces what it set before."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, StderrLines)]:
        root.removeHandler(old)
    handler = StderrLines()
    handler.setFormatter(JsonLines() if settings.log_format == "json" else TextLines())
    handler.addFilter(RequestIdStamp())
    root.addHandler(handler)
    level = LEVELS[settings.log_level]
    root.setLevel(max(level, logging.INFO))
    for name in OWN_LOGGERS:  # below info, for scangate's loggers only; else as the root
        logging.getLogger(name).setLevel(level if level < logging.INFO else logging.NOTSET)
    # Asked for by its own setting, the access log is written whatever the level.
    ACCESS.setLevel(logging.INFO if settings.access_log else logging.NOTSET)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


class RequestIdStamp(logging.Filter):
    """Stamps each record with the request id of the context that logged it (None outside
    a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


class StderrLines(logging.Handler):
    """Writes each record as one line (a traceback's lines included) to the process's
    stderr, looked up at each line so a redirected stderr is followed."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0  # lines that could not be written

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            stream = sys.stderr
            stream.write(line)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            # Nowhere left to say it (stderr is closed or full): count it, and never fall
            # back to logging's handleError, which prints the record's arguments.
            self.dropped += 1


class TextLines(logging.Formatter):
    """``<time> <LEVEL> <logger>[<pid>]: <message> request_id=<id>``, traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{utc_time(record)} {record.levelname} {record.name}[{record.process}]: "
        line += message_of(record)
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line += f" request_id={request_id}"
        if problem := self.problem_of(record):
            line += "\n" + problem
        return line

    def problem_of(self, record: logging.LogRecord) -> str:
        """The record's traceback and stack, when it has them."""
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)


class JsonLines(TextLines):
    """One JSON object per line (see the module's docstring for its fields)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": utc_time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": message_of(record),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            doc["request_id"] = request_id
        if problem := self.problem_of(record):
            doc["exception"] = problem
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update((k, v) for k, v in fields.items() if k not in doc)
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:
            # Text orjson refuses (a lone surrogate, from bytes decoded with
            # surrogateescape): the standard library escapes it.
            return json.dumps(doc, default=str)


def utc_time(record: logging.LogRecord) -> str:
    """``2026-05-09T07:35:25.123Z``: the record's time in UTC, to the millisecond."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{whole}.{int(record.msecs):03d}Z"


def message_of(record: logging.LogRecord) -> str:
    """The record's message; a call whose arguments do not fit its format gives its
    template and says so, rather than raising."""
    try:
        return record.getMessage()
    except Exception:
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        return f"{template} (its arguments did not fit: not logged)"


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """An exception that ends the process, logged as a line like any other (Ctrl-C
    as Python says it)."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("gateway").critical("uncaught exception", exc_info=(kind, exc, tb))
