"""Chaos: 500 randomized requests (plain, streamed, cancelled, timed out, malformed) against engines that
fail (HTTP 500s, a crash, slowness). Afterwards nothing is left reserved and no engine is still working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from pathlib import Path

import aiohttp

from tests.procs import http_get
from tests.test_proxy import admin_metrics, gateway, gateway_config, series, sim, wait_until

REQUESTS = 500
CONCURRENCY = 24
KINDS = ["chat", "chat", "chat", "stream", "stream", "cancel", "timeout", "bad", "completion"]


async def one(session: aiohttp.ClientSession, base: str, kind: str, rng: random.Random) -> str:
    tokens = rng.randint(1, 24)
    doc: dict[str, object] = {
        "model": "m",
        "messages": [{"role": "user", "content": f"chaos {rng.random()} " * rng.randint(1, 30)}],
        "max_tokens": tokens,
    }
    path = "/v1/chat/completions"
    data = json.dumps(doc).encode()
    if kind == "completion":
        path = "/v1/completions"
        data = json.dumps({"model": "m", "prompt": "chaos", "max_tokens": tokens}).encode()
    elif kind == "bad":
        data = data[: rng.randint(0, len(data) - 1)]
    elif kind in ("stream", "cancel"):
        data = json.dumps({**doc, "stream": True}).encode()
    timeout = aiohttp.ClientTimeout(total=rng.uniform(0.01, 0.15) if kind == "timeout" else 20)
    try:
        async with session.post(base + path, data=data, timeout=timeout) as resp:
            if kind == "cancel":
                await resp.content.readany()
                resp.close()
                return "cancelled"
            await resp.read()
            return str(resp.status)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return type(exc).__name__


async def run_mix(base: str, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS) for _ in range(REQUESTS)]
    sem = asyncio.Semaphore(CONCURRENCY)
    outcomes: Counter[str] = Counter()

    async def bounded(kind: str) -> None:
        async with sem:
            outcomes[await one(session, base, kind, rng)] += 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.wait_for(asyncio.gather(*(bounded(k) for k in kinds)), timeout=120)
    return outcomes


def test_random_mix_leaves_no_slot_reserved_and_no_engine_busy(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        flaky = sim(stack, tmp_path, "flaky", "--fault-error-rate", "0.1", "--seed", "7")
        slow = sim(stack, tmp_path, "slow", "--decode-ms-per-token", "8", instant=False)
        crashy = sim(stack, tmp_path, "crashy", "--fault-exit-after", "40")
        steady = sim(stack, tmp_path, "steady")
        config, port, admin_port = gateway_config(
            tmp_path,
            [("flaky", flaky, 4), ("slow", slow, 4), ("crashy", crashy, 4), ("steady", steady, 4)],
            extra="queue: {max_size: 16, timeout_s: 2.0}\ntimeouts: {first_byte_s: 3.0, total_s: 8.0}",
        )
        gateway(stack, tmp_path, config, port)
        outcomes = asyncio.run(run_mix(f"http://127.0.0.1:{port}", seed=20261130))
        assert sum(outcomes.values()) == REQUESTS
        assert outcomes["200"] > REQUESTS // 3, outcomes
        unexpected = {
            k for k in outcomes if k.isdigit() and k not in {"200", "400", "429", "500", "502", "503"}
        }
        assert not unexpected, outcomes

        def settled() -> bool:
            reserved = series(admin_metrics(admin_port), "llm_gateway_reserved_slots")
            return len(reserved) == 4 and set(reserved.values()) == {0.0}

        wait_until(settled, 10, "every reserved-slot gauge back at 0")
        text = admin_metrics(admin_port)
        assert set(series(text, "llm_gateway_queue_depth").values()) <= {0.0}
        assert crashy.popen.poll() is not None, "the crashing engine should have crashed"
        for engine in (flaky, slow, steady):

            def idle(engine=engine) -> bool:
                status, body = http_metrics(engine.url)
                running = series(body, "vllm:num_requests_running")
                return status == 200 and bool(running) and set(running.values()) == {0.0}

            wait_until(idle, 10, f"{engine.url} running 0")


def http_metrics(url: str) -> tuple[int, str]:
    status, body = http_get(url + "/metrics")
    return status, body.decode()
