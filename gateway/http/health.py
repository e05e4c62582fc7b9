"""What operators and orchestrators poll: ``/healthz`` (the process answers), ``/readyz``
(Redis and storage answer) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway.http.context import JSON
from gateway.http.errors import Unavailable
from gateway.http.keys import BUFFER, METRICS, SETTINGS, STORAGE
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


def metrics_app(gateway: web.Application) -> web.Application:
    """An application serving only ``/metrics`` of ``gateway``, for a listener of its own
    (``SCANGATE_METRICS_PORT``)."""

    async def get_gateway_metrics(request: web.Request) -> web.Response:
        body = gateway[METRICS].exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", get_gateway_metrics, name="metrics")
    return app


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", get_healthz, name="healthz")
    app.router.add_get("/readyz", get_readyz, name="readyz")
    if not app[SETTINGS].metrics_port:  # else on its own listener (metrics_app)
        app.router.add_get("/metrics", get_metrics, name="metrics")
