"""The framework's ceiling: bare aiohttp on uvloop answering 200 to POST /v1/scans.

    python benchmarks/reference_server.py --port 18181

It reads the body (as the gateway must) and answers a fixed JSON body of the gateway's
size for one accepted event, with the access log off, exactly as the gateway runs aiohttp.
Nothing else: no auth, no parsing, no Redis. The capacity run compares the gateway to it.
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web

BODY = (
    b'{"accepted":1,"duplicates":0,"rejected":0,'
    b'"results":[{"event_id":"W1-1-1","status":"accepted"}]}'
)


async def post_scans(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18181)
    args = parser.parse_args()
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/v1/scans", post_scans)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
