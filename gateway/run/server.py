"""``scangate serve``: a supervisor process and N gateway worker processes.

The supervisor claims the data dir and the port (``supervision``: a second ``serve`` on
either refuses on one line), starts the embedded Valkey server when no Redis URL is
configured, points prometheus_client's multiprocess directory at a fresh folder (so
``/metrics`` of any worker reports all of them), starts the workers (each binds the same
port with SO_REUSEPORT), restarts a worker that dies or whose event loop is stuck past
``SCANGATE_WORKER_TIMEOUT``, and on SIGTERM or SIGINT stops the workers gracefully (each
stops accepting, finishes requests in flight within the shutdown deadline, exits), then the
embedded server, and exits 0. Its children stop by themselves if it dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Final

from gateway.logs import configure_logging
from gateway.settings import Settings
from signing import Keyring, Sealer, load_master_key
from storage.keyring_store import keyring_store

from . import supervision

log = logging.getLogger(__name__)

SHUTDOWN_DEADLINE_S: Final = 20.0
WORKER_START_TIMEOUT_S: Final = 60.0
RESTART_BACKOFF_S: Final = 1.0
GC_GEN0_THRESHOLD: Final = 20_000


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    flushers: int = 1
    shutdown_deadline_s: float = SHUTDOWN_DEADLINE_S


def serve(settings: Settings, options: ServeOptions) -> int:
    """Run until SIGTERM or SIGINT; the exit status. AlreadyServing (the CLI's one line
    and exit 2) when another process holds the data dir or the port."""
    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if settings.data_dir.stat().st_mode & 0o077:
        log.warning(
            "the data dir %s can be read by other users: it holds personal data; chmod 700 it",
            settings.data_dir,
        )
    lock_fd = supervision.hold_data_dir(settings.data_dir)
    try:
        port_guard = supervision.hold_port(options.host, options.port)
        if settings.metrics_port:
            port_guard += supervision.hold_port(settings.metrics_host, settings.metrics_port)
    except BaseException:
        supervision.release(lock_fd, [])
        raise
    try:
        return _supervise(settings, options, lambda: stop_requested)
    finally:
        supervision.release(lock_fd, port_guard)


def _supervise(settings: Settings, options: ServeOptions, stopping: Callable[[], bool]) -> int:
    from gateway.run.embedded import (  # imported here: only serve needs it
        EMBEDDED_URL_FILE,
        RedisProcess,
        valkey_binary,
    )

    # Open the keyring once here: a missing or wrong master key fails now, on one line,
    # not in every worker; and a generated key file is made once, not raced for.
    store = keyring_store(settings.resolved_storage_url, settings.keyring_path)
    try:
        Keyring(store, Sealer(load_master_key(settings.master_key, settings.data_dir)))
    finally:
        store.close()
    metrics_dir = settings.data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())

    embedded: RedisProcess | None = None
    if settings.redis_url is None:
        embedded = RedisProcess(
            valkey_binary(),
            settings.data_dir / "valkey",
            unix_socket=True,
            appendonly=True,
            appendfsync=settings.redis_fsync,
        )
        embedded.start()
        log.info("embedded Valkey started (%s, append-only file on)", embedded.url)
        url_file = settings.data_dir / EMBEDDED_URL_FILE
        fd = os.open(url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="ascii") as f:
            f.write(embedded.url + "\n")
        settings = dataclasses.replace(settings, redis_url=embedded.url)

    ctx = multiprocessing.get_context("spawn")
    ready: Any = ctx.Queue()
    workers: dict[int, BaseProcess] = {}
    supervisor = os.getpid()
    # One heartbeat per gateway worker slot: the time of its loop's last beat, 0 until the
    # first (see supervision.beat).
    heartbeats = [ctx.Value("d", 0.0, lock=False) for _ in range(options.workers)]

    # Slots 0..N-1 are gateway workers; slots -1..-M are the flushers.
    def start_worker(slot: int) -> None:
        if slot < 0:
            proc = ctx.Process(
                target=run_flusher,
                kwargs={"settings": settings, "supervisor_pid": supervisor},
                name=f"scangate-flusher-{-slot}",
            )
        else:
            heartbeats[slot].value = 0.0
            proc = ctx.Process(
                target=run_worker,
                args=(settings, options, ready, supervisor, heartbeats[slot]),
                name=f"scangate-worker-{slot}",
            )
        proc.start()
        workers[slot] = proc

    try:
        for slot in range(options.workers):
            start_worker(slot)
        if not _await_ready(ready, options.workers, stopping):
            log.error("workers did not start; stopping")
            return 1
        for slot in range(1, options.flushers + 1):
            start_worker(-slot)
        log.info(
            "scangate listening on http://%s:%d (%d worker%s)",
            options.host,
            options.port,
            options.workers,
            "" if options.workers == 1 else "s",
        )
        while not stopping():
            time.sleep(0.2)
            for slot, proc in list(workers.items()):
                if stopping():
                    break
                if slot >= 0 and proc.is_alive():
                    stuck_s = supervision.stuck_for_s(heartbeats[slot], time.monotonic())
                    if stuck_s > settings.worker_timeout_s:
                        log.error(
                            "worker %s: its event loop has not run for %.1f s "
                            "(SCANGATE_WORKER_TIMEOUT); killing it",
                            proc.pid,
                            stuck_s,
                        )
                        proc.kill()
                        proc.join(5)
                if not proc.is_alive():
                    log.error("worker %s exited with %s; restarting it", proc.pid, proc.exitcode)
                    _forget_dead_process(proc.pid)
                    time.sleep(RESTART_BACKOFF_S)
                    start_worker(slot)
        log.info(
            "stopping: finishing requests in flight (deadline %.0fs)", options.shutdown_deadline_s
        )
        return 0
    finally:
        _stop_all(list(workers.values()), options.shutdown_deadline_s + 5)
        if embedded is not None:
            (settings.data_dir / EMBEDDED_URL_FILE).unlink(missing_ok=True)
            embedded.stop()
            log.info("embedded Valkey stopped")
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _await_ready(ready: Any, n: int, stopping: Any) -> bool:
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    started = 0
    while started < n and time.monotonic() < deadline and not stopping():
        try:
            kind, detail = ready.get(timeout=0.5)
        except queue.Empty:
            continue
        if kind != "ready":
            log.error("a worker failed to start: %s", detail)
            return False
        started += 1
    return started == n


def _stop_all(procs: list[BaseProcess], deadline_s: float) -> None:
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    end = time.monotonic() + deadline_s
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
        if proc.is_alive():
            log.warning("worker %s did not stop in time: killing it", proc.pid)
            proc.kill()
            proc.join(5)


def _forget_dead_process(pid: int | None) -> None:
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# -- worker process --------------------------------------------------------------------------


def run_worker(
    settings: Settings, options: ServeOptions, ready: Any, supervisor_pid: int, heartbeat: Any
) -> None:
    """One gateway process: serve until SIGTERM/SIGINT (or its supervisor's death), then
    shut down gracefully."""
    configure_logging(settings)
    supervision.exit_with_supervisor(supervisor_pid)
    try:
        import uvloop

        uvloop.run(_serve_worker(settings, options, ready, heartbeat))
    except OSError as exc:
        # The port is taken, or the address cannot be bound: the supervisor says so on one
        # line; a traceback would add nothing.
        ready.put(("failed", f"{exc.strerror or exc}"))
        raise SystemExit(1) from None
    except Exception as exc:
        ready.put(("failed", f"{type(exc).__name__}: {exc}"))
        # Logged here, as a log line: multiprocessing would print it raw to stderr.
        log.exception("worker failed")
        raise SystemExit(1) from None


async def _serve_worker(
    settings: Settings, options: ServeOptions, ready: Any, heartbeat: Any
) -> None:
    from aiohttp import web

    from gateway.http.app import create_app
    from gateway.http.health import metrics_app
    from gateway.http.protocol import ConnectionLimits, GuardedRunner

    stop = asyncio.Event()
    stop_on_signals(stop)

    app = create_app(settings, workers=options.workers)
    calm_collector()
    runner = GuardedRunner(
        app,
        ConnectionLimits.of(settings),
        shutdown_timeout=options.shutdown_deadline_s,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port, reuse_port=True, backlog=2048)
    await site.start()
    if settings.metrics_port:
        metrics_runner = web.AppRunner(metrics_app(app), access_log=None, handle_signals=False)
        await metrics_runner.setup()
        await web.TCPSite(
            metrics_runner, settings.metrics_host, settings.metrics_port, reuse_port=True
        ).start()
    ready.put(("ready", os.getpid()))
    beating = asyncio.create_task(
        supervision.beat(heartbeat, supervision.heartbeat_period_s(settings.worker_timeout_s))
    )
    await stop.wait()
    beating.cancel()
    # Stop accepting, let requests in flight finish (bounded by shutdown_timeout), close.
    await runner.cleanup()
    if settings.metrics_port:
        await metrics_runner.cleanup()


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on the first SIGTERM or SIGINT; ignore any that follow.

    A second signal comes from an impatient operator or a service manager that signals
    every process of the group, and lands while the process is already stopping, often in
    its tear-down. Not ``loop.add_signal_handler``: closing the loop puts the default
    actions back, and so does the interpreter's exit for a handler written in Python, so
    that second SIGTERM would kill a process that was stopping cleanly (status -15, not 0).
    An ignored signal stays ignored to the end."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def calm_collector() -> None:
    """Everything made so far lives as long as the process: keep the collector off it, and
    collect the young generation less often (a request allocates hundreds of objects, a
    flushed batch hundreds of thousands)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


# -- flusher process -------------------------------------------------------------------------


def run_flusher(
    settings: Settings,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    supervisor_pid: int | None = None,
) -> int:
    """A flusher process: flush until SIGTERM/SIGINT (or, under ``serve``, its
    supervisor's death), finishing the batch in hand."""
    configure_logging(settings)
    import uvloop

    if supervisor_pid is None:  # ``scangate flush``: the command says what went wrong
        return uvloop.run(_flush_until_stopped(settings, metrics_port, metrics_host))
    supervision.exit_with_supervisor(supervisor_pid)
    try:
        return uvloop.run(_flush_until_stopped(settings, metrics_port, metrics_host))
    except Exception:
        # Logged here, as a log line: multiprocessing would print it raw to stderr.
        log.exception("flusher failed")
        raise SystemExit(1) from None


async def _flush_until_stopped(
    settings: Settings, metrics_port: int | None, metrics_host: str
) -> int:
    from gateway.metrics import FlusherMetrics
    from gateway.pipeline.client import connect_redis
    from gateway.pipeline.flusher import Flusher
    from storage import connect_storage

    stop = asyncio.Event()
    stop_on_signals(stop)
    assert settings.redis_url is not None
    metrics = FlusherMetrics()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
    storage = await connect_storage(settings.resolved_storage_url, timezone=settings.timezone)
    client = connect_redis(settings.redis_url, settings.redis_cluster)
    calm_collector()
    try:
        await Flusher(client, storage, settings, metrics).run(stop)
    finally:
        await client.aclose()
        await storage.close()
    return 0
