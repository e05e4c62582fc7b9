"""The ``venues`` commands: register a venue for an app (its code signed with the app's
key), revoke it, mint and revoke door-staff tokens for manual check-ins, and write its
printable poster."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gateway.settings import Settings
from storage import Storage
from storage.models import VENUE_KINDS

from .common import (
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


def add_venues(groups: Subcommands) -> None:
    """Add ``venues`` and its actions: add, revoke, staff-token, revoke-staff-token, poster."""
    venues_sub = command_group(
        groups,
        "venues",
        help="venues: register, revoke, door-staff tokens, posters",
        description="Venues: register, revoke, door-staff tokens, posters.",
    )
    p = leaf(
        venues_sub,
        "add",
        cmd_venues_add,
        "register a venue for an app; prints {venue_id, code}",
    )
    p.add_argument("--app", required=True, metavar="APP_ID", help="the app that issues its code")
    p.add_argument("--name", required=True, help="the venue's name, as on its poster")
    p.add_argument("--phone", required=True, help="a Vietnamese mobile number (kept encrypted)")
    p.add_argument("--address", required=True)
    p.add_argument("--province", required=True)
    p.add_argument(
        "--kind",
        default="other",
        choices=VENUE_KINDS,
        help="what the venue is; some kinds have a longer maximum stay (default other)",
    )
    p = leaf(
        venues_sub,
        "revoke",
        cmd_venues_revoke,
        "refuse the venue's code from now on (gateways pick it up within 2 s)",
    )
    p.add_argument("venue_id", metavar="VENUE_ID", type=entity_id)
    p = leaf(
        venues_sub,
        "staff-token",
        cmd_venues_staff_token,
        "a token for manual check-ins at this venue only; prints {token, token_id, venue_id}",
    )
    p.add_argument("venue_id", metavar="VENUE_ID", type=entity_id)
    p = leaf(
        venues_sub,
        "revoke-staff-token",
        cmd_venues_revoke_staff_token,
        "revoke a door-staff token by its token_id",
    )
    p.add_argument("token_id", metavar="TOKEN_ID", type=entity_id)
    p = leaf(
        venues_sub,
        "poster",
        cmd_venues_poster,
        "write the venue's printable A4 poster (.svg, .png or .pdf)",
    )
    p.add_argument("venue_id", metavar="VENUE_ID", type=entity_id)
    p.add_argument("--app", metavar="APP_ID", help="check the venue belongs to this app")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE")


def cmd_venues_add(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.errors import ApiError
    from gateway.http.people import parse_venue
    from gateway.http.venues import register_venue

    keyring = open_keyring(settings)
    doc = {
        "name": args.name,
        "phone": args.phone,
        "address": args.address,
        "province": args.province,
        "kind": args.kind,
    }
    try:
        form = parse_venue(doc)
    except ApiError as exc:
        raise UsageError(exc.detail) from None

    async def work(storage: Storage) -> int:
        personal = await personal_data(storage, settings)
        emit(await register_venue(storage, keyring, personal, args.app, form))
        return 0

    return run_storage(settings, work)


def cmd_venues_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def work(storage: Storage) -> int:
        venue = await storage.venue(args.venue_id)
        if venue is None:
            raise UsageError(f"no registered venue {args.venue_id}")
        changed = await storage.revoke_venue(args.venue_id, int(time.time() * 1000))
        await storage.audit(cli_actor(), "venue_revoked", args.venue_id)
        emit({"venue_id": args.venue_id, "revoked": True, "already": not changed})
        return 0

    return run_storage(settings, work)


def cmd_venues_staff_token(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.venues import new_staff_token

    async def work(storage: Storage) -> int:
        venue = await storage.venue(args.venue_id)
        if venue is None:
            raise UsageError(f"no registered venue {args.venue_id}")
        emit(await new_staff_token(storage, venue))
        return 0

    return run_storage(settings, work)


def cmd_venues_revoke_staff_token(args: argparse.Namespace, settings: Settings) -> int:
    async def work(storage: Storage) -> int:
        if not await storage.revoke_staff_token(args.token_id, int(time.time() * 1000)):
            raise UsageError(f"no live staff token {args.token_id}")
        emit({"token_id": args.token_id, "revoked": True})
        return 0

    return run_storage(settings, work)


def cmd_venues_poster(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.http.venues import poster

    suffix = args.output.suffix.lower().lstrip(".")
    if suffix not in ("svg", "png", "pdf"):
        raise UsageError(f"{args.output.name}: the output must end in .svg, .png or .pdf")
    keyring = open_keyring(settings)

    async def work(storage: Storage) -> int:
        venue = await storage.venue(args.venue_id)
        if venue is None or (args.app is not None and venue.app_id != args.app):
            raise UsageError(f"no venue {args.venue_id} registered by app {args.app}")
        args.output.write_bytes(poster(keyring, venue, suffix))
        emit({"venue_id": venue.venue_id, "file": str(args.output)})
        return 0

    return run_storage(settings, work)
