from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from gateway import Settings, SettingsError, parse_duration_s


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("10m", 600), ("4h", 14400), ("7d", 604800), ("200ms", 0.2)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "1.5h", "-1s", "10 m", "1w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_s(text)


def test_defaults_match_the_design_table() -> None:
    s = Settings.from_env({})
    assert (s.data_dir, s.redis_url, s.shards, s.retry_memory_s, s.repeat_window_s) == (
        Path("./scangate-data"),
        None,
        16,
        600,
        300,
    )
    assert (s.max_stay_s, s.orphan_stay_s, s.late_window_s, s.clock_skew_s) == (
        14400,
        3600,
        604800,
        300,
    )
    assert (
        s.backlog_high_water,
        s.rate_limit,
        s.retention_s,
        s.flush_batch,
        s.flush_max_age_s,
    ) == (1_000_000, 0, 21 * 86400, 50_000, 0.2)
    assert (s.timezone, s.sms) == ("Asia/Ho_Chi_Minh", "log")


def test_environment_and_overrides() -> None:
    s = Settings.from_env(
        {
            "SCANGATE_RETRY_MEMORY": "2m",
            "SCANGATE_SHARDS": "4",
            "SCANGATE_DATA_DIR": "/x",
            "SCANGATE_REDIS_CLUSTER": "true",
            "SCANGATE_REDIS_URL": "redis://node1:7000/0",
            "SCANGATE_FLUSH_MAX_AGE": "50ms",
        },
        data_dir=Path("/y"),
    )
    assert (s.retry_memory_s, s.shards, s.data_dir, s.redis_cluster, s.flush_max_age_s) == (
        120,
        4,
        Path("/y"),
        True,
        0.05,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SCANGATE_SHARDS": "0"}, "SCANGATE_SHARDS"),
        ({"SCANGATE_CLOCK_SKEW": "2h"}, "SCANGATE_CLOCK_SKEW: use 0 to 1h"),
        ({"SCANGATE_REDIS_CLUSTER": "true"}, "SCANGATE_REDIS_URL"),
        ({"SCANGATE_REDIS_WAIT_REPLICAS": "many"}, "SCANGATE_REDIS_WAIT_REPLICAS"),
        ({"SCANGATE_MAX_STAY": "long"}, "SCANGATE_MAX_STAY"),
        ({"SCANGATE_TIMEZONE": "Mars/Olympus"}, "SCANGATE_TIMEZONE"),
        ({"SCANGATE_SMS": "http"}, "SCANGATE_SMS_URL"),
        ({"SCANGATE_REDIS_CLUSTER": "maybe"}, "SCANGATE_REDIS_CLUSTER"),
        ({"SCANGATE_TRUSTED_PROXIES": "10.0.0.0/33"}, "SCANGATE_TRUSTED_PROXIES"),
        ({"SCANGATE_OTP_CODE_TRIES": "0"}, "SCANGATE_OTP_CODE_TRIES"),
        ({"SCANGATE_OTP_PHONE_CAP": "lots"}, "SCANGATE_OTP_PHONE_CAP"),
        ({"SCANGATE_OTP_WINDOW": "0s"}, "SCANGATE_OTP_WINDOW"),
        ({"SCANGATE_TRUSTED_PROXIES": "10.0.0.0/8,lb.internal"}, "lb.internal"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_trusted_proxies_are_cidrs_or_addresses() -> None:
    s = Settings.from_env({"SCANGATE_TRUSTED_PROXIES": " 10.0.0.0/8, 192.0.2.7 ,2001:db8::/48"})
    assert [str(n) for n in s.trusted_proxy_networks] == [
        "10.0.0.0/8",
        "192.0.2.7/32",
        "2001:db8::/48",
    ]
    assert Settings.from_env({}).trusted_proxy_networks == ()


def test_otp_limits_default_to_the_documented_values_and_windows_can_be_shortened() -> None:
    s = Settings.from_env({})
    assert (s.otp_window_s, s.otp_address_limit, s.otp_phone_address_limit) == (900, 60, 3)
    assert (s.otp_address_guess_limit, s.otp_phone_address_guess_limit) == (120, 5)
    assert (s.otp_code_tries, s.otp_phone_cap, s.otp_phone_cap_window_s) == (5, 20, 86400)
    short = Settings.from_env({"SCANGATE_OTP_WINDOW": "3s", "SCANGATE_OTP_PHONE_CAP_WINDOW": "1h"})
    assert (short.otp_window_s, short.otp_phone_cap_window_s) == (3, 3600)


def test_every_field_is_read_as_the_type_it_is_declared_with() -> None:
    """Conversion goes by each field's annotation, so a new field needs no list to be
    remembered: a float is a duration (and its name says so), an int a whole number, a
    bool true or false."""
    hints = typing.get_type_hints(Settings)
    samples = {float: ("2d", 172800.0), int: ("7", 7), bool: ("yes", True)}
    bounded = {  # at most 1h; at least 10 connections
        name: ("30m", 1800.0)
        for name in ("clock_skew_s", "header_timeout_s", "body_timeout_s", "keepalive_timeout_s")
    } | {"max_connections": ("70", 70)}
    env = {"SCANGATE_REDIS_URL": "redis://127.0.0.1:6379/0"}  # a cluster needs one
    expected: dict[str, object] = {}
    for field in dataclasses.fields(Settings):
        kind = hints[field.name]
        if kind in samples:
            if kind is float:
                assert field.name.endswith("_s"), f"{field.name}: a duration's name ends in _s"
            text, value = bounded.get(field.name, samples[kind])
            env["SCANGATE_" + field.name.upper()] = text
            expected[field.name] = value
    assert len(expected) > 30
    read = Settings.from_env(env)
    for name, value in expected.items():
        got = getattr(read, name)
        assert (type(got), got) == (type(value), value), name
    with pytest.raises(SettingsError, match=r"SCANGATE_SHARDS: '1\.5' is not a whole number"):
        Settings.from_env({"SCANGATE_SHARDS": "1.5"})
