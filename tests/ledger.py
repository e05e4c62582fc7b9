"""An exact ledger of what the gateway answered, and the load that fills it, for the fault
suite (``test_faults.py``).

The load posts batches of unique events (about 1 in 200 with a tampered person code)
and records each event's verdict. A request that fails (5xx, timeout, connection refused)
goes on a list; after the fault, ``settle`` posts those batches again until they are
answered, and an event that then answers ``duplicate`` had reached Redis the first time
(the retry memory remembers it), so it may be stored.

``check`` is the promise, for the events stored once the backlog has drained:
every accepted event is stored exactly once; no rejected event is stored; nothing is
stored that was neither accepted nor a failed-then-duplicate event.

``SCANGATE_FAULT_SCALE`` (default 1) multiplies every phase's length: CI runs the short
mode, release testing runs e.g. ``SCANGATE_FAULT_SCALE=10``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.pipeline.keyspace import entry_values, stream_key
from signing import Keyring

BATCH = 10
# Many persons, as at a real door. Not a multiple of 3 or 11, the cycles of the load's
# kinds and scan-time offsets, so that each person gets check-ins and check-outs at
# varied times (with 3,000 every person got one kind only, and pairing little to do).
PERSONS = 3001
REQUEST_TIMEOUT_S = 5.0


def scale() -> float:
    return float(os.environ.get("SCANGATE_FAULT_SCALE", "1"))


def phase_s(seconds: float) -> float:
    """A phase's length in this mode."""
    return seconds * scale()


def tamper(code: str) -> str:
    """The code with its last character changed: the signature no longer matches."""
    return code[:-1] + ("A" if code[-1] != "A" else "B")


@dataclass
class Ledger:
    """Each event's fate as the gateway told it."""

    accepted: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    duplicate_after_failure: set[str] = field(default_factory=set)
    failed_batches: list[list[dict[str, Any]]] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    missing_retry_after: int = 0

    def record(self, events: Sequence[dict[str, Any]], body: dict[str, Any]) -> None:
        for result in body["results"]:
            event_id = result["event_id"]
            if result["status"] == "accepted":
                self.accepted.add(event_id)
            elif result["status"] == "rejected":
                self.rejected.add(event_id)
            else:
                # Only events whose earlier request failed are ever posted twice.
                self.duplicate_after_failure.add(event_id)

    def summary(self, stored: int) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        failures = ", ".join(f"{k}: {n}" for k, n in sorted(self.failures.items())) or "none"
        return (
            f"accepted {len(self.accepted)}, rejected {len(self.rejected)}, duplicate after a "
            f"failed request {len(self.duplicate_after_failure)}, stored {stored}; HTTP "
            f"statuses {{{statuses}}}; failed requests {{{failures}}}"
        )

    def check(self, stored: Sequence[str]) -> None:
        """The promise, against the event ids found in storage."""
        # Shown with `pytest -s` (RELIABILITY.md quotes these lines).
        print(
            f"\nLEDGER {os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}: "
            f"{self.summary(len(stored))}"
        )
        counts = Counter(stored)
        twice = [e for e, n in counts.items() if n > 1]
        assert not twice, f"stored more than once: {twice[:5]}"
        held = set(counts)
        lost = self.accepted - held
        assert not lost, (
            f"{len(lost)} accepted events missing from storage, e.g. {sorted(lost)[:5]}"
        )
        stored_rejected = self.rejected & held
        assert not stored_rejected, f"rejected events stored: {sorted(stored_rejected)[:5]}"
        unexplained = held - self.accepted - self.duplicate_after_failure
        assert not unexplained, f"stored but never accepted: {sorted(unexplained)[:5]}"
        assert self.statuses.get(500, 0) == 0, f"500 answers: {self.statuses}"
        assert self.missing_retry_after == 0, "a 429/503 without Retry-After"


class Load:
    """Concurrent clients posting unique events to ``url`` until stopped."""

    def __init__(
        self,
        url: str,
        token: str,
        keyring: Keyring,
        app: str = "vhd",
        prefix: str = "F",
        clients: int = 4,
        pause_s: float = 0.005,
        persons: int = PERSONS,
    ) -> None:
        self.url = url.rstrip("/") + "/v1/scans"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.ledger = Ledger()
        self.venue = keyring.issue(app, "venue", "V1")
        self.persons = [keyring.issue(app, "person", f"P{i}", ttl_s=86400) for i in range(persons)]
        self.prefix = prefix
        self.clients = clients
        self.pause_s = pause_s
        self._n = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def _batch(self) -> list[dict[str, Any]]:
        events = []
        for _ in range(BATCH):
            n = self._n
            self._n += 1
            person = self.persons[n % len(self.persons)]
            events.append(
                {
                    "event_id": f"{self.prefix}{n:09d}",
                    "kind": "checkin" if n % 3 else "checkout",
                    "venue_code": self.venue,
                    "person_code": tamper(person) if n % 199 == 7 else person,
                    "scanned_at": int(time.time() * 1000) - (n % 11) * 1000,
                }
            )
        return events

    async def post(self, events: list[dict[str, Any]]) -> bool:
        """Post once; True when answered 200 (and recorded)."""
        assert self._session is not None
        ledger = self.ledger
        try:
            async with self._session.post(
                self.url, json={"events": events}, headers=self.headers
            ) as resp:
                ledger.statuses[resp.status] += 1
                if resp.status in (429, 503) and "Retry-After" not in resp.headers:
                    ledger.missing_retry_after += 1
                if resp.status == 200:
                    ledger.record(events, await resp.json())
                    return True
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ledger.failures[type(exc).__name__] += 1
        return False

    async def _client(self) -> None:
        while not self._stop.is_set():
            events = self._batch()
            if not await self.post(events):
                self.ledger.failed_batches.append(events)
                await asyncio.sleep(0.05)
            await asyncio.sleep(self.pause_s)

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        )
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def settle(self, deadline_s: float = 60) -> None:
        """Post every failed batch again until each is answered."""
        deadline = time.monotonic() + deadline_s
        pending, self.ledger.failed_batches = self.ledger.failed_batches, []
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} batches never answered"
            pending = [b for b in pending if not await self.post(b)]
            if pending:
                await asyncio.sleep(0.5)

    async def __aexit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            await self.stop()
        if self._session is not None:
            await self._session.close()

    def answered(self) -> int:
        return len(self.ledger.accepted) + len(self.ledger.rejected)


async def until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


async def events_in_streams(client: Any, shards: int) -> int:
    """The events the shard streams hold, counted entry by entry (an entry holds several):
    not the backlog counter, which is what the count checks."""
    total = 0
    for shard in range(shards):
        start = "-"
        while True:
            page = await client.xrange(stream_key(shard), min=start, count=1000)
            total += sum(len(entry_values(fields)) for _id, fields in page)
            if len(page) < 1000:
                break
            start = "(" + page[-1][0].decode()
    return total
