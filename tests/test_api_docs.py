"""``/docs``: the API's interactive documentation (Swagger UI) from files the wheel ships,
loading nothing from another origin, under a content security policy of its own; every
other route keeps its headers. (In a real browser: ``tests/test_web_browser.py``.)"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Final

import pytest

from gateway.http.web.security import CONTENT_SECURITY_POLICY, DOCS_CONTENT_SECURITY_POLICY

from .harness import GatewayStarter

STATIC: Final = Path(__file__).resolve().parent.parent / "gateway" / "http" / "web" / "static"
ONE_SERVER: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)


class Links(HTMLParser):
    """Every URL a page loads or links to, and anything inline that a policy would need
    to allow (a script without src, a style element or attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if (tag == "script" and "src" not in found) or tag == "style" or "style" in found:
            self.inline.append(tag)


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for directive in policy.split(";"):
        name, *sources = directive.split()
        parsed[name] = sources
    return parsed


@ONE_SERVER
async def test_docs_loads_only_this_origins_files_and_they_are_served(
    gateway_under_test: GatewayStarter, redis_url: str
) -> None:
    gateway = await gateway_under_test(redis_url)
    client = gateway.client
    answer = await client.get("/docs")
    assert answer.status == 200
    assert answer.content_type == "text/html"
    page = Links()
    page.feed(await answer.text())
    assert page.inline == []
    # Same origin: a path of this host, never a scheme or another host (//cdn...).
    assert page.urls and all(u.startswith("/") and not u.startswith("//") for u in page.urls)
    bundle_files = {"/static/swagger-ui-bundle.js", "/static/swagger-ui.css", "/static/js/docs.js"}
    assert bundle_files <= set(page.urls)
    # (Which name a script's type goes by depends on the machine's MIME table.)
    types = {
        ".js": {"text/javascript", "application/javascript"},
        ".css": {"text/css"},
        ".json": {"application/json"},
    }
    for url in [*page.urls, "/openapi.json"]:
        served = await client.get(url)
        assert served.status == 200, url
        suffix = Path(url).suffix
        if suffix in types:
            assert served.content_type in types[suffix], url
    # What the script loads: this gateway's own document, and no validator elsewhere.
    script = (STATIC / "js" / "docs.js").read_text()
    assert 'url: "/openapi.json"' in script and 'validatorUrl: "none"' in script
    # The vendored bundle names its licenses, and they are beside it.
    bundle = (STATIC / "swagger-ui-bundle.js").read_text()
    assert bundle.startswith("/*! For license information please see swagger-ui-bundle.js")
    for license_file in ("swagger-ui-bundle.js.LICENSE.txt", "swagger-ui-LICENSE.txt"):
        assert (await client.get(f"/static/{license_file}")).status == 200


@ONE_SERVER
async def test_docs_has_a_policy_of_its_own_and_every_other_route_keeps_its_headers(
    gateway_under_test: GatewayStarter, redis_url: str
) -> None:
    gateway = await gateway_under_test(redis_url)
    client = gateway.client
    answer = await client.get("/docs")
    headers = answer.headers
    assert headers["Content-Security-Policy"] == DOCS_CONTENT_SECURITY_POLICY
    policy = directives(DOCS_CONTENT_SECURITY_POLICY)
    # This origin's scripts, styles and calls; no inline code, no eval, no other host.
    assert policy["default-src"] == ["'none'"]
    for kind in ("script-src", "style-src", "connect-src"):
        assert policy[kind] == ["'self'"], kind
    assert policy["img-src"] == ["'self'", "data:", "blob:"]
    assert policy["frame-ancestors"] == ["'none'"]
    sources = {s for listed in policy.values() for s in listed}
    assert sources <= {"'self'", "'none'", "data:", "blob:"}
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-cache"

    # The pages keep theirs, and the API's answers carry none.
    page = await client.get("/")
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    for path in ("/openapi.json", "/healthz"):
        api = await client.get(path)
        assert "Content-Security-Policy" not in api.headers, path
        assert api.headers["Cache-Control"] == "no-store", path
        assert api.headers["X-Content-Type-Options"] == "nosniff", path
