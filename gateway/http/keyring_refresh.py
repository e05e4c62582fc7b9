"""Keeping a gateway process's keyring in step with its store, which the CLI changes.

The keyring is checked every second, and also as soon as a request brings a token it does
not know: an app added with ``scangate apps add`` is usable by the next request, not a
second later. Unknown tokens are also what an attacker sends by the thousand, so such
checks are rate-limited. There is at most one every ``MIN_GAP_S`` per process, one at a
time, and every request waiting meanwhile is answered by the next check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from signing import Keyring

log = logging.getLogger(__name__)

MIN_GAP_S: Final = 0.1


class KeyringRefresh:
    def __init__(self, keyring: Keyring, min_gap_s: float = MIN_GAP_S) -> None:
        self._keyring = keyring
        self._min_gap_s = min_gap_s
        self._lock = asyncio.Lock()
        self._last_start = float("-inf")  # loop time at which the latest check began
        self.checks = 0  # how many times the store was asked (for tests)
        # Called after each change is applied: what is kept from the keyring goes stale.
        self.on_change: list[Callable[[], None]] = []

    async def since(self, moment: float) -> None:
        """Return once a check of the store that began at or after ``moment`` (loop time)
        has been applied. On a store error the keyring stays as it was: logged, not
        raised, since the caller only wanted the freshest answer it could have."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._last_start >= moment:
                return  # a check that began after the caller asked has just finished
            gap = self._last_start + self._min_gap_s - loop.time()
            if gap > 0:
                await asyncio.sleep(gap)
            self._last_start = loop.time()
            try:
                await self._check()
            except Exception:
                log.exception("keyring check failed; the keyring loaded before keeps serving")

    async def now(self) -> None:
        """A check that begins after this call (the periodic refresher's)."""
        await self.since(asyncio.get_running_loop().time())

    async def _check(self) -> None:
        # The store is read off the event loop (it may be a database), then applied on it.
        self.checks += 1
        keyring = self._keyring
        store = keyring.store
        if await asyncio.to_thread(store.version) == keyring.version:
            return
        raw, version = await asyncio.to_thread(store.read)
        keyring.load(raw, version)
        log.info("keyring changed: reloaded")
        for changed in self.on_change:
            changed()
