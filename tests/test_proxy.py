"""The data plane end to end: real `llm-gateway sim` engines behind a real `llm-gateway serve`, the
`openai` SDK and raw sockets as clients. Slot gauges are read from the admin `/metrics`, engine state
from `/sim/stats`."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.procs import Proc, free_port, http_get, spawn
from tests.rawhttp import RawConnection

TOKEN = "proxy-test-token"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
SLOW_SIM = ["--decode-ms-per-token", "40", "--prefill-overhead-ms", "0"]
"""A sim that takes ~40 ms per token: a 100-token stream lasts ~4 s."""


# -- helpers shared by the data-plane tests (test_serve.py and test_chaos.py import them) -------------


def sim(
    stack: contextlib.ExitStack,
    tmp: Path,
    replica_id: str,
    *extra: str,
    model: str = "m",
    instant: bool = True,
) -> Proc:
    port = free_port()
    args = ["sim", "--dialect", "vllm", "--model", model, "--id", replica_id, "--port", str(port), *extra]
    if instant:
        args.append("--instant")
    return stack.enter_context(spawn(args, port=port, log_dir=tmp))


def gateway_config(
    tmp: Path, replicas: list[tuple[str, Proc, int]], extra: str = "", model: str = "m"
) -> tuple[Path, int, int]:
    """A config file for one pool; returns (path, public port, admin port)."""
    port, admin_port = free_port(), free_port()
    lines = "\n".join(
        f'      - {{id: {rid}, url: "{proc.url}", capacity: {capacity}}}' for rid, proc, capacity in replicas
    )
    path = tmp / f"gateway-{port}.yaml"
    path.write_text(
        f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin_port}"}}
health: {{interval_s: 0.5, timeout_s: 0.5}}
scrape: {{interval_s: 0.5}}
retry: {{backoff_base_s: 0.01, eject_base_s: 1.0}}
shutdown_grace_s: 5
pools:
  - model: {model}
    replicas:
{lines}
{extra}
"""
    )
    return path, port, admin_port


def gateway(
    stack: contextlib.ExitStack, tmp: Path, config: Path, port: int, *extra: str, token: str = TOKEN
) -> Proc:
    env = {"LLM_GATEWAY_ADMIN_TOKEN": token} if token else {"LLM_GATEWAY_ADMIN_TOKEN": ""}
    return stack.enter_context(
        spawn(["serve", "--config", str(config), *extra], port=port, log_dir=tmp, env=env)
    )


def admin_metrics(admin_port: int) -> str:
    status, body = http_get(
        f"http://127.0.0.1:{admin_port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, body
    return body.decode()


def series(text: str, name: str) -> dict[str, float]:
    """`name{labels} value` lines of a Prometheus page, keyed by their label text."""
    found: dict[str, float] = {}
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        found[match.group(1) or ""] = float(match.group(2))
    return found


def reserved_slots(admin_port: int) -> dict[str, float]:
    return series(admin_metrics(admin_port), "llm_gateway_reserved_slots")


def sim_stats(proc: Proc) -> dict[str, float]:
    status, body = http_get(proc.url + "/sim/stats")
    assert status == 200
    doc: dict[str, float] = json.loads(body)
    return doc


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def client(port: int, timeout: float = 20.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=timeout)


def post(port: int, path: str, doc: object, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """One raw POST; (status, headers, body)."""
    body = json.dumps(doc).encode()
    with RawConnection(port, timeout=20.0) as conn:
        conn.send(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n".encode()
            + body
        )
        resp = conn.read_responses(1, timeout=20.0)[0]
    return resp.status, resp.headers, resp.body


def chat_request(doc: dict[str, object]) -> bytes:
    body = json.dumps(doc).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def open_stream(port: int, doc: dict[str, object]) -> socket.socket:
    """Start a streamed chat on a raw socket and return it once the first event arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
    sock.sendall(chat_request({**doc, "stream": True}))
    got = b""
    while b"data: " not in got:
        chunk = sock.recv(65536)
        assert chunk, f"stream closed before its first event: {got!r}"
        got += chunk
    return sock


def read_to_close(sock: socket.socket, timeout: float = 15.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


# -- one fleet for the plain cases -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Proc, Proc]]:
    tmp = tmp_path_factory.mktemp("proxy")
    with contextlib.ExitStack() as stack:
        s1 = sim(stack, tmp, "s1")
        s2 = sim(stack, tmp, "s2")
        config, port, admin_port = gateway_config(tmp, [("s1", s1, 16), ("s2", s2, 16)])
        gateway(stack, tmp, config, port)
        yield port, admin_port, s1, s2


def test_chat_completions_and_embeddings_through_the_sdk(fleet: tuple[int, int, Proc, Proc]) -> None:
    port, admin_port, _, _ = fleet
    api = client(port)
    chat = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    completion = api.completions.create(model="m", prompt="once upon a time", max_tokens=3)
    assert completion.choices[0].text
    embedding = api.embeddings.create(model="m", input="embed me")
    assert embedding.data and embedding.data[0].embedding
    assert set(reserved_slots(admin_port).values()) == {0.0}


def test_streaming_through_the_sdk(fleet: tuple[int, int, Proc, Proc]) -> None:
    port, admin_port, _, _ = fleet
    stream = client(port).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "stream please"}], max_tokens=12, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) >= 12
    assert "".join(pieces).strip()
    assert set(reserved_slots(admin_port).values()) == {0.0}


def test_stream_keeps_event_stream_and_chunked_framing(fleet: tuple[int, int, Proc, Proc]) -> None:
    port, _, _, _ = fleet
    status, headers, body = post(port, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_gateway_headers_on_the_answer(fleet: tuple[int, int, Proc, Proc]) -> None:
    port, _, _, _ = fleet
    status, headers, _ = post(port, "/v1/chat/completions", CHAT, "X-Request-Id: abc-123\r\n")
    assert status == 200
    assert headers["x-request-id"] == "abc-123"
    assert headers["x-gateway-replica"] in ("s1", "s2")
    assert headers["x-sim-replica-id"] == headers["x-gateway-replica"]
    assert headers["routing-strategy"]
    _, headers2, _ = post(port, "/v1/chat/completions", CHAT)
    assert headers2["x-request-id"] and headers2["x-request-id"] != "abc-123"


def test_models_health_and_ready(fleet: tuple[int, int, Proc, Proc]) -> None:
    port, _, _, _ = fleet
    status, body = http_get(f"http://127.0.0.1:{port}/v1/models")
    assert status == 200
    doc = json.loads(body)
    assert doc["object"] == "list" and [m["id"] for m in doc["data"]] == ["m"]
    assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200
    assert http_get(f"http://127.0.0.1:{port}/ready")[0] == 200


def test_errors_are_in_openai_shape(fleet: tuple[int, int, Proc, Proc]) -> None:
    port, _, _, _ = fleet
    for doc, status in (
        ({"messages": []}, 400),
        ({**CHAT, "model": "nope"}, 404),
        ({**CHAT, "model": 7}, 400),
    ):
        got, _, body = post(port, "/v1/chat/completions", doc)
        assert got == status
        error = json.loads(body)["error"]
        assert error["message"] and "type" in error and "param" in error and "code" in error
    got, headers, body = post(port, "/v1/chat/completions", CHAT, "routing-strategy: no-such-scorer\r\n")
    assert got == 400
    assert headers.get("x-error-routing") == "true"
    error = json.loads(body)["error"]
    assert "no-such-scorer" in error["message"]
    assert error["param"] == "routing-strategy" and error["code"] == "invalid_routing_strategy"


def test_every_request_reaches_exactly_one_engine(fleet: tuple[int, int, Proc, Proc]) -> None:
    port, _, s1, s2 = fleet
    before = sim_stats(s1)["requests_total"] + sim_stats(s2)["requests_total"]
    for n in range(20):
        doc = {**CHAT, "messages": [{"role": "user", "content": f"distinct prompt {n} " * 20}]}
        status, headers, _ = post(port, "/v1/chat/completions", doc)
        assert status == 200
        assert headers["x-gateway-replica"] == headers["x-sim-replica-id"]
    assert sim_stats(s1)["requests_total"] + sim_stats(s2)["requests_total"] == before + 20


# -- failures ----------------------------------------------------------------------------------


def test_failover_when_a_sim_is_killed(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        a = sim(stack, tmp_path, "a")
        b = sim(stack, tmp_path, "b")
        config, port, admin_port = gateway_config(tmp_path, [("a", a, 8), ("b", b, 8)])
        gateway(stack, tmp_path, config, port)
        a.kill()
        api = client(port)
        for n in range(10):
            chat = api.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"after the crash {n}"}], max_tokens=2
            )
            assert chat.choices[0].message.content
        text = admin_metrics(admin_port)
        errors = series(text, "llm_gateway_upstream_errors_total")
        assert any('replica="a"' in labels and value > 0 for labels, value in errors.items())
        assert sum(series(text, "llm_gateway_requests_total").values()) >= 10
        assert set(reserved_slots(admin_port).values()) == {0.0}


def test_sim_killed_mid_stream_ends_the_stream_with_an_error_event(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        slow = sim(stack, tmp_path, "slow", *SLOW_SIM, instant=False)
        config, port, admin_port = gateway_config(tmp_path, [("slow", slow, 4)])
        gateway(stack, tmp_path, config, port)
        sock = open_stream(port, {**CHAT, "max_tokens": 200})
        with sock:
            assert reserved_slots(admin_port) == {'{model="m",replica="slow"}': 1.0}
            slow.kill()
            rest = read_to_close(sock)
        assert b'data: {"error": ' in rest
        assert rest.endswith(b"0\r\n\r\n"), "chunked body not terminated"
        event = rest[rest.index(b'data: {"error": ') + 6 :].split(b"\n\n")[0]
        assert json.loads(event)["error"]["type"] == "upstream_error"
        wait_until(lambda: set(reserved_slots(admin_port).values()) == {0.0}, 5, "slot released")


def test_client_cancel_aborts_the_generation(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        slow = sim(stack, tmp_path, "slow", *SLOW_SIM, instant=False)
        config, port, admin_port = gateway_config(tmp_path, [("slow", slow, 4)])
        gateway(stack, tmp_path, config, port)
        aborted = sim_stats(slow)["aborted_total"]
        sock = open_stream(port, {**CHAT, "max_tokens": 200})
        assert sim_stats(slow)["running"] == 1
        sock.close()
        wait_until(lambda: sim_stats(slow)["aborted_total"] == aborted + 1, 5, "engine abort")
        assert sim_stats(slow)["running"] == 0
        wait_until(lambda: set(reserved_slots(admin_port).values()) == {0.0}, 5, "slot released")
        # A non-streamed request cancelled while the engine works on it is aborted too.
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(chat_request({**CHAT, "max_tokens": 200}))
            wait_until(lambda: sim_stats(slow)["running"] == 1, 5, "engine started")
        wait_until(lambda: sim_stats(slow)["aborted_total"] == aborted + 2, 5, "engine abort (non-streamed)")
        wait_until(lambda: set(reserved_slots(admin_port).values()) == {0.0}, 5, "slot released")
        metrics = http_get(slow.url + "/metrics")[1].decode()
        aborts = series(metrics, "vllm:request_success_total")
        assert sum(v for labels, v in aborts.items() if 'finished_reason="abort"' in labels) == 2
        assert set(series(metrics, "vllm:num_requests_running").values()) == {0.0}


def test_full_queue_answers_429_at_once_and_a_timed_out_wait_429_with_retry_after(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        slow = sim(stack, tmp_path, "slow", *SLOW_SIM, instant=False)
        config, port, admin_port = gateway_config(
            tmp_path, [("slow", slow, 1)], extra="queue: {max_size: 1, timeout_s: 1.0}"
        )
        gateway(stack, tmp_path, config, port)
        busy = open_stream(port, {**CHAT, "max_tokens": 200})  # holds the only slot
        with busy:
            waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
            waiting.sendall(chat_request(CHAT))
            wait_until(
                lambda: series(admin_metrics(admin_port), "llm_gateway_queue_depth") == {'{model="m"}': 1.0},
                5,
                "one waiter",
            )
            status, _, body_out = post(port, "/v1/chat/completions", CHAT)
            assert status == 429, body_out
            assert json.loads(body_out)["error"]["code"] == "queue_full"
            with waiting:
                answer = read_to_close_or_response(waiting)
            assert answer.startswith(b"HTTP/1.1 429 "), answer[:100]
            assert b"retry-after:" in answer.lower()
        wait_until(lambda: set(reserved_slots(admin_port).values()) == {0.0}, 10, "slots released")


def read_to_close_or_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Bytes until one complete non-streamed response (content-length framed) has arrived."""
    sock.settimeout(timeout)
    out = b""
    while True:
        head, sep, rest = out.partition(b"\r\n\r\n")
        if sep:
            match = re.search(rb"content-length: (\d+)", head, re.I)
            if match and len(rest) >= int(match.group(1)):
                return out
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def test_replica_refusing_connections_gives_502_after_bounded_attempts(tmp_path: Path) -> None:
    dead_port = free_port()
    with contextlib.ExitStack() as stack:
        config = tmp_path / "dead.yaml"
        port, admin_port = free_port(), free_port()
        config.write_text(
            f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin_port}"}}
health: {{interval_s: 30}}
retry: {{max_attempts: 3, backoff_base_s: 0.01, eject_after_failures: 100}}
pools:
  - model: m
    replicas: [{{id: dead, url: "http://127.0.0.1:{dead_port}"}}]
"""
        )
        gateway(stack, tmp_path, config, port)
        status, _, body = post(port, "/v1/chat/completions", CHAT)
        assert status == 502
        assert json.loads(body)["error"]["code"] == "connect"
        text = admin_metrics(admin_port)
        assert series(text, "llm_gateway_retries_total") == {'{model="m"}': 2.0}
        assert series(text, "llm_gateway_upstream_errors_total")['{kind="connect",replica="dead"}'] == 3.0
        assert set(reserved_slots(admin_port).values()) == {0.0}


def test_sigterm_lets_a_stream_finish_then_exits_0(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        slow = sim(stack, tmp_path, "slow", *SLOW_SIM, instant=False)
        config, port, _ = gateway_config(tmp_path, [("slow", slow, 4)])
        gw = gateway(stack, tmp_path, config, port)
        sock = open_stream(port, {**CHAT, "max_tokens": 20})
        with sock:
            gw.signal(signal.SIGTERM)
            rest = read_to_close(sock)
        assert b"data: [DONE]" in rest
        assert gw.popen.wait(timeout=10) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert sim_stats(slow)["aborted_total"] == 0


def test_trailing_whitespace_is_not_part_of_header_values(
    fleet: tuple[int, int, Proc, Proc],
) -> None:
    port, _, _, _ = fleet
    body = json.dumps(CHAT).encode()
    with RawConnection(port) as conn:
        conn.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d \t\r\n"
            b"X-Request-Id: spaced  \r\nrouting-strategy: least-request \r\n\r\n%s" % (len(body), body)
        )
        resp = conn.read_responses(1)[0]
    assert resp.status == 200
    assert resp.headers["x-request-id"] == "spaced"
    assert resp.headers["routing-strategy"] == "least-request"


def test_least_latency_learns_inter_token_time_over_kept_alive_connections(tmp_path: Path) -> None:
    """`fast` answers its first token later but streams 20x faster: only a measured inter-token time
    (taken on reused upstream connections too) makes least-latency prefer it for a 32-token answer."""
    with contextlib.ExitStack() as stack:
        fast = sim(
            stack,
            tmp_path,
            "fast",
            "--prefill-overhead-ms",
            "60",
            "--decode-ms-per-token",
            "1",
            instant=False,
        )
        slow = sim(
            stack,
            tmp_path,
            "slow",
            "--prefill-overhead-ms",
            "0",
            "--decode-ms-per-token",
            "20",
            instant=False,
        )
        config, port, _ = gateway_config(tmp_path, [("fast", fast, 8), ("slow", slow, 8)])
        gateway(stack, tmp_path, config, port)
        doc = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 32,
            "stream": True,
        }
        seen: set[str] = set()
        for n in range(30):  # measure both: random placement, at least 10 requests
            status, headers, _ = post(port, "/v1/chat/completions", doc, "routing-strategy: random\r\n")
            assert status == 200
            seen.add(headers["x-gateway-replica"])
            if len(seen) == 2 and n >= 9:
                break
        assert seen == {"fast", "slow"}
        picked = []
        for _ in range(6):
            status, headers, _ = post(
                port, "/v1/chat/completions", doc, "routing-strategy: least-latency\r\n"
            )
            assert status == 200
            picked.append(headers["x-gateway-replica"])
        assert picked == ["fast"] * 6
