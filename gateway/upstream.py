"""Upstream side of the hot path: a keep-alive pool of HTTP/1.1 connections per replica, and the relay.

An `UpstreamConnection` is a raw `asyncio.Protocol`. The request goes out in one `transport.write`; the
response is parsed by httptools for framing only. Its head is rewritten (hop-by-hop headers dropped, the
gateway's headers added) and the body bytes are relayed to the client as they arrive: a chunked upstream
body goes out verbatim to an HTTP/1.1 client, de-chunked to an HTTP/1.0 one. The client's write
buffer pausing pauses reading from the upstream, so a slow client never makes the gateway buffer.

What the response means (slots, retries, telemetry) is the business of the sink, the request's
`gateway.proxy.Exchange`: it is typed as that class, not as a protocol, so compiled code reads its fields
directly. What the connection uses of it: `client` (the client's transport), `request_id`,
`routing_headers` (extra response header lines), `client_http11`, `client_keep_alive`, `bytes_out`, and
the callbacks `on_head(status, sse, close_client)` (the head is about to go out), `on_complete(last_at,
n_chunks)` (all relayed; the connection is back in the pool or closed) and `on_failed(kind, before_head,
stale, clean_cut)`: `stale` means a reused keep-alive connection died before any byte came back (safe to
resend), `clean_cut` that the client body framing is at a chunk boundary (an error event can follow).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from gateway.http_server import status_line

if TYPE_CHECKING:
    from gateway.proxy import Exchange

_monotonic: Final = time.monotonic

# Response headers never relayed as they are: hop-by-hop ones, framing the gateway re-decides, and the
# request id the gateway owns.
_DROP: Final = 1
_TE: Final = 2
_CL: Final = 3
_CT: Final = 4
_RESPONSE_HEADERS: Final[dict[bytes, int]] = {
    b"connection": _DROP,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"proxy-authenticate": _DROP,
    b"trailer": _DROP,
    b"upgrade": _DROP,
    b"x-request-id": _DROP,
    b"transfer-encoding": _TE,
    b"content-length": _CL,
    b"content-type": _CT,
}
_HEADER_KINDS: Final[dict[bytes, int]] = {
    **_RESPONSE_HEADERS,
    **{name.title(): kind for name, kind in _RESPONSE_HEADERS.items()},
}
"""Header name as received -> kind (0: relayed as is): most names arrive in one of two spellings, so the
lookup usually needs no lowercasing. Names seen are added, up to `_HEADER_KINDS_MAX`."""
_HEADER_KINDS_MAX: Final = 512
_SPECIAL_LENGTHS: Final = sum(1 << n for n in {len(name) for name in _RESPONSE_HEADERS})
"""Bit n is set if some header name in `_RESPONSE_HEADERS` is n bytes long."""
_MAX_HEAD: Final = 64 * 1024
_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_MEMORYVIEW: Final = memoryview


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a replica, reused for consecutive requests."""

    __slots__ = (
        "body_parts",
        "chunked",
        "closed",
        "cut_guess",
        "cut_size",
        "cuts",
        "dechunk",
        "done",
        "feed",
        "framed",
        "got_bytes",
        "head_buf",
        "head_done",
        "head_lines",
        "head_min",
        "in_chunk",
        "keep_alive",
        "last_at",
        "n_chunks",
        "parser",
        "parser_keep",
        "paused",
        "pool",
        "raw",
        "relaying",
        "reused",
        "sink",
        "sse",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser_keep = httptools.HttpResponseParser(self)
        """The connection's parser. It has no `on_body` callback (the protocol has no such method), so a
        relayed body is never copied into a bytes object for it; `send` swaps in a de-chunking parser
        for the rare HTTP/1.0 client."""
        self.parser = self.parser_keep
        self.feed: Callable[[bytes], None] = self.parser_keep.feed_data
        """The current parser's `feed_data`, bound once: calling it skips a method lookup per read."""
        self.sink: Exchange | None = None
        self.closed = False
        self.reused = False
        self.paused = False
        self._reset()

    def _reset(self) -> None:
        self.head_done = False
        self.done = False
        self.keep_alive = False
        self.got_bytes = False
        self.head_buf = b""
        self.head_min = 0
        """A lower bound of the header lines' size (name, colon, value, CRLF of each), so the end of the
        head is searched for from there rather than from its start."""
        self.cuts: list[bytes] | None = None
        """Names (as received) of the header lines not relayed; the rest of the head goes out verbatim."""
        self.head_lines = 0
        self.cut_guess = 0
        self.cut_size = 0
        """Where the first cut line starts and how long it is, if every line before it and itself have the
        usual single space after the colon (checked before use)."""
        self.body_parts: list[bytes] = []
        self.chunked = False
        self.framed = False
        self.sse = False
        self.raw = True
        self.relaying = False
        self.dechunk = False
        self.in_chunk = False
        self.n_chunks = 0
        self.last_at = 0.0
        if self.parser is not self.parser_keep:
            self.parser = self.parser_keep
            self.feed = self.parser_keep.feed_data

    # -- driving ------------------------------------------------------------------------------

    def send(self, sink: Exchange, data: bytes) -> None:
        """Write one request (head and body together) and relay its response to `sink`."""
        self.sink = sink
        if not sink.client_http11:
            self.parser = httptools.HttpResponseParser(_Dechunker(self))
            self.feed = self.parser.feed_data
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection mid-request (client gone, timeout): the engine sees the close and aborts."""
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()

    # -- transport events -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        sink = self.sink
        if sink is None:
            self.pool.discard(self)
            return
        self.sink = None
        if self.head_done and not self.framed and not self.chunked:
            # Close-delimited body: the close is the end of the response.
            self.done = True
            self._finish(sink, keep_alive=False)
            return
        if not self.head_done:
            stale = self.reused and not self.got_bytes
            sink.on_failed("reset", before_head=True, stale=stale, clean_cut=True)
        else:
            sink.on_failed("midstream", before_head=False, stale=False, clean_cut=not self.in_chunk)

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Nobody asked: a server talking out of turn. The connection cannot be trusted.
            self.closed = True
            assert self.transport is not None
            self.transport.abort()
            return
        if self.head_done:
            self.last_at = _monotonic()
            self.n_chunks += 1
            if self.raw:
                sink.bytes_out += len(data)
                sink.client.write(data)
            try:
                self.feed(data)
            except httptools.HttpParserError:
                self._protocol_error(sink)
                return
            if self.done:
                self._finish(sink, self.keep_alive)
            return
        self.got_bytes = True
        buf = self.head_buf = self.head_buf + data if self.head_buf else data
        try:
            self.feed(data)
        except httptools.HttpParserError:
            self._protocol_error(sink)
            return
        if not self.head_done:
            if len(buf) > _MAX_HEAD:
                self._protocol_error(sink)
            return
        self.last_at = _monotonic()
        status = self.parser.get_status_code()
        if status < 200:
            self._protocol_error(sink)  # interim responses are never asked for (no Expect upstream)
            return
        raw = self.raw = sink.client_http11 or not self.chunked
        self.dechunk = not raw
        close_client = not sink.client_keep_alive or not raw or not (self.framed or self.chunked)
        if close_client:
            conn_line = b"connection: close\r\n"
        elif not sink.client_http11:
            conn_line = b"connection: keep-alive\r\n"
        else:
            conn_line = b""
        sink.on_head(status, self.sse, close_client)
        if self.sink is None:
            return
        line = status_line(status)
        n = len(line)
        first = n - 2 if buf[:n] == line else buf.find(b"\r\n")  # the usual status line: no search
        end = buf.find(b"\r\n\r\n", first + self.head_min)
        if end < 0:
            end = buf.find(b"\r\n\r\n")  # never: head_min is a lower bound
        cuts = self.cuts
        head = b"".join(
            (
                line,
                buf[first + 2 : end + 2] if cuts is None else self._kept_headers(buf, first, end, cuts),
                _CHUNKED if self.chunked and raw else b"",
                b"x-request-id: ",
                sink.request_id,
                b"\r\n",
                self.pool.replica_header,
                sink.routing_headers,
                conn_line,
                b"\r\n",
            )
        )
        self.relaying = True
        self.head_buf = b""
        size = len(buf) - end - 4
        if raw and size >= 4096:
            sink.bytes_out += size
            sink.client.writelines((head, _MEMORYVIEW(buf)[end + 4 :]))  # one writev, the body not copied
        else:
            if raw:
                body = buf[end + 4 :]
            else:
                body = b"".join(self.body_parts)
                self.body_parts = []
            size = len(body)
            sink.bytes_out += size
            sink.client.write(head + body if size else head)
        if size:
            self.n_chunks = 1
        if self.done:
            self._finish(sink, self.keep_alive)

    def _kept_headers(self, head: bytes, first: int, end: int, cuts: list[bytes]) -> bytes:
        """The response's header lines (each with its CRLF, as received) minus those named in `cuts`.

        `first` is where the CRLF ending the status line starts, `end` where the blank line's CRLFCRLF
        does. llhttp has already refused obs-fold, bare CR or LF, and whitespace before a colon, so every
        header line is exactly CRLF, name, colon, and no value holds a CR or LF: a cut name's first
        occurrence is the line to drop, and a CRLF found where a line would end with single spacing is
        that line's end.
        """
        if len(cuts) == 1:  # the usual case (`Connection: keep-alive`): two slices of the head, one join
            needle = _needle(cuts[0])
            i = first + self.cut_guess
            if head[i : i + len(needle)] != needle:
                i = head.find(needle, first, end)
                if i < 0:
                    return head[first + 2 : end + 2]
            j = i + self.cut_size
            if head[j : j + 2] != b"\r\n":
                j = head.find(b"\r\n", i + 2)  # at most `end`: the blank line's CRLF ends the last header
            return head[first + 2 : i + 2] + head[j + 2 : end + 2]
        block = head[first:end]
        for name in cuts:
            i = block.find(_needle(name))
            if i >= 0:
                j = block.find(b"\r\n", i + 2)
                block = block[:i] + block[j:] if j >= 0 else block[:i]
        return block[2:] + b"\r\n" if block else b""

    def _protocol_error(self, sink: Exchange) -> None:
        before = not self.head_done
        self.sink = None
        self.closed = True
        assert self.transport is not None
        self.transport.abort()
        sink.on_failed(
            "reset" if before else "midstream", before_head=before, stale=False, clean_cut=not self.in_chunk
        )

    def _finish(self, sink: Exchange, keep_alive: bool) -> None:
        self.sink = None
        last_at, n_chunks = self.last_at, self.n_chunks
        if keep_alive and not self.closed:
            if self.paused:
                self.resume()
            self._reset()
            self.reused = True
            self.pool.put(self)
        else:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        sink.on_complete(last_at, n_chunks)

    # -- parser callbacks (framing only) ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # trailers travel raw inside the chunked body
        head_min = self.head_min
        size = len(name) + len(value) + 3
        self.head_min = head_min + size
        self.head_lines += 1
        if not (_SPECIAL_LENGTHS >> len(name)) & 1:
            return  # no header the gateway reads or drops is this long: relayed, no hashing
        kind = _HEADER_KINDS.get(name)
        if kind is None:
            kind = _RESPONSE_HEADERS.get(name.lower(), 0)
            if len(_HEADER_KINDS) < _HEADER_KINDS_MAX:
                _HEADER_KINDS[name] = kind
        if not kind:
            return
        if kind == _CL:
            self.framed = True
        elif kind == _CT:
            if value[:17].lower() == b"text/event-stream":
                self.sse = True
        else:
            if kind == _TE:
                self.chunked = b"chunked" in value.lower()
            if self.cuts is None:
                self.cuts = [name]
                self.cut_guess = head_min + self.head_lines - 1
                self.cut_size = size + 1
            else:
                self.cuts.append(name)

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_chunk_header(self) -> None:
        self.in_chunk = True

    def on_chunk_complete(self) -> None:
        self.in_chunk = False

    def on_message_complete(self) -> None:
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful inside the callback


class _Dechunker:
    """The parser protocol of a response relayed to an HTTP/1.0 client: the connection's callbacks plus
    `on_body`, which writes a chunked body's data without its framing (or keeps what came with the head
    until the head is out)."""

    __slots__ = ("conn",)

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn

    def on_header(self, name: bytes, value: bytes) -> None:
        self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        self.conn.on_headers_complete()

    def on_chunk_header(self) -> None:
        self.conn.on_chunk_header()

    def on_chunk_complete(self) -> None:
        self.conn.on_chunk_complete()

    def on_body(self, body: bytes) -> None:
        conn = self.conn
        if conn.dechunk:
            sink = conn.sink
            if sink is not None:
                sink.bytes_out += len(body)
                sink.client.write(body)
        elif conn.chunked and not conn.relaying:
            conn.body_parts.append(body)  # arrived with the head: written after it

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


def _needle(name: bytes) -> bytes:
    needle = _NEEDLES.get(name)
    if needle is None:
        needle = b"\r\n%s:" % name
        if len(_NEEDLES) < 64:
            _NEEDLES[name] = needle
    return needle


_NEEDLES: Final[dict[bytes, bytes]] = {}
"""`CRLF name:` per header name seen in a cut (a handful in practice; bounded all the same)."""


class UpstreamPool:
    """Idle keep-alive connections to one replica (most recently used first), at most `max_idle`."""

    __slots__ = (
        "closed",
        "connect_timeout",
        "host",
        "host_header",
        "idle",
        "max_idle",
        "port",
        "replica_header",
        "ssl",
    )

    def __init__(
        self,
        host: str,
        port: int,
        replica_id: str,
        *,
        max_idle: int,
        connect_timeout: float,
        tls: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        """TLS to an `https://` replica, verified against the system's CA store."""
        self.max_idle = max(1, max_idle)
        self.connect_timeout = connect_timeout
        self.idle: list[UpstreamConnection] = []
        self.closed = False
        default_port = port == (443 if tls else 80)
        authority = host if default_port else f"{host}:{port}"
        if ":" in host and not default_port:
            authority = f"[{host}]:{port}"
        self.host_header = f"host: {authority}\r\n".encode()
        self.replica_header = f"x-gateway-replica: {replica_id}\r\n".encode()

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection; raises OSError or TimeoutError (after `connect_timeout`)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, protocol = await loop.create_connection(
                lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl
            )
        return protocol

    def put(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self.idle) >= self.max_idle:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
            return
        self.idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        """The replica left: close the idle connections; busy ones close when their response ends."""
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
