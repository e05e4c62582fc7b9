"""What every command group of the ``scangate`` command line shares: the exit codes, the
one-line error (``UsageError``) and the parser that prints one, the ``--data-dir`` option and
``leaf`` that gives it to each command, argument types, the audit log's actor, JSON output,
and opening the keyring, storage and the personal data the handlers work on."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import orjson

from gateway.settings import Settings, parse_duration_s
from signing import Keyring, Sealer, load_master_key
from signing.codes import ID_PATTERN
from storage import Storage, connect_storage

PROG = "scangate"
EXIT_INVALID = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, Settings], int]


class UsageError(Exception):
    """A bad argument or an operation that cannot be done; printed on one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line instead of usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# What add_subparsers returns, for the functions that add each group's commands. argparse
# names it only privately, and it is generic only in the type stubs.
if TYPE_CHECKING:
    Subcommands: TypeAlias = argparse._SubParsersAction[OneLineParser]
else:
    Subcommands = argparse._SubParsersAction


def common_options() -> OneLineParser:
    """A parent parser with the options every command takes (``--data-dir``)."""
    common = OneLineParser(add_help=False)
    common.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="keyring, master key file, SQLite file, ... (default: $SCANGATE_DATA_DIR "
        "or ./scangate-data)",
    )
    return common


def command_group(groups: Subcommands, name: str, *, help: str, description: str) -> Subcommands:
    """Add the command group ``name`` (``scangate NAME ACTION``) and return where its
    actions go; an action is required."""
    group = groups.add_parser(name, help=help, description=description)
    actions = group.add_subparsers(dest="command", metavar="ACTION", parser_class=OneLineParser)
    actions.required = True
    return actions


def leaf(sub: Subcommands, name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
    """Add command ``name`` under ``sub``, run by ``handler``, with the common options and
    ``help_`` as both its line in the list and its description."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, parents=[common_options()], help=help_, description=help_
    )
    p.set_defaults(handler=handler)
    return p


def duration(text: str) -> float:
    """An argument type: a duration such as 90s, 10m, 4h or 7d, in seconds."""
    try:
        return parse_duration_s(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def entity_id(text: str) -> str:
    """An argument type: a venue, person, case, claim or token id (A-Z0-9, 1 to 16)."""
    if not ID_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: an id is 1 to 16 characters of A-Z0-9")
    return text


def cli_actor() -> str:
    """Who the audit log names for a command run here: the operating-system user."""
    return f"cli:{getpass.getuser()}"


def emit(value: Any) -> None:
    """Print ``value`` as JSON on one line of stdout."""
    sys.stdout.write(orjson.dumps(value).decode("utf-8") + "\n")


def open_keyring(settings: Settings) -> Keyring:
    """The keyring of apps, keys and tokens, opened with the master key."""
    master = load_master_key(settings.master_key, settings.data_dir)
    from storage.keyring_store import keyring_store

    return Keyring(
        keyring_store(settings.resolved_storage_url, settings.keyring_path), Sealer(master)
    )


def run_storage(settings: Settings, work: Callable[[Storage], Awaitable[int]]) -> int:
    """Open storage (migrations applied), run ``work`` on it, close it."""

    async def run() -> int:
        storage = await connect_storage(settings.resolved_storage_url, timezone=settings.timezone)
        try:
            return await work(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


async def personal_data(storage: Storage, settings: Settings) -> Any:
    """What encrypts and decrypts personal fields: storage's data key, opened with the
    master key (and made on first use)."""
    from gateway.http.context import load_personal_data

    sealer = Sealer(load_master_key(settings.master_key, settings.data_dir))
    return await load_personal_data(storage, sealer)
