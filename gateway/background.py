"""Background tasks: periodic ones that stop when asked, within a deadline, and the work a
request starts that outlives it, awaited on shutdown.

A periodic task's step may call a client library that catches ``CancelledError`` and
raises its own error instead (redis-py does, mid-command); a loop that handles that error
would then run on forever with its cancellation lost. So a periodic task also checks a
stop flag, and ``stop`` cancels again until the task is done or the deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

log = logging.getLogger(__name__)

STOP_DEADLINE_S: Final = 5.0


class Periodic:
    """Run ``step`` every ``interval_s`` until stopped; a step's error is logged, not fatal."""

    def __init__(self, name: str, step: Callable[[], Awaitable[None]], interval_s: float) -> None:
        self.name = name
        self._step = step
        self._interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=name)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._step()
            except Exception:
                log.exception("%s: step failed; trying again in %.1fs", self.name, self._interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    async def stop(self, deadline_s: float = STOP_DEADLINE_S) -> None:
        self._stopping.set()
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while not self._task.done() and loop.time() < end:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=0.1)
        if not self._task.done():
            log.error("%s did not stop within %.1fs", self.name, deadline_s)
            return
        if not self._task.cancelled() and self._task.exception() is not None:
            log.error("%s ended with an error", self.name, exc_info=self._task.exception())


class BackgroundTasks:
    """Work started by a request that outlives it (an SMS being sent): each task is kept
    referenced until done, since the event loop keeps only weak references to tasks, and
    what is still running at shutdown is awaited within a deadline."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, deadline_s: float) -> None:
        """Wait for the tasks still running, for ``deadline_s`` at most."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=deadline_s)
