"""``scangate serve`` against operators' mistakes and dying processes, as real processes:
a second ``serve`` beside a running one, a supervisor killed with SIGKILL, a worker whose
event loop stops, and who may read the data dir."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from tests.test_serve import Served, clean_env, cli, request


def serve_once(data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--data-dir",
            str(data_dir),
            "serve",
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def children(pid: int) -> set[int]:
    """The processes ``pid`` started (Linux's /proc), and theirs."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found.add(int(child))
            found |= children(int(child))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent to reap it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def wait_until(check: object, timeout_s: float) -> float:
    """Seconds until ``check()`` held; AssertionError past ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s")


def answers(url: str) -> bool:
    try:
        return request(url)[0] == 200
    except OSError:  # refused while no worker listens
        return False


def test_a_second_serve_on_the_same_port_refuses_with_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    first = Served(tmp_path / "first", 1)
    try:
        second = serve_once(tmp_path / "second", first.port)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines == [lines[-1]] and "is in use by another process" in lines[0], lines
        assert "Traceback" not in second.stderr + second.stdout
        # The running gateway kept its port to itself.
        for _ in range(20):
            assert request(first.base + "/readyz")[0] == 200
    finally:
        assert first.stop()[0] == 0


def test_a_second_serve_on_the_same_data_dir_refuses_with_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    first = Served(tmp_path, 1)
    try:
        second = serve_once(tmp_path, first.port + 1 if first.port < 65535 else first.port - 1)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"pid {first.proc.pid}" in lines[0] and "data dir" in lines[0]
        assert request(first.base + "/readyz")[0] == 200
    finally:
        assert first.stop()[0] == 0


def test_workers_flushers_and_valkey_exit_within_5_s_of_their_supervisors_death(
    tmp_path: Path,
) -> None:
    served = Served(tmp_path, 2)
    try:
        spawned = children(served.proc.pid)
        # Two workers, one flusher, the embedded Valkey (and multiprocessing's helper).
        assert len(spawned) >= 4, spawned
        served.proc.send_signal(signal.SIGKILL)
        # Timed from the kill: the children share its stdout, so reading that to its end
        # waits for them too.
        took = wait_until(lambda: not any(alive(pid) for pid in spawned), 10)
        served.proc.communicate(timeout=10)
        print(f"orphans outlived their supervisor by {took:.2f} s")
        assert took <= 5.0, f"orphans lived {took:.1f} s"
        # Nothing of the dead instance holds the port or the data dir: a new one starts.
        again = Served(tmp_path, 1)
        assert request(again.base + "/readyz")[0] == 200
        assert again.stop()[0] == 0
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.communicate(timeout=10)


def test_a_worker_whose_event_loop_is_stuck_is_killed_and_replaced(tmp_path: Path) -> None:
    served = Served(tmp_path, 1, env={"SCANGATE_WORKER_TIMEOUT": "2s"})
    try:
        # The gateway worker is the child that listens on TCP (Valkey has a Unix socket).
        workers = {pid for pid in children(served.proc.pid) if _listens_on_tcp(pid)}
        assert len(workers) == 1, workers
        (stuck,) = workers
        # A stopped process runs no event loop: to its supervisor it is a stuck one.
        os.kill(stuck, signal.SIGSTOP)
        wait_until(lambda: not alive(stuck), 15)
        wait_until(lambda: answers(served.base + "/readyz"), 30)
        code, out = served.stop()
        assert code == 0
        assert "its event loop has not run for" in out and "SCANGATE_WORKER_TIMEOUT" in out
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.communicate(timeout=10)


def _listens_on_tcp(pid: int) -> bool:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                return True
    return False


def test_the_data_dir_and_its_files_are_for_their_owner_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    json.loads(cli(data_dir, "apps", "add", "vhd"))
    served = Served(data_dir, 1)
    try:
        assert request(served.base + "/readyz")[0] == 200
        paths = [data_dir, *data_dir.rglob("*")]
    finally:
        assert served.stop()[0] == 0
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert {"data", "data/scangate.db", "data/keyring.json", "data/valkey"} <= names, names
    for path in paths:
        if path.is_socket() or not path.exists():
            continue  # the server's socket: inside a 0700 directory
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(tmp_path)} is {mode:o}"


def test_a_workers_poster_renderer_exits_when_the_worker_is_killed(tmp_path: Path) -> None:
    token = json.loads(cli(tmp_path, "apps", "add", "vhd"))["token"]
    served = Served(tmp_path, 1)
    try:
        status, body = request(
            served.base + "/v1/venues",
            {
                "name": "Chợ Bến Thành",
                "phone": "0983829927",
                "address": "Lê Lợi",
                "province": "Hồ Chí Minh",
                "kind": "market",
            },
            token,
        )
        assert status == 201, body
        venue_id = json.loads(body)["venue_id"]
        (worker,) = {pid for pid in children(served.proc.pid) if _listens_on_tcp(pid)}
        assert children(worker) == set()  # no renderer before the first poster
        status, _ = request(f"{served.base}/v1/venues/{venue_id}/poster.png", token=token)
        assert status == 200
        renderers = children(worker)
        assert renderers, "the poster was drawn with no process of its own"
        os.kill(worker, signal.SIGKILL)
        took = wait_until(lambda: not any(alive(pid) for pid in renderers), 10)
        assert took <= 2.0, f"the renderer outlived its worker by {took:.1f} s"
        wait_until(lambda: answers(served.base + "/readyz"), 30)  # a new worker took over
    finally:
        assert served.stop()[0] == 0
