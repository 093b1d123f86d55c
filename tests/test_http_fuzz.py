"""Fuzz the public request path: whatever a client sends, never a 5xx and never a hang."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.procs import free_port, http_get, spawn


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    sim_port, port = free_port(), free_port()
    config = tmp / "gateway.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{free_port()}"}}
pools:
  - model: m
    replicas:
      - {{id: s1, url: "http://127.0.0.1:{sim_port}", capacity: 16}}
timeouts: {{client_header_s: 1.0, client_idle_s: 1.0, client_body_s: 1.0}}
limits: {{max_body_bytes: 4096, max_header_bytes: 4096, max_headers: 20}}
"""
    )
    sim_args = ["sim", "--dialect", "vllm", "--instant", "--model", "m", "--id", "s1"]
    with (
        spawn([*sim_args, "--port", str(sim_port)], port=sim_port, log_dir=tmp),
        spawn(["serve", "--config", str(config)], port=port, log_dir=tmp),
    ):
        yield port, sim_port


def exchange(port: int, data: bytes) -> list[int]:
    """Send `data`, half-close, collect every response status until the server closes (max 4 s)."""
    statuses: list[int] = []

    class Collect:
        def on_headers_complete(self) -> None:
            statuses.append(parser.get_status_code())

    parser = httptools.HttpResponseParser(Collect())
    deadline = time.monotonic() + 4.0
    with socket.create_connection(("127.0.0.1", port), timeout=4.0) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return statuses
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"server hung on {data[:200]!r}"
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return statuses
            except TimeoutError:
                raise AssertionError(f"server hung on {data[:200]!r}") from None
            if not chunk:
                return statuses
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError as exc:
                raise AssertionError(f"server sent unparsable bytes for {data[:200]!r}") from exc


TOKENS = [
    b"GET",
    b"POST",
    b"PUT",
    b" ",
    b"/",
    b"/v1/chat/completions",
    b"/v1/completions",
    b"/v1/models",
    b"/health",
    b"/admin/v1/replicas",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/9.9",
    b"\r\n",
    b"\n",
    b"\r",
    b":",
    b"Host: x",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity",
    b"Expect: 100-continue",
    b"Connection: close",
    b"Connection: keep-alive",
    b"0",
    b"5",
    b"99999999999999999999",
    b"-1",
    b"ff",
    b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}',
    b'{"model": "m", "prompt": "x", "max_tokens": 2, "stream": true}',
    b'{"model": 5}',
    b"{",
    b"\x00",
    b"\xff\xfe",
    b" \t",
]

VALID_CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}'


@st.composite
def http_garbage(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["tokens", "bytes", "mutated"]))
    if kind == "tokens":
        return b"".join(draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=40)))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=600))
    base = bytearray(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(len(VALID_CHAT)).encode()
        + b"\r\n\r\n"
        + VALID_CHAT
    )
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(base) - 1))
        op = draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            base[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            del base[pos]
        else:
            base[pos:pos] = draw(st.sampled_from(TOKENS))
        if not base:
            base = bytearray(b"\r\n")
    return bytes(base)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=http_garbage())
def test_client_garbage_never_gets_a_5xx_or_a_hang(ports: tuple[int, int], data: bytes) -> None:
    port, _ = ports
    statuses = exchange(port, data)
    assert all(status < 500 for status in statuses), (statuses, data[:300])


def test_gateway_still_healthy_after_fuzzing(ports: tuple[int, int]) -> None:
    port, sim_port = ports
    status, _ = http_get(f"http://127.0.0.1:{port}/health")
    assert status == 200
    status, body = http_get(f"http://127.0.0.1:{sim_port}/metrics")
    assert status == 200
    running = [line for line in body.decode().splitlines() if line.startswith("vllm:num_requests_running")]
    assert running and all(float(line.rsplit(" ", 1)[1]) == 0 for line in running)
