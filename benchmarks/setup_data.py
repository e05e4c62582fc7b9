"""Mint a load-test data set: an app token and signed venue and person codes, in bulk.

    python benchmarks/setup_data.py --data-dir DIR [--venues 10000] [--persons 200000]
                                    [--out DIR/loadtest.json]

Works on the keyring of the data dir a gateway serves (run it against the same DIR, with
the same ``SCANGATE_MASTER_KEY`` if one is set, or the codes will not verify there; a
running gateway picks up the new apps and token within 2 seconds). It registers the app
``vhd`` (or, when it is there already, mints another API token for it) and ``bluezone``
(prefix ``BZ``, reused as it is when present), then issues with vhd's active key one
venue code per venue (ids ``V0000001``, ...) and one person code per person (ids
``P0000001``, ..., valid 30 days), plus 200 venue and 200 person codes of bluezone for
wrong-app traffic. The JSON file ``benchmarks/locustfile.py`` reads:

    {"gateway_app": "vhd", "token": "sga_...", "venue_codes": [...], "person_codes": [...],
     "wrong_app_token_codes": {"venue_codes": [...], "person_codes": [...]},
     "created_at": "2026-11-25T03:04:05Z"}

It holds a bearer token, so it is written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, NoReturn, TextIO

import orjson

from signing import (
    CodeVerifier,
    FileKeyringStore,
    Keyring,
    Sealer,
    SigningError,
    load_master_key,
)
from signing.keyring import KEYRING_FILE

PROG: Final = "setup_data.py"
EXIT_USAGE: Final = 2
MAIN_APP: Final = "vhd"
WRONG_APP: Final = "bluezone"
WRONG_APP_PREFIX: Final = "BZ"
WRONG_APP_CODES: Final = 200  # of each type: bad traffic is a small share of requests
PERSON_TTL_S: Final = 30 * 86400
# Ids are a letter and 7 digits (``V0000001``): fixed width up to this many.
MAX_ENTITIES: Final = 9_999_999


class UsageError(Exception):
    """A bad argument or a keyring that cannot be used; printed on one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line, like the scangate CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class Progress:
    """A one-line progress bar on a terminal; only the final count otherwise.

    On a pipe or a log file ``\\r`` updates would pile up as garbage, so there the bar
    prints once, when done. Redraws happen every 1% so the bar costs nothing next to the
    signing it reports on.
    """

    WIDTH: Final = 30

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, total
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.step = max(1, total // 100)
        self.started = time.perf_counter()

    def update(self, done: int) -> None:
        if self.tty and (done % self.step == 0 or done == self.total):
            self._draw(done, end="")

    def close(self) -> None:
        self._draw(self.total, end="\n")

    def _draw(self, done: int, end: str) -> None:
        filled = self.WIDTH * done // max(1, self.total)
        elapsed = time.perf_counter() - self.started
        self.stream.write(
            f"\r{self.label:<16} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
            f"{done:>9,}/{self.total:,}  {elapsed:5.1f}s{end}"
        )
        self.stream.flush()


def open_keyring(data_dir: Path, master_key_b64: str | None) -> Keyring:
    """The data dir's keyring, opened with the master key the gateway would use."""
    master = load_master_key(master_key_b64, data_dir)
    return Keyring(FileKeyringStore(data_dir / KEYRING_FILE), Sealer(master))


def ensure_app(keyring: Keyring, app_id: str, prefix: str | None = None) -> str:
    """Register ``app_id``, or reuse it when present; a fresh API token either way.

    Tokens are kept only as hashes, so reusing an app means minting another token: the
    ones handed out before are not recoverable.
    """
    if app_id in keyring.app_ids():
        return keyring.add_token(app_id)
    return keyring.add_app(app_id, prefix).token


def ensure_app_no_token(keyring: Keyring, app_id: str, prefix: str) -> None:
    """Register ``app_id`` unless present. Its codes are only ever posted with another
    app's token, so no token is minted (and none piles up in the keyring on re-runs)."""
    if app_id not in keyring.app_ids():
        keyring.add_app(app_id, prefix)


def issue_codes(
    verifier: CodeVerifier,
    id_letter: str,
    count: int,
    make: Callable[[CodeVerifier, str], str],
    label: str,
) -> list[str]:
    """``count`` codes for ids ``{id_letter}0000001``..., with a progress bar."""
    bar = Progress(label, count)
    codes: list[str] = []
    append = codes.append
    for i in range(1, count + 1):
        append(make(verifier, f"{id_letter}{i:07d}"))
        bar.update(i)
    bar.close()
    return codes


def build_data_set(
    keyring: Keyring, venues: int, persons: int, now_s: int | None = None
) -> dict[str, object]:
    """Register the apps and mint every code; the document the locustfile reads."""
    token = ensure_app(keyring, MAIN_APP)
    ensure_app_no_token(keyring, WRONG_APP, WRONG_APP_PREFIX)
    issued = int(time.time()) if now_s is None else now_s
    expires = issued + PERSON_TTL_S

    # The verifier's own issue() straight in the loop: Keyring.issue looks the app up and
    # reads the clock on every call, which is most of the cost at a few microseconds each.
    def venue(v: CodeVerifier, id_: str) -> str:
        return v.issue("venue", id_, issued)

    def person(v: CodeVerifier, id_: str) -> str:
        return v.issue("person", id_, issued, expires)

    main, other = keyring.verifier(MAIN_APP), keyring.verifier(WRONG_APP)
    wrong_n = WRONG_APP_CODES
    return {
        "gateway_app": MAIN_APP,
        "token": token,
        "venue_codes": issue_codes(main, "V", venues, venue, "venue codes"),
        "person_codes": issue_codes(main, "P", persons, person, "person codes"),
        "wrong_app_token_codes": {
            "venue_codes": issue_codes(other, "V", wrong_n, venue, f"{WRONG_APP} venue"),
            "person_codes": issue_codes(other, "P", wrong_n, person, f"{WRONG_APP} person"),
        },
        "created_at": dt.datetime.fromtimestamp(issued, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_private(path: Path, document: bytes) -> None:
    """Write ``path`` with mode 0600 (it holds a bearer token), replacing it atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(document)
    os.replace(tmp, path)


def _count(text: str) -> int:
    try:
        n = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= n <= MAX_ENTITIES:
        raise argparse.ArgumentTypeError(f"{n}: use 1 to {MAX_ENTITIES:,}")
    return n


def build_parser() -> argparse.ArgumentParser:
    title, _usage, details = __doc__.split("\n\n", 2)
    parser = _Parser(
        prog=PROG,
        description=f"{title}\n\n{details}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The master key is SCANGATE_MASTER_KEY when set, else DIR/master.key "
        "(generated when\nmissing), exactly as `scangate serve` resolves it. A progress bar "
        "is drawn on stderr\nwhen it is a terminal. Bad arguments: one line on stderr, "
        "exit 2.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the gateway's data dir (its keyring.json gets the apps; created if missing)",
    )
    parser.add_argument(
        "--venues", type=_count, default=10_000, metavar="N", help="venue codes (default 10000)"
    )
    parser.add_argument(
        "--persons",
        type=_count,
        default=200_000,
        metavar="N",
        help="person codes, valid 30 days (default 200000)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="where to write the JSON (default DIR/loadtest.json; the locustfile reads "
        "$SCANGATE_LOADTEST_DATA, default benchmarks/out/loadtest.json)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_dir: Path = args.data_dir
    out: Path = args.out or data_dir / "loadtest.json"
    try:
        if data_dir.exists() and not data_dir.is_dir():
            raise UsageError(f"--data-dir {str(data_dir)!r} is not a directory")
        if out.is_dir():
            raise UsageError(f"--out {str(out)!r} is a directory; name a file")
        # Before the keyring is touched: a token minted for a file never written is lost.
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {str(out)!r}: cannot create its folder: {exc}") from None
        started = time.perf_counter()
        keyring = open_keyring(data_dir, os.environ.get("SCANGATE_MASTER_KEY"))
        data = build_data_set(keyring, args.venues, args.persons)
        write_private(out, orjson.dumps(data))
    except (UsageError, SigningError, OSError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    sys.stderr.write(
        f"wrote {out} ({args.venues:,} venues, {args.persons:,} persons) "
        f"in {time.perf_counter() - started:.1f}s\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
