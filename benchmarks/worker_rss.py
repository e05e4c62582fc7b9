"""A gateway worker's resident memory after start-up: ``scangate serve`` with one worker and
no flusher, on the embedded Valkey, run several times; the worker's VmRSS is read from /proc
once /readyz answers 200.

    python benchmarks/worker_rss.py                            # this environment
    python benchmarks/worker_rss.py --python /tmp/old/bin/python  # another one

To compare two versions of the code, install each in a virtual environment of its own from
the same lock (``pip install --require-hashes -r requirements/runtime.lock``, then
``pip install --no-deps <checkout>``), so only the code differs. (An editable install's
import hook wins over PYTHONPATH, so pointing one environment at two checkouts measures the
installed one twice.)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def worker_pid(supervisor: int) -> int:
    """The worker is the supervisor's child started by multiprocessing's spawn (the others
    are the Valkey server and multiprocessing's resource tracker)."""
    for child in children(supervisor):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            return child
    raise RuntimeError("no worker process found")


def measure_once(python: str) -> int:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="scangate-rss-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCANGATE_")}
        env["SCANGATE_DATA_DIR"] = data_dir
        proc = subprocess.Popen(
            [python, "-m", "gateway", "serve", "--port", str(port), "--no-flusher"],
            env=env,
            # Not this checkout's folder: ``-m`` puts the working directory first on the
            # path, and the code measured would be this checkout's whatever --python says.
            cwd=data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("the gateway did not become ready") from None
                    time.sleep(0.1)
            time.sleep(1.0)  # let start-up's last allocations settle
            return rss_kb(worker_pid(proc.pid))
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python", default=sys.executable, help="the interpreter whose scangate to measure"
    )
    parser.add_argument("--runs", type=int, default=3, help="how many starts (default 3)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs: at least 1")
    if not os.access(args.python, os.X_OK):
        parser.error(f"--python: {args.python} is not an interpreter that can be run")
    values = []
    for run in range(1, args.runs + 1):
        kb = measure_once(args.python)
        values.append(kb / 1024)
        print(f"run {run}: worker VmRSS {kb / 1024:.1f} MB", file=sys.stderr)
    print(
        f"worker VmRSS after start-up, {args.runs} runs: min {min(values):.1f} MB, "
        f"median {statistics.median(values):.1f} MB, max {max(values):.1f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
