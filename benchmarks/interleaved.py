"""Before and after, interleaved: the reference and several versions' gateways, in turn.

    git worktree add /tmp/before <commit>
    python benchmarks/interleaved.py [--rounds 6] [--seconds 5] [--batch 1] /tmp/before .

Each CHECKOUT is a directory holding a version of scangate; its gateway (one worker, no
flusher) is started from there, so each runs its own code. The bare aiohttp reference
(benchmarks/reference_server.py) and every gateway stay up side by side, pinned to CPU 0
(idle while another is measured), with one Valkey (AOF everysec) and wrk on CPU 1, as in
benchmarks/capacity.py. Each round runs wrk against the reference, then each gateway, for
``--seconds`` each. On this machine the speed drifts within minutes, by more than most
changes are worth: a version's ratio is taken to the reference of the same round, and the
median over the rounds is printed with every round's ratio and the CPU the server spent
per request (from /proc), and Valkey's. The verdicts each gateway counted are printed too: a version
whose events were refused would look fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

from capacity import (
    CONNECTIONS_BATCH,
    CONNECTIONS_SINGLE,
    HERE,
    SHARDS,
    free_port,
    pinned,
    prepare_data,
    run_wrk,
    tree_cpu_seconds,
    wait_http,
    wait_port,
)

from gateway.run.embedded import RedisProcess, valkey_binary

SERVER_CPU, CLIENT_CPU = 0, 1
OUTCOME = re.compile(
    r'^scangate_scan_events_total\{[^}]*outcome="(\w+)",reason="(\w*)"\} ([\d.e+]+)$', re.M
)


def verdicts(url: str) -> dict[str, float]:
    """The gateway's own counts of its verdicts, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for outcome, reason, n in OUTCOME.findall(text):
        key = f"{outcome} {reason}".strip()
        counts[key] = counts.get(key, 0) + float(n)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", type=Path, help="directories of versions")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=5, help="per server per round")
    parser.add_argument("--batch", type=int, default=1, help="events per request (1 or 100)")
    parser.add_argument(
        "--connections", type=int, help="default as benchmarks/capacity.py: 64 for 1 event, else 48"
    )
    args = parser.parse_args()
    for checkout in args.checkouts:
        if not (checkout / "gateway" / "__main__.py").is_file():
            parser.error(f"{checkout}: not a scangate checkout (no gateway/__main__.py)")
    if args.rounds < 1 or args.seconds < 1:
        parser.error("--rounds and --seconds must be 1 or more")
    if shutil.which("wrk") is None:
        sys.exit("interleaved: wrk is not installed (apt-get install wrk)")
    connections = args.connections or (CONNECTIONS_SINGLE if args.batch == 1 else CONNECTIONS_BATCH)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCANGATE_", "PROMETHEUS_"))}
    with (
        tempfile.TemporaryDirectory(prefix="scangate-interleaved-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        lua = prepare_data(work, venues=1000, persons=10_000)
        valkey = RedisProcess(valkey_binary(), work / "valkey", appendonly=True)
        valkey.start()
        stack.callback(valkey.stop)
        os.sched_setaffinity(valkey.pid or 0, {CLIENT_CPU})
        port = free_port()
        ref_cmd = [sys.executable, str(HERE / "reference_server.py"), "--port", str(port)]
        ref = stack.enter_context(pinned(ref_cmd, SERVER_CPU, env, work / "reference.log"))
        wait_port(port)
        # name -> (url, pid, events a request, connections)
        servers: dict[str, tuple[str, int, int, int]] = {
            "reference": (f"http://127.0.0.1:{port}", ref.pid, 1, 64)
        }
        for n, checkout in enumerate(args.checkouts):
            data = work / f"gateway-{n}"  # the same keyring and master key as the codes
            shutil.copytree(work, data, ignore=shutil.ignore_patterns("gateway-*", "valkey*"))
            port = free_port()
            genv = {**env, "SCANGATE_REDIS_URL": valkey.url, "SCANGATE_SHARDS": str(SHARDS),
                    "SCANGATE_BACKLOG_HIGH_WATER": "100000000"}  # fmt: skip
            command = (f"cd {checkout.resolve()} && exec {sys.executable} -m gateway --data-dir "
                       f"{data} serve --port {port} --workers 1 --no-flusher")  # fmt: skip
            gw = stack.enter_context(pinned(["sh", "-c", command], SERVER_CPU, genv,
                                            work / f"gateway-{n}.log"))  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/readyz")
            run_wrk(f"warm{n}", url, lua, args.batch, 2, connections, gw.pid)
            servers[str(checkout)] = (url, gw.pid, args.batch, connections)
        rates: dict[str, list[float]] = {name: [] for name in servers}
        cpu_us: dict[str, list[float]] = {name: [] for name in servers}
        valkey_us: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for n, (name, (url, pid, batch, conns)) in enumerate(servers.items()):
                valkey_before = tree_cpu_seconds(valkey.pid or 0)
                # The run's label starts every event id: letters and digits only.
                row = run_wrk(f"ab{n}", url, lua, batch, args.seconds, conns, pid)
                valkey_cpu = tree_cpu_seconds(valkey.pid or 0) - valkey_before
                rates[name].append(row.rps * batch)
                cpu_us[name].append(row.server_cpu / row.rps * 1e6)
                valkey_us[name].append(valkey_cpu / row.requests * 1e6)
        print(f"\n{args.rounds} rounds of {args.seconds} s, {args.batch} event(s) a request; "
              "rate: events/s (the reference's: requests/s)\n")  # fmt: skip
        print(
            "| server | median rate | median ratio | ratios, round by round "
            "| CPU µs a request | Valkey CPU µs a request |"
        )
        print("|---|---:|---:|---|---:|---:|")
        for name, rate in rates.items():
            ratios = [r / ref_r for r, ref_r in zip(rate, rates["reference"], strict=True)]
            print(f"| {name} | {statistics.median(rate):,.0f} | {statistics.median(ratios):.3f} "
                  f"| {' '.join(f'{r:.2f}' for r in ratios)} "
                  f"| {statistics.median(cpu_us[name]):.0f} "
                  f"| {statistics.median(valkey_us[name]):.0f} |")  # fmt: skip
        print()
        for name, (url, *_) in servers.items():
            if name != "reference":
                print(f"verdicts of {name}: {verdicts(url)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
