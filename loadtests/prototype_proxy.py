"""The prototype peer of the proxy benchmark: asyncio.Protocol + uvloop + httptools, about 80 lines.

The ceiling for a Python proxy on this machine: each client connection gets its own keep-alive upstream
connection, the request is parsed by httptools and sent on with one write, and the answer is relayed
byte for byte while httptools finds its end. No routing, no slots, no limits, no metrics, no error
handling beyond closing both sides.

Usage: python loadtests/prototype_proxy.py --listen 127.0.0.1:8100 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
from urllib.parse import urlsplit

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.parser = httptools.HttpResponseParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream = None
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: Upstream | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        method = self.parser.get_method()
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        request = head % (method, self.url, self.host.encode(), len(body)) + body
        if self.upstream is not None:
            self.upstream.transport.write(request)
            return
        asyncio.get_running_loop().create_task(self.connect(request))

    async def connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, self.upstream = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        self.upstream.transport.write(request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8100", help="HOST:PORT to serve on")
    parser.add_argument("--upstream", required=True, help="base URL of the one engine to relay to")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    target = urlsplit(args.upstream)
    upstream_host, upstream_port = target.hostname or "127.0.0.1", target.port or 80

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Client(upstream_host, upstream_port), host, int(port))
        await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
