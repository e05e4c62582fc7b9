"""The web pages for citizens, venues, door staff and officials (``/``, ``/khai-bao``,
``/dang-ky-diem``, ``/quay``, ``/truy-vet``), their files and the same-origin endpoints
they call, and the API's interactive documentation (``/docs``). They are for people in
browsers: the machine API (``/v1``), and its OpenAPI document, is separate."""

from __future__ import annotations

from aiohttp import web

from . import docs, endpoints, pages


def add_routes(app: web.Application) -> None:
    pages.add_routes(app)
    endpoints.add_routes(app)
    docs.add_routes(app)


def is_web_route(path: str) -> bool:
    """Whether a route belongs to the web pages rather than to the machine API."""
    return (
        path in pages.PAGES
        or path in ("/sw.js", docs.DOCS_PATH)
        or path.startswith(("/static", "/web/api/"))
    )
