"""Who a request's client is, for the per-address limits (SCANGATE_TRUSTED_PROXIES), tried
the way an attacker would: over HTTP against a real gateway on a real Redis or Valkey,
each client bound to a loopback address of its own (127.0.0.2, 127.0.0.3, ...), which the
gateway sees as the client's address.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway import Settings
from gateway.app import create_app
from signing import Keyring

PHONE: Final = "0912345678"
ATTACKERS: Final = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

Route = Literal["api", "web"]


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None


@dataclass
class Client:
    """An HTTP client on its own source address, calling the API with an app token or the
    web pages' endpoints (after opening a page for the CSRF cookie and token)."""

    http: aiohttp.ClientSession
    base: URL
    route: Route
    token: str = ""
    csrf: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    async def call(self, path: str, body: Any, **headers: str) -> Reply:
        sent = {**self.headers, **headers}
        if self.route == "api":
            url = self.base / "v1" / path
            sent["Authorization"] = f"Bearer {self.token}"
        else:
            url = self.base / "web" / "api" / path
            sent["X-CSRF-Token"] = self.csrf
        async with self.http.post(url, json=body, headers=sent) as response:
            raw = await response.read()
            doc = orjson.loads(raw) if response.content_type == "application/json" else raw
            return Reply(response.status, doc, response.headers)

    async def ask(self, phone: str = PHONE, **headers: str) -> Reply:
        return await self.call("otp", {"phone": phone}, **headers)

    async def verify(
        self, code: str, challenge: str | None = None, phone: str = PHONE, **headers: str
    ) -> Reply:
        body = {"phone": phone, "code": code}
        if challenge is not None:
            body["challenge"] = challenge
        return await self.call("otp/verify", body, **headers)


@dataclass
class Site:
    """A gateway served on 127.0.0.1, with the apps vhd and bluezone, the web app, and the
    log SMS sender (its file stands in for the phones)."""

    server: TestServer
    settings: Settings
    tokens: dict[str, str]
    sessions: list[aiohttp.ClientSession]

    async def client(self, address: str, route: Route, app: str = "vhd") -> Client:
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(address, 0)),
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # the site is an IP address
        )
        self.sessions.append(http)
        base = self.server.make_url("/")
        if route == "api":
            return Client(http, base, route, token=self.tokens[app])
        async with http.get(base / "khai-bao") as page:
            html = await page.text()
        match = re.search(r'<meta name="csrf-token" content="([0-9a-f]{64})">', html)
        assert match is not None
        return Client(http, base, route, csrf=match.group(1))

    def sms(self) -> list[dict[str, str]]:
        path = self.settings.data_dir / "sms.log"
        if not path.exists():
            return []
        lines = path.read_bytes().split(b"\n")[:-1]  # a line still being written is left
        return [orjson.loads(line) for line in lines]


SiteFactory = Callable[..., Any]


@pytest.fixture
async def make_site(
    tmp_path: Path, keyring: Keyring, master_key: bytes, redis_url: str
) -> AsyncIterator[SiteFactory]:
    tokens = {
        "vhd": keyring.add_app("vhd", name="Vietnam Health Declaration").token,
        "bluezone": keyring.add_app("bluezone", prefix="BZ").token,
        "web": keyring.add_app("web", name="Khai báo y tế").token,
    }
    sites: list[Site] = []

    async def make(**settings_over: Any) -> Site:
        settings = Settings(
            data_dir=tmp_path,
            redis_url=redis_url,
            master_key=base64.b64encode(master_key).decode(),
            shards=4,
            web_app="web",
        )
        settings = replace(settings, **settings_over)
        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server()
        site = Site(server, settings, tokens, [])
        sites.append(site)
        return site

    yield make
    for site in sites:
        for http in site.sessions:
            await http.close()
        await site.server.close()


# -- whose address counts: SCANGATE_TRUSTED_PROXIES ------------------------------------------


async def test_forwarding_headers_from_an_untrusted_peer_are_ignored(
    make_site: SiteFactory,
) -> None:
    # A proxy is trusted, but not this peer.
    site: Site = await make_site(otp_address_limit=2, trusted_proxies="10.0.0.0/8")
    client = await site.client(ATTACKERS[0], "web")
    forged = [
        {"X-Forwarded-For": "203.0.113.7"},
        {"Forwarded": "for=198.51.100.9"},
        {"X-Forwarded-For": "10.0.0.1, 192.0.2.1", "Forwarded": 'for="[2001:db8::1]"'},
        {"X-Real-IP": "198.51.100.10"},
    ]
    sends = [await client.ask(f"09770005{n:02d}", **h) for n, h in enumerate(forged)]
    assert [reply.status for reply in sends] == [202, 202, 429, 429]


async def test_behind_a_trusted_proxy_each_client_has_its_own_budget(
    make_site: SiteFactory,
) -> None:
    # 127.0.0.2 is the load balancer; 10.0.0.0/8 holds proxies inside the network.
    site: Site = await make_site(otp_address_limit=2, trusted_proxies="127.0.0.2/32, 10.0.0.0/8")
    proxy = await site.client(ATTACKERS[0], "web")
    phones = (f"09770006{n:02d}" for n in range(100))

    async def asks(*headers: dict[str, str]) -> list[int]:
        return [(await proxy.ask(next(phones), **h)).status for h in headers]

    x = {"X-Forwarded-For": "198.51.100.7"}
    y = {"Forwarded": "for=203.0.113.9;proto=https"}
    assert await asks(x, x, x) == [202, 202, 429]
    # Entries a client writes on the left change nothing; a trusted proxy on the right is
    # skipped.
    assert await asks(
        {"X-Forwarded-For": "192.0.2.99, 198.51.100.7"},
        {"X-Forwarded-For": "198.51.100.7:5555, 10.1.2.3"},
    ) == [429, 429]
    assert await asks(y, y, y) == [202, 202, 429]
    # An IPv6 client counts by its /64.
    assert await asks(
        {"Forwarded": 'for="[2001:db8:1:2::1]:4711"'},
        {"X-Forwarded-For": "2001:db8:1:2::99"},
        {"X-Forwarded-For": "2001:db8:1:2:ffff::5"},
        {"X-Forwarded-For": "2001:db8:1:3::1"},
    ) == [202, 202, 429, 202]
    # Headers that disagree, or name no address, or none: counted as the proxy's own.
    assert await asks(
        {"X-Forwarded-For": "192.0.2.50", "Forwarded": "for=192.0.2.51"},
        {"Forwarded": "for=unknown"},
        {},
    ) == [202, 202, 429]
