"""Capacity run: the gateway against the bare framework, same client, same body, one run.

    python benchmarks/capacity.py [--quick] [--results benchmarks/RESULTS.md]

Bounded: about 4 minutes, or under 60 s with --quick. On this 2-core machine:
  * CPU 0: the server under test (the reference server, or the gateway: one worker);
  * CPU 1: the load generator (wrk, C, one thread) and Redis/Valkey.
Rows, each measured here in this invocation:
  * reference: bare aiohttp + uvloop answering 200 to POST /v1/scans (benchmarks/
    reference_server.py): the framework's ceiling, measured just before and just after the
    gateway's single-event row (ratios are to the mean of the two);
  * gateway, single-event requests and batches of 100: at the maximum rate (as many
    connections as keep CPU 0 busy) and at half that rate (wrk paced by a per-request delay)
    for latency, from an empty buffer, as a flusher that keeps up leaves it (no flusher
    runs: the full-load rows' events are counted, then dropped);
  * the flusher: committed events per second into SQLite and PostgreSQL, visits included,
    and scan-to-storage latency at half its maximum rate (benchmarks/bench_flush.py).
The client is not the bottleneck when its CPU use stays well under its core while the
server's core is busy: both are measured (from /proc) and printed with each row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from results import cpu_model, write_section
from setup_data import build_data_set, open_keyring

from gateway.pipeline.keyspace import entry_values, stream_key
from gateway.run.embedded import RedisProcess, valkey_binary

HERE = Path(__file__).resolve().parent
SERVER_CPU, CLIENT_CPU = 0, 1
REWRITE_TIMEOUT_S = 120  # Valkey's AOF rewrite of an emptied buffer
SHARDS = 16
# wrk's connections at the maximum rate. The reference's core is busy with 64. Batches of
# 100 need more in flight than 16 to keep the gateway and Valkey working at once: on
# 2026-12-05 16, 32, 48, 64 and 96 connections gave 121,000, 136,000, 155,000, 150,000 and
# 148,000 events/s (the gateway's core 65%, -, 78%, 74%, 81% busy; Valkey's shares CPU 1).
CONNECTIONS_SINGLE = 64
CONNECTIONS_BATCH = 48
# Issue 21's floors. Its batch floor is absolute (events/s of one gateway process), set
# beside a reference of 27,300 requests/s on 2026-12-04; this machine's speed moves from
# day to day by more than the floor, so the same floor is also checked per reference
# request (120,000 / 27,300 = 4.4 events per reference request).
TARGET_SINGLE_RATIO = 0.6
TARGET_BATCH_EVENTS = 120_000
TARGET_BATCH_PER_REFERENCE = 120_000 / 27_300
TARGET_P99_MS = (10.0, 25.0)  # at half load: single events, batches of 100
TARGET_RSS_MB = 100


@dataclass
class WrkResult:
    label: str
    batch: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    bad: int  # non-2xx answers and socket errors
    client_cpu: float  # share of one core the client used
    server_cpu: float  # share of one core the server used

    @property
    def events_per_s(self) -> float:
        return self.rps * self.batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process and its children."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def parse_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(
    label: str, url: str, data_lua: Path, batch: int, seconds: int, connections: int,
    server_pid: int, delay_ms: float = 0,
) -> WrkResult:  # fmt: skip
    run_id = f"{label[:3]}{time.monotonic_ns() % 10**9}"
    cmd = [
        "taskset", "-c", str(CLIENT_CPU), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--latency", "-s", str(HERE / "scans.lua"), f"{url}/v1/scans", "--",
        str(data_lua), str(batch), run_id, f"{delay_ms:.3f}",
    ]  # fmt: skip
    server_before = tree_cpu_seconds(server_pid)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    # wait4 gives this child's own CPU time (taskset execs wrk in the same process).
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    client_cpu = usage.ru_utime + usage.ru_stime
    server_cpu = (tree_cpu_seconds(server_pid) - server_before) / wall
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = parse_ms(re.search(r"\s50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p99 = parse_ms(re.search(r"\s99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    bad = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        bad += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        bad += sum(int(g) for g in m.groups())
    result = WrkResult(label, batch, rps, p50, p99, requests, bad, client_cpu / wall, server_cpu)
    print(f"  {label}: {rps:,.0f} req/s ({result.events_per_s:,.0f} events/s), p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms, bad {bad}, client CPU {result.client_cpu:.0%}, "
          f"server CPU {server_cpu:.0%}", file=sys.stderr)  # fmt: skip
    return result


def prepare_data(data_dir: Path, venues: int, persons: int) -> Path:
    """An app and valid codes (benchmarks/setup_data.py), as a Lua file for wrk."""
    keyring = open_keyring(data_dir, None)
    data = build_data_set(keyring, venues, persons)
    lua = data_dir / "codes.lua"
    lua.write_text(
        f'token = "{data["token"]}"\n'
        + "venues = {" + ",".join(f'"{c}"' for c in data["venue_codes"]) + "}\n"  # type: ignore[attr-defined]
        + "persons = {" + ",".join(f'"{c}"' for c in data["person_codes"]) + "}\n"  # type: ignore[attr-defined]
    )  # fmt: skip
    return lua


@contextlib.contextmanager
def pinned(
    cmd: list[str], cpu: int, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(["taskset", "-c", str(cpu), *cmd], env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def accepted_total(url: str) -> int:
    """The gateway's own count of accepted events, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    return int(
        sum(
            float(m.group(1))
            for m in re.finditer(
                r'^scangate_scan_events_total\{[^}]*outcome="accepted"[^}]*\} ([\d.e+]+)$',
                text,
                re.M,
            )
        )
    )


def stream_total(url: str) -> int:
    """The events the shard streams hold, counted entry by entry (not the backlog counter,
    which the gateway's own script keeps)."""
    import redis

    total = 0
    with redis.Redis.from_url(url) as r:
        for shard in range(SHARDS):
            start = "-"
            while page := r.xrange(stream_key(shard), min=start, count=2000):
                total += sum(len(entry_values(fields)) for _id, fields in page)
                start = "(" + page[-1][0].decode()
    return total


def empty_buffer(url: str) -> None:
    """Leave Valkey as a flusher that keeps up would: the streams empty and the append-only
    file rewritten small. With no flusher, the full-load rows leave millions of events
    behind, and Valkey's automatic AOF rewrite then forks a process of that size during a
    half-load row, on the core wrk and Valkey share (p99 of batches at half load 31.8 and
    43.6 ms in two runs on 2026-12-05, against 1.8 ms at p50)."""
    import redis

    with redis.Redis.from_url(url) as r:

        def wait_for_no_rewrite() -> None:
            deadline = time.monotonic() + REWRITE_TIMEOUT_S
            while True:
                info = r.info("persistence")
                if not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Valkey's AOF rewrite ran over {REWRITE_TIMEOUT_S} s")
                time.sleep(0.1)

        # SYNC: Valkey 8 frees a FLUSHALL's memory in a background thread by default
        # (lazyfree-lazy-user-flush), which would then run during the next row.
        r.execute_command("FLUSHALL", "SYNC")
        wait_for_no_rewrite()  # a rewrite already under way refuses a new one
        r.bgrewriteaof()
        wait_for_no_rewrite()


def gateway_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of the largest process under the supervisor."""
    peak = 0
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return peak / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs: under 60 s in all")
    parser.add_argument("--results", type=Path, help="update this RESULTS.md's section")
    parser.add_argument("--skip-flush", action="store_true", help="gateway rows only")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("capacity: wrk is not installed (apt-get install wrk)")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("capacity: needs 2 CPUs (server and client are pinned apart)")
    seconds = 4 if args.quick else 15
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scangate-capacity-") as tmp:
        work = Path(tmp)
        lua = prepare_data(work, venues=1000, persons=10_000)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SCANGATE_", "PROMETHEUS_"))}  # fmt: skip

        # The reference stays up beside the gateway (idle while the gateway is measured)
        # and is measured just before and just after the single-event row: this machine's
        # speed drifts within minutes, and the ratio is taken against the mean of the two.
        print("reference server (bare aiohttp + uvloop):", file=sys.stderr)
        port = free_port()
        ref_cmd = [sys.executable, str(HERE / "reference_server.py"), "--port", str(port)]
        redis_server = RedisProcess(valkey_binary(), work / "valkey", appendonly=True)
        with pinned(ref_cmd, SERVER_CPU, env, work / "reference.log") as ref:
            wait_port(port)
            ref_url = f"http://127.0.0.1:{port}"
            reference = run_wrk(
                "reference, 1 event", ref_url, lua, 1, seconds, CONNECTIONS_SINGLE, ref.pid
            )
            redis_server.start()
            os.sched_setaffinity(redis_server.pid or 0, {CLIENT_CPU})
            try:
                port = free_port()
                genv = {**env, "SCANGATE_REDIS_URL": redis_server.url,
                        "SCANGATE_SHARDS": str(SHARDS),
                        "SCANGATE_BACKLOG_HIGH_WATER": "100000000"}  # fmt: skip
                gw_cmd = [sys.executable, "-m", "gateway", "--data-dir", str(work), "serve",
                          "--port", str(port), "--workers", "1", "--no-flusher"]  # fmt: skip
                print("gateway (1 worker, Valkey with AOF everysec):", file=sys.stderr)
                with pinned(gw_cmd, SERVER_CPU, genv, work / "gateway.log") as gw:
                    url = f"http://127.0.0.1:{port}"
                    wait_http(url + "/readyz")
                    before = stream_total(redis_server.url)
                    accepted_before = accepted_total(url)
                    single = run_wrk(
                        "gateway, 1 event", url, lua, 1, seconds, CONNECTIONS_SINGLE, gw.pid
                    )
                    reference_again = run_wrk(
                        "reference, 1 event, again", ref_url, lua, 1, seconds,
                        CONNECTIONS_SINGLE, ref.pid,
                    )  # fmt: skip
                    batch = run_wrk(
                        "gateway, 100 events", url, lua, 100, seconds, CONNECTIONS_BATCH, gw.pid
                    )
                    time.sleep(0.5)  # let requests still in flight at wrk's cut-off finish
                    stored = stream_total(redis_server.url) - before
                    expected = accepted_total(url) - accepted_before
                    empty_buffer(redis_server.url)
                    half_single = run_wrk(
                        "gateway, 1 event, half load", url, lua, 1, seconds, 32, gw.pid,
                        delay_ms=32 * 1000 / (single.rps / 2),
                    )  # fmt: skip
                    half_batch = run_wrk(
                        "gateway, 100 events, half load", url, lua, 100, seconds, 8, gw.pid,
                        delay_ms=8 * 1000 / (batch.rps / 2),
                    )  # fmt: skip
                    rss = gateway_rss_mb(gw.pid)
            finally:
                redis_server.stop()
        rows = [reference, single, reference_again, batch, half_single, half_batch]
    print(f"streams gained {stored:,} events; the gateway counted {expected:,} accepted",
          file=sys.stderr)  # fmt: skip

    flush_lines: list[str] = []
    if not args.skip_flush:
        # The flusher's own benchmark, in this same invocation; its table goes in ours.
        print("flusher (benchmarks/bench_flush.py):", file=sys.stderr)
        # Its full mode builds 21 days of history (20 million events) and takes 10 to 15
        # minutes: in quick mode, or with --keep-history, it fits this run's budget better.
        cmd = [sys.executable, str(HERE / "bench_flush.py"), *(["--quick"] if args.quick else [])]
        flush = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=1800,
                               check=False)  # fmt: skip
        if flush.returncode not in (0, 1):  # 1: ran, but a target was missed
            raise RuntimeError(f"bench_flush.py failed with status {flush.returncode}")
        body = flush.stdout.strip().splitlines()
        # Drop its own heading: it becomes a sub-section of this one.
        flush_lines = ["", "### Flusher", "", *[ln for ln in body if not ln.startswith("## ")]]

    reference_rps = (reference.rps + reference_again.rps) / 2
    ratio = single.rps / reference_rps
    per_reference = batch.events_per_s / reference_rps
    p99_met = half_single.p99_ms <= TARGET_P99_MS[0] and half_batch.p99_ms <= TARGET_P99_MS[1]
    lines = [
        "## Capacity run (issue 5)",
        "",
        f"{dt.date.today().isoformat()} · {cpu_model()}, {os.cpu_count()} cores · Python "
        f"{platform.python_version()} · aiohttp {_version('aiohttp')}, uvloop "
        f"{_version('uvloop')}, redis-py {_version('redis')}, Valkey "
        f"{_valkey_version()} · {'quick' if args.quick else 'full'} mode, "
        f"{seconds} s per row, {time.monotonic() - started:.0f} s in all",
        "",
        f"Server on CPU {SERVER_CPU} (taskset); wrk (1 thread; {CONNECTIONS_SINGLE} "
        f"connections for single events, {CONNECTIONS_BATCH} for batches at the maximum rate) "
        f"and Valkey on CPU {CLIENT_CPU}. Absolute figures are this machine's; the ratio "
        "column compares "
        "requests/s with the reference measured in this same run, the mean of its two rows "
        "(just before and just after the gateway's single-event row).",
        "",
        "| row | requests/s | events/s | p50 ms | p99 ms | ratio to reference | "
        "server CPU | client CPU | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.rps:,.0f} | {r.events_per_s:,.0f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.rps / reference_rps:.2f} | {r.server_cpu:.0%} | "
            f"{r.client_cpu:.0%} | {r.bad} |"
        )
    lines += [
        "",
        f"Every accepted event is in Redis: the streams gained {stored:,} events and the "
        f"gateway counted {expected:,} accepted. Gateway worker peak RSS: {rss:.0f} MB.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| single-event requests >= {TARGET_SINGLE_RATIO} x reference | {ratio:.2f} x | "
        f"{_yes(ratio >= TARGET_SINGLE_RATIO)} |",
        f"| batches of 100 >= {TARGET_BATCH_EVENTS:,} events/s, one process | "
        f"{batch.events_per_s:,.0f} | {_yes(batch.events_per_s >= TARGET_BATCH_EVENTS)} |",
        f"| the same per reference request >= {TARGET_BATCH_PER_REFERENCE:.1f} events | "
        f"{per_reference:.1f} | {_yes(per_reference >= TARGET_BATCH_PER_REFERENCE)} |",
        f"| p99 at half load <= {TARGET_P99_MS[0]:.0f} ms (1 event) / "
        f"{TARGET_P99_MS[1]:.0f} ms (100 events) | "
        f"{half_single.p99_ms:.1f} / {half_batch.p99_ms:.1f} ms | "
        f"{_yes(p99_met)} |",
        f"| gateway RSS <= {TARGET_RSS_MB} MB at peak | {rss:.0f} MB | "
        f"{_yes(rss <= TARGET_RSS_MB)} |",
        "",
        f"Reproduce: `python benchmarks/capacity.py{' --quick' if args.quick else ''} "
        "--results benchmarks/RESULTS.md`",
    ]
    lines += flush_lines
    report = "\n".join(lines)
    print(report)
    if args.results:
        write_section(args.results, "capacity", report)
    return 0 if stored == expected else 1


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _valkey_version() -> str:
    out = subprocess.run([str(valkey_binary()), "--version"], capture_output=True, text=True,
                         check=False).stdout  # fmt: skip
    m = re.search(r"v=([\d.]+)", out)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    sys.exit(main())
