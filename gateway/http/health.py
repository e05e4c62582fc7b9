"""What operators and orchestrators poll: ``/healthz`` (the process answers), ``/readyz``
(Redis and storage answer) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway.http.context import JSON
from gateway.http.errors import Unavailable
from gateway.http.keys import BUFFER, METRICS, STORAGE
from gateway.metrics import CONTENT_TYPE

RETRY_AFTER_UNAVAILABLE_S: Final = 1


async def get_healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON)


async def get_readyz(request: web.Request) -> web.Response:
    app = request.app
    down = None
    if not await app[BUFFER].ping():
        down = "Redis"
    elif not await app[STORAGE].ping():
        down = "storage"
    app[METRICS].set_ready(down is None)
    if down is not None:
        raise Unavailable(f"{down} does not answer", retry_after_s=RETRY_AFTER_UNAVAILABLE_S)
    return web.Response(body=b'{"status":"ready","redis":"ok","storage":"ok"}', content_type=JSON)


async def get_metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", get_healthz, name="healthz")
    app.router.add_get("/readyz", get_readyz, name="readyz")
    app.router.add_get("/metrics", get_metrics, name="metrics")
