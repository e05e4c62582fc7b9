"""Settings read from files: ``SCANGATE_<NAME>_FILE`` names a file whose contents are the
setting, as a mounted Docker or Kubernetes secret hands it over. Every process reads it
itself, so a command run by ``docker compose exec`` (which skips any entrypoint) uses the
deployment's master key instead of minting one of its own."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

import pytest

from gateway import Settings
from gateway.run.cli import main
from gateway.settings import SettingsError
from signing.crypto import MASTER_KEY_FILE


def a_master_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def test_a_setting_is_read_from_the_file_its_file_variable_names(tmp_path: Path) -> None:
    key = a_master_key()
    (tmp_path / "master_key").write_text(key + "\n")  # secrets often end in a newline
    (tmp_path / "redis_url").write_text("redis://:p%40ss@10.0.0.5:6379/0\r\n")
    (tmp_path / "retention").write_text("14d")
    settings = Settings.from_env(
        {
            "SCANGATE_MASTER_KEY_FILE": str(tmp_path / "master_key"),
            "SCANGATE_REDIS_URL_FILE": str(tmp_path / "redis_url"),
            # Durations drop their _s in the variable's name, from a file too.
            "SCANGATE_RETENTION_FILE": str(tmp_path / "retention"),
        }
    )
    assert settings.master_key == key
    assert settings.redis_url == "redis://:p%40ss@10.0.0.5:6379/0"
    assert settings.retention_s == 14 * 86400


def test_a_setting_given_both_ways_is_refused(tmp_path: Path) -> None:
    (tmp_path / "url").write_text("redis://a:6379/0")
    with pytest.raises(SettingsError, match="both SCANGATE_REDIS_URL and SCANGATE_REDIS_URL_FILE"):
        Settings.from_env(
            {
                "SCANGATE_REDIS_URL": "redis://b:6379/0",
                "SCANGATE_REDIS_URL_FILE": str(tmp_path / "url"),
            }
        )


def test_an_unreadable_file_names_the_variable_and_the_path_but_no_contents(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"SCANGATE_MASTER_KEY_FILE": str(missing)})
    assert str(raised.value) == (
        f"SCANGATE_MASTER_KEY_FILE: cannot read {missing}: No such file or directory"
    )
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe secret bytes")
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"SCANGATE_STORAGE_URL_FILE": str(binary)})
    assert "secret bytes" not in str(raised.value)
    assert "UnicodeDecodeError" in str(raised.value)


@pytest.mark.parametrize(
    ("name", "contents"),
    [
        ("SCANGATE_SHARDS", "hunter2-secret"),  # refused while converting
        ("SCANGATE_SHARDS", "0"),  # refused by the checks after
        ("SCANGATE_TIMEZONE", "hunter2-secret"),
        ("SCANGATE_TRUSTED_PROXIES", "hunter2-secret"),
        ("SCANGATE_KIND_MAX_STAY", "hunter2-secret"),
    ],
)
def test_a_value_read_from_a_file_is_checked_but_never_quoted(
    tmp_path: Path, name: str, contents: str
) -> None:
    """A secret file mounted under the wrong setting's name must not reach the logs through
    the error that refuses it."""
    (tmp_path / "value").write_text(contents)
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({f"{name}_FILE": str(tmp_path / "value")})
    assert str(raised.value) == (
        f"{name}_FILE: the file's contents are not a valid {name} (not shown: they may be a secret)"
    )
    # The same value set directly is quoted, as the operator typed it.
    if contents != "0":
        with pytest.raises(SettingsError, match=contents):
            Settings.from_env({name: contents})


@pytest.mark.usefixtures("restored_logging")  # main() configures the process's logging
def test_the_command_line_uses_the_master_key_file_and_mints_no_key_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ``docker compose exec gateway scangate apps add ...`` does: the entrypoint is
    skipped, so only settings can read the secret file."""
    data_dir = tmp_path / "data"
    key = a_master_key()
    key_file = tmp_path / "master_key"
    key_file.write_text(key + "\n")
    env = {"SCANGATE_DATA_DIR": str(data_dir), "SCANGATE_MASTER_KEY_FILE": str(key_file)}

    assert main(["apps", "add", "vhd", "--name", "Khai báo y tế"], env=env) == 0
    assert json.loads(capsys.readouterr().out)["app_id"] == "vhd"
    assert not (data_dir / MASTER_KEY_FILE).exists()

    # The keyring is sealed with that key: the key given directly opens it...
    assert (
        main(["apps", "list"], env={"SCANGATE_DATA_DIR": str(data_dir), "SCANGATE_MASTER_KEY": key})
        == 0
    )
    assert [app["app_id"] for app in json.loads(capsys.readouterr().out)] == ["vhd"]
    # ...and another key does not.
    other = {"SCANGATE_DATA_DIR": str(data_dir), "SCANGATE_MASTER_KEY": a_master_key()}
    assert main(["apps", "list"], env=other) != 0
    assert "does not open with this master key" in capsys.readouterr().err
