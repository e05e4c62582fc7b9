"""Headers every answer of the application carries, whatever handler made it
(``on_response_prepare``). The protocol adds the first two to aiohttp's own error answers
too (``gateway.http.protocol``).

- ``Server`` names the software without its version, which only helps an attacker pick
  an exploit.
- ``X-Content-Type-Options: nosniff``: a browser takes each answer as the type it says.
- ``Cache-Control: no-store`` unless the handler chose otherwise. Most answers hold
  personal data or a secret (codes, sessions, traces, cases), and no cache between the
  caller and the gateway may keep them; the few public ones (static files) say so
  themselves.
- SVG is a document that can carry script: an SVG answer (a poster, a personal code)
  may load and run nothing, even when opened on its own.
- ``X-Request-Id``: the id the request is logged under (``gateway.logs``), its own when it
  sent a sane one; so a caller can quote it when reporting a problem.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway.logs import REQUEST_ID_HEADER, current_request_id

SERVER_NAME: Final = "scangate"
COMMON_HEADERS: Final = {"Server": SERVER_NAME, "X-Content-Type-Options": "nosniff"}
SVG_POLICY: Final = "default-src 'none'; style-src 'unsafe-inline'; sandbox"


async def answer_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The application's ``on_response_prepare`` receiver: every routed answer."""
    stamp_answer(response, current_request_id())  # bound by the application's middleware


def stamp_answer(response: web.StreamResponse, request_id: str | None) -> None:
    """The headers above, on one answer (the front door's scans set them themselves)."""
    headers = response.headers
    headers.update(COMMON_HEADERS)
    headers.setdefault("Cache-Control", "no-store")
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    if response.content_type == "image/svg+xml":
        headers["Content-Security-Policy"] = SVG_POLICY
