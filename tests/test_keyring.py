"""Keyring: apps, rotation, retirement, tokens, sealing at rest, concurrent changes."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from signing import (
    AppToken,
    Code,
    Keyring,
    KeyringError,
    MasterKeyError,
    UnknownApp,
    load_master_key,
    token_id,
)
from tests.conftest import KeyringFactory

NOW = 1_790_000_000


def test_code_of_app_a_is_wrong_app_for_app_b(keyring: Keyring) -> None:
    keyring.add_app("vhd")
    keyring.add_app("bluezone", prefix="BZ")
    code = keyring.issue("vhd", "venue", "V1", now_s=NOW)
    assert keyring.verifier("bluezone").verify(code, "venue", NOW) == "wrong_app"
    person = keyring.issue("bluezone", "person", "P1", now_s=NOW, ttl_s=60)
    assert keyring.verifier("vhd").verify(person, "person", NOW) == "wrong_app"


def test_rotation_keeps_old_codes_and_retirement_refuses_them(
    keyring: Keyring, keyring_factory: KeyringFactory
) -> None:
    keyring.add_app("vhd")
    old = keyring.issue("vhd", "venue", "V1", now_s=NOW)
    assert keyring.rotate("vhd") == "K2"
    new = keyring.issue("vhd", "venue", "V2", now_s=NOW)
    v = keyring.verifier("vhd")
    assert isinstance(v.verify(old, "venue", NOW), Code)  # now cached
    assert v.verify(new, "venue", NOW).kid == 2  # type: ignore[union-attr]
    keyring.retire("vhd", "K1")
    # The same verifier (and its cache) refuses the retired key's code at once...
    assert v.verify(old, "venue", NOW) == "unknown_key"
    assert isinstance(v.verify(new, "venue", NOW), Code)
    # ...and so does another process's view once it refreshes.
    other = keyring_factory()
    assert other.verifier("vhd").verify(old, "venue", NOW) == "unknown_key"


def test_another_process_picks_up_a_retirement_on_refresh(
    keyring: Keyring, keyring_factory: KeyringFactory
) -> None:
    keyring.add_app("vhd")
    old = keyring.issue("vhd", "venue", "V1", now_s=NOW)
    reader = keyring_factory()
    assert isinstance(reader.verifier("vhd").verify(old, "venue", NOW), Code)
    keyring.rotate("vhd")
    keyring.retire("vhd", "K1")
    assert reader.refresh() is True
    assert reader.verifier("vhd").verify(old, "venue", NOW) == "unknown_key"
    assert reader.refresh() is False


def test_retiring_the_active_or_an_unknown_key_is_refused(keyring: Keyring) -> None:
    keyring.add_app("vhd")
    with pytest.raises(KeyringError, match="active key"):
        keyring.retire("vhd", "K1")
    with pytest.raises(KeyringError, match="no key K9"):
        keyring.retire("vhd", "K9")
    with pytest.raises(KeyringError, match="not a key id"):
        keyring.retire("vhd", "K01")
    with pytest.raises(UnknownApp):
        keyring.rotate("nope")


@pytest.mark.parametrize(
    ("app_id", "prefix"),
    [
        ("A", None),
        ("ab-c", None),
        ("x" * 17, None),
        ("ok", "lower"),
        ("ok", "P" * 17),
        ("ok", "A:B"),
    ],
)
def test_bad_app_ids_and_prefixes_are_refused(
    keyring: Keyring, app_id: str, prefix: str | None
) -> None:
    with pytest.raises(KeyringError):
        keyring.add_app(app_id, prefix)


def test_duplicate_app_or_prefix_is_refused(keyring: Keyring) -> None:
    keyring.add_app("vhd")
    with pytest.raises(KeyringError, match="already exists"):
        keyring.add_app("vhd")
    with pytest.raises(KeyringError, match="already used"):
        keyring.add_app("other", prefix="VHD")


def test_tokens_are_random_shown_once_and_stored_as_hashes(
    keyring: Keyring, tmp_path: Path
) -> None:
    a = keyring.add_app("vhd")
    b = keyring.add_app("ncovi")
    extra = keyring.add_token("vhd")
    assert len({a.token, b.token, extra}) == 3
    assert keyring.app_for_token(a.token) == "vhd"
    assert keyring.app_for_token(extra) == "vhd"
    assert keyring.app_for_token(b.token) == "ncovi"
    assert keyring.app_for_token(a.token + "x") is None
    assert keyring.app_for_token("") is None
    text = (tmp_path / "keyring.json").read_text()
    for token in (a.token, b.token, extra):
        assert token not in text
        assert token.removeprefix("sga_") not in text


def test_keyring_file_holds_no_key_bytes_in_the_clear(keyring: Keyring, tmp_path: Path) -> None:
    keyring.add_app("vhd")
    keyring.rotate("vhd")
    raw = (tmp_path / "keyring.json").read_bytes()
    doc = json.loads(raw)
    keys = _plain_keys(keyring)
    assert len(keys) == 2
    for key in keys:
        for form in (key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)):
            assert form not in raw
    assert all(len(base64.b64decode(k)) > 32 for k in doc["apps"]["vhd"]["keys"].values())
    assert stat.S_IMODE(os.stat(tmp_path / "keyring.json").st_mode) == 0o600


def _plain_keys(keyring: Keyring) -> list[bytes]:
    doc = keyring._doc
    return [
        keyring._open_key("vhd", int(kid), sealed)
        for kid, sealed in doc["apps"]["vhd"]["keys"].items()
    ]


def test_a_different_master_key_cannot_open_the_keyring(
    keyring: Keyring, keyring_factory: KeyringFactory
) -> None:
    keyring.add_app("vhd")
    with pytest.raises(MasterKeyError, match="does not open"):
        keyring_factory(os.urandom(32))


def test_generated_master_key_file_is_0600_and_reused(tmp_path: Path) -> None:
    first = load_master_key(None, tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "master.key").st_mode) == 0o600
    assert load_master_key(None, tmp_path) == first
    configured = base64.b64encode(os.urandom(32)).decode()
    assert load_master_key(configured, tmp_path) == base64.b64decode(configured)
    with pytest.raises(MasterKeyError):
        load_master_key("not base64!", tmp_path)
    with pytest.raises(MasterKeyError, match="32 bytes"):
        load_master_key(base64.b64encode(b"short").decode(), tmp_path)


def _rotate_many(path: str, key: bytes, n: int) -> None:
    from signing import FileKeyringStore, Sealer

    keyring = Keyring(FileKeyringStore(Path(path)), Sealer(key))
    for _ in range(n):
        keyring.rotate("vhd")


def test_concurrent_changes_from_several_processes_are_all_kept(
    keyring: Keyring, tmp_path: Path, master_key: bytes, keyring_factory: KeyringFactory
) -> None:
    keyring.add_app("vhd")
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rotate_many, args=(str(tmp_path / "keyring.json"), master_key, 10))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    apps = keyring_factory().list_apps()
    assert len(apps[0].kids) == 31
    assert apps[0].active_kid == "K31"


def _as_format_1(path: Path) -> None:
    """Rewrite the keyring file as a scangate from before token ids wrote it."""
    doc = json.loads(path.read_bytes())
    doc["format"] = 1
    for app in doc["apps"].values():
        for token in app["tokens"]:
            del token["id"]
    path.write_text(json.dumps(doc))


def test_a_keyring_from_before_token_ids_gets_the_same_ids_in_every_process(
    keyring: Keyring, keyring_factory: KeyringFactory, tmp_path: Path
) -> None:
    first = keyring.add_app("vhd")
    second = keyring.add_token("vhd")
    path = tmp_path / "keyring.json"
    _as_format_1(path)
    before = path.read_bytes()
    # Two readers, as two gateway processes: the same ids, derived, with nothing written.
    views = [keyring_factory(), keyring_factory()]
    expected = [token_id(first.token), token_id(second)]
    for view in views:
        assert [t.token_id for t in view.list_tokens("vhd")] == expected
        assert view.token_for(first.token) == AppToken("vhd", expected[0])
    assert path.read_bytes() == before
    assert expected[0] == "tok_" + hashlib.sha256(first.token.encode()).hexdigest()[:12]
    # The first change writes the current format, with those ids.
    views[0].revoke_token(expected[0])
    doc = json.loads(path.read_bytes())
    assert doc["format"] == 2
    assert [t["id"] for t in doc["apps"]["vhd"]["tokens"]] == expected
    assert views[1].refresh() is True
    assert views[1].app_for_token(first.token) is None
    assert views[1].app_for_token(second) == "vhd"


def test_a_revoked_token_is_refused_listed_and_never_reissued(keyring: Keyring) -> None:
    made = keyring.add_app("vhd")
    other = keyring.add_app("ncovi")
    assert keyring.revoke_token(made.token_id) == ("vhd", False)
    assert keyring.app_for_token(made.token) is None
    assert keyring.token_for(made.token) is None
    assert keyring.revoke_token(made.token_id) == ("vhd", True)
    assert keyring.app_for_token(other.token) == "ncovi"
    listed = keyring.list_tokens("vhd")
    assert [(t.token_id, t.revoked_at is not None) for t in listed] == [(made.token_id, True)]
    assert keyring.list_apps()[1].tokens == 0  # vhd: none live
    fresh = keyring.add_token("vhd")
    assert token_id(fresh) != made.token_id
    assert keyring.app_for_token(fresh) == "vhd"
    with pytest.raises(KeyringError, match="no app token"):
        keyring.revoke_token("tok_000000000000")
    with pytest.raises(KeyringError, match="not a token id"):
        keyring.revoke_token(made.token)
    with pytest.raises(UnknownApp):
        keyring.list_tokens("nope")


def test_a_document_of_a_newer_format_is_refused(
    keyring: Keyring, keyring_factory: KeyringFactory, tmp_path: Path
) -> None:
    keyring.add_app("vhd")
    path = tmp_path / "keyring.json"
    doc = json.loads(path.read_bytes())
    doc["format"] = 3
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyringError, match="unknown format"):
        keyring_factory()
