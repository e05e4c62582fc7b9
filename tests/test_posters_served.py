"""Posters as the gateway serves them: drawn on their own threads, a few at a time, kept
until what they show changes, refused for a revoked venue, and limited per address on the
public route."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Final

import pytest

from gateway.http import posters as posters_module
from gateway.http.keys import KEYRING_REFRESH, POSTERS
from gateway.http.web.endpoints import POSTER_BURST
from signing import Keyring

from .test_declarations import Desk, DeskFactory, make_desk

__all__ = ["make_desk"]  # the fixture, used here

ONE_REDIS: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)


class RenderLog:
    """Wraps the drawing: which threads drew, and how many drew at once at most."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[str] = []
        self.at_once = self.most_at_once = 0
        self._lock = threading.Lock()
        real = posters_module._render

        def render(*args: Any) -> bytes:
            with self._lock:
                self.threads.append(threading.current_thread().name)
                self.at_once += 1
                self.most_at_once = max(self.most_at_once, self.at_once)
            try:
                return real(*args)
            finally:
                with self._lock:
                    self.at_once -= 1

        monkeypatch.setattr(posters_module, "_render", render)


async def fetch(desk: Desk, venue_id: str, fmt: str = "png") -> tuple[int, bytes]:
    response = await desk.client.get(f"/v1/venues/{venue_id}/poster.{fmt}", headers=desk.auth())
    return response.status, await response.read()


@ONE_REDIS
async def test_posters_are_drawn_off_the_loop_a_few_at_a_time_and_kept(
    make_desk: DeskFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = RenderLog(monkeypatch)
    desk: Desk = await make_desk()
    venues = [await desk.venue(name=f"Chợ số {i}") for i in range(8)]
    answers = await asyncio.gather(*(fetch(desk, v["venue_id"]) for v in venues))
    assert all(status == 200 for status, _ in answers)
    assert len(log.threads) == 8
    assert all(name.startswith("poster") for name in log.threads), log.threads
    assert log.most_at_once <= posters_module.RENDER_THREADS
    # Again: every one from the cache, byte for byte.
    again = await asyncio.gather(*(fetch(desk, v["venue_id"]) for v in venues))
    assert again == answers and len(log.threads) == 8
    # Eight at once for one poster not yet drawn: drawn once.
    fresh = await desk.venue(name="Chợ mới")
    same = await asyncio.gather(*(fetch(desk, fresh["venue_id"], "pdf") for _ in range(8)))
    assert len({body for _, body in same}) == 1 and len(log.threads) == 9


@ONE_REDIS
async def test_a_poster_is_the_same_file_each_time_it_is_drawn(make_desk: DeskFactory) -> None:
    desk: Desk = await make_desk()
    venue = await desk.venue()
    for fmt in ("svg", "png", "pdf"):
        first = await fetch(desk, venue["venue_id"], fmt)
        assert first[0] == 200, first
        desk.app[POSTERS].clear()
        await asyncio.sleep(1.1)  # another second: the code's issue time must not move
        assert await fetch(desk, venue["venue_id"], fmt) == first, fmt


@ONE_REDIS
async def test_a_key_rotation_or_retirement_redraws_and_a_revocation_refuses(
    make_desk: DeskFactory, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = RenderLog(monkeypatch)
    desk: Desk = await make_desk()
    venue = await desk.venue()
    status, before = await fetch(desk, venue["venue_id"], "svg")
    assert status == 200
    keyring.rotate("vhd")  # another process's view: the CLI
    await desk.app[KEYRING_REFRESH].now()
    assert desk.app[POSTERS].kept() == []  # emptied by the change
    status, after = await fetch(desk, venue["venue_id"], "svg")
    assert status == 200 and after != before and len(log.threads) == 2
    keyring.retire("vhd", "K1")  # the key the first poster was signed with
    await desk.app[KEYRING_REFRESH].now()
    assert desk.app[POSTERS].kept() == []
    status, redrawn = await fetch(desk, venue["venue_id"], "svg")
    assert status == 200 and redrawn == after and len(log.threads) == 3
    status, doc, _ = await desk.call("DELETE", f"/v1/venues/{venue['venue_id']}")
    assert status == 200, doc
    status, body = await fetch(desk, venue["venue_id"], "svg")
    assert status == 404 and b"revoked" in body
    assert all(key.venue_id != venue["venue_id"] for key in desk.app[POSTERS].kept())


@ONE_REDIS
async def test_the_public_poster_route_is_limited_per_address(make_desk: DeskFactory) -> None:
    desk: Desk = await make_desk(web_app="vhd", trusted_proxies="127.0.0.0/8")
    venue = await desk.venue()
    path = f"/web/api/venues/{venue['venue_id']}/poster.svg"

    async def get(address: str) -> Any:
        return await desk.client.get(path, headers={"X-Forwarded-For": address})

    statuses = [(await get("203.0.113.7")).status for _ in range(POSTER_BURST + 3)]
    assert statuses == [200] * POSTER_BURST + [429] * 3
    refused = await get("203.0.113.7")
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert (await refused.json())["error"] == "rate_limited"
    # Another address is not held back by the first.
    assert (await get("198.51.100.9")).status == 200
