"""A child process that must not outlive its parent: it watches for being re-parented (the
parent died, by SIGKILL or the OOM killer, without stopping it) and then acts.

Polling ``getppid`` works wherever the child runs, with no signal set up before the
child's ``exec``; Linux's ``PR_SET_PDEATHSIG`` would need that, and it fires when the
parent's *thread* ends, not the parent."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Final

POLL_S: Final = 0.25


def when_orphaned(parent_pid: int, act: Callable[[], None]) -> None:
    """Run ``act`` on a daemon thread once this process's parent is no longer
    ``parent_pid``."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
        act()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def exit_when_orphaned(parent_pid: int) -> None:
    """For a helper process with nothing to finish (a poster renderer): exit at once."""
    when_orphaned(parent_pid, lambda: os._exit(0))
