"""Monitoring: the metrics the alerts need, the Prometheus config and alerts (checked and
unit-tested by promtool), and a real Prometheus scraping a real ``scangate serve`` under
load, through which every query of the Grafana dashboard must answer with data."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from gateway.metrics import FlusherMetrics, Metrics
from signing import Keyring

from .conftest import KeyringFactory
from .harness import GatewayStarter
from .servers import free_loopback_port, missing

ROOT: Final = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR: Final = ROOT / "deploy" / "prometheus"
DASHBOARD: Final = ROOT / "deploy" / "grafana" / "scangate.json"
SHARDS: Final = 4
LOAD_S: Final = 20.0
MAXMEMORY_BYTES: Final = 256 * 1024 * 1024
# Grafana's template variables, as the live test's Prometheus (1 s scrapes) can answer them.
GRAFANA_VARIABLES: Final = {
    "$__rate_interval": "15s",
    "$__interval": "1s",
    "$__range": "30s",
    "${datasource}": "",
    "$datasource": "",
}


def tool(name: str) -> str:
    """A Prometheus binary on PATH; a skip without it (a failure under CI=true)."""
    found = shutil.which(name)
    if found is None:
        missing(f"{name} not installed: apt-get install prometheus")
    return found


def exported_names(registry: CollectorRegistry) -> set[str]:
    return {sample.name for family in registry.collect() for sample in family.samples}


def all_exported_names() -> set[str]:
    """Every sample name the gateway and the flusher export, with each labelled metric
    given one child (an unlabelled-yet metric exports nothing)."""
    metrics = Metrics()
    metrics.observe_request("scans", 200, 0.01)
    metrics.count_events(Tally([("vhd", "checkin", "accepted", "")]))
    metrics.set_backlog([0])
    metrics.notices.labels("webhook", "delivered").inc()
    metrics.door_lookups.labels("vhd", "unknown").inc()
    metrics.publish()
    flusher = FlusherMetrics()
    flusher.stream_backlog.labels("0").set(0)
    return exported_names(metrics.registry) | exported_names(flusher.registry)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel, variables filled in."""
    doc = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


# -- the metrics the alerts need ---------------------------------------------------------------


def test_every_metric_the_alerts_and_the_dashboard_use_is_exported() -> None:
    names = all_exported_names()
    assert {
        "scangate_ready",
        "scangate_flush_errors_total",
        "scangate_dead_letters_total",
        "scangate_redis_memory_used_bytes",
        "scangate_redis_maxmemory_bytes",
    } <= names
    used = set(re.findall(r"\bscangate_[a-z_]+", (PROMETHEUS_DIR / "alerts.yml").read_text()))
    used |= {name for _, expr in dashboard_queries() for name in re.findall(r"scangate_\w+", expr)}
    assert used - names == set()
    assert len(used) > 10


def test_the_dashboard_has_a_prometheus_datasource_variable_and_every_panel_a_query() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 39
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= (
        doc["templating"]["list"][0].items()
    )
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


@dataclass
class Gateway:
    client: TestClient[Any, Any]

    async def metric(self, name: str) -> float | None:
        """The value of an unlabelled metric in /metrics, or None when absent."""
        text = await (await self.client.get("/metrics")).text()
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    async def until(
        self, name: str, check: Callable[[float], bool], timeout_s: float = 10
    ) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.metric(name)
            if value is not None and check(value):
                return value
            assert time.monotonic() < deadline, f"{name} is {value}"
            await asyncio.sleep(0.1)


GatewayFactory = Callable[[str], Any]


@pytest.fixture
def make_gateway(gateway_under_test: GatewayStarter) -> GatewayFactory:
    """A gateway (in this process) on the Redis at the given URL."""

    async def make(url: str) -> Gateway:
        return Gateway((await gateway_under_test(url, shards=SHARDS)).client)

    return make


async def test_the_poll_reports_ready_and_redis_memory(
    make_gateway: GatewayFactory, redis_url: str
) -> None:
    gateway: Gateway = await make_gateway(redis_url)
    # No /readyz call: the periodic poll alone sets it.
    assert await gateway.until("scangate_ready", lambda v: v == 1) == 1
    assert await gateway.until("scangate_redis_memory_used_bytes", lambda v: v > 0) > 0
    async with aioredis.Redis.from_url(redis_url, decode_responses=True) as client:
        configured = int(str((await client.config_get("maxmemory"))["maxmemory"]))
    assert await gateway.metric("scangate_redis_maxmemory_bytes") == configured


async def test_redis_maxmemory_is_exported_and_ready_follows_redis(
    make_gateway: GatewayFactory, private_redis: Any
) -> None:
    server = private_redis("valkey", appendonly=False, extra_args=["--maxmemory", "64mb"])
    gateway: Gateway = await make_gateway(server.url)
    await gateway.until("scangate_redis_maxmemory_bytes", lambda v: v == 64 * 1024 * 1024)
    await gateway.until("scangate_ready", lambda v: v == 1)
    server.stop()
    await gateway.until("scangate_ready", lambda v: v == 0)
    resp = await gateway.client.get("/readyz")
    assert resp.status == 503 and "Redis" in (await resp.json())["detail"]
    server.start()
    await gateway.until("scangate_ready", lambda v: v == 1)
    assert (await gateway.client.get("/readyz")).status == 200


# -- promtool ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("check", "config", "prometheus.yml"), id="check-config"),
        pytest.param(("check", "rules", "alerts.yml"), id="check-rules"),
        pytest.param(("test", "rules", "alerts_test.yml"), id="test-rules"),
    ],
)
def test_promtool(args: tuple[str, ...]) -> None:
    result = subprocess.run(
        [tool("promtool"), *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# -- a live gateway scraped by a real Prometheus -----------------------------------------------


@dataclass
class Served:
    base: str
    token: str
    keyring: Keyring


def scangate_env(redis_url: str, master_key: bytes) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCANGATE_", "PROMETHEUS_"))}
    env.update(
        {
            "SCANGATE_REDIS_URL": redis_url,
            "SCANGATE_MASTER_KEY": base64.b64encode(master_key).decode(),
            "SCANGATE_SHARDS": str(SHARDS),
        }
    )
    return env


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    """Until ``url`` answers 200; fails at once if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=2) as resp,
        ):
            if resp.status == 200:
                return
        assert time.monotonic() < deadline, f"{url} never answered:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture
def served(
    tmp_path: Path, master_key: bytes, keyring_factory: KeyringFactory, private_redis: Any
) -> Iterator[Served]:
    """``scangate serve`` (1 worker and its flusher) on a private Valkey with a maxmemory."""
    server = private_redis(
        "valkey", appendonly=False, extra_args=["--maxmemory", str(MAXMEMORY_BYTES)]
    )
    env = scangate_env(server.url, master_key)
    cli = [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path)]
    added = subprocess.run(
        [*cli, "apps", "add", "vhd"], env=env, capture_output=True, timeout=60, check=True
    )
    token = json.loads(added.stdout)["token"]
    port = free_loopback_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cli, "serve", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz", proc, log)
        yield Served(base, token, keyring_factory())
    finally:
        code = stop_process(proc, 30)
    assert code == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


@pytest.fixture
def prometheus(tmp_path: Path, served: Served) -> Iterator[str]:
    """Debian's Prometheus scraping the gateway every second, with the alerts loaded."""
    binary = tool("prometheus")
    port = free_loopback_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "scangate-gateway",
                        "static_configs": [{"targets": [served.base.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/-/ready", proc, log)
        yield url
    finally:
        stop_process(proc, 15)


async def put_load(served: Served, seconds: float) -> dict[int, int]:
    """Scans from 4 clients for ``seconds``: valid ones, a few invalid codes, repeats (which
    answer duplicate) and requests with a wrong token (401). Statuses seen, counted."""
    venues = [served.keyring.issue("vhd", "venue", f"V{n}") for n in range(10)]
    persons = [served.keyring.issue("vhd", "person", f"P{n}", ttl_s=86400) for n in range(100)]
    numbers = itertools.count()
    statuses: dict[int, int] = {}
    end = time.monotonic() + seconds

    def event(n: int) -> dict[str, Any]:
        return {
            "event_id": f"LOAD{n:010d}",
            "kind": "checkin" if n % 2 else "checkout",
            "venue_code": venues[n % len(venues)] if n % 50 else "NOT-A-CODE",
            "person_code": persons[n % len(persons)],
            "scanned_at": int(time.time() * 1000) - 500,
        }

    async def client(session: aiohttp.ClientSession) -> None:
        batch: list[dict[str, Any]] = []
        for round_ in itertools.count():
            if time.monotonic() >= end:
                return
            if round_ % 10 != 5:  # every tenth batch is sent again
                batch = [event(next(numbers)) for _ in range(50)]
            token = served.token if round_ % 25 else "wrong-token"
            async with session.post(
                served.base + "/v1/scans",
                json={"events": batch},
                headers={"Authorization": f"Bearer {token}"},
            ) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(4)))
    return statuses


async def query(session: aiohttp.ClientSession, prometheus: str, expr: str) -> list[Any]:
    """An instant query's result vector; fails on a query Prometheus refuses."""
    async with session.get(prometheus + "/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


async def scalar(session: aiohttp.ClientSession, prometheus: str, expr: str) -> float:
    result = await query(session, prometheus, expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


async def test_prometheus_scrapes_a_live_gateway_and_every_dashboard_query_has_data(
    served: Served, prometheus: str
) -> None:
    async with aiohttp.ClientSession() as session:
        # The first scrape is in before the load starts, so every counter is seen rising.
        deadline = time.monotonic() + 10
        while not await query(session, prometheus, 'up{job="scangate-gateway"} == 1'):
            assert time.monotonic() < deadline, "Prometheus never scraped the gateway"
            await asyncio.sleep(0.2)
        started = time.monotonic()
        statuses = await put_load(served, LOAD_S)
        assert statuses.get(200, 0) > 100 and statuses.get(401, 0) > 0, statuses
        assert set(statuses) == {200, 401}, statuses
        await asyncio.sleep(2.5)  # the last published counts, scraped
        window = f"{int(time.monotonic() - started) + 2}s"

        async def moved(expr: str) -> float:
            return await scalar(session, prometheus, f"sum(increase({expr}[{window}]))")

        assert await moved('scangate_scan_events_total{outcome="accepted"}') > 0
        assert await moved('scangate_scan_events_total{outcome="duplicate"}') > 0
        assert await moved('scangate_scan_events_total{outcome="rejected"}') > 0
        assert await moved("scangate_scan_to_storage_seconds_count") > 0
        assert await moved('scangate_scan_to_storage_seconds_bucket{le="+Inf"}') > 0
        buckets = await query(session, prometheus, "scangate_scan_to_storage_seconds_bucket")
        assert len(buckets) == 12  # 11 bounds and +Inf
        backlog = await query(session, prometheus, "scangate_stream_backlog")
        assert sorted(s["metric"]["shard"] for s in backlog) == [str(n) for n in range(SHARDS)]
        peak = f"max(max_over_time(scangate_stream_backlog[{window}]))"
        assert await scalar(session, prometheus, peak) > 0
        assert await scalar(session, prometheus, "min(scangate_ready)") == 1
        assert await scalar(session, prometheus, "max(scangate_redis_memory_used_bytes)") > 0
        maxmemory = await scalar(session, prometheus, "max(scangate_redis_maxmemory_bytes)")
        assert maxmemory == MAXMEMORY_BYTES
        assert await scalar(session, prometheus, "sum(scangate_flush_errors_total)") == 0

        # Every panel of the dashboard shows something.
        empty = []
        for title, expr in dashboard_queries():
            if not await query(session, prometheus, expr):
                empty.append(f"{title}: {expr}")
        assert not empty, "queries with no data:\n" + "\n".join(empty)

        # The alerts evaluate on real series without error, and none fires.
        async with session.get(prometheus + "/api/v1/rules") as resp:
            rules = [r for g in (await resp.json())["data"]["groups"] for r in g["rules"]]
        assert len(rules) >= 7
        assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
        assert [r["name"] for r in rules if r["state"] == "firing"] == []
