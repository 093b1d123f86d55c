"""The public listener faces clients: strict HTTP/1.1, limits, timeouts and request-smuggling defences.

Raw bytes over real sockets to a real `llm-gateway serve` with a simulator behind it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import free_port, spawn
from tests.rawhttp import RawConnection, RawResponse

MAX_BODY = 65536
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()


@pytest.fixture(scope="module")
def gateway_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp: Path = tmp_path_factory.mktemp("strict")
    sim_port, port, admin_port = free_port(), free_port(), free_port()
    config = tmp / "gateway.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin_port}"}}
pools:
  - model: m
    replicas:
      - {{id: s1, url: "http://127.0.0.1:{sim_port}", capacity: 8}}
timeouts: {{client_header_s: 1.0, client_idle_s: 2.0, client_body_s: 2.0}}
limits: {{max_body_bytes: {MAX_BODY}, max_header_bytes: 8192, max_headers: 40}}
"""
    )
    sim_args = ["sim", "--dialect", "vllm", "--instant", "--model", "m", "--id", "s1"]
    with (
        spawn([*sim_args, "--port", str(sim_port)], port=sim_port, log_dir=tmp),
        spawn(
            ["serve", "--config", str(config)],
            port=port,
            log_dir=tmp,
            env={"LLM_GATEWAY_ADMIN_TOKEN": "t0ken"},
        ),
    ):
        yield port


def one(port: int, data: bytes) -> tuple[RawResponse, RawConnection]:
    conn = RawConnection(port)
    conn.send(data)
    responses = conn.read_responses(1)
    assert responses, f"no response to {data[:80]!r}"
    return responses[0], conn


def assert_openai_error(resp: RawResponse, status: int) -> None:
    assert resp.status == status, (resp.status, resp.body)
    doc = json.loads(resp.body)
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert "type" in doc["error"]


def rejected(port: int, data: bytes, status: int = 400) -> None:
    """The request is refused with `status` in OpenAI's shape and the connection is closed."""
    resp, conn = one(port, data)
    with conn:
        assert_openai_error(resp, status)
        assert conn.wait_closed(3.0), "connection left open after a framing error"


def chat_head(length: int, extra: str = "") -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def test_keep_alive_serves_several_requests_on_one_connection(gateway_port: int) -> None:
    with RawConnection(gateway_port) as conn:
        for n in range(3):
            conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            responses = conn.read_responses(n + 1)
            assert responses[n].status == 200
        conn.send(chat_head(len(CHAT)) + CHAT)
        resp = conn.read_responses(4)[3]
        assert resp.status == 200
        assert json.loads(resp.body)["object"] == "chat.completion"


def test_pipelined_requests_are_answered_in_order(gateway_port: int) -> None:
    with RawConnection(gateway_port) as conn:
        conn.send(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
            + chat_head(len(CHAT))
            + CHAT
            + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        first, second, third, fourth = conn.read_responses(4)
        assert first.status == 200 and json.loads(first.body)["object"] == "list"
        assert second.status == 200 and json.loads(second.body)["object"] == "chat.completion"
        assert_openai_error(third, 404)
        assert fourth.status == 200


def test_connection_close_is_honoured(gateway_port: int) -> None:
    resp, conn = one(gateway_port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with conn:
        assert resp.status == 200
        assert resp.headers.get("connection", "").lower() == "close"
        assert conn.wait_closed(3.0)


def test_http10_closes_by_default_and_keeps_alive_on_request(gateway_port: int) -> None:
    resp, conn = one(gateway_port, b"GET /health HTTP/1.0\r\n\r\n")
    with conn:
        assert resp.status == 200
        assert conn.wait_closed(3.0)
    with RawConnection(gateway_port) as conn:
        conn.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert conn.read_responses(1)[0].status == 200
        conn.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert conn.read_responses(2)[1].status == 200


def test_http10_client_gets_a_streamed_answer_without_chunked_framing(gateway_port: int) -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    ).encode()
    head = f"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with RawConnection(gateway_port) as conn:
        conn.send(head + body)
        assert conn.wait_closed(5.0)
        head_part, _, payload = conn.raw.partition(b"\r\n\r\n")
        assert head_part.startswith(b"HTTP/1.")
        assert b"transfer-encoding: chunked" not in head_part.lower()
        assert payload.rstrip().endswith(b"data: [DONE]")


def test_expect_100_continue_then_body(gateway_port: int) -> None:
    with RawConnection(gateway_port) as conn:
        conn.send(chat_head(len(CHAT), "Expect: 100-continue\r\n"))
        interim = conn.read_responses(1)
        assert interim[0].status == 100
        conn.send(CHAT)
        final = conn.read_responses(2)[1]
        assert final.status == 200
        assert json.loads(final.body)["object"] == "chat.completion"


def test_expect_100_continue_with_oversized_body_gets_413_without_continue(gateway_port: int) -> None:
    resp, conn = one(gateway_port, chat_head(MAX_BODY + 1, "Expect: 100-continue\r\n"))
    with conn:
        assert_openai_error(resp, 413)
        assert b"100 Continue" not in conn.raw


def test_chunked_request_body_is_accepted(gateway_port: int) -> None:
    half = len(CHAT) // 2
    chunks = f"{half:x}\r\n".encode() + CHAT[:half] + b"\r\n"
    chunks += f"{len(CHAT) - half:x}\r\n".encode() + CHAT[half:] + b"\r\n0\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    resp, conn = one(gateway_port, head + chunks)
    with conn:
        assert resp.status == 200, resp.body
        assert json.loads(resp.body)["object"] == "chat.completion"


def test_content_length_with_transfer_encoding_is_rejected(gateway_port: int) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    rejected(gateway_port, head)


@pytest.mark.parametrize(
    "lengths",
    [
        ["5", "6"],
        ["5", "5"],
    ],
    ids=["different", "same"],
)
def test_duplicate_content_length_is_rejected(gateway_port: int, lengths: list[str]) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    for value in lengths:
        head += f"Content-Length: {value}\r\n".encode()
    rejected(gateway_port, head + b"\r\nhello!")


@pytest.mark.parametrize("value", ["abc", "-1", "1,2", "0x10", " 12a"])
def test_invalid_content_length_is_rejected(gateway_port: int, value: str) -> None:
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n".encode()
    rejected(gateway_port, head)


def test_obs_fold_is_rejected(gateway_port: int) -> None:
    rejected(gateway_port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n")


def test_unsupported_transfer_encoding_is_rejected(gateway_port: int) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    )
    resp, conn = one(gateway_port, head)
    with conn:
        assert resp.status in (400, 501)
        assert conn.wait_closed(3.0)


def test_too_many_headers_is_431(gateway_port: int) -> None:
    many = "".join(f"X-H{i}: v\r\n" for i in range(60))
    rejected(gateway_port, f"GET /health HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode(), 431)


def test_oversized_header_block_is_431(gateway_port: int) -> None:
    rejected(gateway_port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431)


def test_body_over_limit_by_content_length_is_413(gateway_port: int) -> None:
    rejected(gateway_port, chat_head(MAX_BODY + 1), 413)


def test_chunked_body_over_limit_is_413(gateway_port: int) -> None:
    piece = b"a" * 16384
    body = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    rejected(gateway_port, head + body, 413)


def test_garbage_request_line_is_400(gateway_port: int) -> None:
    rejected(gateway_port, b"HELLO THERE\r\n\r\n")


def test_unsupported_http_version_is_rejected(gateway_port: int) -> None:
    resp, conn = one(gateway_port, b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n")
    with conn:
        assert resp.status in (400, 505)
        assert conn.wait_closed(3.0)


def test_slow_request_head_is_cut_off(gateway_port: int) -> None:
    """Slowloris: a head that never completes is closed after `timeouts.client_header_s` (1 s here)."""
    with RawConnection(gateway_port) as conn:
        conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(3):
            time.sleep(0.3)
            try:
                conn.send(b"X-Drip: 1\r\n")
            except OSError:
                break
        assert conn.wait_closed(5.0)
        assert time.monotonic() - started < 5.0
        if conn.collector.responses:
            assert conn.collector.responses[0].status == 408


def test_slow_request_body_is_cut_off(gateway_port: int) -> None:
    """A body that trickles in after its head is cut off `timeouts.client_body_s` (2 s here) after the
    head: each byte that arrives does not buy more time."""
    with RawConnection(gateway_port) as conn:
        conn.send(chat_head(100) + b'{"model": ')
        started = time.monotonic()
        for _ in range(8):
            time.sleep(0.4)
            try:
                conn.send(b" ")
            except OSError:
                break
        assert conn.wait_closed(5.0)
        assert 1.5 < time.monotonic() - started < 4.0  # not extended by the trickle (that would be 5 s+)
        assert conn.collector.responses and conn.collector.responses[0].status == 408


def test_idle_keep_alive_connection_is_closed(gateway_port: int) -> None:
    with RawConnection(gateway_port) as conn:
        conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_responses(1)[0].status == 200
        assert conn.wait_closed(6.0), "idle keep-alive connection never closed"


def test_unknown_path_and_admin_paths_are_404_on_the_public_port(gateway_port: int) -> None:
    for path in ("/nope", "/admin/v1/replicas", "/admin/v1/stats", "/metrics"):
        resp, conn = one(
            gateway_port, f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n".encode()
        )
        with conn:
            assert_openai_error(resp, 404)


def test_bad_json_missing_model_unknown_model(gateway_port: int) -> None:
    for body, status in (
        (b"{not json", 400),
        (b'{"messages": []}', 400),
        (b'{"model": "nope", "messages": []}', 404),
    ):
        resp, conn = one(gateway_port, chat_head(len(body)) + body)
        with conn:
            assert_openai_error(resp, status)


def test_request_id_is_created_or_kept(gateway_port: int) -> None:
    resp, conn = one(gateway_port, chat_head(len(CHAT)) + CHAT)
    with conn:
        assert resp.status == 200
        assert resp.headers.get("x-request-id")
    resp, conn = one(gateway_port, chat_head(len(CHAT), "X-Request-Id: my-id-42\r\n") + CHAT)
    with conn:
        assert resp.headers.get("x-request-id") == "my-id-42"
        assert resp.headers.get("x-gateway-replica") == "s1"
