"""What keeps the web pages safe to serve: the headers every page gets (a content security
policy that allows only this origin's own scripts and styles) and the CSRF check of the
same-origin endpoints that act as the web app.

CSRF: those endpoints carry the web app's authority without any credential from the
browser, so a form on another site must not be able to call them (to send SMS to
strangers, say). Three checks, all needed to pass:

- ``Sec-Fetch-Site``, when the browser sends it, is ``same-origin``;
- ``Origin``, when sent, names this host;
- ``X-CSRF-Token`` is the HMAC of the page's ``sg_csrf`` cookie (HttpOnly, SameSite=Strict),
  compared in constant time (signed double-submit: a cookie planted by a sibling
  subdomain does not come with its token).

The endpoints also take only ``application/json``, which no cross-site form can send.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from gateway.http.errors import ApiError

CSRF_COOKIE: Final = "sg_csrf"
CSRF_HEADER: Final = "X-CSRF-Token"
MAX_COOKIE_CHARS: Final = 64

CONTENT_SECURITY_POLICY: Final = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # data: and blob: for the personal code kept in the browser and for downloads.
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "manifest-src 'self'",
        "worker-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


# The API's documentation (/docs, Swagger UI) has a policy of its own, for what that bundle
# needs: this origin's scripts, styles and calls (the document, and requests tried out);
# the data: images of its style sheet, and blob: for an image answer tried out. No service
# worker or manifest, unlike the pages.
DOCS_CONTENT_SECURITY_POLICY: Final = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
DOCS_HEADERS: Final = {**PAGE_HEADERS, "Content-Security-Policy": DOCS_CONTENT_SECURITY_POLICY}


class CsrfFailed(ApiError):
    status, code = 403, "csrf_failed"


def csrf_cookie(request: web.Request) -> str | None:
    """The request's CSRF cookie, when it has a well-formed one."""
    value = request.cookies.get(CSRF_COOKIE)
    if value is None or not 16 <= len(value) <= MAX_COOKIE_CHARS or not value.isascii():
        return None
    return value


def new_csrf_cookie() -> str:
    return secrets.token_urlsafe(32)


def set_csrf_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
    response.set_cookie(
        CSRF_COOKIE, value, path="/", httponly=True, samesite="Strict", secure=request.secure
    )


def csrf_token(key: bytes, cookie: str) -> str:
    """The token a page carries for its cookie."""
    return hmac.new(key, b"csrf\x00" + cookie.encode(), hashlib.sha256).hexdigest()


def check_same_origin(request: web.Request, key: bytes) -> None:
    """CsrfFailed unless the request comes from one of this site's pages."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        raise CsrfFailed("this request did not come from a page of this site")
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise CsrfFailed("this request did not come from a page of this site")
    cookie = csrf_cookie(request)
    sent = request.headers.get(CSRF_HEADER, "")
    if cookie is None or not hmac.compare_digest(sent.encode(), csrf_token(key, cookie).encode()):
        raise CsrfFailed("the page's form token is missing or stale: reload the page")
