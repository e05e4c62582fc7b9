"""The commands health officials use on the data: ``trace`` (the contacts of a person, or
everyone a national id names), ``claims`` (national ids claimed more than once), ``cases``
(confirmed cases and their exposure notices), ``report`` (daily figures) and ``audit`` (the
log of who did which of these). Each works through the same functions as the HTTP API, and
what it reads or decides is audit-logged with ``cli:<user>`` as the actor."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson

from gateway.settings import Settings
from storage import Storage, connect_storage

from .common import (
    EXIT_INVALID,
    PROG,
    Subcommands,
    UsageError,
    cli_actor,
    command_group,
    emit,
    entity_id,
    leaf,
    open_keyring,
    personal_data,
    run_storage,
)

CLI_MAX_AUDIT_ENTRIES = 100_000


def unknown_person(detail: str) -> int:
    """A trace of nobody: one line, exit 1 (an empty list would read as "no contacts")."""
    sys.stderr.write(f"{PROG}: unknown person: {detail}\n")
    return EXIT_INVALID


def add_trace(groups: Subcommands) -> None:
    """Add ``trace``: a person's contacts, or everyone a phone or national id names."""
    p = leaf(
        groups,
        "trace",
        cmd_trace,
        "contacts of a person: one row per pair of overlapping visits (audit-logged)",
    )
    p.add_argument(
        "person_id", metavar="PERSON_ID", type=entity_id, nargs="?", help="the case's person id"
    )
    p.add_argument(
        "--phone",
        metavar="NUMBER",
        help="instead of PERSON_ID: everyone declared from this phone (a family shares one), "
        "with their visits and contacts; JSON only; with --national-id, one search of both",
    )
    p.add_argument(
        "--national-id",
        metavar="NUMBER",
        help="instead of PERSON_ID: everyone this id number names (every claimant, and the "
        "person its ID card was recorded under at the doors), with their visits; JSON only",
    )
    p.add_argument("--days", type=int, default=14, help="how far back (default 14)")
    p.add_argument(
        "--margin",
        default="60m",
        metavar="DURATION",
        help="widen the case's visits by this on both sides (default 60m)",
    )
    p.add_argument(
        "--min-overlap",
        default="10m",
        metavar="DURATION",
        help="shortest overlap that counts (default 10m)",
    )
    p.add_argument(
        "--depth",
        type=int,
        choices=(1, 2),
        default=1,
        help="2 adds the contacts of each contact (default 1)",
    )
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument(
        "--reveal",
        action="store_true",
        help="add each contact's full_name and phone (decrypted; the reveal is audit-logged)",
    )


def cmd_trace(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.trace import revealed_batches, trace_query
    from storage.tracing import csv_header, csv_lines, rows_to_json

    searching = args.national_id is not None or args.phone is not None
    if (args.person_id is None) == (not searching):
        raise UsageError("give PERSON_ID, or --phone and/or --national-id (not both kinds)")
    if searching:
        return _trace_search(args, settings)
    try:
        query = trace_query(
            args.person_id,
            {
                "days": str(args.days),
                "margin": args.margin,
                "min_overlap": args.min_overlap,
                "depth": str(args.depth),
            },
            now_ms=int(time.time() * 1000),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    actor = cli_actor()

    async def work(storage: Storage) -> int:
        replica = None
        if settings.trace_storage_url:
            replica = await connect_storage(
                settings.trace_storage_url, timezone=settings.timezone, migrate=False
            )
        if not await (replica or storage).person_known(args.person_id) and not (
            await storage.person_known(args.person_id)
        ):
            if replica is not None:
                await replica.close()
            await storage.audit(actor, "trace", args.person_id, "unknown person")
            return unknown_person(f"nothing is stored of {args.person_id}")
        personal = await personal_data(storage, settings) if args.reveal else None
        out = sys.stdout
        # Written as the trace goes, however many rows: CSV line by line, JSON as one
        # array on one line (the output contract), a batch of rows at a time.
        out.write(csv_header(args.reveal, venues=True) if args.format == "csv" else "[")
        first = True
        try:
            batches = revealed_batches(
                storage.trace_stream(query, actor, replica), storage, personal, actor,
                args.person_id,
            )  # fmt: skip
            async for rows, revealed, venues in batches:
                if args.format == "csv":
                    out.write(csv_lines(rows, revealed, venues))
                    continue
                for item in rows_to_json(rows, revealed, venues):
                    out.write(("" if first else ",") + orjson.dumps(item).decode())
                    first = False
        finally:
            if replica is not None:
                await replica.close()
        if args.format == "json":
            out.write("]\n")
        out.flush()
        return 0

    return run_storage(settings, work)


def _trace_search(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.claims import trace_search
    from gateway.http.errors import InvalidField, InvalidPhone, UnknownPerson
    from gateway.http.people import national_id, normalise_phone

    if args.format != "json":
        raise UsageError(
            "--phone and --national-id answer in JSON only (persons, visits, contacts)"
        )
    try:
        id_number = (
            national_id(args.national_id, "--national-id") if args.national_id is not None else None
        )
        phone = normalise_phone(args.phone) if args.phone is not None else None
    except InvalidField as exc:
        raise UsageError(f"--national-id: {exc.detail}") from None
    except InvalidPhone as exc:
        raise UsageError(f"--phone: {exc.detail}") from None
    params = {
        "days": str(args.days),
        "margin": args.margin,
        "min_overlap": args.min_overlap,
        "depth": str(args.depth),
    }

    async def work(storage: Storage) -> int:
        personal = await personal_data(storage, settings)
        try:
            found = await trace_search(
                storage,
                personal,
                params,
                cli_actor(),
                phone=phone,
                id_number=id_number,
                reveal=args.reveal,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except UnknownPerson as exc:
            return unknown_person(exc.detail)
        emit(found)
        return 0

    return run_storage(settings, work)


def add_claims(groups: Subcommands) -> None:
    """Add ``claims list`` and ``claims accept``: national ids claimed more than once."""
    claims_sub = command_group(
        groups,
        "claims",
        help="national ids claimed by more than one declaration: list, accept one",
        description="A declaration claims a national id for the person it makes; several "
        "claims on one id compete (none is refused) until an official accepts one, which "
        "rejects the others. Reads and decisions are audit-logged.",
    )
    p = leaf(
        claims_sub,
        "list",
        cmd_claims_list,
        "claims on ids claimed more than once, grouped; unresolved ones unless --all",
    )
    p.add_argument("--all", action="store_true", help="also the groups already resolved")
    p.add_argument(
        "--reveal",
        action="store_true",
        help="add each claimant's declared full_name and phone (decrypted; audit-logged)",
    )
    p = leaf(
        claims_sub,
        "accept",
        cmd_claims_accept,
        "accept a claim: it stands, every other claim on the same id is rejected",
    )
    p.add_argument("claim_id", metavar="CLAIM_ID", type=entity_id)


def cmd_claims_list(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.claims import contested_claims

    async def work(storage: Storage) -> int:
        personal = await personal_data(storage, settings)
        listed, _ = await contested_claims(
            storage,
            personal,
            cli_actor(),
            include_resolved=args.all,
            reveal=args.reveal,
        )
        emit({"claims": listed})
        return 0

    return run_storage(settings, work)


def cmd_claims_accept(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.claims import accept_claim
    from gateway.http.errors import NotFound

    async def work(storage: Storage) -> int:
        try:
            emit(await accept_claim(storage, args.claim_id, cli_actor()))
        except NotFound:
            raise UsageError(f"no claim {args.claim_id}") from None
        return 0

    return run_storage(settings, work)


def add_cases(groups: Subcommands) -> None:
    """Add ``cases add`` and ``cases show``: confirmed cases and their notices."""
    cases_sub = command_group(
        groups,
        "cases",
        help="confirmed cases: exposure notices to their contacts",
        description="Record a confirmed case: its contacts (the trace over the 14 days "
        "before confirmation) are notified through their apps' webhooks, or by SMS.",
    )
    p = leaf(
        cases_sub,
        "add",
        cmd_cases_add,
        "record a case and queue its notices; prints {case_id, contacts, notices} (audit-logged)",
    )
    p.add_argument("person_id", metavar="PERSON_ID", type=entity_id)
    p.add_argument(
        "--confirmed-at",
        required=True,
        metavar="TIME",
        help="RFC 3339 with an offset (2026-11-25T09:30:00+07:00) or epoch milliseconds",
    )
    p.add_argument("--note", help="free text for officials (stored encrypted)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the contacts and the notices that would be sent; store and send nothing",
    )
    p = leaf(
        cases_sub,
        "show",
        cmd_cases_show,
        "a case and each notice's delivery state (audit-logged as case_read)",
    )
    p.add_argument("case_id", metavar="CASE_ID", type=entity_id)


def cmd_cases_add(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.cases import audit_preview, check_case_request, plan_case, record_case
    from gateway.http.errors import ApiError

    now_ms = int(time.time() * 1000)
    raw = args.confirmed_at
    try:
        person_id, confirmed_at_ms, note = check_case_request(
            {
                "person_id": args.person_id,
                "confirmed_at": int(raw) if raw.isdecimal() else raw,
                "note": args.note,
            },
            now_ms,
            int(settings.clock_skew_s * 1000),
            int(settings.retention_s * 1000),
        )
    except ApiError as exc:
        raise UsageError(exc.detail) from None
    keyring = open_keyring(settings)
    actor = cli_actor()

    async def work(storage: Storage) -> int:
        known = None if args.dry_run else await storage.case_confirmed(person_id, confirmed_at_ms)
        if known is not None:  # the same case again: the one already recorded
            emit({"case_id": known.case_id, "contacts": known.contacts, "notices": known.notices})
            return 0
        personal = await personal_data(storage, settings)
        plan = await plan_case(storage, keyring, personal, person_id, confirmed_at_ms, note, actor)
        if args.dry_run:
            await audit_preview(storage, plan)
            emit(plan.preview())
            return 0
        await record_case(storage, plan)
        emit(
            {"case_id": plan.case.case_id, "contacts": plan.contacts, "notices": len(plan.notices)}
        )
        return 0

    return run_storage(settings, work)


def cmd_cases_show(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.cases import read_case

    async def work(storage: Storage) -> int:
        personal = await personal_data(storage, settings)
        shown = await read_case(storage, personal, args.case_id, cli_actor())
        if shown is None:
            raise UsageError(f"no case {args.case_id}")
        emit(shown)
        return 0

    return run_storage(settings, work)


def add_report(groups: Subcommands) -> None:
    """Add ``report``: the daily figures, as JSON, CSV or a chart."""
    p = leaf(
        groups,
        "report",
        cmd_report,
        "daily report per province, venue kind or venue: scans, check-ins, persons, visits, "
        "median stay, peak occupancy (days in SCANGATE_TIMEZONE)",
    )
    p.add_argument("--from", dest="first", required=True, metavar="YYYY-MM-DD", help="first day")
    p.add_argument(
        "--to", dest="last", required=True, metavar="YYYY-MM-DD", help="last day (at most 92)"
    )
    p.add_argument("--by", choices=("province", "venue_kind", "venue"), default="province")
    p.add_argument(
        "--format",
        choices=("json", "csv", "png"),
        default="json",
        help="png: a chart for a steering committee (needs -o)",
    )
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here, not stdout")


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.report_chart import render_chart
    from gateway.http.reports import (
        build_report,
        epidemic,
        group_names,
        report_json,
        report_range,
    )
    from storage.reports import rows_to_csv

    try:
        today = dt.datetime.now(ZoneInfo(settings.timezone)).date()
        first_day, last_day = report_range(args.first, args.last, today)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    if args.format == "png" and args.output is None:
        raise UsageError("--format png writes a file: give -o FILE.png")
    actor = cli_actor()

    async def work(storage: Storage) -> int:
        rows = await build_report(storage, first_day, last_day, args.by, settings.timezone)
        await storage.audit(actor, "report", args.by, f"from={first_day} to={last_day}")
        names = await group_names(storage, rows, args.by)
        if args.format == "png":
            national = await epidemic(storage, last_day, settings.timezone)
            args.output.write_bytes(
                render_chart(rows, args.by, first_day, last_day, names, national)
            )
            emit({"file": str(args.output), "rows": len(rows)})
            return 0
        if args.format == "csv":
            text = rows_to_csv(rows)
        else:
            text = (
                orjson.dumps(
                    report_json(rows, first_day, last_day, args.by, settings.timezone, names)
                    | {"epidemic": await epidemic(storage, last_day, settings.timezone)}
                ).decode()
                + "\n"
            )
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.write_text(text, encoding="utf-8", newline="")
            emit({"file": str(args.output), "rows": len(rows)})
        return 0

    return run_storage(settings, work)


def add_audit(groups: Subcommands) -> None:
    """Add ``audit``: a page of the audit log."""
    p = leaf(
        groups,
        "audit",
        cmd_audit,
        "read the audit log (who traced, revealed, read or changed what): a JSON array of "
        "{id, at, actor, action, subject, detail}, oldest first; this read is logged too",
    )
    p.add_argument(
        "--since",
        metavar="DURATION_OR_TIME",
        help="entries from this long ago (7d, 12h) or from this time (RFC 3339 with an "
        "offset, or epoch ms); default 1d",
    )
    p.add_argument("--actor", metavar="NAME", help="only this actor, e.g. admin:officer1, cli:root")
    p.add_argument(
        "--action",
        metavar="NAME",
        help="only this action, e.g. trace, reveal, case_read, admin_revoked",
    )
    p.add_argument(
        "--after",
        metavar="ID",
        help="entries after this id (a full page says on stderr which id to continue after)",
    )
    p.add_argument(
        "--limit",
        metavar="N",
        help=f"at most N entries (default 100, at most {CLI_MAX_AUDIT_ENTRIES})",
    )


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.audit import audit_query, entries_json, next_after, read_audit_log

    given = {
        "since": args.since,
        "actor": args.actor,
        "action": args.action,
        "after": args.after,
        "limit": args.limit,
    }
    try:
        query = audit_query(
            {k: v for k, v in given.items() if v is not None},
            int(time.time() * 1000),
            max_limit=CLI_MAX_AUDIT_ENTRIES,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    async def work(storage: Storage) -> int:
        records = await read_audit_log(storage, query, cli_actor())
        emit(entries_json(records))
        following = next_after(records, query)
        if following is not None:
            sys.stderr.write(f"{PROG}: more entries: add --after {following}\n")
        return 0

    return run_storage(settings, work)


def add_visits(groups: Subcommands) -> None:
    """Add ``visits``: what is stored of one person."""
    p = leaf(
        groups,
        "visits",
        cmd_visits,
        "a person's stored scan events and visits: {person_id, events, visits} "
        "(the read is audit-logged)",
    )
    p.add_argument("person_id", metavar="PERSON_ID", type=entity_id)


def cmd_visits(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.stored import person_record

    async def work(storage: Storage) -> int:
        if not await storage.person_known(args.person_id):
            return unknown_person(f"nothing is stored of {args.person_id}")
        emit(await person_record(storage, args.person_id, cli_actor()))
        return 0

    return run_storage(settings, work)
