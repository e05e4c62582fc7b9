"""The web pages' server side, on a real Redis and storage: the CSRF check, the web app
acting for the browser, the stricter venue rules, the pages switched off, the messages
of both languages. The pages themselves run in a browser in ``test_web_browser.py``."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import Settings
from gateway.http.addresses import address_bucket
from gateway.http.errors import ApiError
from gateway.http.web import is_web_route
from gateway.http.web.pages import HERE, PAGES, Site
from gateway.pipeline.events import EVENT_REASONS
from gateway.settings import SettingsError
from signing import Keyring
from signing.codes import Code, CodeType
from storage import PairingRules, ScanEvent

from .test_declarations import PHONE, Desk, DeskFactory, declaration, make_desk

__all__ = ["make_desk"]  # the fixture, used here

OTHER = "0387654321"


async def web_desk(make_desk: DeskFactory, keyring: Keyring, **over: Any) -> Desk:
    token = keyring.add_app("web", name="Khai báo y tế").token
    desk: Desk = await make_desk(web_app="web", **over)
    desk.tokens["web"] = token
    return desk


def code_id(keyring: Keyring, code: str, kind: CodeType) -> str:
    """The id in a code of the web app; fails when it does not verify."""
    checked = keyring.verifier("web").verify(code, kind, time.time())
    assert isinstance(checked, Code), checked
    return checked.id


async def page_token(desk: Desk, path: str = "/khai-bao") -> str:
    """Open a page (which sets the CSRF cookie) and read the token it carries."""
    response = await desk.client.get(path)
    assert response.status == 200
    html = await response.text()
    match = re.search(r'<meta name="csrf-token" content="([0-9a-f]{64})">', html)
    assert match is not None
    return match.group(1)


async def web_call(
    desk: Desk, method: str, path: str, body: Any = None, token: str | None = None, **headers: str
) -> tuple[int, Any]:
    sent = dict(headers)
    if token is not None:
        sent["X-CSRF-Token"] = token
    response = await desk.client.request(method, path, json=body, headers=sent)
    doc = await response.json() if response.content_type == "application/json" else None
    return response.status, doc


async def web_session(desk: Desk, token: str, phone: str = PHONE) -> str:
    before = len(desk.sms())
    status, body = await web_call(desk, "POST", "/web/api/otp", {"phone": phone}, token)
    assert status == 202, body
    for _ in range(200):
        if len(desk.sms()) > before:
            break
        await __import__("asyncio").sleep(0.01)
    (code,) = re.findall(r"\b\d{6}\b", desk.sms()[-1]["text"])
    status, body = await web_call(
        desk, "POST", "/web/api/otp/verify", {"phone": phone, "code": code}, token
    )
    assert status == 200, body
    session: str = body["session"]
    return session


# -- CSRF --------------------------------------------------------------------------------------


async def test_the_web_endpoints_need_the_pages_token_and_this_origin(
    make_desk: DeskFactory, keyring: Keyring
) -> None:
    desk = await web_desk(make_desk, keyring)
    body = {"phone": PHONE}
    # No page opened: no cookie, no token.
    status, doc = await web_call(desk, "POST", "/web/api/otp", body)
    assert (status, doc["error"]) == (403, "csrf_failed")
    token = await page_token(desk)
    for bad in (
        {"token": None},
        {"token": "0" * 64},
        {"token": token[:-1] + ("0" if token[-1] != "0" else "1")},
        {"token": token, "Sec-Fetch-Site": "cross-site"},
        {"token": token, "Sec-Fetch-Site": "same-site"},
        {"token": token, "Origin": "https://evil.example"},
        {"token": token, "Origin": "null"},  # a sandboxed frame or a file
    ):
        extra = {k: v for k, v in bad.items() if k != "token"}
        status, doc = await web_call(desk, "POST", "/web/api/otp", body, bad["token"], **extra)
        assert (status, doc["error"]) == (403, "csrf_failed"), bad
    assert desk.sms() == []  # nothing was sent for any of them
    host = desk.client.make_url("/").host
    port = desk.client.make_url("/").port
    status, doc = await web_call(
        desk,
        "POST",
        "/web/api/otp",
        body,
        token,
        **{"Sec-Fetch-Site": "same-origin", "Origin": f"http://{host}:{port}"},
    )
    assert status == 202, doc
    # The pages act as the web app only on /web/api/: the API still wants its token.
    status, doc = await web_call(desk, "POST", "/v1/otp", body, token)
    assert (status, doc["error"]) == (401, "unauthorized")
    # Reading changes nothing: a poster link works without the token (here: no such venue).
    status, doc = await web_call(desk, "GET", "/web/api/venues/V0000/poster.pdf")
    assert (status, doc["error"]) == (404, "not_found")


async def test_a_page_keeps_its_cookie_and_a_new_visitor_gets_a_new_one(
    make_desk: DeskFactory, keyring: Keyring
) -> None:
    desk = await web_desk(make_desk, keyring)
    first = await desk.client.get("/khai-bao")
    cookie = first.cookies["sg_csrf"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    again = await desk.client.get("/dang-ky-diem")
    assert "sg_csrf" not in again.cookies  # the browser's cookie is kept, not replaced
    assert (await page_token(desk)) == (await page_token(desk, "/quay"))


# -- acting as the web app -------------------------------------------------------------------


async def test_a_declaration_through_the_pages_is_the_web_apps(
    make_desk: DeskFactory, keyring: Keyring
) -> None:
    desk = await web_desk(make_desk, keyring)
    token = await page_token(desk)
    session = await web_session(desk, token)
    status, made = await web_call(
        desk, "POST", "/web/api/declarations", declaration(), token, **{"X-Session": session}
    )
    assert status == 201, made
    assert made["code"].startswith("WEB:")
    assert code_id(keyring, made["code"], "person") == made["person_id"]
    # The API's validation, word for word.
    status, doc = await web_call(
        desk,
        "POST",
        "/web/api/declarations",
        declaration(birth_year=1800),
        token,
        **{"X-Session": session},
    )
    assert (status, doc["error"], doc["field"]) == (400, "invalid_field", "birth_year")
    response = await desk.client.get(
        f"/web/api/people/{made['person_id']}/code.png", headers={"X-Session": session}
    )
    assert response.status == 200 and response.content_type == "image/png"
    assert response.headers["Cache-Control"] == "no-store"


async def test_a_session_of_another_app_does_not_work_on_the_pages(
    make_desk: DeskFactory, keyring: Keyring
) -> None:
    desk = await web_desk(make_desk, keyring)
    vhd_session = await desk.session()  # verified through the vhd app
    token = await page_token(desk)
    status, doc = await web_call(
        desk, "POST", "/web/api/declarations", declaration(), token, **{"X-Session": vhd_session}
    )
    assert (status, doc["error"]) == (401, "unauthorized")


async def test_the_pages_are_off_without_a_web_app(
    make_desk: DeskFactory, keyring: Keyring
) -> None:
    desk: Desk = await make_desk()  # SCANGATE_WEB_APP unset
    response = await desk.client.get("/khai-bao?lang=en")
    html = await response.text()
    assert response.status == 200
    assert '<p class="notice error" role="alert">This page is not switched on here' in html
    assert 'id="otp-phone"' not in html
    token = await page_token(desk)
    status, doc = await web_call(desk, "POST", "/web/api/otp", {"phone": PHONE}, token)
    assert (status, doc["error"]) == (503, "web_app_unset")
    # The door and trace pages do not act as the web app: they still work.
    assert 'class="notice error"' not in await (await desk.client.get("/quay")).text()

    ghost: Desk = await make_desk(web_app="ghost")
    html = await (await ghost.client.get("/dang-ky-diem")).text()
    assert "Ứng dụng trong SCANGATE_WEB_APP không có trên máy chủ" in html


def test_the_otp_address_limit_counts_an_ipv6_client_by_its_64() -> None:
    assert address_bucket("2001:db8:1:2::1") == address_bucket("2001:db8:1:2:ffff::9")
    assert address_bucket("2001:db8:1:2::1") != address_bucket("2001:db8:1:3::1")
    assert address_bucket("::ffff:192.0.2.7") == address_bucket("192.0.2.7") == "192.0.2.7"
    assert address_bucket(None) == ""


def test_the_web_app_setting_is_an_app_id() -> None:
    assert Settings.from_env({"SCANGATE_WEB_APP": "web"}).web_app == "web"
    with pytest.raises(SettingsError, match="SCANGATE_WEB_APP"):
        Settings.from_env({"SCANGATE_WEB_APP": "Web App"})


# -- venues through the pages -----------------------------------------------------------------


async def test_a_venue_registered_on_the_pages_is_its_verified_phones(
    make_desk: DeskFactory, keyring: Keyring
) -> None:
    desk = await web_desk(make_desk, keyring)
    token = await page_token(desk, "/dang-ky-diem")
    session = await web_session(desk, token)
    venue = {
        "name": "Tiệm bánh mì Hoà Mã",
        "phone": OTHER,
        "address": "53 Cao Thắng",
        "province": "Hồ Chí Minh",
        "kind": "shop",
    }
    as_session = {"X-Session": session}
    status, doc = await web_call(desk, "POST", "/web/api/venues", venue, token, **as_session)
    assert (status, doc["error"]) == (403, "forbidden")
    status, made = await web_call(
        desk, "POST", "/web/api/venues", {**venue, "phone": "+84 912 345 678"}, token, **as_session
    )
    assert status == 201, made
    venue_id = made["venue_id"]

    # No door-staff tokens from the pages: a verified SIM is not enough for those.
    path = f"/web/api/venues/{venue_id}/staff-tokens"
    status, doc = await web_call(desk, "POST", path, {}, token, **as_session)
    assert (status, doc["error"]) == (404, "not_found")
    # The operator (or the web app's own back office) makes them with the app token.
    status, staff, _ = await desk.call("POST", f"/v1/venues/{venue_id}/staff-tokens", app="web")
    assert status == 201 and staff["token"].startswith("sgs_")

    # The door desk learns its venue and a code for it from the staff token.
    status, door, _ = await desk.call(
        "GET", "/v1/staff/venue", headers={"Authorization": f"Bearer {staff['token']}"}
    )
    assert status == 200, door
    assert (door["venue_id"], door["name"], door["kind"]) == (
        venue_id,
        "Tiệm bánh mì Hoà Mã",
        "shop",
    )
    assert code_id(keyring, door["venue_code"], "venue") == venue_id
    status, doc, _ = await desk.call(
        "GET", "/v1/staff/venue", headers={"Authorization": f"Bearer {desk.tokens['vhd']}"}
    )
    assert (status, doc["error"]) == (401, "unauthorized")

    # Its poster is public (it hangs at the door); another app's venue is not found.
    poster = await desk.client.get(f"/web/api/venues/{venue_id}/poster.pdf")
    assert poster.status == 200 and (await poster.read()).startswith(b"%PDF")
    vhd_venue = await desk.venue()
    poster = await desk.client.get(f"/web/api/venues/{vhd_venue['venue_id']}/poster.pdf")
    assert poster.status == 404


async def test_a_trace_can_be_had_as_csv(make_desk: DeskFactory, keyring: Keyring) -> None:
    desk = await web_desk(make_desk, keyring)
    storage = desk.storage
    admin = await storage.add_admin("so-y-te")
    auth = {"Authorization": f"Bearer {admin}"}
    response = await desk.client.get("/v1/trace/NOBODY?format=csv", headers=auth)
    assert response.status == 404  # nothing stored of NOBODY: never an empty table
    assert (await response.json())["error"] == "unknown_person"
    await storage.store_batch(
        [ScanEvent("vhd", "E1", "checkin", "MARKET", "SOMEBODY", 1, 1, None)], PairingRules()
    )
    response = await desk.client.get("/v1/trace/SOMEBODY?format=csv", headers=auth)
    assert response.status == 200 and response.content_type == "text/csv"
    assert (await response.text()).startswith("person_id,venue_id")
    status, doc, _ = await desk.call("GET", "/v1/trace/NOBODY?format=xml", headers=auth)
    assert (status, doc["error"]) == (400, "invalid_request")


# -- pages and messages ------------------------------------------------------------------------


def test_both_languages_have_every_message_the_pages_use() -> None:
    site = Site.load()
    vi, en = site.catalogues["vi"], site.catalogues["en"]
    assert set(vi) == set(en)
    assert all(text.strip() for text in [*vi.values(), *en.values()])
    used: set[str] = set()
    for template in (HERE / "templates").glob("*.html"):
        used |= set(re.findall(r"""t\(["']([\w.]+)["']\)""", template.read_text()))
    for script in (HERE / "static" / "js").glob("*.js"):
        used |= set(re.findall(r"""\bt\(\s*["']([\w.]+)["']""", script.read_text()))
    used |= {f"{page}.title" for page in PAGES.values()}
    # Built from a value at run time: every rejection reason and every error code.
    used |= {f"js.reason.{reason}" for reason in EVENT_REASONS}
    codes = {cls.code for cls in _subclasses(ApiError)} - {"conflict"}
    # (invalid_field, invalid_phone and otp_invalid have messages of their own: js.fix.*)
    special = ("invalid_field", "invalid_phone", "otp_invalid")
    used |= {f"js.err.{code}" for code in codes if code not in special}
    missing = sorted(used - set(vi))
    assert missing == [], missing


def _subclasses(cls: type) -> list[type[ApiError]]:
    found: list[type[ApiError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def test_the_web_routes_are_told_apart_from_the_api() -> None:
    for path in [*PAGES, "/sw.js", "/static/site.css", "/web/api/otp"]:
        assert is_web_route(path), path
    for path in ["/v1/scans", "/v1/staff/venue", "/metrics", "/openapi.json", "/healthz"]:
        assert not is_web_route(path), path


def test_every_file_a_page_loads_is_packaged() -> None:
    """What the templates link to exists, and pyproject ships its folder."""
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    for template in (HERE / "templates").glob("*.html"):
        for link in re.findall(r'(?:src|href)="(/static/[^"]+)"', template.read_text()):
            assert (HERE / link.removeprefix("/")).is_file(), link
    for pattern in ("templates/*.html", "static/*", "static/js/*", "locales/*.json"):
        assert pattern in pyproject
