"""Raw-socket HTTP/1.x client for conformance tests: sends exact bytes, parses whatever comes back."""

from __future__ import annotations

import socket
import time

import httptools


class RawResponse:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""


class _Collector:
    def __init__(self) -> None:
        self.responses: list[RawResponse] = []
        self.current = RawResponse()
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        if self.parser is not None:
            self.current.status = self.parser.get_status_code()

    def on_message_begin(self) -> None:
        self.current = RawResponse()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.responses.append(self.current)


class RawConnection:
    """One TCP connection; `read_responses(n)` parses n complete responses (interim 1xx included)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.collector = _Collector()
        self.parser = httptools.HttpResponseParser(self.collector)
        self.collector.parser = self.parser
        self.closed_by_peer = False
        self.raw = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_responses(self, count: int, timeout: float = 5.0) -> list[RawResponse]:
        deadline = time.monotonic() + timeout
        while len(self.collector.responses) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"got {len(self.collector.responses)} of {count} responses: {self.raw!r}")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                self.closed_by_peer = True
                try:
                    self.parser.feed_data(b"")
                except httptools.HttpParserError:
                    pass
                break
            self.raw += data
            self.parser.feed_data(data)
        return self.collector.responses

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True when the peer closes within `timeout` (anything it still sends is collected)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                self.closed_by_peer = True
                return True
            if not data:
                self.closed_by_peer = True
                return True
            self.raw += data
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
