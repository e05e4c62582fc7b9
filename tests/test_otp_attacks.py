"""One-time codes under attack (issue 16): strangers asking for and guessing at a citizen's
codes from other addresses must not keep the citizen from signing in; and who a request's
client is, for the per-address limits (SCANGATE_TRUSTED_PROXIES).

Every test runs a real gateway on a real Redis or Valkey and talks to it over HTTP, as an
attacker would: each client is bound to a loopback address of its own (127.0.0.2,
127.0.0.3, ...), which the gateway sees as the client's address. Attackers use the web
pages' endpoints, which need no app token, and the API with an app's token.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp
import orjson
import pytest
from yarl import URL

from gateway import Settings
from signing import Keyring

from .fixtures_servers import STORAGE_KINDS
from .harness import GatewayStarter, GatewayUnderTest, StorageKind

PHONE: Final = "0912345678"
PHONE_E164: Final = "+84912345678"
# The send and guess window, shortened from 15 minutes so that a test can attack for a
# whole window. Every other limit keeps its default.
WINDOW_S: Final = 3.0
OWNER: Final = "127.0.0.5"
ATTACKERS: Final = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# How long an attacker waits after a refusal before it tries again: far below any window,
# so it uses every send and guess the limits allow the moment they allow it.
REPROBE_S: Final = 0.05

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

    gateway: GatewayUnderTest
    tokens: dict[str, str]
    sessions: list[aiohttp.ClientSession]

    @property
    def settings(self) -> Settings:
        return self.gateway.settings

    async def client(self, address: str, route: Route, app: str = "vhd") -> Client:
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(address, 0)),
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # the site is an IP address
        )
        self.sessions.append(http)
        base = URL(self.gateway.url)
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

    async def code_for(self, reference: str, phone: str = PHONE_E164) -> str:
        """The code in the SMS to ``phone`` that carries ``reference``, as its owner finds it
        among the others."""
        for _ in range(300):
            for message in self.sms():
                if message["to"] == phone and f"tham chieu {reference})" in message["text"]:
                    codes: list[str] = re.findall(r"\b\d{6}\b", message["text"])
                    assert len(codes) == 1, message["text"]
                    return codes[0]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no SMS with the reference {reference}")

    async def metric(self, sample: str) -> float:
        async with (
            aiohttp.ClientSession() as http,
            http.get(URL(self.gateway.url) / "metrics") as response,
        ):
            text = await response.text()
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{sample} not in /metrics")


SiteFactory = Callable[..., Any]


@pytest.fixture(params=STORAGE_KINDS)
def storage(request: pytest.FixtureRequest) -> StorageKind:
    """The storage the gateway writes to: SQLite, or a schema of the test PostgreSQL
    database."""
    kind: StorageKind = request.param
    return kind


@pytest.fixture
async def make_site(
    keyring: Keyring, redis_url: str, gateway_under_test: GatewayStarter
) -> AsyncIterator[SiteFactory]:
    tokens = {
        "vhd": keyring.add_app("vhd", name="Vietnam Health Declaration").token,
        "bluezone": keyring.add_app("bluezone", prefix="BZ").token,
        "web": keyring.add_app("web", name="Khai báo y tế").token,
    }
    sites: list[Site] = []

    async def make(storage: StorageKind = "sqlite", **settings: Any) -> Site:
        gateway = await gateway_under_test(
            redis_url, storage=storage, **{"shards": 4, "web_app": "web", **settings}
        )
        site = Site(gateway, tokens, [])
        sites.append(site)
        return site

    yield make
    # The fixture closes the gateways; the clients' sessions are this file's own.
    for site in sites:
        for http in site.sessions:
            await http.close()


def random_code() -> str:
    return f"{secrets.randbelow(10**6):06d}"


# -- the attack --------------------------------------------------------------------


async def attack(client: Client, until: float, seen: Tally[tuple[str, int, str | None]]) -> None:
    """Ask for codes for the phone and guess at them as fast as the limits allow: without a
    challenge (the code asked from this address), with this attacker's own challenges, and
    with made-up ones."""
    loop = asyncio.get_running_loop()
    challenges: list[str] = []
    while loop.time() < until:
        sent = await client.ask()
        seen["send", sent.status, sent.error] += 1
        if sent.status == 202:
            challenges.append(sent.body["challenge"])
        refused = sent.status == 429
        for challenge in (None, challenges[-1] if challenges else None, secrets.token_urlsafe(16)):
            guess = await client.verify(random_code(), challenge)
            assert guess.status in (401, 429), guess.body
            seen["guess", guess.status, guess.error] += 1
            refused = refused and guess.status == 429
        if refused:
            await asyncio.sleep(REPROBE_S)


async def test_three_attacking_addresses_never_keep_the_owner_from_signing_in(
    make_site: SiteFactory, storage: StorageKind
) -> None:
    site: Site = await make_site(storage, otp_window_s=WINDOW_S)
    attackers = [
        await site.client(ATTACKERS[0], "web"),
        await site.client(ATTACKERS[1], "web"),
        await site.client(ATTACKERS[2], "api", app="bluezone"),
    ]
    owner = {"web": await site.client(OWNER, "web"), "api": await site.client(OWNER, "api")}
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen: list[Tally[tuple[str, int, str | None]]] = [Tally() for _ in attackers]
    attacks = [
        asyncio.create_task(attack(a, start + WINDOW_S, s))
        for a, s in zip(attackers, seen, strict=True)
    ]
    # The owner signs in three times within the window (its own address may ask 3 codes a
    # window), by the pages and by an app, with and without the challenge, once after a typo.
    sessions = []
    rounds: list[tuple[Route, bool, bool]] = [
        ("web", True, False),
        ("api", True, True),
        ("web", False, False),
    ]
    for n, (route, with_challenge, typo) in enumerate(rounds):
        await asyncio.sleep(max(0.0, start + (n + 0.3) * WINDOW_S / 3 - loop.time()))
        sent = await owner[route].ask()
        assert sent.status == 202, (n, sent.body)
        code = await site.code_for(sent.body["reference"])
        challenge = sent.body["challenge"] if with_challenge else None
        if typo:
            wrong = await owner[route].verify("000000" if code != "000000" else "111111", challenge)
            # The attackers' guesses cost the owner none of its tries.
            assert (wrong.status, wrong.error, wrong.body["tries_left"]) == (401, "otp_invalid", 4)
        verified = await owner[route].verify(code, challenge)
        assert verified.status == 200, (n, verified.body)
        sessions.append(verified.body["session"])
    await asyncio.gather(*attacks)
    assert loop.time() - start >= WINDOW_S

    # The attackers ran into every limit of their own address and got no session.
    for tally in seen:
        assert tally["send", 202, None] >= 1, tally
        assert tally["send", 429, "rate_limited"] >= 1, tally
        assert tally["guess", 401, "otp_invalid"] >= 1, tally
        assert tally["guess", 429, "otp_locked"] >= 1, tally
    # And a session the owner won works: a declaration is stored.
    declaration = {
        "full_name": "Nguyễn Thị Hồng Nhung",
        "national_id": "079123456789",
        "birth_year": 1990,
        "gender": "female",
        "phone": PHONE,
        "address": "12 Lê Lợi, Quận 1",
        "province": "Hồ Chí Minh",
        "answers": {
            "fever": False,
            "cough": False,
            "shortness_of_breath": False,
            "sore_throat": False,
            "loss_of_taste_or_smell": False,
            "contact_with_case": False,
            "visited_outbreak_area": False,
        },
    }
    made = await owner["api"].call("declarations", declaration, **{"X-Session": sessions[1]})
    assert made.status == 201, made.body


async def test_a_wrong_guess_ends_only_the_code_it_was_aimed_at(make_site: SiteFactory) -> None:
    site: Site = await make_site()
    owner = await site.client(OWNER, "api")
    asked = await owner.ask()
    assert asked.status == 202, asked.body
    code = await site.code_for(asked.body["reference"])
    # A stranger asks for a code and guesses at it from three addresses: its challenge
    # reaches only its own code, which ends after 5 wrong tries in all.
    stranger = await site.client(ATTACKERS[0], "web")
    theirs = await stranger.ask()
    assert theirs.status == 202, theirs.body
    guessers = [stranger, await site.client(ATTACKERS[1], "web")]
    guessers.append(await site.client(ATTACKERS[2], "api", app="bluezone"))
    wrong = "000000" if code != "000000" else "111111"
    lefts = []
    for guesser in guessers:
        for _ in range(2):
            reply = await guesser.verify(wrong, theirs.body["challenge"])
            assert (reply.status, reply.error) == (401, "otp_invalid"), reply.body
            lefts.append(reply.body["tries_left"])
            if reply.body["tries_left"] == 0:
                assert "new code" in reply.body["detail"]
    assert lefts == [4, 3, 2, 1, 0, 0]
    # Without a challenge a guess aims at the latest code asked from the guesser's own
    # address: the stranger's ended one, not the owner's.
    for _ in range(2):
        reply = await stranger.verify(wrong)
        assert reply.status in (401, 429), reply.body
    # The owner's code was never touched: a typo costs one of its 5 tries, the code works.
    reply = await owner.verify(wrong, asked.body["challenge"])
    assert (reply.status, reply.body["tries_left"]) == (401, 4)
    reply = await owner.verify(code, asked.body["challenge"])
    assert reply.status == 200, reply.body
    # Single use.
    reply = await owner.verify(code, asked.body["challenge"])
    assert (reply.status, reply.body["tries_left"]) == (401, 0)


async def test_the_sms_cost_cap_is_the_one_lockout_and_is_counted(make_site: SiteFactory) -> None:
    site: Site = await make_site(otp_phone_cap=3)
    clients = [await site.client(f"127.0.0.{n}", "api") for n in range(2, 6)]
    sent = [await client.ask() for client in clients[:3]]
    assert [reply.status for reply in sent] == [202, 202, 202]
    refused = await clients[3].ask()
    assert (refused.status, refused.error) == (429, "otp_phone_cap"), refused.body
    assert 86_000 <= int(refused.headers["Retry-After"]) <= 86_400
    assert await site.metric('scangate_otp_sends_total{outcome="phone_cap"}') == 1
    # It refuses sends to this phone only: a code already sent still signs in, and the
    # same address gets a code for another phone.
    code = await site.code_for(sent[0].body["reference"])
    reply = await clients[0].verify(code, sent[0].body["challenge"])
    assert reply.status == 200, reply.body
    assert (await clients[3].ask("0977000401")).status == 202
    assert await site.metric('scangate_otp_sends_total{outcome="sent"}') == 4


async def test_the_web_pages_count_in_the_same_address_budgets_as_the_api(
    make_site: SiteFactory,
) -> None:
    site: Site = await make_site(otp_address_limit=3, otp_address_guess_limit=2)
    web, api = await site.client(ATTACKERS[0], "web"), await site.client(ATTACKERS[0], "api")
    elsewhere = await site.client(ATTACKERS[1], "web")
    sends = [(web, "0977000301"), (api, "0977000302"), (web, "0977000303"), (api, "0977000304")]
    statuses = [(await client.ask(phone)).status for client, phone in sends]
    assert statuses == [202, 202, 202, 429]
    refused = await web.ask("0977000305")
    assert (refused.status, refused.error) == (429, "rate_limited")
    assert "address" in refused.body["detail"] and int(refused.headers["Retry-After"]) >= 1
    assert (await elsewhere.ask("0977000305")).status == 202
    guesses = [await client.verify(random_code()) for client in (web, api, web)]
    assert [(reply.status, reply.error) for reply in guesses] == [
        (401, "otp_invalid"),
        (401, "otp_invalid"),
        (429, "otp_locked"),
    ]
    assert "address" in guesses[-1].body["detail"]
    assert (await elsewhere.verify(random_code())).status == 401


# -- whose address counts: SCANGATE_TRUSTED_PROXIES ------------------------------------------


async def test_forwarding_headers_from_an_untrusted_peer_are_ignored(
    make_site: SiteFactory,
) -> None:
    # A proxy is trusted, but not this peer.
    site: Site = await make_site(
        otp_address_limit=2, otp_address_guess_limit=2, trusted_proxies="10.0.0.0/8"
    )
    client = await site.client(ATTACKERS[0], "web")
    forged = [
        {"X-Forwarded-For": "203.0.113.7"},
        {"Forwarded": "for=198.51.100.9"},
        {"X-Forwarded-For": "10.0.0.1, 192.0.2.1", "Forwarded": 'for="[2001:db8::1]"'},
        {"X-Real-IP": "198.51.100.10"},
    ]
    sends = [await client.ask(f"09770005{n:02d}", **h) for n, h in enumerate(forged)]
    assert [reply.status for reply in sends] == [202, 202, 429, 429]
    guesses = [await client.verify(random_code(), **headers) for headers in forged]
    assert [reply.status for reply in guesses] == [401, 401, 429, 429]


async def test_behind_a_trusted_proxy_each_client_has_its_own_budget(
    make_site: SiteFactory,
) -> None:
    # 127.0.0.2 is the load balancer; 10.0.0.0/8 holds proxies inside the network.
    site: Site = await make_site(
        otp_address_limit=2,
        otp_address_guess_limit=2,
        trusted_proxies="127.0.0.2/32, 10.0.0.0/8",
    )
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
    # Wrong guesses are counted per client the same way.
    for headers in (x, y):
        statuses = [(await proxy.verify(random_code(), **headers)).status for _ in range(3)]
        assert statuses == [401, 401, 429], headers
