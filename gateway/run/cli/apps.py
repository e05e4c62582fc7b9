"""The commands for who may issue codes and call the API: ``apps`` (an app's signing keys,
API tokens and webhook, kept in the keyring), ``admins`` (health officials' tokens, kept in
storage) and ``codes`` (issue, verify and render codes with an app's keys)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from gateway.settings import Settings
from signing import parse_code, render_to_file, standard_secret, token_id
from storage import Storage
from storage.times import format_time_ms

from .common import (
    EXIT_INVALID,
    PROG,
    Subcommands,
    UsageError,
    cli_actor,
    command_group,
    duration,
    emit,
    entity_id,
    leaf,
    open_keyring,
    run_storage,
)


def add_apps(groups: Subcommands) -> None:
    """Add ``apps`` and its actions: keys, API tokens and the webhook of an app."""
    apps_sub = command_group(
        groups,
        "apps",
        help="apps that issue codes: keys and tokens",
        description="Apps that issue codes: keys and tokens.",
    )
    p = leaf(
        apps_sub,
        "add",
        cmd_apps_add,
        "register an app; prints {app_id, prefix, kid, token, token_id} (the token only now)",
    )
    p.add_argument("app_id", metavar="APP_ID", help="2 to 16 characters of a-z0-9")
    p.add_argument(
        "--prefix",
        metavar="PFX",
        help="code prefix, 1 to 16 of A-Z0-9 (default: APP_ID upper-cased)",
    )
    p.add_argument(
        "--name",
        metavar="NAME",
        help='the name people know the app by, printed on posters, e.g. "PC-Covid" '
        "(default: APP_ID in capitals, with a warning; apps set-name changes it)",
    )
    p = leaf(
        apps_sub,
        "set-name",
        cmd_apps_set_name,
        "set the name people know the app by, printed on its venues' posters",
    )
    p.add_argument("app_id", metavar="APP_ID")
    p.add_argument("name", metavar="NAME", help="1 to 40 characters")
    p = leaf(
        apps_sub,
        "rotate",
        cmd_apps_rotate,
        "add a signing key and make it active; older codes keep verifying",
    )
    p.add_argument("app_id", metavar="APP_ID")
    p = leaf(
        apps_sub,
        "retire",
        cmd_apps_retire,
        "remove a signing key: its codes, printed posters included, stop verifying",
    )
    p.add_argument("app_id", metavar="APP_ID")
    p.add_argument("kid", metavar="KID", help="key id as printed, e.g. K1")
    p = leaf(
        apps_sub,
        "token",
        cmd_apps_token,
        "mint another API token for an app; prints {app_id, token, token_id} (the token only now)",
    )
    p.add_argument("app_id", metavar="APP_ID")
    p = leaf(
        apps_sub,
        "tokens",
        cmd_apps_tokens,
        "list an app's API tokens as a JSON array of {token_id, created_at, last_used_at, "
        "revoked_at}, never the tokens; last use is to the minute, written by each gateway "
        "every SCANGATE_LAST_USE_FLUSH",
    )
    p.add_argument("app_id", metavar="APP_ID")
    p = leaf(
        apps_sub,
        "revoke-token",
        cmd_apps_revoke_token,
        "refuse an API token from now on (401 on every gateway within 2 s, within 5 s on "
        "hosts sharing PostgreSQL); prints {token_id, app_id, revoked, already}",
    )
    p.add_argument(
        "token_id",
        metavar="TOKEN_ID",
        help="as apps tokens lists it (tok_ and 12 hex digits: the first 12 of the token's "
        "SHA-256, so a leaked token tells its id)",
    )
    leaf(apps_sub, "list", cmd_apps_list, "list apps as a JSON array (no secrets)")

    p = leaf(
        apps_sub,
        "set-webhook",
        cmd_apps_set_webhook,
        "where the app's exposure notices are POSTed; prints {app_id, url, secret, "
        "standard_webhooks_secret} (the signing secret only now, as X-Scangate-Signature "
        "receivers use it and as Standard Webhooks libraries take it, whsec_<base64>; "
        "setting it again makes a new one)",
    )
    p.add_argument("app_id", metavar="APP_ID")
    p.add_argument("url", metavar="URL", help="https://... (http:// only to localhost)")


def cmd_apps_add(args: argparse.Namespace, settings: Settings) -> int:
    new = open_keyring(settings).add_app(args.app_id, args.prefix, args.name)
    if args.name is None:
        # Posters print "Dùng ứng dụng <name> để quét": an internal id there tells people
        # nothing, so say so now rather than at the first poster.
        sys.stderr.write(
            f"{PROG}: warning: no --name: posters will say {args.app_id.upper()!r}; give the "
            f"name people know the app by with: {PROG} apps set-name {args.app_id} NAME\n"
        )
    emit(
        {
            "app_id": new.app_id,
            "prefix": new.prefix,
            "kid": new.kid,
            "token": new.token,
            "token_id": new.token_id,
        }
    )
    return 0


def cmd_apps_set_name(args: argparse.Namespace, settings: Settings) -> int:
    open_keyring(settings).set_name(args.app_id, args.name)
    emit({"app_id": args.app_id, "name": args.name.strip()})
    return 0


def cmd_apps_rotate(args: argparse.Namespace, settings: Settings) -> int:
    kid = open_keyring(settings).rotate(args.app_id)
    emit({"app_id": args.app_id, "kid": kid})
    return 0


def cmd_apps_retire(args: argparse.Namespace, settings: Settings) -> int:
    open_keyring(settings).retire(args.app_id, args.kid)
    emit({"app_id": args.app_id, "retired": args.kid.upper()})
    return 0


def cmd_apps_token(args: argparse.Namespace, settings: Settings) -> int:
    token = open_keyring(settings).add_token(args.app_id)
    emit({"app_id": args.app_id, "token": token, "token_id": token_id(token)})
    return 0


def cmd_apps_tokens(args: argparse.Namespace, settings: Settings) -> int:
    tokens = open_keyring(settings).list_tokens(args.app_id)

    async def work(storage: Storage) -> int:
        last_use = await storage.token_last_use([t.token_id for t in tokens])
        emit(
            [
                {
                    "token_id": t.token_id,
                    "created_at": format_time_ms(t.created_at * 1000),
                    "last_used_at": _time_or_none(last_use.get(t.token_id)),
                    "revoked_at": _time_or_none(
                        None if t.revoked_at is None else t.revoked_at * 1000
                    ),
                }
                for t in tokens
            ]
        )
        return 0

    return run_storage(settings, work)


def cmd_apps_revoke_token(args: argparse.Namespace, settings: Settings) -> int:
    # The keyring first: a leaked token must stop working even if storage is down.
    app_id, already = open_keyring(settings).revoke_token(args.token_id)

    async def work(storage: Storage) -> int:
        await storage.audit(
            cli_actor(),
            "app_token_revoked",
            args.token_id,
            f"app_id={app_id}" + (" already" if already else ""),
        )
        emit({"token_id": args.token_id, "app_id": app_id, "revoked": True, "already": already})
        return 0

    return run_storage(settings, work)


def cmd_apps_list(args: argparse.Namespace, settings: Settings) -> int:
    emit(
        [
            {
                "app_id": a.app_id,
                "name": a.name,
                "prefix": a.prefix,
                "active_kid": a.active_kid,
                "kids": list(a.kids),
                "tokens": a.tokens,
                "created_at": a.created_at,
            }
            for a in open_keyring(settings).list_apps()
        ]
    )
    return 0


def cmd_apps_set_webhook(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.outbox.notifier import private_addresses

    secret = open_keyring(settings).set_webhook(args.app_id, args.url)
    # One key, shown two ways: ``secret`` as receivers of X-Scangate-Signature have always
    # used it, and the form Standard Webhooks libraries decode (docs/webhooks.md).
    emit(
        {
            "app_id": args.app_id,
            "url": args.url,
            "secret": secret,
            "standard_webhooks_secret": standard_secret(secret.encode()),
        }
    )
    private = [] if settings.webhook_private else private_addresses(args.url)
    if private:
        # Set all the same (the network may change, or the setting), but said now rather
        # than found later in every notice's last_error.
        sys.stderr.write(
            f"{PROG}: warning: the webhook's host is not public ({', '.join(private)}) and "
            "SCANGATE_WEBHOOK_PRIVATE is off: every delivery to it will fail\n"
        )
    return 0


def _time_or_none(ms: int | None) -> str | None:
    return None if ms is None else format_time_ms(ms)


def add_admins(groups: Subcommands) -> None:
    """Add ``admins`` and its actions: add, list and revoke officials' tokens."""
    admins_sub = command_group(
        groups,
        "admins",
        help="health officials' admin tokens",
        description="Admin tokens of health officials: tracing, cases, reports and the audit "
        "log over HTTP. Tokens are checked against storage on every request.",
    )
    p = leaf(
        admins_sub,
        "add",
        cmd_admins_add,
        "register an admin; prints {name, token} (the token only now)",
    )
    p.add_argument("name", metavar="NAME")
    leaf(
        admins_sub,
        "list",
        cmd_admins_list,
        "list admins as a JSON array of {name, created_at, revoked_at}, never their tokens",
    )
    p = leaf(
        admins_sub,
        "revoke",
        cmd_admins_revoke,
        "refuse the admin's token from now on (401 on its next request); prints {name, "
        "revoked, already}. Adding the name again issues a new token",
    )
    p.add_argument("name", metavar="NAME")


def cmd_admins_add(args: argparse.Namespace, settings: Settings) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", args.name):
        raise UsageError("NAME: 1 to 64 characters of A-Za-z0-9_.@-")

    async def work(storage: Storage) -> int:
        token = await storage.add_admin(args.name)
        await storage.audit(cli_actor(), "admin_added", args.name)
        emit({"name": args.name, "token": token})
        return 0

    return run_storage(settings, work)


def cmd_admins_list(args: argparse.Namespace, settings: Settings) -> int:
    async def work(storage: Storage) -> int:
        emit(
            [
                {
                    "name": a.name,
                    "created_at": format_time_ms(a.created_at_ms),
                    "revoked_at": _time_or_none(a.revoked_at_ms),
                }
                for a in await storage.admins()
            ]
        )
        return 0

    return run_storage(settings, work)


def cmd_admins_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def work(storage: Storage) -> int:
        revoked = await storage.revoke_admin(args.name)
        if revoked is None:
            raise UsageError(f"no admin {args.name!r}")
        await storage.audit(cli_actor(), "admin_revoked", args.name)
        emit({"name": args.name, "revoked": True, "already": not revoked})
        return 0

    return run_storage(settings, work)


def add_codes(groups: Subcommands) -> None:
    """Add ``codes`` and its actions: issue, verify, render."""
    codes_sub = command_group(
        groups,
        "codes",
        help="issue, verify and render codes",
        description="Issue, verify and render venue and person codes.",
    )
    p = leaf(codes_sub, "issue", cmd_codes_issue, "issue a code; prints the code alone")
    p.add_argument("--app", required=True, metavar="APP_ID")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--venue", type=entity_id, metavar="ID", help="venue id (A-Z0-9, 1-16)")
    who.add_argument("--person", type=entity_id, metavar="ID", help="person id (A-Z0-9, 1-16)")
    p.add_argument(
        "--ttl",
        type=duration,
        metavar="DURATION",
        help="person codes: validity, e.g. 7d (default 7d)",
    )
    p = leaf(
        codes_sub,
        "verify",
        cmd_codes_verify,
        "verify a code with an app's keys; prints {valid, reason, type, id, kid}; "
        "exit 0 valid, 1 not",
    )
    p.add_argument("--app", required=True, metavar="APP_ID")
    p.add_argument("code", metavar="CODE")
    p = leaf(codes_sub, "render", cmd_codes_render, "render a code as a QR image")
    p.add_argument("code", metavar="CODE")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="FILE.svg or FILE.png")


def cmd_codes_issue(args: argparse.Namespace, settings: Settings) -> int:
    keyring = open_keyring(settings)
    if args.venue is not None:
        if args.ttl is not None:
            raise UsageError("--ttl applies to person codes only")
        code = keyring.issue(args.app, "venue", args.venue)
    else:
        code = keyring.issue(args.app, "person", args.person, ttl_s=int(args.ttl or 7 * 86400))
    sys.stdout.write(code + "\n")
    return 0


def cmd_codes_verify(args: argparse.Namespace, settings: Settings) -> int:
    verifier = open_keyring(settings).verifier(args.app)
    parsed = parse_code(args.code)
    # Verify as the type the code says it is: this command answers "is this code good".
    expected = parsed.type if parsed is not None else "venue"
    result = verifier.verify(args.code, expected, time.time())
    if isinstance(result, str):
        emit({"valid": False, "reason": result, "type": None, "id": None, "kid": None})
        return EXIT_INVALID
    emit(
        {
            "valid": True,
            "reason": None,
            "type": result.type,
            "id": result.id,
            "kid": f"K{result.kid}",
        }
    )
    return 0


def cmd_codes_render(args: argparse.Namespace, settings: Settings) -> int:
    if parse_code(args.code) is None:
        raise UsageError("that is not a well-formed scangate code")
    try:
        render_to_file(args.code, Path(args.output))
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    return 0
