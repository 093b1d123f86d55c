"""Routing through a real gateway in front of real simulators: prefix affinity, and yielding to load."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.procs import Proc, free_port, http_get, spawn

MODEL = "sim-model"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, list[Proc]]]:
    logs = tmp_path_factory.mktemp("policies-gateway")
    sims: list[Proc] = []
    stack = []
    try:
        for i in range(3):
            port = free_port()
            ctx = spawn(
                [
                    "sim",
                    "--model",
                    MODEL,
                    "--port",
                    str(port),
                    "--id",
                    f"sim{i}",
                    "--decode-ms-per-token",
                    "20",
                    "--decode-batch-slowdown",
                    "0",
                    "--kv-blocks",
                    "2048",
                ],
                port=port,
                log_dir=logs,
            )
            stack.append(ctx)
            sims.append(ctx.__enter__())
        port = free_port()
        args = ["serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}"]
        for sim in sims:
            args += ["--upstream", sim.url]
        ctx = spawn(args, port=port, log_dir=logs, timeout=30.0)
        stack.append(ctx)
        gateway = ctx.__enter__()
        yield gateway, sims
    finally:
        for ctx in reversed(stack):
            ctx.__exit__(None, None, None)


def system_prompt(tag: str) -> str:
    return f"You are the {tag} assistant. " + "Answer briefly, cite sources, stay polite. " * 50


def chat(
    gateway: Proc, system: str, user: str, *, max_tokens: int = 1, stream: bool = False
) -> tuple[str, bytes]:
    """POST a chat; returns (x-sim-replica-id, body). Reads the whole response."""
    body = orjson.dumps(
        {
            "model": MODEL,
            "max_tokens": max_tokens,
            "stream": stream,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return resp.getheader("x-sim-replica-id") or "", data
    finally:
        conn.close()


def test_a_repeated_prefix_goes_back_to_the_same_sim(fleet: tuple[Proc, list[Proc]]) -> None:
    gateway, sims = fleet
    homes = {}
    for tag in ("billing", "travel", "cooking"):
        homes[tag], _ = chat(gateway, system_prompt(tag), "first question")
    for turn in range(4):
        for tag, home in homes.items():
            replica, _ = chat(gateway, system_prompt(tag), f"follow-up question {turn}")
            assert replica == home, (tag, turn)
    hits = 0
    for sim in sims:
        status, raw = http_get(sim.url + "/sim/stats")
        assert status == 200
        hits += orjson.loads(raw)["prefix_hits_tokens"]
    assert hits > 0


def test_a_saturated_sim_is_avoided_despite_its_cache(fleet: tuple[Proc, list[Proc]]) -> None:
    gateway, _ = fleet
    system = system_prompt("saturation")
    home, _ = chat(gateway, system, "warm the cache")
    landed: list[str] = []
    lock = threading.Lock()

    def long_stream(i: int) -> None:
        replica, _ = chat(gateway, system, f"long answer {i}", max_tokens=150, stream=True)
        with lock:
            landed.append(replica)

    # Affinity holds until the home sim has 8 more requests than the idlest (balance_abs_threshold).
    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    # While the home sim holds the long streams, a new request with its prefix goes elsewhere.
    replica, _ = chat(gateway, system, "one more while busy")
    for t in threads:
        t.join(timeout=30)
    counts = Counter(landed)
    assert len(landed) == 12
    assert 6 <= counts[home] < 12, counts
    assert len(counts) >= 2, counts
    assert replica != home, counts


def test_bad_strategy_header_is_refused_by_the_gateway(fleet: tuple[Proc, list[Proc]]) -> None:
    gateway, _ = fleet
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        conn.request(
            "POST",
            "/v1/chat/completions",
            body,
            {"content-type": "application/json", "routing-strategy": "least-request:2,vtc-basic"},
        )
        resp = conn.getresponse()
        payload = orjson.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 400
    assert resp.getheader("x-error-routing") == "true"
    assert payload["error"]["message"] == "incorrect routing strategy least-request:2,vtc-basic"
    assert payload["error"]["type"] == "invalid_request_error"


def test_profiles_file_through_serve(tmp_path: Path, fleet: tuple[Proc, list[Proc]]) -> None:
    _, sims = fleet
    profiles = tmp_path / "profiles.json"
    profiles.write_bytes(
        orjson.dumps(
            {
                "defaultProfile": "main",
                "profiles": {
                    "main": {"routingStrategy": "least-request:1,prefix-cache:1"},
                    "limited": {"routingStrategy": "random", "requestsPerSecond": 1},
                },
            }
        )
    )
    port = free_port()
    args = ["serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}"]
    args += ["--upstream", sims[0].url, "--profiles", str(profiles)]
    with spawn(args, port=port, log_dir=tmp_path, timeout=30.0) as gw:
        body = orjson.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
        statuses = []
        for header in ({}, {"config-profile": "limited"}, {"config-profile": "limited"}):
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            try:
                conn.request(
                    "POST", "/v1/chat/completions", body, {"content-type": "application/json", **header}
                )
                resp = conn.getresponse()
                resp.read()
                statuses.append(
                    (resp.status, resp.getheader("routing-strategy"), resp.getheader("x-gateway-profile"))
                )
            finally:
                conn.close()
    assert statuses[0] == (200, "least-request:1,prefix-cache:1", "main")
    assert statuses[1] == (200, "random", "limited")
    assert statuses[2][0] == 429
