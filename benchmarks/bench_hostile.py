"""What hostile traffic on the same port does to the scan path (issue 18).

    python benchmarks/bench_hostile.py [--quick] [--results benchmarks/RESULTS.md]

Starts ``scangate serve`` (one worker, embedded Valkey, no flusher) on a free loopback
port, then measures single-event ``POST /v1/scans`` latency from a probe that sends a
steady 100 requests/s, one at a time, in four phases:

1. idle: nothing else arrives;
2. 300 slow clients: 300 connections, each sending a request head one header line per
   second; when the gateway closes one at its header deadline, it reconnects at once;
3. 8 poster fetchers over many venues: 8 loops fetching PDF posters of venues not fetched
   before (cache misses), through the API route (apps' tokens are not limited per address);
4. 8 poster fetchers over one venue (cache hits).

Targets: the p99 under slow clients within 2x the idle p99; the median under poster
fetchers within 2x the idle median, in both poster phases. Everything runs on this
machine's cores together (the probe, the attackers, the gateway and Valkey), so the
absolute figures are this machine's; the ratios are within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from capacity import free_port, wait_http  # noqa: E402
from results import cpu_model, write_section  # noqa: E402
from setup_data import build_data_set, open_keyring  # noqa: E402

PROBE_RATE: Final = 100  # requests/s
SLOW_CLIENTS: Final = 300
POSTER_FETCHERS: Final = 8
VENUES: Final = 4000  # more than the misses phase fetches: every fetch there is a miss


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def probe(url: str, token: str, data: dict[str, Any], seconds: float) -> list[float]:
    """Latencies (ms) of single-event scans sent one at a time at PROBE_RATE."""
    venues, persons = data["venue_codes"], data["person_codes"]
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) - start < seconds:
            due = start + n / PROBE_RATE
            if due > now:
                await asyncio.sleep(due - now)
            body = json.dumps(
                {
                    "events": [
                        {
                            "event_id": f"PROBE-{os.getpid()}-{time.time_ns()}",
                            "kind": "checkin",
                            "venue_code": venues[n % len(venues)],
                            "person_code": persons[n % len(persons)],
                            "scanned_at": int(time.time() * 1000),
                        }
                    ]
                }
            )
            sent = time.perf_counter()
            async with http.post(url + "/v1/scans", data=body, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append((time.perf_counter() - sent) * 1000)
            n += 1
    return latencies


def slow_clients(port: int, seconds: float, closed: Any) -> None:
    """SLOW_CLIENTS connections trickling heads; counts the ones the gateway closed."""

    async def one(stop_at: float) -> None:
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/scans HTTP/1.1\r\nHost: x\r\n")
                line = 0
                while time.monotonic() < stop_at:
                    try:
                        if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                            break  # closed by the gateway
                    except TimeoutError:
                        pass
                    writer.write(f"X-Slow-{line}: 1\r\n".encode())
                    line += 1
                else:
                    writer.close()
                    return
                with closed.get_lock():
                    closed.value += 1
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)

    async def main() -> None:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(one(stop_at) for _ in range(SLOW_CLIENTS)))

    asyncio.run(main())


def poster_fetchers(
    url: str, token: str, venue_ids: list[str], seconds: float, same: bool, fetched: Any
) -> None:
    """POSTER_FETCHERS loops fetching posters: each its own venues in turn, or all one."""

    async def one(i: int, http: aiohttp.ClientSession, stop_at: float) -> None:
        n = 0
        while time.monotonic() < stop_at:
            venue = venue_ids[0] if same else venue_ids[(n * POSTER_FETCHERS + i) % len(venue_ids)]
            async with http.get(
                f"{url}/v1/venues/{venue}/poster.pdf", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                await response.read()
                if response.status == 200:
                    with fetched.get_lock():
                        fetched.value += 1
            n += 1

    async def main() -> None:
        stop_at = time.monotonic() + seconds
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(one(i, http, stop_at) for i in range(POSTER_FETCHERS)))

    asyncio.run(main())


def phase(
    name: str,
    url: str,
    token: str,
    data: dict[str, Any],
    seconds: float,
    attacker: Any = None,
    args: tuple[Any, ...] = (),
) -> dict[str, Any]:
    counter = multiprocessing.Value("i", 0)
    process = None
    if attacker is not None:
        process = multiprocessing.Process(target=attacker, args=(*args, seconds + 2, counter))
        process.start()
        time.sleep(2)  # let it build up
    latencies = asyncio.run(probe(url, token, data, seconds))
    if process is not None:
        process.join(30)
    row = {
        "phase": name,
        "requests": len(latencies),
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "count": counter.value,
    }
    print(
        f"{name}: {row['requests']} scans, p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms, "
        f"count {row['count']}",
        file=sys.stderr,
    )
    return row


def register_venues(url: str, token: str, n: int) -> list[str]:
    async def main() -> list[str]:
        ids = []
        async with aiohttp.ClientSession() as http:
            for i in range(n):
                doc = {
                    "name": f"Cửa hàng số {i}",
                    "phone": "0983829927",
                    "address": f"{i} Lê Lợi, Quận 1",
                    "province": "Hồ Chí Minh",
                    "kind": "market",
                }
                async with http.post(
                    url + "/v1/venues", json=doc, headers={"Authorization": f"Bearer {token}"}
                ) as response:
                    assert response.status == 201, await response.text()
                    ids.append((await response.json())["venue_id"])
        return ids

    return asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s phases (about a minute)")
    parser.add_argument("--results", type=Path, help="update this RESULTS.md's section")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 15.0
    with tempfile.TemporaryDirectory(prefix="scangate-hostile-") as tmp:
        work = Path(tmp)
        data = build_data_set(open_keyring(work, None), venues=200, persons=2000)
        token = str(data["token"])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SCANGATE_", "PROMETHEUS_"))
        }
        cmd = [
            sys.executable, "-m", "gateway", "--data-dir", str(work), "serve",
            "--port", str(port), "--workers", "1", "--no-flusher",
        ]  # fmt: skip
        with (work / "gateway.log").open("wb") as log:
            gateway = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(url + "/readyz", 60)
            venue_ids = register_venues(url, token, VENUES)
            rows = [
                phase("idle", url, token, data, seconds),
                phase(
                    f"{SLOW_CLIENTS} slow clients", url, token, data, seconds,
                    slow_clients, (port,),
                ),
                phase(
                    f"{POSTER_FETCHERS} poster fetchers, many venues (misses)", url, token, data,
                    seconds, _many_venues, (url, token, venue_ids),
                ),
            ]  # fmt: skip
            # The hits phase: the same fetchers on one venue.
            rows.append(
                phase(
                    f"{POSTER_FETCHERS} poster fetchers, one venue (hits)", url, token, data,
                    seconds, _one_venue, (url, token, venue_ids),
                )
            )  # fmt: skip
        finally:
            gateway.terminate()
            gateway.wait(60)
    idle = rows[0]
    lines = [
        "## Hostile traffic beside the scan path (issue 18)",
        "",
        f"{time.strftime('%Y-%m-%d')} · {cpu_model()} · {os.cpu_count()} cores shared by the "
        "gateway (1 worker), Valkey, the probe and the attackers · "
        f"{'quick run, ' if args.quick else ''}{seconds:.0f} s per phase",
        "",
        f"Single-event scans from a probe at {PROBE_RATE}/s, one at a time, while something "
        "else arrives at the same port. Latencies are absolute (this machine); ratios are "
        "to the idle phase of the same run.",
        "",
        "| phase | scans | p50 ms | p99 ms | p50 / idle | p99 / idle | beside it | target |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for i, row in enumerate(rows):
        p50_ratio, p99_ratio = row["p50"] / idle["p50"], row["p99"] / idle["p99"]
        if i == 0:
            beside, target = "", ""
        elif i == 1:
            beside = f"{row['count']:,} slow connections closed at the header deadline"
            target = f"p99 ≤ 2x: {'met' if p99_ratio <= 2 else '**missed**'}"
        else:
            served = row["count"]
            beside = f"{served:,} posters served ({served / seconds:.0f}/s)"
            if i == 2:
                beside += (
                    ", each drawn (a miss)" if served <= VENUES else f", the first {VENUES:,} drawn"
                )
            target = f"p50 ≤ 2x: {'met' if p50_ratio <= 2 else '**missed**'}"
        lines.append(
            f"| {row['phase']} | {row['requests']:,} | {row['p50']:.2f} | {row['p99']:.2f} | "
            f"{p50_ratio:.2f} | {p99_ratio:.2f} | {beside} | {target} |"
        )
    lines += [
        "",
        "Reproduce: `python benchmarks/bench_hostile.py --results benchmarks/RESULTS.md`",
    ]
    print("\n".join(lines))
    if args.results:
        write_section(args.results, "bench_hostile", "\n".join(lines))
    return 0


def _one_venue(url: str, token: str, venue_ids: list[str], seconds: float, fetched: Any) -> None:
    poster_fetchers(url, token, venue_ids, seconds, True, fetched)


def _many_venues(url: str, token: str, venue_ids: list[str], seconds: float, fetched: Any) -> None:
    poster_fetchers(url, token, venue_ids, seconds, False, fetched)


if __name__ == "__main__":
    sys.exit(main())
