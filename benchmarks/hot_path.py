"""Where a single-event scan's CPU time goes in the gateway's own code, step by step.

    python benchmarks/hot_path.py [--rounds 7] [--requests 20000]

The capacity run (benchmarks/capacity.py) measures whole requests over HTTP, where the
machine's noise moves a figure by 20% from one run to the next. This runs the gateway's
own steps in this process on real objects: the application started as ``scangate serve``
starts it (a private Valkey, SQLite in a temporary data dir), requests made by aiohttp's
test helper with their bodies already received, as the server hands them over. Each step
runs ``--requests`` times per round, and the best round counts (the cost without the
machine's interruptions). The group commit runs 64 requests at a time, as the capacity
run's 64 connections do, and is timed in CPU seconds of this process (Valkey's own time is
not in it).

Steps, each timed alone:
  * front door, whole: ``front_door(app)`` on a scan, from the request to the answer
    object (everything the gateway adds to aiohttp's own request handling);
  * token: the bearer token to an app id (``app_of_token``);
  * body: the received body to JSON (``read_json``);
  * checks: the batch's shape and the event's envelope and codes (``check_event``);
  * buffer: the event appended to Redis through the group commit;
  * answer: the body and the answer object (its bytes are written by aiohttp's connection,
    on the far side of the line this measures).
What aiohttp and the event loop do per request (parse, write, schedule) is the bare
reference's whole cost, measured by the capacity run; the two are printed side by side
in RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request

from gateway import Settings
from gateway.http.app import create_app
from gateway.http.context import app_of_token, read_json
from gateway.http.front_door import ScanAnswer, front_door
from gateway.http.keys import KEYRING, METRICS
from gateway.http.protocol import ConnectionLimits, GuardedRunner
from gateway.http.scans import SCAN_INTAKE, _all_accepted
from gateway.pipeline.events import check_event
from gateway.run.embedded import RedisProcess, valkey_binary
from gateway.run.server import calm_collector

CONCURRENCY = 64


def scan_body(keyring: Any, n: int) -> bytes:
    return orjson.dumps(
        {
            "events": [
                {
                    "event_id": f"HP-{n:010d}",
                    "kind": "checkin",
                    "venue_code": keyring.issue("vhd", "venue", f"V{n % 1000:07d}"),
                    "person_code": keyring.issue("vhd", "person", f"P{n:07d}", ttl_s=86400),
                    "scanned_at": int(time.time() * 1000) - 1000,
                }
            ]
        }
    )


class _Connection:
    """The few members of aiohttp's connection a received body reads (a mock's calls
    would cost more than the steps timed)."""

    transport = None
    ssl_context = None
    peername = ("127.0.0.1", 40000)
    sockname = ("127.0.0.1", 8000)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


class Requests:
    """Mocked ``POST /v1/scans`` requests, each with its body received whole."""

    def __init__(self, app: web.Application, token: str, bodies: list[bytes]) -> None:
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Content-Length": str(len(bodies[0])),
        }
        self.connection: Any = _Connection()
        self.template = make_mocked_request(
            "POST", "/v1/scans", headers=headers, app=app, protocol=self.connection
        )
        self.bodies = bodies

    def make(self, i: int) -> web.Request:
        body = self.bodies[i % len(self.bodies)]
        request = self.template.clone()
        reader = streams.StreamReader(self.connection, 2**16, loop=asyncio.get_running_loop())
        reader.feed_data(body)
        reader.feed_eof()
        request._payload = reader  # what the parser hands over for a body that has arrived
        return request


async def cpu_per_call(
    make: Callable[[int], Any], step: Callable[[Any], Awaitable[Any]], n: int, rounds: int
) -> float:
    """Best round's CPU µs per call of ``step``, ``CONCURRENCY`` calls at a time."""
    best = float("inf")
    for r in range(rounds):
        inputs = [make(r * n + i) for i in range(n)]
        gc.collect()
        started = time.process_time()
        for at in range(0, n, CONCURRENCY):
            await asyncio.gather(*(step(x) for x in inputs[at : at + CONCURRENCY]))
        best = min(best, (time.process_time() - started) / n * 1e6)
    return best


async def measure(rounds: int, n: int) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory(prefix="scangate-hot-path-") as tmp:
        work = Path(tmp)
        valkey = RedisProcess(valkey_binary(), work / "valkey", appendonly=True)
        valkey.start()
        try:
            settings = Settings(
                data_dir=work,
                redis_url=valkey.url,
                master_key=base64.b64encode(secrets.token_bytes(32)).decode(),
                shards=16,
                backlog_high_water=10**9,
            )
            app = create_app(settings)
            runner = GuardedRunner(app, ConnectionLimits.of(settings))
            await runner.setup()  # starts the application: every resource opens
            calm_collector()  # as a worker does once its application is made
            try:
                return await _steps(app, rounds, n)
            finally:
                await runner.cleanup()
        finally:
            valkey.stop()


async def _steps(app: web.Application, rounds: int, n: int) -> list[tuple[str, float]]:
    keyring = app[KEYRING]
    token = keyring.add_app("vhd").token
    per_step = n * rounds
    # Every step gets events and codes of its own: an event id is new (the de-duplication
    # would answer duplicate) and a person code is verified, not found in the verified-code
    # cache, as for people who scan once or twice a day.
    series = iter(range(0, 10**9, per_step))

    def requests() -> Requests:
        first = next(series)
        return Requests(app, token, [scan_body(keyring, first + i) for i in range(per_step)])

    intake = app[SCAN_INTAKE]
    enter = front_door(app)

    async def nothing(_: Any) -> None:
        pass

    # What running a step 64 at a time costs by itself (a task each): taken off every row.
    base = await cpu_per_call(lambda i: i, nothing, n, rounds)
    rows: list[tuple[str, float]] = []

    async def whole(request: web.Request) -> None:
        response = await enter(request)
        assert response.status == 200, response.status

    rows.append(("front door, whole", await cpu_per_call(requests().make, whole, n, rounds)))

    async def take(request: web.Request) -> None:
        assert (await intake.take(request)).startswith(b'{"accepted":1,')

    rows.append(("the scans' handler", await cpu_per_call(requests().make, take, n, rounds)))

    async def token_step(request: web.Request) -> None:
        await app_of_token(request, keyring, intake.keyring_refresh, intake.token_uses)

    rows.append(("token", await cpu_per_call(requests().make, token_step, n, rounds)))

    async def body_step(request: web.Request) -> None:
        await read_json(request)

    rows.append(("body", await cpu_per_call(requests().make, body_step, n, rounds)))
    docs = [orjson.loads(b) for b in requests().bodies]
    verifier, now_ms = keyring.verifier("vhd"), int(time.time() * 1000)

    async def checks_step(doc: Any) -> None:
        raw_events = doc["events"]
        assert isinstance(doc, dict) and isinstance(raw_events, list) and raw_events
        for raw in raw_events:
            check_event(raw, "vhd", verifier, intake.rules, now_ms, intake.revoked.ids)

    rows.append(("checks", await cpu_per_call(docs.__getitem__, checks_step, n, rounds)))
    events = [
        check_event(orjson.loads(b)["events"][0], "vhd", verifier, intake.rules, now_ms)
        for b in requests().bodies
    ]

    async def buffer_step(event: Any) -> None:
        assert await intake.buffer.append([event], now_ms) == [True]

    rows.append(
        (
            "buffer (group commit, 64 at a time)",
            await cpu_per_call(events.__getitem__, buffer_step, n, rounds),
        )
    )
    metrics = app[METRICS]

    async def answer_step(event: Any) -> None:
        ScanAnswer(_all_accepted("vhd", [event], metrics), "0" * 16)

    rows.append(("answer", await cpu_per_call(events.__getitem__, answer_step, n, rounds)))
    return [("(a task per call, taken off each row below)", base)] + [
        (name, us - base) for name, us in rows
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="best of this many (default 7)")
    parser.add_argument("--requests", type=int, default=20_000, help="per round and step")
    args = parser.parse_args()
    if args.rounds < 1 or args.requests < CONCURRENCY:
        parser.error(f"--rounds must be 1 or more and --requests {CONCURRENCY} or more")
    rows = uvloop.run(measure(args.rounds, args.requests))
    whole, handler = rows[1][1], rows[2][1]
    parts = sum(us for _name, us in rows[3:])
    print(f"CPU µs per single-event scan, best of {args.rounds} rounds of {args.requests:,}")
    print(f"(Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    print("| step | µs |")
    print("|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    print(f"| (the front door's own: {whole - handler:.1f}; the handler's steps timed apart: "
          f"{parts:.1f}, the rest of the handler: {handler - parts:.1f}) | |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
