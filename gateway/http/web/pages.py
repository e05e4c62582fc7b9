"""The HTML pages: rendered on the server from templates (autoescaped), in Vietnamese
unless the visitor chose English, with the page's messages for its script embedded as
JSON. Nothing is built before ``scangate serve`` runs them: the scripts are plain
JavaScript modules under ``static/``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import jinja2
import orjson
from aiohttp import web
from markupsafe import Markup

from gateway.http.keys import KEYRING, PERSONAL, SETTINGS
from gateway.http.people import ANSWER_KEYS, GENDERS
from gateway.settings import Settings
from signing import Keyring
from storage.models import VENUE_KINDS

from .security import (
    PAGE_HEADERS,
    csrf_cookie,
    csrf_token,
    new_csrf_cookie,
    set_csrf_cookie,
)

Language = Literal["vi", "en"]
LANGUAGES: Final[tuple[Language, ...]] = ("vi", "en")
LANGUAGE_COOKIE: Final = "lang"
LANGUAGE_COOKIE_AGE_S: Final = 365 * 86400
HERE: Final = Path(__file__).parent

# Path -> the page's name (its template is <name>.html, its messages <name>.*).
PAGES: Final = {
    "/": "index",
    "/khai-bao": "declare",
    "/dang-ky-diem": "venue",
    "/quay": "door",
    "/truy-vet": "trace",
}
# The pages that act as the web app (SCANGATE_WEB_APP).
WEB_APP_PAGES: Final = frozenset({"declare", "venue"})
# What a relative declared for is to the declarer (sent as "on_behalf").
RELATIONSHIPS: Final = ("parent", "child", "spouse", "grandparent", "sibling", "other")
# Vietnam's 34 provinces and centrally run cities (since 1 July 2025). The API takes any
# province text; the pages offer these.
PROVINCES: Final = (
    "Hà Nội",
    "Hồ Chí Minh",
    "Hải Phòng",
    "Đà Nẵng",
    "Cần Thơ",
    "Huế",
    "An Giang",
    "Bắc Ninh",
    "Cà Mau",
    "Cao Bằng",
    "Đắk Lắk",
    "Điện Biên",
    "Đồng Nai",
    "Đồng Tháp",
    "Gia Lai",
    "Hà Tĩnh",
    "Hưng Yên",
    "Khánh Hòa",
    "Lai Châu",
    "Lâm Đồng",
    "Lạng Sơn",
    "Lào Cai",
    "Nghệ An",
    "Ninh Bình",
    "Phú Thọ",
    "Quảng Ngãi",
    "Quảng Ninh",
    "Quảng Trị",
    "Sơn La",
    "Tây Ninh",
    "Thái Nguyên",
    "Thanh Hóa",
    "Tuyên Quang",
    "Vĩnh Long",
)


@dataclass(frozen=True)
class Site:
    """The templates and the message catalogues, loaded once per application."""

    templates: jinja2.Environment
    catalogues: dict[Language, dict[str, str]]

    @classmethod
    def load(cls) -> Site:
        templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        catalogues: dict[Language, dict[str, str]] = {
            lang: orjson.loads((HERE / "locales" / f"{lang}.json").read_bytes())
            for lang in LANGUAGES
        }
        return cls(templates, catalogues)

    def script_messages(self, lang: Language) -> Markup:
        """The ``js.*`` messages as JSON that is safe inside a ``<script>`` element."""
        doc = {k: v for k, v in self.catalogues[lang].items() if k.startswith("js.")}
        text = orjson.dumps(doc).decode().replace("<", "\\u003c").replace(">", "\\u003e")
        return Markup(text)  # noqa: S704 - JSON with < and > escaped, inside a data script


SITE: Final = web.AppKey("site", Site)


def choose_language(request: web.Request) -> Language:
    """``?lang=`` when given, else the visitor's earlier choice, else Vietnamese."""
    for candidate in (request.query.get("lang"), request.cookies.get(LANGUAGE_COOKIE)):
        if candidate == "vi":
            return "vi"
        if candidate == "en":
            return "en"
    return "vi"


def web_app_problem(settings: Settings, keyring: Keyring) -> str | None:
    """Why the pages that act as the web app cannot work here (a message key), or None."""
    web_app = settings.web_app
    if web_app is None:
        return "web.unset"
    if web_app not in keyring.app_ids():
        return "web.unknown"
    return None


async def get_page(request: web.Request, name: str) -> web.Response:
    app = request.app
    settings, site = app[SETTINGS], app[SITE]
    lang = choose_language(request)
    catalogue = site.catalogues[lang]
    cookie = csrf_cookie(request)
    fresh_cookie = cookie is None
    if cookie is None:
        cookie = new_csrf_cookie()
    html = site.templates.get_template(f"{name}.html").render(
        page=name,
        lang=lang,
        other_lang="en" if lang == "vi" else "vi",
        t=catalogue.__getitem__,  # a missing message is an error, caught by the tests
        messages_json=site.script_messages(lang),
        csrf_token=csrf_token(app[PERSONAL].web_key, cookie),
        timezone=settings.timezone,
        web_problem=web_app_problem(settings, app[KEYRING]) if name in WEB_APP_PAGES else None,
        relationships=RELATIONSHIPS,
        genders=GENDERS,
        answer_keys=ANSWER_KEYS,
        venue_kinds=VENUE_KINDS,
        provinces=PROVINCES,
    )
    response = web.Response(
        text=html,
        content_type="text/html",
        charset="utf-8",
        # private: the page carries this visitor's CSRF token.
        headers={**PAGE_HEADERS, "Cache-Control": "private, no-cache"},
    )
    if fresh_cookie:
        set_csrf_cookie(response, request, cookie)
    if "lang" in request.query and request.query["lang"] == lang:
        response.set_cookie(
            LANGUAGE_COOKIE, lang, path="/", max_age=LANGUAGE_COOKIE_AGE_S, samesite="Lax"
        )
    return response


async def get_service_worker(request: web.Request) -> web.FileResponse:
    # At the site's root, so it may serve /khai-bao when offline.
    return web.FileResponse(
        HERE / "static" / "sw.js",
        headers={
            **PAGE_HEADERS,
            "Content-Type": "text/javascript; charset=utf-8",
            "Cache-Control": "no-cache",
        },
    )


async def _static_headers(request: web.Request, response: web.StreamResponse) -> None:
    # Files under /static: revalidated on every load (the service worker keeps copies
    # for offline use), never sniffed, never framed.
    if request.path.startswith("/static/"):
        response.headers.update(PAGE_HEADERS)
        response.headers["Cache-Control"] = "no-cache"


def add_routes(app: web.Application) -> None:
    app[SITE] = Site.load()
    for path, name in PAGES.items():
        app.router.add_get(path, functools.partial(get_page, name=name), name=f"page_{name}")
    app.router.add_get("/sw.js", get_service_worker, name="service_worker")
    app.router.add_static("/static", HERE / "static", name="static")
    app.on_response_prepare.append(_static_headers)
