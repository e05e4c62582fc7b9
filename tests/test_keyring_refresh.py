"""An app added with the CLI works for the very next request, and tokens nobody issued
cannot turn that into a flood of keyring reads. The README's quick start, run as written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import pytest

from gateway.http.keyring_refresh import MIN_GAP_S
from gateway.http.keys import KEYRING_REFRESH
from signing import Keyring

from .harness import GatewayStarter
from .test_serve import Served, clean_env

ONE_REDIS: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)
README: Final = Path(__file__).resolve().parent.parent / "README.md"
A_SCAN: Final = {"events": [{"event_id": "NEW-APP-1"}]}  # rejected, but only once authorised


@ONE_REDIS
async def test_an_app_added_elsewhere_is_usable_by_the_next_request(
    gateway_under_test: GatewayStarter, redis_url: str, keyring: Keyring
) -> None:
    gateway = await gateway_under_test(redis_url)
    await asyncio.sleep(1.5)  # the periodic check has run: nothing pending
    for n in range(5):
        # Another process's view of the same store, as the CLI has.
        added = keyring.add_app(f"late{n}")
        response = await gateway.client.post(
            "/v1/scans", json=A_SCAN, headers={"Authorization": f"Bearer {added.token}"}
        )
        assert response.status == 200, await response.text()


@ONE_REDIS
async def test_unknown_tokens_check_the_keyring_at_most_ten_times_a_second(
    gateway_under_test: GatewayStarter, redis_url: str
) -> None:
    gateway = await gateway_under_test(redis_url)
    refresh = gateway.app[KEYRING_REFRESH]

    async def garbage() -> int:
        token = "sga_" + secrets.token_urlsafe(24)
        response = await gateway.client.post(
            "/v1/scans", json=A_SCAN, headers={"Authorization": f"Bearer {token}"}
        )
        return response.status

    before, start = refresh.checks, time.monotonic()
    statuses: list[int] = []
    for _ in range(10):  # 10 waves of 50 at once
        statuses += await asyncio.gather(*(garbage() for _ in range(50)))
    elapsed = time.monotonic() - start
    assert statuses == [401] * 500
    checks = refresh.checks - before
    # One check per gap at most, plus the periodic one each second, plus one at each edge.
    assert checks <= elapsed / MIN_GAP_S + elapsed + 2, (checks, elapsed)
    assert checks < 100


def quick_start_lines() -> str:
    """The README's second block of the quick start: register an app, post a scan."""
    text = README.read_text(encoding="utf-8")
    after = text.split("Then, in another terminal, register an app and post a scan:", 1)[1]
    match = re.search(r"```sh\n(.*?)```", after, re.S)
    assert match is not None, "the README's quick start has no sh block after its heading"
    return match.group(1)


def test_the_readme_quick_start_posts_an_accepted_scan_at_the_first_paste(
    tmp_path: Path,
) -> None:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "scangate").exists():
        if os.environ.get("CI") == "true":
            raise AssertionError(f"no scangate script in {venv}: install the project")
        pytest.skip(f"no scangate script in {venv} (pip install -e . into it)")
    # The README runs from a checkout with .venv in it; so does this, on a port of its own.
    (tmp_path / ".venv").symlink_to(venv)
    served = Served(tmp_path / "scangate-data", 1)
    lines = quick_start_lines()
    assert "localhost:8080" in lines
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", lines.replace("localhost:8080", served.base)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    code, _log = served.stop()
    assert code == 0
    assert result.returncode == 0, result.stderr
    answer, stored = (json.loads(line) for line in result.stdout.splitlines()[:2])
    assert answer["accepted"] == 1, answer
    # It ends by showing the scan stored, with the visit it opened, and the buffer drained.
    assert [e["event_id"] for e in stored["events"]] == ["EVT00000001"], stored
    assert [v["venue_id"] for v in stored["visits"]] == ["SHOP42"]
    table = "\n".join(result.stdout.splitlines()[2:])
    assert "backlog        0 events" in table and "storage        sqlite: 1 events" in table
