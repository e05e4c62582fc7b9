"""The ``scangate`` command line: ``main`` and ``build_parser``, which assembles the commands
of each group. The groups live in their own modules, each command's parser next to its
handler: ``service`` (serve, flush, notify, migrate, purge), ``tracing`` (trace, claims,
cases, report, audit), ``venues``, and ``apps`` (apps, admins, codes); ``common`` holds what
they share.

Output formats are a contract: JSON objects and arrays on stdout, one per line; a code
alone on its line. Bad arguments and failed operations print one line to stderr and exit 2;
``codes verify`` exits 1 for a code that does not verify.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.logs import configure_logging
from gateway.settings import Settings, SettingsError
from signing import SigningError
from storage import StorageError

from . import apps, service, tracing, venues
from .common import (
    EXIT_USAGE,
    PROG,
    Handler,
    OneLineParser,
    UsageError,
    common_options,
)
from .service import default_flushers

__all__ = ["build_parser", "default_flushers", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``handler``, the function that runs it."""
    parser = OneLineParser(
        prog=PROG,
        parents=[common_options()],
        description="scangate: scan ingestion gateway for QR health check-in. Verifies "
        "check-in/check-out scans signed with per-app keys, de-duplicates them, buffers them "
        "in Redis streams and pairs them into visits for contact tracing.",
        epilog="Each command has its own --help. Settings come from SCANGATE_* variables "
        "(docs/settings.md lists them; SCANGATE_<NAME>_FILE reads one from a file).",
    )
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", parser_class=OneLineParser)
    groups.required = True

    # In the order scangate --help has always listed them, which is not the modules' order.
    service.add_serve(groups)
    service.add_migrate(groups)
    service.add_flush(groups)
    service.add_status(groups)
    tracing.add_trace(groups)
    service.add_purge(groups)
    tracing.add_audit(groups)
    tracing.add_visits(groups)
    venues.add_venues(groups)
    tracing.add_claims(groups)
    apps.add_admins(groups)
    apps.add_apps(groups)
    tracing.add_cases(groups)
    tracing.add_report(groups)
    service.add_notify(groups)
    apps.add_codes(groups)
    return parser


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    """Run the command in ``argv`` (default: the process's) and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(
            os.environ if env is None else env,
            data_dir=Path(args.data_dir) if "data_dir" in args else None,
        )
        configure_logging(settings)  # SCANGATE_LOG_FORMAT and _LEVEL, as every process does
        handler: Handler = args.handler
        return handler(args, settings)
    except (UsageError, SigningError, SettingsError, StorageError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
