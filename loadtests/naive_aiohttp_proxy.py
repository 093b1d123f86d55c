"""The naive peer of the proxy benchmark: aiohttp server + aiohttp client + uvloop, about 60 lines.

What most people write first. It relays any request to one upstream with keep-alive and streams the
answer back chunk by chunk; no routing, no slots, no limits, no metrics. It shows what the framework
costs before any gateway logic is added.

Usage: python loadtests/naive_aiohttp_proxy.py --listen 127.0.0.1:8100 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset(
    ["connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade", "host"]
)


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def start(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=300)
        app["session"] = aiohttp.ClientSession(upstream, connector=connector, auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        session: aiohttp.ClientSession = request.app["session"]
        async with session.request(request.method, request.rel_url, data=body, headers=headers) as up:
            response = web.StreamResponse(status=up.status)
            for key, value in up.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers[key] = value
            try:
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:
                pass
            return response

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8100", help="HOST:PORT to serve on")
    parser.add_argument("--upstream", required=True, help="base URL of the one engine to relay to")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    uvloop.install()
    web.run_app(build_app(args.upstream), host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
