"""What keeps one ``scangate serve`` to itself, and its processes tied to their supervisor.

The supervisor holds two claims for its whole life, so that a second ``serve`` refuses on
one line instead of starting beside it:
- a lock on the data dir: two supervisors on one data dir would run two embedded servers
  on the same append-only file;
- the port: the workers bind it with SO_REUSEPORT, which lets any process of the same user
  bind it too, and the kernel then splits the connections between the two gateways (scans
  of one instance's apps answered 401 by the other). The supervisor binds it first without
  SO_REUSEPORT, which fails if anyone has it, and only then allows the sharing.

Its children watch it in turn: a worker or flusher whose supervisor died (SIGKILL, OOM
killer) stops within ``ORPHAN_EXIT_S`` instead of keeping the port; a gateway worker
beats a heartbeat from its event loop, and the supervisor replaces one whose loop has
stopped beating for longer than ``SCANGATE_WORKER_TIMEOUT`` (gunicorn's worker timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Final

from gateway import lifetime

LOCK_NAME: Final = "serve.lock"
# A worker told to stop because its supervisor died has this long, from the death, to
# finish its requests in flight; then it exits anyway.
ORPHAN_EXIT_S: Final = 4.5


class AlreadyServing(Exception):
    """Another process holds the data dir or the port; the message says which, on one line."""


def hold_data_dir(data_dir: Path) -> int:
    """Lock ``data_dir`` for this supervisor (the lock goes with the process, whatever
    ends it); the lock file's descriptor, to keep open. AlreadyServing names the holder."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyServing(
            f"another scangate serve (pid {holder}) is running on the data dir {data_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def hold_port(host: str, port: int) -> list[socket.socket]:
    """Bind ``host:port`` without SO_REUSEPORT (so it fails if any process has it), then
    allow the workers' SO_REUSEPORT binds beside it. The sockets never listen, so they
    take no connections; keep them open for as long as the workers serve."""
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            # As asyncio's create_server binds, so that the same addresses conflict.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise AlreadyServing(
                    f"{host}:{port} is in use by another process (another scangate serve?); "
                    "stop it or choose another --port"
                ) from None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


def exit_with_supervisor(supervisor_pid: int) -> None:
    """In a child of ``serve``: once the supervisor is gone (the child is re-parented),
    stop as SIGTERM stops, and exit within ``ORPHAN_EXIT_S`` whatever is in flight."""

    def stop() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ORPHAN_EXIT_S - lifetime.POLL_S)
        os._exit(1)  # still here: the graceful stop did not finish in time

    lifetime.when_orphaned(supervisor_pid, stop)


async def beat(heartbeat: Any, every_s: float) -> None:
    """Write the time into ``heartbeat`` (a shared double) from the event loop, forever:
    the supervisor reads a stale value as a stuck loop."""
    while True:
        heartbeat.value = time.monotonic()
        await asyncio.sleep(every_s)


def heartbeat_period_s(timeout_s: float) -> float:
    """How often a worker beats: often enough that a missed beat or two is not a timeout."""
    return min(1.0, timeout_s / 4)


def stuck_for_s(heartbeat: Any, now: float) -> float:
    """How long the worker behind ``heartbeat`` has not beaten; 0 before its first beat
    (a worker that is still starting is not stuck)."""
    last: float = heartbeat.value
    return 0.0 if last == 0.0 else now - last


def release(fd: int, sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
    with contextlib.suppress(OSError):
        os.close(fd)
