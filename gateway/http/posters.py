"""Venue posters, rendered away from the event loop and kept.

A poster takes tens of milliseconds of drawing (Pillow). Rendered on the event loop, eight
people fetching posters raised the scan path's median from 1.9 ms to 221 ms; rendered on
threads of the same process, the drawing still held the interpreter against the loop (the
scan median at 5x idle, ``benchmarks/bench_hostile.py``). So:
- posters render in a process of their own (``RENDER_PROCESSES``, started on the first
  poster, one render at a time each), and a request for a poster being rendered waits
  for that render, not for one of its own;
- a poster's code carries its venue's registration time as its issue time, so the same
  venue, key and text give the same bytes, and rendered posters are kept, up to
  ``CACHE_BYTES``, keyed by everything they show: the venue, its app, the app's active
  key, the format, the venue's name, address, province and kind, and the app's name;
- what changes a poster (the app's key rotated or retired, its name) comes through the
  keyring, and a keyring change empties the cache; a venue revoked through this process
  drops its posters, and a revoked venue gets no poster from any process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
import os
from collections import OrderedDict
from typing import Final, NamedTuple

from gateway.lifetime import exit_when_orphaned
from signing import Keyring
from signing.poster import PosterFormat, render_poster
from storage.registry import VenueRecord

RENDER_PROCESSES: Final = 1
CACHE_BYTES: Final = 64 * 1024 * 1024


class PosterKey(NamedTuple):
    venue_id: str
    app_id: str
    kid: int
    fmt: str
    name: str
    address: str
    province: str
    kind: str
    app_name: str


def poster_code(keyring: Keyring, venue: VenueRecord) -> str:
    """The venue's code as its poster prints it: issued at the venue's registration, so
    every render of it with the same key is the same code."""
    return keyring.issue(venue.app_id, "venue", venue.venue_id, now_s=venue.created_at_ms // 1000)


class Posters:
    """Rendered posters of one process: a bounded cache, and a bounded render pool."""

    def __init__(self, cache_bytes: int = CACHE_BYTES, processes: int = RENDER_PROCESSES) -> None:
        self._cache: OrderedDict[PosterKey, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._held_bytes = 0
        self._rendering: dict[PosterKey, asyncio.Future[bytes]] = {}
        self._processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.renders = 0  # how many were drawn (for tests and the benchmark)

    def _renderer(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # Spawned, not forked: a fork of a process running an event loop and threads
            # inherits their locks in whatever state they were.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self._processes,
                mp_context=multiprocessing.get_context("spawn"),
                # A worker killed outright must not leave its renderer behind.
                initializer=exit_when_orphaned,
                initargs=(os.getpid(),),
            )
        return self._pool

    async def poster(self, keyring: Keyring, venue: VenueRecord, fmt: PosterFormat) -> bytes:
        app_name = keyring.app_name(venue.app_id)
        key = PosterKey(
            venue.venue_id,
            venue.app_id,
            keyring.verifier(venue.app_id).active_kid,
            fmt,
            venue.name,
            venue.address,
            venue.province,
            venue.kind,
            app_name,
        )
        kept = self._cache.get(key)
        if kept is not None:
            self._cache.move_to_end(key)
            return kept
        pending = self._rendering.get(key)
        if pending is None:
            # The code is signed here, on the loop that owns the keyring; only the drawing
            # goes to the pool.
            code = poster_code(keyring, venue)
            loop = asyncio.get_running_loop()
            render = functools.partial(
                render_poster,
                code,
                venue_name=venue.name,
                address=venue.address,
                province=venue.province,
                app_name=app_name,
                fmt=fmt,
            )
            try:
                pending = loop.run_in_executor(self._renderer(), render)
            except concurrent.futures.BrokenExecutor:
                self._pool = None  # the render process died: the next poster starts another
                raise
            self._rendering[key] = pending
            pending.add_done_callback(lambda done: self._rendered(key, done))
        # Shielded: a caller that goes away does not cancel the render others wait for.
        return await asyncio.shield(pending)

    def _rendered(self, key: PosterKey, done: asyncio.Future[bytes]) -> None:
        self._rendering.pop(key, None)
        if done.cancelled():
            return
        if isinstance(done.exception(), concurrent.futures.BrokenExecutor):
            self._pool = None  # the render process died: the next poster starts another
        if done.exception() is not None:
            return
        self.renders += 1
        body = done.result()
        if len(body) > self._cache_bytes:
            return
        self._cache[key] = body
        self._held_bytes += len(body)
        while self._held_bytes > self._cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._held_bytes -= len(dropped)

    def kept(self) -> list[PosterKey]:
        """What the cache holds now, least recently used first."""
        return list(self._cache)

    def drop_venue(self, venue_id: str) -> None:
        for key in [k for k in self._cache if k.venue_id == venue_id]:
            self._held_bytes -= len(self._cache.pop(key))

    def clear(self) -> None:
        self._cache.clear()
        self._held_bytes = 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
