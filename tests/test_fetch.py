"""The poll client behind scraping: keep-alive reuse, stale sockets, bounded bodies, timeouts."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.fetch import Fetcher, FetchError


async def start(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_polls_reuse_one_connection_and_survive_a_server_side_close() -> None:
    peers: list[object] = []

    async def metrics(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        close = request.query.get("close") == "1"
        return web.Response(
            text="vllm:num_requests_running 3\n", headers={"Connection": "close"} if close else {}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await start(app)
    fetcher = Fetcher(max_bytes=1 << 20)
    try:
        assert server.port is not None
        for _ in range(3):
            status, body = await fetcher.get("127.0.0.1", server.port, "/metrics", 2.0)
            assert (status, body) == (200, b"vllm:num_requests_running 3\n")
        assert len(set(map(str, peers))) == 1, "keep-alive connection was not reused"
        await fetcher.get("127.0.0.1", server.port, "/metrics?close=1", 2.0)
        status, _ = await fetcher.get("127.0.0.1", server.port, "/metrics", 2.0)
        assert status == 200
        assert len(set(map(str, peers))) == 2
    finally:
        fetcher.close()
        await server.close()


async def test_an_idle_socket_the_server_closed_is_replaced_by_a_fresh_one() -> None:
    """A keep-alive socket the server dropped between polls is not an error of the replica."""
    app = web.Application()

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/health", health)
    server = await start(app)
    fetcher = Fetcher(max_bytes=1024)
    try:
        assert server.port is not None
        assert (await fetcher.get("127.0.0.1", server.port, "/health", 2.0))[0] == 200
        ((idle,),) = fetcher._idle.values()
        assert idle.transport is not None
        # The server side goes away silently; the client only learns on its next write/read.
        await server.close()
        server = await start_on(app, server.port)
        assert (await fetcher.get("127.0.0.1", server.port, "/health", 2.0))[0] == 200
    finally:
        fetcher.close()
        await server.close()


async def start_on(app: web.Application, port: int) -> TestServer:
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    return server


async def test_a_body_over_the_limit_is_an_error_not_a_memory_spike() -> None:
    app = web.Application()

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)

    app.router.add_get("/metrics", big)
    server = await start(app)
    fetcher = Fetcher(max_bytes=4096)
    try:
        assert server.port is not None
        with pytest.raises(FetchError, match="4096"):
            await fetcher.get("127.0.0.1", server.port, "/metrics", 2.0)
        assert not any(fetcher._idle.values())
    finally:
        fetcher.close()
        await server.close()


async def test_a_hung_server_times_out_and_its_connection_is_dropped() -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/metrics", hang)
    server = await start(app)
    fetcher = Fetcher(max_bytes=4096)
    try:
        assert server.port is not None
        with pytest.raises(TimeoutError):
            await fetcher.get("127.0.0.1", server.port, "/metrics", 0.2)
        assert not any(fetcher._idle.values())
    finally:
        fetcher.close()
        await server.close()


async def test_connection_refused_is_an_oserror() -> None:
    fetcher = Fetcher(max_bytes=4096)
    with pytest.raises(OSError):
        await fetcher.get("127.0.0.1", 1, "/metrics", 2.0)
