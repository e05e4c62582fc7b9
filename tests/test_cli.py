"""The CLI's output contract and its one-line errors, run as a real subprocess."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SCANGATE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_apps_and_codes_round_trip(tmp_path: Path) -> None:
    added = ok_json(run(tmp_path, "apps", "add", "vhd"))
    assert isinstance(added, dict)
    assert set(added) == {"app_id", "prefix", "kid", "token", "token_id"}
    assert (added["app_id"], added["prefix"], added["kid"]) == ("vhd", "VHD", "K1")
    assert ok_json(run(tmp_path, "apps", "add", "bluezone", "--prefix", "BZ"))["prefix"] == "BZ"  # type: ignore[index]

    issued = run(tmp_path, "codes", "issue", "--app", "vhd", "--venue", "SHOP42")
    assert issued.returncode == 0
    code = issued.stdout.strip()
    assert issued.stdout == code + "\n" and code.startswith("VHD:")

    verified = run(tmp_path, "codes", "verify", "--app", "vhd", code)
    assert json.loads(verified.stdout) == {
        "valid": True,
        "reason": None,
        "type": "venue",
        "id": "SHOP42",
        "kid": "K1",
    }
    wrong = run(tmp_path, "codes", "verify", "--app", "bluezone", code)
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout) == {
        "valid": False,
        "reason": "wrong_app",
        "type": None,
        "id": None,
        "kid": None,
    }

    assert ok_json(run(tmp_path, "apps", "rotate", "vhd")) == {"app_id": "vhd", "kid": "K2"}
    assert run(tmp_path, "codes", "verify", "--app", "vhd", code).returncode == 0
    assert run(tmp_path, "apps", "retire", "vhd", "K1").returncode == 0
    retired = run(tmp_path, "codes", "verify", "--app", "vhd", code)
    assert (retired.returncode, json.loads(retired.stdout)["reason"]) == (1, "unknown_key")

    person = run(tmp_path, "codes", "issue", "--app", "vhd", "--person", "P1", "--ttl", "1d")
    pcode = person.stdout.strip()
    assert (
        json.loads(run(tmp_path, "codes", "verify", "--app", "vhd", pcode).stdout)["type"]
        == "person"
    )

    listed = ok_json(run(tmp_path, "apps", "list"))
    assert isinstance(listed, list)
    assert [a["app_id"] for a in listed] == ["bluezone", "vhd"]
    assert "token" not in json.dumps(listed).replace('"tokens"', "")

    out = tmp_path / "code.png"
    assert run(tmp_path, "codes", "render", pcode, "-o", str(out)).returncode == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_data_dir_comes_from_the_environment_too(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "apps", "add", "vhd"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SCANGATE_DATA_DIR": str(tmp_path / "d")},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d" / "keyring.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["apps", "add", "X"],
        ["apps", "add"],
        ["apps", "frobnicate"],
        ["apps", "rotate", "nope"],
        ["apps", "retire", "nope", "K1"],
        ["codes", "issue", "--app", "nope", "--venue", "V1"],
        ["codes", "issue", "--app", "vhd", "--venue", "lower"],
        ["codes", "issue", "--app", "vhd", "--venue", "V1", "--person", "P1"],
        ["codes", "issue", "--app", "vhd", "--venue", "V1", "--ttl", "1d"],
        ["codes", "issue", "--app", "vhd", "--person", "P1", "--ttl", "soon"],
        ["codes", "render", "NOT A CODE", "-o", "x.png"],
        ["codes", "verify", "--app", "nope", "X"],
        ["serve", "--flushers", "99"],
        ["serve", "--flushers", "-1"],
        [],
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    run(tmp_path, "apps", "add", "vhd")
    result = run(tmp_path, *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_settings_give_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run(tmp_path, "apps", "list", env={"SCANGATE_SHARDS": "many"})
    assert result.returncode == 2
    assert result.stderr.strip() == "scangate: error: SCANGATE_SHARDS: 'many' is not a whole number"


def test_every_command_has_help(tmp_path: Path) -> None:
    for args in (
        ["--help"],
        ["apps", "--help"],
        ["apps", "add", "--help"],
        ["apps", "rotate", "--help"],
        ["apps", "retire", "--help"],
        ["apps", "list", "--help"],
        ["apps", "token", "--help"],
        ["codes", "--help"],
        ["codes", "issue", "--help"],
        ["codes", "verify", "--help"],
        ["codes", "render", "--help"],
    ):
        result = run(tmp_path, *args)
        assert result.returncode == 0 and "usage: scangate" in result.stdout, args


def test_serve_runs_two_flushers_on_postgresql_and_one_on_sqlite(tmp_path: Path) -> None:
    from gateway.run.cli import default_flushers
    from gateway.settings import Settings

    assert default_flushers(Settings(data_dir=tmp_path)) == 1
    postgres = Settings(data_dir=tmp_path, storage_url="postgresql://db.invalid/scangate")
    assert default_flushers(postgres) == 2


def test_venues_add_poster_staff_token_and_revoke(tmp_path: Path) -> None:
    ok_json(run(tmp_path, "apps", "add", "vhd", "--name", "Vietnam Health Declaration"))
    venue = ok_json(
        run(
            tmp_path,
            "venues",
            "add",
            "--app",
            "vhd",
            "--name",
            "Chợ Bến Thành",
            "--phone",
            "0912345678",
            "--address",
            "Lê Lợi, Quận 1",
            "--province",
            "Hồ Chí Minh",
            "--kind",
            "market",
        )
    )
    assert isinstance(venue, dict) and set(venue) == {"venue_id", "code"}
    verified = json.loads(run(tmp_path, "codes", "verify", "--app", "vhd", venue["code"]).stdout)
    assert (verified["type"], verified["id"]) == ("venue", venue["venue_id"])

    out = tmp_path / "poster.pdf"
    made = ok_json(
        run(tmp_path, "venues", "poster", venue["venue_id"], "--app", "vhd", "-o", str(out))
    )
    assert made == {"venue_id": venue["venue_id"], "file": str(out)}
    assert out.read_bytes().startswith(b"%PDF")

    staff = ok_json(run(tmp_path, "venues", "staff-token", venue["venue_id"]))
    assert isinstance(staff, dict) and staff["token"].startswith("sgs_")
    revoked = ok_json(run(tmp_path, "venues", "revoke-staff-token", staff["token_id"]))
    assert revoked == {"token_id": staff["token_id"], "revoked": True}
    again = run(tmp_path, "venues", "revoke-staff-token", staff["token_id"])
    assert again.returncode == 2 and "no live staff token" in again.stderr

    assert ok_json(run(tmp_path, "venues", "revoke", venue["venue_id"])) == {
        "venue_id": venue["venue_id"],
        "revoked": True,
        "already": False,
    }
    for bad in (
        ["venues", "add", "--app", "vhd", "--name", "X", "--phone", "123", "--address", "A",
         "--province", "P"],
        ["venues", "add", "--app", "nope", "--name", "X", "--phone", "0912345678",
         "--address", "A", "--province", "P"],
        ["venues", "revoke", "VNOSUCH"],
        ["venues", "poster", venue["venue_id"], "-o", str(tmp_path / "p.gif")],
    ):  # fmt: skip
        result = run(tmp_path, *bad)
        assert result.returncode == 2, bad
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("url", "private_on", "warned"),
    [
        ("http://127.0.0.1:9/hook", False, "127.0.0.1"),
        ("http://localhost:9/hook", False, "127.0.0.1|::1"),
        ("https://10.1.2.3/hook", False, "10.1.2.3"),
        ("https://[fe80::1]/hook", False, "fe80::1"),
        ("https://hooks.example.invalid/hook", False, "hooks.example.invalid"),  # no address
        ("http://127.0.0.1:9/hook", True, None),
        ("https://93.184.216.34/hook", False, None),  # public: no look-up needed
    ],
)
def test_set_webhook_warns_when_deliveries_could_not_reach_it(
    tmp_path: Path, url: str, private_on: bool, warned: str | None
) -> None:
    ok_json(run(tmp_path, "apps", "add", "vhd"))
    env = {"SCANGATE_WEBHOOK_PRIVATE": "true"} if private_on else {}
    result = run(tmp_path, "apps", "set-webhook", "vhd", url, env=env)
    doc = ok_json(result)
    assert isinstance(doc, dict) and doc["url"] == url  # set all the same
    # One key in two forms: the secret as X-Scangate-Signature receivers use it, and as
    # Standard Webhooks libraries take it (whsec_ and the base64 of those same bytes).
    assert set(doc) == {"app_id", "url", "secret", "standard_webhooks_secret"}
    standard = doc["standard_webhooks_secret"]
    assert standard.startswith("whsec_") and standard != doc["secret"]
    assert (
        base64.b64decode(standard.removeprefix("whsec_"), validate=True) == doc["secret"].encode()
    )
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    if warned is None:
        assert warnings == [], result.stderr
    else:
        assert len(warnings) == 1, result.stderr
        assert any(address in warnings[0] for address in warned.split("|")), warnings
        assert "SCANGATE_WEBHOOK_PRIVATE is off" in warnings[0]


def test_posters_name_the_app_people_know_and_the_province(tmp_path: Path) -> None:
    added = run(tmp_path, "apps", "add", "vhd")
    ok_json(added)
    warnings = [line for line in added.stderr.splitlines() if "no --name" in line]
    assert len(warnings) == 1 and "apps set-name vhd" in warnings[0], added.stderr
    (app,) = ok_json(run(tmp_path, "apps", "list"))  # type: ignore[misc]
    assert app["name"] == "VHD"
    venue = ok_json(
        run(
            tmp_path,
            "venues",
            "add",
            "--app",
            "vhd",
            "--name",
            "Chợ Bến Thành",
            "--phone",
            "0983829927",
            "--address",
            "Lê Lợi, Quận 1",
            "--province",
            "Hồ Chí Minh",
            "--kind",
            "market",
        )
    )
    assert isinstance(venue, dict)

    def poster_text() -> str:
        out = tmp_path / "poster.svg"
        result = run(tmp_path, "venues", "poster", venue["venue_id"], "-o", str(out))
        assert result.returncode == 0, result.stderr
        return out.read_text(encoding="utf-8")

    first = poster_text()
    assert "Dùng ứng dụng VHD để quét" in first and "Hồ Chí Minh" in first
    assert ok_json(run(tmp_path, "apps", "set-name", "vhd", "PC-Covid")) == {
        "app_id": "vhd",
        "name": "PC-Covid",
    }
    assert "Dùng ứng dụng PC-Covid để quét" in poster_text()
    named = run(tmp_path, "apps", "add", "bz", "--name", "Bluezone")
    assert named.returncode == 0 and "no --name" not in named.stderr
    bad = run(tmp_path, "apps", "set-name", "vhd", "\u0378")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
