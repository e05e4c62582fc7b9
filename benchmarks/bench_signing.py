"""Code verifications per second on one core: never-seen codes and cached codes.

    python benchmarks/bench_signing.py [--codes N] [--rounds N] [--results benchmarks/RESULTS.md]

Pins itself to one CPU, then measures in the same run:
  * fresh:    every code verified once (parse, HMAC, constant-time compare, cache insert);
  * cached:   a working set of codes verified again and again (a venue's poster);
  * baseline: the same fresh codes with the standard library's ``base64.b32decode`` and
              ``hmac.digest`` (no precomputed state), for scale.
Targets (issue 2): fresh >= 150,000/s, cached >= 2,000,000/s. Each figure is the best of
``--rounds`` rounds (the least disturbed by whatever else the machine runs).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hmac
import os
import platform
import secrets
import sys
import time
from pathlib import Path

from results import cpu_model, write_section

from signing import Code, CodeVerifier
from signing.codes import TAG_BYTES, signed_message_prefix

NOW = int(time.time())
TARGET_FRESH = 150_000
TARGET_CACHED = 2_000_000


def make_codes(verifier: CodeVerifier, n: int) -> list[tuple[str, str]]:
    """Half venue, half person codes with distinct ids, like a real day's mix."""
    out: list[tuple[str, str]] = []
    for i in range(n):
        if i % 2:
            out.append((verifier.issue("person", f"P{i:09d}", NOW, NOW + 7 * 86400), "person"))
        else:
            out.append((verifier.issue("venue", f"V{i:09d}", NOW), "venue"))
    return out


def rate_fresh(verifier: CodeVerifier, codes: list[tuple[str, str]]) -> float:
    verifier.clear_cache()
    verify = verifier.verify
    now = time.time()
    start = time.perf_counter()
    for text, kind in codes:
        verify(text, kind, now)  # type: ignore[arg-type]
    return len(codes) / (time.perf_counter() - start)


def rate_cached(verifier: CodeVerifier, codes: list[tuple[str, str]], repeats: int) -> float:
    verify = verifier.verify
    now = time.time()
    for text, kind in codes:
        verify(text, kind, now)  # type: ignore[arg-type]
    work = codes * repeats
    start = time.perf_counter()
    for text, kind in work:
        verify(text, kind, now)  # type: ignore[arg-type]
    return len(work) / (time.perf_counter() - start)


def rate_stdlib(key: bytes, app_id: str, codes: list[tuple[str, str]]) -> float:
    """What the obvious implementation manages: b32decode plus one-shot hmac.digest."""
    label = signed_message_prefix(app_id)
    start = time.perf_counter()
    for text, _ in codes:
        body = text.partition(":")[2]
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
        mac = hmac.digest(key, label + raw[:-TAG_BYTES], "sha256")[:TAG_BYTES]
        hmac.compare_digest(mac, raw[-TAG_BYTES:])
    return len(codes) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", type=int, default=300_000, help="fresh codes per round")
    parser.add_argument("--working-set", type=int, default=10_000, help="cached codes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, help="update this RESULTS.md's section")
    args = parser.parse_args()

    cpu = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {cpu})
    key = secrets.token_bytes(32)
    verifier = CodeVerifier("vhd", "VHD", {1: key}, 1, cache_size=max(args.codes, 100_000))
    print(f"minting {args.codes:,} codes ...", file=sys.stderr)
    codes = make_codes(verifier, args.codes)
    working = codes[: args.working_set]
    # Every fresh code really verifies (the benchmark would be meaningless otherwise).
    assert all(isinstance(verifier.verify(t, k, time.time()), Code) for t, k in codes[:1000])  # type: ignore[arg-type]

    fresh, cached, stdlib = [], [], []
    for r in range(args.rounds):
        fresh.append(rate_fresh(verifier, codes))
        cached.append(rate_cached(verifier, working, repeats=100))
        stdlib.append(rate_stdlib(key, "vhd", codes))
        print(
            f"round {r + 1}/{args.rounds}: fresh {fresh[-1]:,.0f}/s, cached {cached[-1]:,.0f}/s, "
            f"stdlib {stdlib[-1]:,.0f}/s",
            file=sys.stderr,
        )
    best_fresh, best_cached, best_stdlib = max(fresh), max(cached), max(stdlib)

    rows = [
        ("never seen (parse + HMAC + cache insert)", best_fresh, TARGET_FRESH),
        (f"already verified (working set {args.working_set:,})", best_cached, TARGET_CACHED),
        ("stdlib b32decode + hmac.digest, same codes (reference)", best_stdlib, None),
    ]
    lines = [
        "## Code verification (issue 2)",
        "",
        f"{dt.date.today().isoformat()} · {cpu_model()} · pinned to 1 core (CPU {cpu}) · "
        f"Python {platform.python_version()} · best of {args.rounds} rounds of "
        f"{args.codes:,} codes (half venue, half person)",
        "",
        "| verification | per second (absolute) | ratio to stdlib (same run) | target | met |",
        "|---|---:|---:|---:|---|",
    ]
    for label, rate, target in rows:
        lines.append(
            f"| {label} | {rate:,.0f} | {rate / best_stdlib:.1f}x | "
            f"{f'{target:,}' if target else '-'} | "
            f"{'-' if target is None else ('yes' if rate >= target else 'NO')} |"
        )
    lines += ["", "Reproduce: `python benchmarks/bench_signing.py --results benchmarks/RESULTS.md`"]
    report = "\n".join(lines)
    print(report)
    if args.results:
        write_section(args.results, "bench_signing", report)
    return 0 if best_fresh >= TARGET_FRESH and best_cached >= TARGET_CACHED else 1


if __name__ == "__main__":
    sys.exit(main())
