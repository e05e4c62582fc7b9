"""Apps, their signing keys and API tokens.

Each app has a code prefix, one or more 256-bit HMAC keys with small integer ids (one of
them active for issuing), and API tokens. Keys are kept sealed under the master key;
tokens are kept only as SHA-256 hashes (they are 256-bit random, so a plain hash is as
good as a slow one) and looked up by hash, never compared as text.

Each token has a public id, ``tok_`` and the first 12 hex digits of its hash, which can be
listed, logged and revoked without the token. Derived rather than random, it is the same
in every process that reads a document written before ids existed (format 1), with no
write needed, and whoever holds a leaked token can tell which id to revoke. 48 bits of
the hash of a 256-bit random token tell nothing about the token. A revoked token stays in
the document with its ``revoked_at`` (listed, never accepted).

The document lives behind ``KeyringStore`` (a file in the data dir for one host; a database
table when several hosts share a deployment). Changes are read-modify-write under the
store's exclusive lock, so two CLI invocations never lose each other's change, and
``Keyring.refresh`` picks up a change another process made.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

import orjson

from .codes import MAX_KID, CodeType
from .crypto import Sealer
from .errors import KeyringError, UnknownApp
from .text import has_unprintable
from .verify import CodeVerifier

APP_ID_PATTERN: Final = re.compile(r"[a-z0-9]{2,16}")
PREFIX_PATTERN: Final = re.compile(r"[A-Z0-9]{1,16}")
KEY_BYTES: Final = 32
TOKEN_BYTES: Final = 32
TOKEN_PREFIX: Final = "sga_"  # noqa: S105 - a label, not a secret
WEBHOOK_SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a label, not a secret
TOKEN_ID_PREFIX: Final = "tok_"  # noqa: S105 - a label, not a secret
TOKEN_ID_HEX_DIGITS: Final = 12
TOKEN_ID_PATTERN: Final = re.compile(r"tok_[0-9a-f]{12}")
# 2: each token has an "id" (format 1 documents are upgraded as they are read), and may
# have a "revoked_at".
DOCUMENT_FORMAT: Final = 2
KEYRING_FILE: Final = "keyring.json"


class KeyringStore(Protocol):
    """Where the keyring document is kept."""

    def read(self) -> tuple[bytes | None, str]:
        """The document (None when there is none yet) and a version tag for change checks."""
        ...

    def version(self) -> str:
        """A cheap tag that changes whenever the document does."""
        ...

    def write(self, document: bytes) -> None: ...

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held around read-modify-write so concurrent changes serialise."""
        ...

    def close(self) -> None:
        """Let go of what the store holds (a database connection); nothing for a file."""
        ...


class FileKeyringStore:
    """The keyring as one JSON file, replaced atomically, mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def version(self) -> str:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "absent"
        return f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"

    def read(self) -> tuple[bytes | None, str]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(), f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"
        except FileNotFoundError:
            return None, "absent"

    def write(self, document: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(document)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


@dataclass(frozen=True, slots=True)
class NewApp:
    app_id: str
    prefix: str
    kid: str
    token: str

    @property
    def token_id(self) -> str:
        return token_id(self.token)


class AppToken(NamedTuple):
    """Whose a presented token is: its app and its public id."""

    app_id: str
    token_id: str


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """An app token as listed: never the token."""

    token_id: str
    app_id: str
    created_at: int  # epoch seconds
    revoked_at: int | None


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    secret: bytes  # the HMAC-SHA256 key of every delivery's signatures (signing.webhooks)


@dataclass(frozen=True, slots=True)
class AppInfo:
    """An app as listed: no secrets."""

    app_id: str
    prefix: str
    active_kid: str
    kids: tuple[str, ...]
    tokens: int  # not revoked
    created_at: int
    name: str = ""  # what people know it by (posters)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_id_of_hash(token_sha256: str) -> str:
    return TOKEN_ID_PREFIX + token_sha256[:TOKEN_ID_HEX_DIGITS]


def token_id(token: str) -> str:
    """The public id of an app token (what ``scangate apps revoke-token`` takes)."""
    return token_id_of_hash(hash_token(token))


def format_kid(kid: int) -> str:
    return f"K{kid}"


def parse_kid(text: str) -> int:
    """``K3`` (as printed) or ``3``."""
    digits = text[1:] if text[:1] in ("K", "k") else text
    if not digits.isdecimal() or digits.startswith("0") or not 1 <= int(digits) <= MAX_KID:
        raise KeyringError(f"not a key id: {text!r} (key ids look like K1, K2, ...)")
    return int(digits)


class Keyring:
    """The apps, keys and tokens of a deployment, and a verifier per app."""

    def __init__(self, store: KeyringStore, sealer: Sealer) -> None:
        self._store = store
        self._sealer = sealer
        self._version = ""
        self._doc: dict[str, Any] = {"format": DOCUMENT_FORMAT, "apps": {}}
        self._verifiers: dict[str, CodeVerifier] = {}
        self._tokens_by_hash: dict[str, AppToken] = {}
        self.refresh(force=True)

    # -- reading -------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> bool:
        """Reload when the stored document changed; True when it did.

        Verifiers are kept and updated in place, so their caches survive a rotation; a
        retired key is removed, which empties its app's cache.
        """
        if not force and self._store.version() == self._version:
            return False
        raw, version = self._store.read()
        self.load(raw, version)
        return True

    @property
    def store(self) -> KeyringStore:
        return self._store

    @property
    def version(self) -> str:
        """The version tag of the document now loaded."""
        return self._version

    def load(self, raw: bytes | None, version: str) -> None:
        """Apply a document read from the store (a server reads it off its event loop,
        then applies it here, on the loop that verifies codes)."""
        doc = self._parse(raw)
        self._apply(doc)
        self._doc, self._version = doc, version

    def _parse(self, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            return {"format": DOCUMENT_FORMAT, "apps": {}}
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise KeyringError(f"the keyring document is not valid JSON: {exc}") from exc
        if isinstance(doc, dict) and doc.get("format") == 1:
            return _upgrade_from_format_1(doc)
        if not isinstance(doc, dict) or doc.get("format") != DOCUMENT_FORMAT:
            raise KeyringError(
                "the keyring document has an unknown format (written by a newer scangate?)"
            )
        return doc

    def _apply(self, doc: dict[str, Any]) -> None:
        verifiers: dict[str, CodeVerifier] = {}
        by_hash: dict[str, AppToken] = {}
        for app_id, app in doc["apps"].items():
            keys = {int(kid): self._open_key(app_id, int(kid), k) for kid, k in app["keys"].items()}
            active = int(app["active_kid"])
            verifier = self._verifiers.get(app_id)
            if verifier is None or verifier.prefix != app["prefix"]:
                verifier = CodeVerifier(app_id, app["prefix"], keys, active)
            else:
                for kid in verifier.kids - keys.keys():
                    verifier.remove_key(kid)
                for kid in keys.keys() - verifier.kids:
                    verifier.add_key(kid, keys[kid])
                verifier.active_kid = active
            verifiers[app_id] = verifier
            for token in app["tokens"]:
                if token.get("revoked_at") is None:
                    by_hash[token["sha256"]] = AppToken(app_id, token["id"])
        self._verifiers = verifiers
        self._tokens_by_hash = by_hash

    def _open_key(self, app_id: str, kid: int, sealed_b64: str) -> bytes:
        return self._sealer.open(base64.b64decode(sealed_b64), _key_purpose(app_id, kid))

    def app_ids(self) -> list[str]:
        return sorted(self._verifiers)

    def verifier(self, app_id: str) -> CodeVerifier:
        try:
            return self._verifiers[app_id]
        except KeyError:
            raise UnknownApp(app_id) from None

    def app_name(self, app_id: str) -> str:
        """The app's name for people (posters, messages)."""
        app = self._doc["apps"].get(app_id)
        if app is None:
            raise UnknownApp(app_id)
        return str(app.get("name", app_id))

    def app_for_token(self, token: str) -> str | None:
        """The app a token belongs to, or None (unknown or revoked)."""
        found = self.token_for(token)
        return None if found is None else found.app_id

    def token_for(self, token: str) -> AppToken | None:
        """The app and id of a live token, or None. Looked up by hash: no text comparison."""
        return self._tokens_by_hash.get(hash_token(token))

    def list_tokens(self, app_id: str) -> list[TokenInfo]:
        """An app's tokens, revoked ones too, oldest first."""
        return [
            TokenInfo(
                token_id=t["id"],
                app_id=app_id,
                created_at=int(t["created_at"]),
                revoked_at=None if t.get("revoked_at") is None else int(t["revoked_at"]),
            )
            for t in _app(self._doc, app_id)["tokens"]
        ]

    def list_apps(self) -> list[AppInfo]:
        return [
            AppInfo(
                app_id=app_id,
                prefix=app["prefix"],
                active_kid=format_kid(int(app["active_kid"])),
                kids=tuple(format_kid(k) for k in sorted(int(k) for k in app["keys"])),
                tokens=sum(1 for t in app["tokens"] if t.get("revoked_at") is None),
                created_at=int(app["created_at"]),
                name=self.app_name(app_id),
            )
            for app_id, app in sorted(self._doc["apps"].items())
        ]

    def issue(
        self,
        app_id: str,
        code_type: CodeType,
        id_: str,
        now_s: int | None = None,
        ttl_s: int | None = None,
    ) -> str:
        """A code for a venue or (with ``ttl_s``) a person, signed with the active key."""
        issued = int(time.time()) if now_s is None else now_s
        expires = None if code_type == "venue" else issued + (ttl_s or 0)
        return self.verifier(app_id).issue(code_type, id_, issued, expires)

    # -- changing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _change(self) -> Iterator[dict[str, Any]]:
        """Read the latest document under the lock, let the caller edit it, write it back."""
        with self._store.exclusive():
            raw, _ = self._store.read()
            doc = self._parse(raw)
            yield doc
            self._store.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        self.refresh(force=True)

    def add_app(self, app_id: str, prefix: str | None = None, name: str | None = None) -> NewApp:
        """Register an app; ``name`` is what people see (on posters and pages), by default
        the app id in capitals until ``set_name`` gives it one."""
        if name is not None and not 1 <= len(name.strip()) <= 40:
            raise KeyringError("app name: 1 to 40 characters")
        if name is not None and has_unprintable(name):
            raise KeyringError("app name: no control, invisible or unassigned characters")
        if not APP_ID_PATTERN.fullmatch(app_id):
            raise KeyringError(f"app id {app_id!r}: use 2 to 16 characters of a-z0-9")
        prefix = app_id.upper() if prefix is None else prefix
        if not PREFIX_PATTERN.fullmatch(prefix):
            raise KeyringError(f"prefix {prefix!r}: use 1 to 16 characters of A-Z0-9")
        with self._change() as doc:
            apps = doc["apps"]
            if app_id in apps:
                raise KeyringError(f"app {app_id!r} already exists")
            taken = {a["prefix"]: other for other, a in apps.items()}
            if prefix in taken:
                raise KeyringError(f"prefix {prefix!r} is already used by app {taken[prefix]!r}")
            apps[app_id] = {
                "prefix": prefix,
                "name": (name or app_id.upper()).strip(),
                "created_at": int(time.time()),
                "active_kid": 1,
                "next_kid": 2,
                "keys": {"1": self._seal_new_key(app_id, 1)},
                "tokens": [],
            }
            token = _add_new_token(doc, app_id)
        return NewApp(app_id=app_id, prefix=prefix, kid=format_kid(1), token=token)

    def set_name(self, app_id: str, name: str) -> None:
        """The name people know the app by, printed on its venues' posters."""
        if not 1 <= len(name.strip()) <= 40:
            raise KeyringError("app name: 1 to 40 characters")
        if has_unprintable(name):
            raise KeyringError("app name: no control, invisible or unassigned characters")
        with self._change() as doc:
            _app(doc, app_id)["name"] = name.strip()

    def rotate(self, app_id: str) -> str:
        """Add a key and make it the active one; codes of older keys keep verifying."""
        with self._change() as doc:
            app = _app(doc, app_id)
            kid = int(app["next_kid"])
            if kid > MAX_KID:
                raise KeyringError(f"app {app_id!r} has used all {MAX_KID} key ids")
            app["keys"][str(kid)] = self._seal_new_key(app_id, kid)
            app["active_kid"] = kid
            app["next_kid"] = kid + 1
        return format_kid(kid)

    def retire(self, app_id: str, kid_text: str) -> None:
        """Remove a key: its codes (printed posters included) fail with ``unknown_key``."""
        kid = parse_kid(kid_text)
        with self._change() as doc:
            app = _app(doc, app_id)
            if str(kid) not in app["keys"]:
                raise KeyringError(f"app {app_id!r} has no key {format_kid(kid)}")
            if int(app["active_kid"]) == kid:
                raise KeyringError(
                    f"{format_kid(kid)} is the active key of {app_id!r}: rotate first, "
                    "then retire it"
                )
            del app["keys"][str(kid)]

    def add_token(self, app_id: str) -> str:
        """Another API token for an app (shown once; only its hash is kept)."""
        with self._change() as doc:
            return _add_new_token(doc, app_id)

    def revoke_token(self, token_id: str) -> tuple[str, bool]:
        """Refuse an app token from now on (each gateway within its keyring refresh):
        ``(app_id, already)``, ``already`` when it was revoked before."""
        if not TOKEN_ID_PATTERN.fullmatch(token_id):
            raise KeyringError(f"not a token id: {token_id!r} (token ids look like tok_3f9a...)")
        self.refresh()
        found = _find_token(self._doc, token_id)
        if found is not None and found[1].get("revoked_at") is not None:
            return found[0], True
        with self._change() as doc:
            found = _find_token(doc, token_id)
            if found is None:
                raise KeyringError(f"no app token {token_id}")
            app_id, token = found
            already = token.get("revoked_at") is not None
            if not already:
                token["revoked_at"] = int(time.time())
        return app_id, already

    def set_webhook(self, app_id: str, url: str) -> str:
        """Where the app's exposure notices are POSTed, with a new signing secret (returned
        once; kept sealed). ``https://`` only, but for a loopback host in development."""
        check_webhook_url(url)
        secret = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
        with self._change() as doc:
            _app(doc, app_id)["webhook"] = {
                "url": url,
                "secret": base64.b64encode(
                    self._sealer.seal(secret.encode(), _webhook_purpose(app_id))
                ).decode("ascii"),
                "set_at": int(time.time()),
            }
        return secret

    def webhook(self, app_id: str) -> Webhook | None:
        """The app's webhook and its secret, or None when it has none (or is unknown)."""
        app = self._doc["apps"].get(app_id)
        if app is None or "webhook" not in app:
            return None
        hook = app["webhook"]
        secret = self._sealer.open(base64.b64decode(hook["secret"]), _webhook_purpose(app_id))
        return Webhook(url=hook["url"], secret=secret)

    def _seal_new_key(self, app_id: str, kid: int) -> str:
        key = secrets.token_bytes(KEY_BYTES)
        return base64.b64encode(self._sealer.seal(key, _key_purpose(app_id, kid))).decode("ascii")


def _upgrade_from_format_1(doc: dict[str, Any]) -> dict[str, Any]:
    """A format 1 document as format 2: each token gets its id (derived, so every process
    that reads the old document gives it the same one)."""
    for app in doc.get("apps", {}).values():
        for token in app.get("tokens", []):
            token.setdefault("id", token_id_of_hash(token["sha256"]))
    doc["format"] = DOCUMENT_FORMAT
    return doc


def _find_token(doc: dict[str, Any], token_id: str) -> tuple[str, dict[str, Any]] | None:
    for app_id, app in doc["apps"].items():
        for token in app["tokens"]:
            if token["id"] == token_id:
                return app_id, token
    return None


def _add_new_token(doc: dict[str, Any], app_id: str) -> str:
    """Mint a token for ``app_id`` into ``doc``; the token (kept only as its hash)."""
    while True:
        token = _new_token()
        digest = hash_token(token)
        # A new id never repeats one in the document, revoked ones included.
        if _find_token(doc, token_id_of_hash(digest)) is None:
            break
    _app(doc, app_id)["tokens"].append(
        {"id": token_id_of_hash(digest), "sha256": digest, "created_at": int(time.time())}
    )
    return token


def _app(doc: dict[str, Any], app_id: str) -> dict[str, Any]:
    try:
        app: dict[str, Any] = doc["apps"][app_id]
    except KeyError:
        raise UnknownApp(app_id) from None
    return app


def check_webhook_url(url: str) -> None:
    """KeyringError unless ``url`` is https, or http to a loopback host (development)."""
    parts = urllib.parse.urlsplit(url)
    if len(url) > 500 or not parts.hostname or parts.username or parts.password:
        raise KeyringError("webhook: an absolute URL without credentials, at most 500 chars")
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise KeyringError("webhook: use https:// (http:// only to localhost, for development)")


def _webhook_purpose(app_id: str) -> bytes:
    return f"scangate-webhook\x00{app_id}".encode("ascii")


def _key_purpose(app_id: str, kid: int) -> bytes:
    # Binds a sealed key to its slot: swapping two apps' key blobs makes both fail to open.
    return f"scangate-keyring\x00{app_id}\x00{kid}".encode("ascii")


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
