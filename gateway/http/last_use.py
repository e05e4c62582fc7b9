"""When each app token was last used, to the minute, with no write per request.

``authenticate`` notes the minute of each use in this process's memory (a dict store, on
the event loop's thread). A background task of each gateway process writes what it noted
out to storage every ``SCANGATE_LAST_USE_FLUSH`` (60 s by default) and once more when the
process stops: one transaction for all its tokens, whatever the number of requests. The
write keeps the later minute (``Storage.record_token_use``), so the workers and hosts that
all write the same token never move its last use back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from storage import Storage

MINUTE_MS: Final = 60_000


class LastUse:
    """The minute each app token was last used in this process, since the last write."""

    def __init__(self) -> None:
        self._minutes: dict[str, int] = {}

    def note(self, token_id: str, now_s: float) -> None:
        """A use of the token at ``now_s`` (epoch seconds), kept as its minute."""
        self._minutes[token_id] = int(now_s // 60) * MINUTE_MS

    def pending(self) -> Mapping[str, int]:
        """What the next write would store (token id -> epoch ms of the minute)."""
        return dict(self._minutes)

    async def write(self, storage: Storage) -> int:
        """Store what was noted since the last write; how many tokens. What a failed write
        took is put back, to go with the next one."""
        taken, self._minutes = self._minutes, {}
        if not taken:
            return 0
        try:
            await storage.record_token_use(taken)
        except BaseException:
            for token_id, minute in taken.items():
                if minute > self._minutes.get(token_id, -1):
                    self._minutes[token_id] = minute
            raise
        return len(taken)
