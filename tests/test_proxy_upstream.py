"""The upstream side against scripted engines that misbehave in exact ways (a raw socket server in the test):
bytes forwarded untouched, hop-by-hop headers dropped both ways, stale keep-alive connections, first-byte
and idle timeouts."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.procs import free_port, http_get
from tests.test_proxy import CHAT, admin_metrics, gateway, post, read_to_close, series

Script = Callable[[socket.socket, bytes, int], bool]
"""Answer one request (raw bytes, its number on the connection); False closes the connection."""


def read_request(sock: socket.socket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head_end = buf.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buf[:head_end]).split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buf) < head_end + length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    request = bytes(buf[: head_end + length])
    del buf[: head_end + length]
    return request


class FakeEngine:
    """A threaded TCP server running `script` for every request; remembers what it received."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        engine = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                engine.connections += 1
                buf = bytearray()
                n = 0
                with contextlib.suppress(OSError):
                    while True:
                        request = read_request(self.request, buf)
                        if request is None:
                            return
                        engine.requests.append(request)
                        n += 1
                        if not engine.script(self.request, request, n):
                            return

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


def raw_chat_request() -> bytes:
    """One keep-alive chat request (`CHAT`) as raw bytes, for tests that read the answer off the socket."""
    body = json.dumps(CHAT).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head + body


def health_ok(sock: socket.socket, request: bytes) -> bool:
    """Health checks and scrapes get a quick answer."""
    if request.startswith(b"GET "):
        sock.sendall(answer(b"{}"))
        return True
    return False


@contextlib.contextmanager
def engine(script: Script) -> Iterator[FakeEngine]:
    fake = FakeEngine(script)
    try:
        yield fake
    finally:
        fake.close()


def config_for(tmp: Path, replicas: list[tuple[str, str]], extra: str = "") -> tuple[Path, int, int]:
    port, admin_port = free_port(), free_port()
    lines = "\n".join(
        f'      - {{id: {rid}, url: "{url}", engine: openai, capacity: 4}}' for rid, url in replicas
    )
    path = tmp / "gateway.yaml"
    path.write_text(
        f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin_port}"}}
health: {{interval_s: 30}}
scrape: {{enabled: false}}
retry: {{backoff_base_s: 0.01}}
pools:
  - model: m
    replicas:
{lines}
{extra}
"""
    )
    return path, port, admin_port


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s


def test_body_bytes_and_headers_forwarded_exactly(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    def script(sock: socket.socket, request: bytes, n: int) -> bool:
        if health_ok(sock, request):
            return True
        sock.sendall(
            answer(
                b'{"ok": true}',
                b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
                b"X-Request-Id: engine-id\r\nX-Engine: yes\r\n",
            )
        )
        return True

    fake = stack.enter_context(engine(script))
    config, port, _ = config_for(tmp_path, [("e", fake.url)])
    gateway(stack, tmp_path, config, port)
    # Odd spacing, key order and unicode escapes must reach the engine byte for byte.
    body = b'{ "messages" :[{"role":"user","content":"h\\u00e9llo"}],  "model":"m" ,"max_tokens":3}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: public.example\r\nContent-Length: %d\r\n"
            b"Connection: keep-alive, X-Hop\r\nX-Hop: drop-me\r\nKeep-Alive: timeout=9\r\nTE: trailers\r\n"
            b"Authorization: Bearer sk-client\r\nX-Request-Id: rid-7\r\nX-Custom: kept\r\n\r\n%s"
            % (len(body), body)
        )
        head = b""
        while b'{"ok": true}' not in head:
            chunk = sock.recv(65536)
            assert chunk
            head += chunk
    upstream = next(r for r in fake.requests if r.startswith(b"POST"))
    up_head, _, up_body = upstream.partition(b"\r\n\r\n")
    assert up_body == body
    assert up_head.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
    lower = up_head.lower()
    assert b"authorization: bearer sk-client" in lower
    assert b"x-custom: kept" in lower
    assert b"x-request-id: rid-7" in lower
    assert f"host: 127.0.0.1:{fake.port}".encode() in lower
    for hop in (b"x-hop:", b"keep-alive:", b"te:", b"connection:"):
        assert hop not in lower, hop
    client_head = head.partition(b"\r\n\r\n")[0].lower()
    assert b"x-request-id: rid-7" in client_head and b"engine-id" not in client_head
    assert b"x-engine: yes" in client_head
    assert b"keep-alive:" not in client_head
    assert b"x-gateway-replica: e" in client_head


@pytest.mark.parametrize(
    ("before", "cut"),
    [
        (b"X-First: 1\r\n", b"cOnNeCtIoN:\t  keep-alive  \r\n"),  # odd spacing on the dropped line
        (b"X-First:1\r\nX-Wide:   w\r\n", b"Connection: keep-alive\r\n"),  # odd spacing before it
    ],
)
def test_response_head_is_relayed_verbatim_minus_one_hop_header(
    tmp_path: Path, stack: contextlib.ExitStack, before: bytes, cut: bytes
) -> None:
    """Odd spacing and spelling in the engine's head: every kept line goes out byte for byte, in order."""
    kept = b"X-A:    spaced   \r\nx-b:v\r\nSet-Cookie: a=1; Path=/\r\n"

    def script(sock: socket.socket, request: bytes, n: int) -> bool:
        if health_ok(sock, request):
            return True
        sock.sendall(answer(b'{"ok": true}', before + cut + kept))
        return True

    fake = stack.enter_context(engine(script))
    config, port, _ = config_for(tmp_path, [("e", fake.url)])
    gateway(stack, tmp_path, config, port)
    request = raw_chat_request()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(2):  # the second answer comes over the kept-alive upstream connection
            sock.sendall(request)
            got = b""
            while not got.endswith(b'{"ok": true}'):
                chunk = sock.recv(65536)
                assert chunk
                got += chunk
    head = got.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert b"\r\nContent-Type: application/json\r\nContent-Length: 12\r\n" + before + kept in head
    assert b"onnection" not in head.lower().replace(b"x-gateway", b"")


def test_stale_keep_alive_connection_is_resent_transparently(
    tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    def script(sock: socket.socket, request: bytes, n: int) -> bool:
        if health_ok(sock, request):
            return True
        sock.sendall(answer(b'{"n": %d}' % n))
        return False  # closes after every answer, without saying so: the gateway's pooled copy goes stale

    fake = stack.enter_context(engine(script))
    config, port, admin_port = config_for(tmp_path, [("e", fake.url)])
    gateway(stack, tmp_path, config, port)
    for _ in range(5):
        status, _, _ = post(port, "/v1/chat/completions", CHAT)
        assert status == 200
        time.sleep(0.05)
    assert len([r for r in fake.requests if r.startswith(b"POST")]) >= 5
    assert series(admin_metrics(admin_port), "llm_gateway_upstream_errors_total") == {}


def test_first_byte_timeout_fails_over(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    def silent(sock: socket.socket, request: bytes, n: int) -> bool:
        if health_ok(sock, request):
            return True
        time.sleep(3)
        return False

    def good(sock: socket.socket, request: bytes, n: int) -> bool:
        if not health_ok(sock, request):
            sock.sendall(answer(b'{"fine": 1}'))
        return True

    slow = stack.enter_context(engine(silent))
    fine = stack.enter_context(engine(good))
    config, port, admin_port = config_for(
        tmp_path,
        [("silent", slow.url), ("fine", fine.url)],
        extra="timeouts: {first_byte_s: 0.3}\nrouting: {default_strategy: random}",
    )
    gateway(stack, tmp_path, config, port)
    for _ in range(6):
        status, headers, body = post(port, "/v1/chat/completions", CHAT)
        assert status == 200 and json.loads(body) == {"fine": 1}
        assert headers["x-gateway-replica"] == "fine"
    errors = series(admin_metrics(admin_port), "llm_gateway_upstream_errors_total")
    assert errors.get('{kind="first_byte_timeout",replica="silent"}', 0) >= 1


def test_idle_stream_is_ended_with_an_error_event(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    def stalls(sock: socket.socket, request: bytes, n: int) -> bool:
        if health_ok(sock, request):
            return True
        event = b'data: {"choices": []}\n\n'
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(event), event)
        )
        time.sleep(3)
        return False

    fake = stack.enter_context(engine(stalls))
    config, port, admin_port = config_for(tmp_path, [("e", fake.url)], extra="timeouts: {idle_s: 0.4}")
    gateway(stack, tmp_path, config, port)
    body = json.dumps({**CHAT, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        got = read_to_close(sock)
    assert b'data: {"choices": []}' in got
    assert b'"code": "idle_timeout"' in got
    assert got.endswith(b"0\r\n\r\n")
    assert set(series(admin_metrics(admin_port), "llm_gateway_reserved_slots").values()) == {0.0}
    assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200


def test_slow_reader_gets_everything_and_the_connection_is_reused(
    tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    big = b'{"pad": "' + b"x" * (8 * 1024 * 1024) + b'"}'

    def script(sock: socket.socket, request: bytes, n: int) -> bool:
        if not health_ok(sock, request):
            sock.sendall(answer(big if n == 1 else b'{"small": 1}'))
        return True

    fake = stack.enter_context(engine(script))
    config, port, admin_port = config_for(tmp_path, [("e", fake.url)], extra="health: {interval_s: 60}")
    gateway(stack, tmp_path, config, port)
    request = raw_chat_request()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(request)
        got = b""
        deadline = time.monotonic() + 20
        while len(got) < len(big) and time.monotonic() < deadline:
            chunk = sock.recv(16384)
            assert chunk
            got += chunk
            if len(got) < 1024 * 1024:
                time.sleep(0.002)  # a slow start: the gateway must pause the engine, not buffer
        assert got.endswith(big)
        for _ in range(3):
            sock.sendall(request)
            answer_bytes = b""
            while b'{"small": 1}' not in answer_bytes:
                chunk = sock.recv(65536)
                assert chunk
                answer_bytes += chunk
    posts = [r for r in fake.requests if r.startswith(b"POST")]
    assert len(posts) == 4
    assert set(series(admin_metrics(admin_port), "llm_gateway_reserved_slots").values()) == {0.0}
