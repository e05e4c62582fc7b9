"""Posters as the gateway serves them: drawn in a process of their own, once each, kept
until what they show changes, refused for a revoked venue, and limited per address on the
public route."""

from __future__ import annotations

import asyncio
from typing import Any, Final

import pytest

import signing.poster
from gateway.http.keys import KEYRING_REFRESH, POSTERS
from gateway.http.web.endpoints import POSTER_BURST
from signing import Keyring

from .test_declarations import Desk, DeskFactory, make_desk

__all__ = ["make_desk"]  # the fixture, used here

ONE_REDIS: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)


def draw_nothing_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make drawing fail in this process: a poster that is served was drawn elsewhere."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a poster was drawn in the gateway's own process")

    monkeypatch.setattr(signing.poster, "layout_poster", refuse)


async def fetch(desk: Desk, venue_id: str, fmt: str = "png") -> tuple[int, bytes]:
    response = await desk.client.get(f"/v1/venues/{venue_id}/poster.{fmt}", headers=desk.auth())
    return response.status, await response.read()


@ONE_REDIS
async def test_posters_are_drawn_in_a_process_of_their_own_and_kept(
    make_desk: DeskFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    draw_nothing_here(monkeypatch)
    desk: Desk = await make_desk()
    posters = desk.app[POSTERS]
    venues = [await desk.venue(name=f"Chợ số {i}") for i in range(8)]
    answers = await asyncio.gather(*(fetch(desk, v["venue_id"]) for v in venues))
    assert all(status == 200 for status, _ in answers), answers[0]
    assert all(body.startswith(b"\x89PNG") for _, body in answers)
    assert posters.renders == 8
    # Again: every one from the cache, byte for byte.
    again = await asyncio.gather(*(fetch(desk, v["venue_id"]) for v in venues))
    assert again == answers and posters.renders == 8
    # Eight at once for one poster not yet drawn: drawn once.
    fresh = await desk.venue(name="Chợ mới")
    same = await asyncio.gather(*(fetch(desk, fresh["venue_id"], "pdf") for _ in range(8)))
    assert len({body for _, body in same}) == 1 and posters.renders == 9


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
    make_desk: DeskFactory, keyring: Keyring
) -> None:
    desk: Desk = await make_desk()
    venue = await desk.venue()
    status, before = await fetch(desk, venue["venue_id"], "svg")
    assert status == 200
    keyring.rotate("vhd")  # another process's view: the CLI
    await desk.app[KEYRING_REFRESH].now()
    assert desk.app[POSTERS].kept() == []  # emptied by the change
    status, after = await fetch(desk, venue["venue_id"], "svg")
    assert status == 200 and after != before and desk.app[POSTERS].renders == 2
    keyring.retire("vhd", "K1")  # the key the first poster was signed with
    await desk.app[KEYRING_REFRESH].now()
    assert desk.app[POSTERS].kept() == []
    status, redrawn = await fetch(desk, venue["venue_id"], "svg")
    assert status == 200 and redrawn == after and desk.app[POSTERS].renders == 3
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
