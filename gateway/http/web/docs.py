"""``GET /docs``: the API's interactive documentation, Swagger UI on ``/openapi.json``.

Swagger UI's files are vendored from swagger-ui-dist 5.35.0 under ``static/`` (the bundle,
its style sheet, and their licenses: ``swagger-ui-LICENSE.txt``, ``swagger-ui-NOTICE.txt``,
``swagger-ui-bundle.js.LICENSE.txt``), so they ship in the wheel and nothing is loaded from
a CDN. The page is this origin's files only, under a policy of its own
(``security.DOCS_CONTENT_SECURITY_POLICY``): its script is ``static/js/docs.js``, never
inline. Upgrading Swagger UI is copying those files from a newer swagger-ui-dist.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from .pages import SITE
from .security import DOCS_HEADERS

DOCS_PATH: Final = "/docs"
DOCS_PAGE: Final = web.AppKey("docs_page", bytes)


async def get_docs(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[DOCS_PAGE],
        content_type="text/html",
        charset="utf-8",
        headers={**DOCS_HEADERS, "Cache-Control": "no-cache"},
    )


def add_routes(app: web.Application) -> None:
    """``GET /docs``, rendered once (after ``pages.add_routes``, which loads the templates)."""
    app[DOCS_PAGE] = app[SITE].templates.get_template("docs.html").render().encode()
    app.router.add_get(DOCS_PATH, get_docs, name="docs")
