"""The commands that run scangate and look after its storage: ``serve`` (the HTTP gateway,
its flusher processes and, by default, an embedded Valkey), ``flush`` and ``notify`` (one
flusher or one outbox worker on its own), ``migrate`` and ``purge``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from gateway.settings import Settings
from storage import Storage
from storage.times import format_time_ms

from .common import (
    Subcommands,
    UsageError,
    common_options,
    emit,
    leaf,
    open_keyring,
    personal_data,
    run_storage,
)


def add_serve(groups: Subcommands) -> None:
    """Add ``serve``: the HTTP gateway with its workers, flushers and Valkey."""
    p = groups.add_parser(
        "serve",
        parents=[common_options()],
        help="run the HTTP gateway (embedded Valkey unless SCANGATE_REDIS_URL is set)",
        description="Run the HTTP gateway: the /v1 API (see /openapi.json), the web pages "
        "(/, /khai-bao, ...), /healthz, /readyz, /metrics; each worker also delivers "
        "exposure notices. With SCANGATE_REDIS_URL unset it starts a Valkey server under "
        "the data dir (append-only file on) and stops it on exit. SIGTERM stops accepting, "
        "finishes requests in flight and exits 0.",
    )
    p.set_defaults(handler=cmd_serve)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes sharing the port with SO_REUSEPORT (default 1)",
    )
    p.add_argument(
        "--flushers",
        type=int,
        metavar="N",
        help="flusher processes to start (default 1 on SQLite, 2 on PostgreSQL)",
    )
    p.add_argument(
        "--no-flusher",
        action="store_true",
        help="start no flusher process (run scangate flush elsewhere); same as --flushers 0",
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.run.server import ServeOptions, serve
    from gateway.run.supervision import AlreadyServing

    if not 1 <= args.workers <= 64:
        raise UsageError("--workers: use 1 to 64")
    if not 0 < args.port < 65536:
        raise UsageError("--port: use 1 to 65535")
    if args.no_flusher:
        flushers = 0
    elif args.flushers is not None:
        if not 0 <= args.flushers <= 16:
            raise UsageError("--flushers: use 0 to 16")
        flushers = args.flushers
    else:
        flushers = default_flushers(settings)
    options = ServeOptions(host=args.host, port=args.port, workers=args.workers, flushers=flushers)
    try:
        return serve(settings, options)
    except AlreadyServing as exc:
        raise UsageError(str(exc)) from None


def default_flushers(settings: Settings) -> int:
    """One flusher on SQLite (one writer at a time anyway); two on PostgreSQL, whose
    server works on one batch while the other flusher's Python prepares the next (the
    benchmarks measured 17k events/s with two, against 13k with one)."""
    return 1 if settings.resolved_storage_url.startswith("sqlite:") else 2


def add_migrate(groups: Subcommands) -> None:
    """Add ``migrate``: the schema brought up to date, with nothing else run."""
    leaf(
        groups,
        "migrate",
        cmd_migrate,
        "apply pending schema migrations to SCANGATE_STORAGE_URL (also done at start-up)",
    )


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    async def work(storage: Storage) -> int:
        emit({"storage": storage.kind, "migrated": True})
        return 0

    return run_storage(settings, work)


def add_flush(groups: Subcommands) -> None:
    """Add ``flush``: one flusher on its own, with its own metrics port."""
    p = leaf(
        groups,
        "flush",
        cmd_flush,
        "run a flusher: move buffered scans from Redis into storage until SIGTERM",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve this flusher's Prometheus metrics on HOST:PORT",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 in a container)",
    )


def cmd_flush(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.run.server import run_flusher

    if settings.redis_url is None:
        raise UsageError("scangate flush needs SCANGATE_REDIS_URL (serve runs its own flusher)")
    return run_flusher(settings, metrics_port=args.metrics_port, metrics_host=args.metrics_host)


def add_purge(groups: Subcommands) -> None:
    """Add ``purge``: what retention no longer keeps, deleted now."""
    leaf(
        groups,
        "purge",
        cmd_purge,
        "delete events, visits and cases older than SCANGATE_RETENTION, and audit entries "
        "older than SCANGATE_AUDIT_RETENTION (the flusher does it daily); a visit still open "
        "at the cutoff stays until a later purge",
    )


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    cutoff_ms = int((time.time() - settings.retention_s) * 1000)
    audit_cutoff_ms = int((time.time() - settings.audit_retention_s) * 1000)

    async def work(storage: Storage) -> int:
        from gateway.pipeline.flusher import pairing_rules, with_venue_stays

        # The flusher's rules: what retention keeps at its cutoff depends on the stays.
        rules = with_venue_stays(pairing_rules(settings), settings, await storage.venue_kinds())
        result = await storage.purge(cutoff_ms, rules)
        cases = await storage.purge_cases(cutoff_ms)
        audit_entries = await storage.purge_audit(audit_cutoff_ms)
        emit(
            {
                "cutoff": format_time_ms(cutoff_ms),
                "events": result.events,
                "visits": result.visits,
                "partitions_dropped": result.partitions_dropped,
                "cases": cases,
                "audit_cutoff": format_time_ms(audit_cutoff_ms),
                "audit_entries": audit_entries,
            }
        )
        return 0

    return run_storage(settings, work)


def add_notify(groups: Subcommands) -> None:
    """Add ``notify``: one outbox worker on its own."""
    leaf(
        groups,
        "notify",
        cmd_notify,
        "deliver exposure notices from the outbox until SIGTERM (serve's workers do too)",
    )


def cmd_notify(args: argparse.Namespace, settings: Settings) -> int:
    """The outbox worker alone, until SIGTERM or SIGINT (serve's workers run one each)."""
    from gateway.background import Periodic
    from gateway.outbox.notifier import Notifier, run_until
    from gateway.outbox.sms import make_sms_sender
    from gateway.run.server import stop_on_signals

    keyring = open_keyring(settings)

    async def work(storage: Storage) -> int:
        personal = await personal_data(storage, settings)
        sms = make_sms_sender(settings)
        notifier = Notifier(storage, keyring, personal, sms, settings)
        stop = asyncio.Event()
        stop_on_signals(stop)

        async def refresh_keyring() -> None:  # webhooks set with the CLI reach us in 2 s
            await asyncio.to_thread(keyring.refresh)

        refresher = Periodic("keyring-refresh", refresh_keyring, 2.0)
        # Logged under the command line's name, as it was before the commands were split
        # into modules: whatever filters the logs by name keeps seeing it.
        logging.getLogger("gateway.run.cli").info("notifier %s delivering notices", notifier.owner)
        try:
            await run_until(stop, notifier, settings.notice_poll_s)
        finally:
            await refresher.stop()
            await notifier.close()
            await sms.close()
        return 0

    return run_storage(settings, work)


def add_status(groups: Subcommands) -> None:
    """Add ``status``: the buffer, storage and outbox at a glance."""
    p = leaf(
        groups,
        "status",
        cmd_status,
        "the buffer's backlog per shard and its oldest entry's age, the last flush, the "
        "events and visits stored and the notices pending (as JSON, or --format table)",
    )
    p.add_argument("--format", choices=("json", "table"), default="json")


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.stored import pipeline_status
    from gateway.pipeline.client import connect_redis
    from gateway.pipeline.status import status_table

    url = settings.redis_url or embedded_redis_url(settings)

    async def work(storage: Storage) -> int:
        client = None if url is None else connect_redis(url, settings.redis_cluster)
        try:
            doc = await pipeline_status(client, settings.shards, storage)
        finally:
            if client is not None:
                await client.aclose()
        if args.format == "table":
            sys.stdout.write(status_table(doc))
        else:
            emit(doc)
        return 0

    return run_storage(settings, work)


def embedded_redis_url(settings: Settings) -> str | None:
    """The URL of the embedded server a running ``serve`` on this data dir started
    (``serve`` writes it down), or None."""
    from gateway.run.embedded import EMBEDDED_URL_FILE

    try:
        return (settings.data_dir / EMBEDDED_URL_FILE).read_text("ascii").strip() or None
    except OSError:
        return None
