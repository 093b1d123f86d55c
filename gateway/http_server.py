"""The public listener: one `asyncio.Protocol` per client connection, httptools for framing, strict HTTP/1.1.

It faces clients, so it refuses anything a proxy behind it could read differently (request smuggling):
Content-Length together with Transfer-Encoding, duplicate or invalid Content-Length, a Transfer-Encoding
other than `chunked`, obs-fold, bare CR/LF. Heads and bodies have size limits, slow heads and idle
keep-alive connections time out, pipelined requests are answered strictly in order. Framing errors are
answered (OpenAI error JSON, `Connection: close`) and the connection is closed; nothing a client sends
can produce a 5xx or leave a connection hanging.

The handler sees complete requests (`Request`, body already read) one at a time per connection and ends
each with `ClientConnection.finish()`. Timeouts are checked by one sweep over all connections a few times a
second, so the per-request path never touches a timer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import httptools
import orjson

from gateway.config import LimitsConfig, TimeoutConfig

if TYPE_CHECKING:
    from gateway.proxy import Gateway

log = logging.getLogger(__name__)
_monotonic: Final = time.monotonic

STATUS_REASONS: Final = {
    100: "Continue",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_STATUS_LINES: Final[dict[int, bytes]] = {
    code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in STATUS_REASONS.items()
}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {STATUS_REASONS.get(status, 'Unknown')}\r\n".encode()
        _STATUS_LINES[status] = line
    return line


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's error shape."""
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


# Request headers the gateway consumes (hop-by-hop, framing) instead of forwarding upstream.
_H_HOST: Final = 1
_H_CONTENT_LENGTH: Final = 2
_H_TRANSFER_ENCODING: Final = 3
_H_CONNECTION: Final = 4
_H_EXPECT: Final = 5
_H_DROP: Final = 6
_H_REQUEST_ID: Final = 7
_H_STRATEGY: Final = 8
_H_PROFILE: Final = 9
_H_SESSION: Final = 10
_SPECIAL_HEADERS: Final[dict[bytes, int]] = {
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"expect": _H_EXPECT,
    b"keep-alive": _H_DROP,
    b"proxy-connection": _H_DROP,
    b"proxy-authorization": _H_DROP,
    b"te": _H_DROP,
    b"trailer": _H_DROP,
    b"upgrade": _H_DROP,
    b"http2-settings": _H_DROP,
    b"x-request-id": _H_REQUEST_ID,
    b"routing-strategy": _H_STRATEGY,
    b"config-profile": _H_PROFILE,
    b"x-session-id": _H_SESSION,
}
_HEADER_KINDS: Final[dict[bytes, int]] = {
    **_SPECIAL_HEADERS,
    **{name.title(): kind for name, kind in _SPECIAL_HEADERS.items()},
}
"""Header name as received -> kind (0: forwarded as is). Most names arrive in one of a few spellings, so
the lookup usually needs no lowercasing; names seen are added, up to `_HEADER_KINDS_MAX`."""
_HEADER_KINDS_MAX: Final = 512
_SPECIAL_LENGTHS: Final = sum(1 << n for n in {len(name) for name in _SPECIAL_HEADERS})
"""Bit n is set if some special header name is n bytes long."""
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_PIPELINED: Final = 16
"""Complete requests queued behind the one in progress before the connection stops reading."""
_MAX_REQUEST_ID: Final = 200


class Route:
    """A path the server answers; anything else is a 404 decided from the head alone."""

    __slots__ = ("allow", "kind", "methods")

    def __init__(self, kind: str, methods: tuple[bytes, ...]) -> None:
        self.kind = kind
        self.methods = methods
        self.allow = ", ".join(m.decode() for m in methods).encode()


class Request:
    """One complete client request. `forward` holds the header lines to pass upstream, already filtered."""

    __slots__ = (
        "body",
        "close",
        "error",
        "forward",
        "http11",
        "keep_alive",
        "method",
        "profile",
        "request_id",
        "route",
        "session_id",
        "strategy",
        "url",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.http11 = True
        self.keep_alive = True
        self.route: Route | None = None
        self.forward: list[bytes] = []
        self.body = b""
        self.request_id: bytes | None = None
        self.strategy: str | None = None
        self.profile: str | None = None
        self.session_id: str | None = None
        self.error: tuple[int, bytes, bytes] | None = None
        """(status, extra header lines, body): answer this instead of handling the request."""
        self.close = False
        """Close the connection after answering (framing can no longer be trusted)."""


class Active(Protocol):
    """The request a connection is busy with, as far as the connection needs to tell it things."""

    def client_gone(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the reason is on the connection."""


# Parser states.
_BETWEEN: Final = 0
_HEAD: Final = 1
_BODY: Final = 2


class ClientConnection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order."""

    __slots__ = (
        "active",
        "body_parts",
        "body_size",
        "busy",
        "cl",
        "closed",
        "closing",
        "conn_tokens",
        "dead",
        "deadline",
        "eof",
        "expect",
        "feed",
        "head_bytes",
        "head_raw",
        "hosts",
        "n_headers",
        "parser",
        "paused_reading",
        "paused_writing",
        "pending_continue",
        "pstate",
        "queue",
        "req",
        "server",
        "transport",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.feed: Callable[[bytes], None] = self.parser.feed_data
        """Bound once: calling it skips a method lookup per read."""
        self.queue: deque[Request] = deque()
        self.busy = False
        self.active: Active | None = None
        """Set by the handler while a request is in progress, so a disconnect can abort it."""
        self.closed = False
        self.closing = False
        self.eof = False
        self.dead = False
        self.paused_reading = False
        self.paused_writing = False
        """The client's socket buffer is full: a new upstream relay starts paused too."""
        self.pending_continue = False
        self.pstate = _BETWEEN
        self.deadline = _monotonic() + server.timeouts.client_header_s
        self.head_raw = 0
        self._reset_message()

    def _reset_message(self) -> None:
        self.req = Request()
        self.n_headers = 0
        self.head_bytes = 0
        self.hosts = 0
        self.cl: int | None = None
        self.expect = False
        self.conn_tokens: list[bytes] | None = None
        self.body_parts: list[bytes] = []
        self.body_size = 0

    # -- transport events ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.server.connections.add(self)
        if self.server.closing:
            self.closing = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.queue.clear()
        active = self.active
        if active is not None:
            self.active = None
            active.client_gone()

    def eof_received(self) -> bool:
        """The client stopped sending. A request in progress is abandoned (the engine should stop
        generating for nobody); queued complete requests are dropped with it."""
        self.eof = True
        if self.active is not None or not self.busy:
            self._close()
        return True

    def pause_writing(self) -> None:
        self.paused_writing = True
        if self.active is not None:
            self.active.pause()

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.active is not None:
            self.active.resume()

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        pstate = self.pstate
        if pstate != _BODY:
            self.head_raw += len(data)
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: the request was queued; nothing after it is HTTP/1.1 we can frame.
            self._stop_parsing()
            if self.queue:
                self.queue[-1].close = True
            else:
                self._fatal(400, "protocol upgrades are not supported")
        except (httptools.HttpParserCallbackError, _Reject):
            if not self.dead:
                self._fatal(400, "bad request")
        except httptools.HttpParserError as exc:
            if not self.dead:
                self._fatal(400, f"malformed HTTP request: {_parser_reason(exc)}")
        else:
            if self.pstate == _HEAD and self.head_raw > self.server.max_head_raw:
                self._fatal(431, "request head too large")
        if self.busy:
            return
        if self.queue:
            self._next()
        elif self.pstate != pstate:
            # A head began, or a head ended, in this read and its message is not complete: the head's or
            # the body's timeout starts now. (A request read whole, the usual case, reads no clock here.)
            timeouts = self.server.timeouts
            wait = timeouts.client_header_s if self.pstate == _HEAD else timeouts.client_body_s
            self.deadline = _monotonic() + wait

    # -- parser callbacks -------------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        """The first callback of each message (there is no `on_message_begin`: one call fewer per request)."""
        req = self.req
        if self.pstate == _BETWEEN:
            self.pstate = _HEAD
            req.url = url
        else:
            req.url = req.url + url
        if len(req.url) > self.server.limits.max_header_bytes:
            self._fatal(414, "request URL too long")
            raise _Reject

    def on_header(self, name: bytes, value: bytes) -> None:
        n = self.n_headers = self.n_headers + 1
        size = self.head_bytes = self.head_bytes + len(name) + len(value)
        server = self.server
        if n > server.max_headers or size > server.max_header_bytes:
            self._header_limit()
        if self.pstate == _BODY:
            return  # chunked trailer: counted, not forwarded
        if not (_SPECIAL_LENGTHS >> len(name)) & 1:  # no special name is this long: no hashing
            self.req.forward.append(b"%s: %s\r\n" % (name, value))
            return
        kind = _HEADER_KINDS.get(name)
        if kind is None:
            kind = _SPECIAL_HEADERS.get(name.lower(), 0)
            if len(_HEADER_KINDS) < _HEADER_KINDS_MAX:
                _HEADER_KINDS[name] = kind
        if not kind:
            self.req.forward.append(b"%s: %s\r\n" % (name, value))
            return
        req = self.req
        if kind == _H_CONTENT_LENGTH:
            value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace; it is not part of the value
            if self.cl is not None or not value.isdigit():
                self._fatal(400, "invalid or duplicate Content-Length")
                raise _Reject
            self.cl = int(value)
        elif kind == _H_TRANSFER_ENCODING:
            if value.strip(b" \t").lower() != b"chunked":
                self._fatal(400, "only Transfer-Encoding: chunked is accepted")
                raise _Reject
        elif kind == _H_HOST:
            self.hosts += 1
        elif kind == _H_CONNECTION:
            tokens = [t.strip(b" \t") for t in value.lower().split(b",")]
            if self.conn_tokens is None:
                self.conn_tokens = tokens
            else:
                self.conn_tokens.extend(tokens)
        elif kind == _H_EXPECT:
            if value.strip(b" \t").lower() != b"100-continue":
                self._fatal(417, f"unsupported expectation {value.decode('latin-1')!r}")
                raise _Reject
            self.expect = True
        elif kind == _H_REQUEST_ID:
            value = value.rstrip(b" \t")
            if 0 < len(value) <= _MAX_REQUEST_ID:
                req.request_id = value
        elif kind != _H_DROP:  # routing headers: read, and passed on
            req.forward.append(b"%s: %s\r\n" % (name, value))
            text = value.rstrip(b" \t").decode("latin-1")
            if kind == _H_STRATEGY:
                req.strategy = text
            elif kind == _H_PROFILE:
                req.profile = text
            elif kind == _H_SESSION:
                req.session_id = text

    def _header_limit(self) -> None:
        limits = self.server.limits
        if self.n_headers > limits.max_headers:
            self._fatal(431, f"too many header fields (limit {limits.max_headers})")
        else:
            self._fatal(431, f"request header fields too large (limit {limits.max_header_bytes} bytes)")
        raise _Reject

    def on_headers_complete(self) -> None:
        server = self.server
        parser = self.parser
        req = self.req
        self.pstate = _BODY
        self.head_raw = 0
        keep_alive = parser.should_keep_alive()
        if not keep_alive or self.conn_tokens is not None:
            # Without a Connection header only HTTP/1.1 is keep-alive (llhttp accepts no other 1.x), so
            # the version string, which httptools formats on each call, is read only when it can differ.
            version = parser.get_http_version()
            if version != "1.1":
                if version == "1.0":
                    req.http11 = False
                elif version.startswith(("2.", "3.")):
                    self._fatal(505, f"HTTP/{version} is not supported; use HTTP/1.1")
                    raise _Reject
                else:
                    self._fatal(400, "malformed request line")
                    raise _Reject
        req.method = parser.get_method()
        req.keep_alive = keep_alive
        url = req.url
        if not url.startswith(b"/"):
            self._fatal(400, "request target must be an absolute path")
            raise _Reject
        if req.http11 and self.hosts != 1:
            self._fatal(400, "HTTP/1.1 requests need exactly one Host header")
            raise _Reject
        if self.hosts > 1:
            self._fatal(400, "more than one Host header")
            raise _Reject
        tokens = self.conn_tokens
        if tokens is not None:
            if b"close" in tokens:
                req.keep_alive = False
            extra = [t for t in tokens if t not in _CONNECTION_KEYWORDS]
            if extra:
                req.forward = [line for line in req.forward if line.split(b":", 1)[0].lower() not in extra]
        path = url[: url.find(b"?")] if b"?" in url else url  # `in` is a cheap call, `find` is not
        route = server.routes.get(path)
        if route is None:
            req.error = (404, b"", error_body(f"Invalid URL ({_method_path(req)})", "invalid_request_error"))
        elif req.method not in route.methods:
            req.error = (
                405,
                b"allow: " + route.allow + b"\r\n",
                error_body(f"Method not allowed ({_method_path(req)})", "invalid_request_error"),
            )
        else:
            req.route = route
        limit = server.limits.max_body_bytes
        if self.cl is not None and self.cl > limit:
            self._fatal(413, f"request body too large (limit {limit} bytes)", "request_too_large")
            raise _Reject
        if self.expect:
            if req.error is not None:
                # Answer now instead of inviting a body we would throw away; the body may still come.
                req.close = True
                self._queue(req)
                self._stop_parsing()
                raise _Reject
            if self.busy or self.queue:
                self.pending_continue = True
            else:
                self._write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        limit = self.server.limits.max_body_bytes
        if self.body_size > limit:
            self._fatal(413, f"request body too large (limit {limit} bytes)", "request_too_large")
            raise _Reject
        if self.req.error is None:
            self.body_parts.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        parts = self.body_parts
        if parts:
            req.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pstate = _BETWEEN
        self.pending_continue = False
        self._queue(req)
        self._reset_message()

    # -- answering ------------------------------------------------------------------------------

    def _queue(self, req: Request) -> None:
        self.queue.append(req)
        if len(self.queue) >= _MAX_PIPELINED and not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()

    def _next(self) -> None:
        """Start the next queued request (the previous one is finished)."""
        while self.queue and not self.busy and not self.closed:
            req = self.queue.popleft()
            if self.paused_reading and len(self.queue) < _MAX_PIPELINED // 2 and not self.dead:
                self.paused_reading = False
                assert self.transport is not None
                self.transport.resume_reading()
            self.busy = True
            self.deadline = _NEVER
            if req.error is not None:
                status, headers, body = req.error
                self.respond(status, body, req, headers, close=req.close)
            else:
                try:
                    self.server.handler.handle(self, req)
                except Exception:
                    log.exception("handler failed on %s", _method_path(req))
                    if self.busy and self.active is None:
                        self.respond(500, error_body("internal error", "server_error"), req, close=True)

    def respond(
        self,
        status: int,
        body: bytes,
        req: Request,
        headers: bytes = b"",
        *,
        close: bool = False,
        content_type: bytes = b"application/json",
    ) -> None:
        """A complete response produced by the gateway itself, then `finish`."""
        close = close or not req.keep_alive or self.closing or self.eof
        head = b"%scontent-type: %s\r\ncontent-length: %d\r\n%s%s\r\n" % (
            status_line(status),
            content_type,
            len(body),
            headers,
            _connection_header(req.http11, close),
        )
        self._write(head + body if req.method != b"HEAD" else head)
        self.finish(close)

    def finish(self, close: bool, now: float = 0.0) -> None:
        """The current response is complete: close, or go on with the next request. `now`: the
        monotonic clock if the caller just read it (timeouts restart from it)."""
        self.busy = False
        self.active = None
        if self.closed:
            return
        if close or self.closing or self.eof:
            self._close()
            return
        if self.pending_continue and not self.queue:
            self.pending_continue = False
            self._write(_CONTINUE)
        if self.queue:
            self._next()
            return
        clock = now or _monotonic()
        timeouts = self.server.timeouts
        pstate = self.pstate
        if pstate == _BETWEEN:
            self.deadline = clock + timeouts.client_idle_s
        elif pstate == _HEAD:
            self.deadline = clock + timeouts.client_header_s
        else:
            self.deadline = clock + timeouts.client_body_s

    def _fatal(self, status: int, message: str, code: str | None = None) -> None:
        """The byte stream can no longer be framed: answer in turn, then close."""
        if self.dead:
            return
        req = Request()
        req.http11 = self.req.http11
        req.error = (status, b"", error_body(message, "invalid_request_error", code))
        req.close = True
        self._queue(req)
        self._stop_parsing()

    def _stop_parsing(self) -> None:
        self.dead = True
        self.pending_continue = False
        if self.transport is not None and not self.paused_reading:
            self.paused_reading = True
            self.transport.pause_reading()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.server.connections.discard(self)
            self.queue.clear()
            active = self.active
            if active is not None:
                self.active = None
                active.client_gone()

    def on_timeout(self) -> None:
        """Called by the sweep when `deadline` passed while the connection was not busy."""
        if self.pstate == _BETWEEN and not self.queue:
            self._close()  # idle keep-alive (or a connection that never sent a byte)
            return
        self.dead = True
        req = Request()
        req.http11 = self.req.http11
        self.busy = True
        self.respond(408, error_body("request not received in time", "invalid_request_error", "timeout"), req)
        self._close()

    def close_if_idle(self) -> None:
        """Shutdown: close now if nothing is in progress, else after the current response."""
        self.closing = True
        if not self.busy:
            self._close()


_NEVER: Final = float("inf")
_CONNECTION_KEYWORDS: Final = frozenset((b"close", b"keep-alive", b"upgrade", b""))


def _connection_header(http11: bool, close: bool) -> bytes:
    if close:
        return b"connection: close\r\n"
    return b"" if http11 else b"connection: keep-alive\r\n"


def _method_path(req: Request) -> str:
    return f"{req.method.decode('latin-1')} {req.url[:200].decode('latin-1')}"


def _parser_reason(exc: Exception) -> str:
    text = str(exc)
    return text[:120] if text else type(exc).__name__


class HttpServer:
    """The listening socket(s), the set of open connections, and the timeout sweep."""

    def __init__(self, handler: Gateway, limits: LimitsConfig, timeouts: TimeoutConfig) -> None:
        """`handler.handle(conn, req)` answers each request now or later, ending with `conn.finish()`. It
        is typed as the gateway's class, not a protocol, so the compiled call is direct."""
        self.handler = handler
        self.routes = handler.routes
        self.limits = limits
        self.max_headers = limits.max_headers
        self.max_header_bytes = limits.max_header_bytes
        self.timeouts = timeouts
        self.max_head_raw = 2 * limits.max_header_bytes + 8 * limits.max_headers + 64
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.sweep_interval = max(
            0.05,
            min(0.5, timeouts.client_header_s / 4, timeouts.client_idle_s / 4, timeouts.client_body_s / 4),
        )

    def _protocol(self) -> ClientConnection:
        return ClientConnection(self)

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 2048) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = await loop.create_server(self._protocol, sock=sock, backlog=backlog)
        self._schedule_sweep(loop)

    @property
    def port(self) -> int:
        server: Any = self._server  # uvloop's `sockets` is a list, not the tuple the stubs say
        return int(server.sockets[0].getsockname()[1])

    def _schedule_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = loop.call_later(self.sweep_interval, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = _monotonic()
        try:
            expired = [c for c in self.connections if c.deadline <= now and not c.busy]
            for conn in expired:
                conn.on_timeout()
        finally:
            self._schedule_sweep(loop)

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections finish what they are doing, idle ones close."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()

    def busy_connections(self) -> int:
        return sum(1 for c in self.connections if c.busy)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn._close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
