"""Every fault flag of the simulator, against a real process."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

from tests.procs import free_port, http_get, spawn

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def chat(port: int, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body or CHAT))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_exit(popen: object, timeout: float = 5.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = popen.poll()  # type: ignore[attr-defined]
        if code is not None:
            return int(code)
        time.sleep(0.02)
    return None


def test_exit_after_n_answers_then_crashes(tmp_path: Path) -> None:
    port = free_port()
    with spawn(
        ["sim", "--port", str(port), "--instant", "--fault-exit-after", "2"], port=port, log_dir=tmp_path
    ) as p:
        assert chat(port)[0] == 200
        assert chat(port)[0] == 200, "the N-th answer is still sent"
        assert wait_exit(p.popen) == 1
        try:
            status = chat(port, timeout=1)[0]
        except OSError:
            status = None
        assert status is None


def test_exit_after_cuts_a_streaming_answer_midway(tmp_path: Path) -> None:
    port = free_port()
    args = ["sim", "--port", str(port), "--instant", "--fault-exit-after", "1"]
    with spawn(args, port=port, log_dir=tmp_path) as p:
        body = {**CHAT, "max_tokens": 40, "stream": True}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
        resp = conn.getresponse()
        assert resp.status == 200
        received = b""
        try:
            received = resp.read()
        except http.client.IncompleteRead as exc:
            received = exc.partial
        conn.close()
        tokens = received.count(b'"delta":{"content"')
        assert 0 < tokens < 40, "some tokens arrived, but not all"
        assert b'finish_reason":"' not in received and b"[DONE]" not in received, "and not the end"
        assert wait_exit(p.popen) == 1


def test_hang_after_n_keeps_sockets_open_and_answers_nothing(tmp_path: Path) -> None:
    port = free_port()
    with spawn(
        ["sim", "--port", str(port), "--instant", "--fault-hang-after", "1"], port=port, log_dir=tmp_path
    ) as p:
        assert chat(port)[0] == 200
        for attempt in (lambda: chat(port, timeout=0.5), lambda: http_get(p.url + "/health", timeout=0.5)):
            try:
                attempt()
                raise AssertionError("a hung simulator answered")
            except TimeoutError:
                pass
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
        assert p.popen.poll() is None


def test_error_rate_gives_http_500_in_the_engine_error_shape(tmp_path: Path) -> None:
    port = free_port()
    with spawn(
        ["sim", "--port", str(port), "--instant", "--fault-error-rate", "1"], port=port, log_dir=tmp_path
    ):
        status, body = chat(port)
        assert status == 500
        assert json.loads(body)["error"]["code"] == 500
    port = free_port()
    args = ["sim", "--port", str(port), "--instant", "--fault-error-rate", "0.5", "--seed", "7"]
    with spawn(args, port=port, log_dir=tmp_path):
        statuses = [chat(port)[0] for _ in range(40)]
        assert set(statuses) == {200, 500}
        assert 8 <= statuses.count(500) <= 32


def test_startup_delay_reports_503_until_ready(tmp_path: Path) -> None:
    port = free_port()
    args = ["sim", "--port", str(port), "--instant", "--fault-startup-delay-s", "1.5"]
    with spawn(args, port=port, log_dir=tmp_path, ready_path="/v1/models") as p:
        started = time.monotonic()
        assert http_get(p.url + "/health")[0] == 503
        assert chat(port)[0] == 503
        deadline = started + 10
        while http_get(p.url + "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http_get(p.url + "/health")[0] == 200
        assert chat(port)[0] == 200


def test_unhealthy_after_n_fails_health_but_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    args = ["sim", "--port", str(port), "--instant", "--fault-unhealthy-after", "2"]
    with spawn(args, port=port, log_dir=tmp_path) as p:
        assert chat(port)[0] == 200
        assert http_get(p.url + "/health")[0] == 200
        assert chat(port)[0] == 200
        assert http_get(p.url + "/health")[0] == 503
        assert chat(port)[0] == 200
