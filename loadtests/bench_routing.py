"""Benchmark 2: routing quality through the gateway, strategy by strategy.

N simulators with a small KV cache behind one `llm-gateway serve --upstream ...`; a shared-prefix workload:
K long system prompts x M users, each user a multi-turn chat (every turn resends the history, replies
included, with an `x-session-id` per user), C conversations in flight at once. All K prompts do not fit in
one sim's KV cache (24 x ~3,000 tokens against 1,280 blocks of 16 tokens), so where a prompt goes matters.
For each strategy the fleet is restarted cold, so caches start empty. Reported per strategy: aggregate
prefix-cache hit rate (the sims' own token counters), TTFT p50/p90 measured by the client on the stream,
throughput, and max/min requests per sim.

    .venv/bin/python loadtests/bench_routing.py [--sims 4] [--prompts 24] [--users 4] [--json FILE]

Pass criterion of the issue: the default chain (no header) reaches at least 3x the hit rate of `random`,
with max/min per-sim request count at most 1.3. The sims use their default timing profile (an 8B model on
one H100, see CALIBRATION.md) with `--kv-blocks` lowered so that all system prompts do not fit in one sim.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
DEFAULT = "default"
STRATEGIES = [
    "random",
    "least-request",
    "least-kv-cache",
    "throughput",
    "power-of-two",
    "session-affinity",
    "prefix-cache",
    DEFAULT,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )


async def wait_ready(
    session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout}s")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Result:
    strategy: str
    requests: int = 0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)
    output_chars: int = 0
    seconds: float = 0.0
    per_sim: dict[str, int] = field(default_factory=dict)
    hits_tokens: int = 0
    queries_tokens: int = 0

    def row(self) -> dict[str, Any]:
        counts = list(self.per_sim.values()) or [0]
        ttft = sorted(self.ttft_s) or [0.0]
        return {
            "strategy": self.strategy,
            "requests": self.requests,
            "errors": self.errors,
            "hit_rate": round(self.hits_tokens / self.queries_tokens, 4) if self.queries_tokens else 0.0,
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
            "ttft_p90_ms": round(ttft[int(0.9 * (len(ttft) - 1))] * 1000, 1),
            "req_per_s": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
            "max_min_ratio": round(max(counts) / min(counts), 3) if min(counts) else float("inf"),
            "per_sim": dict(sorted(self.per_sim.items())),
        }


def system_prompt(k: int, chars: int) -> str:
    rng = random.Random(k)
    words = ["policy", "refund", "invoice", "shipping", "warranty", "account", "escalate", "verify", "order"]
    body = " ".join(rng.choice(words) for _ in range(chars // 7))
    return f"You are support agent #{k}. Follow these rules exactly: {body}"[:chars]


async def conversation(
    session: aiohttp.ClientSession,
    url: str,
    strategy: str,
    system: str,
    user: int,
    turns: int,
    max_tokens: int,
    result: Result,
    gate: asyncio.Semaphore,
) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    headers = {"content-type": "application/json", "x-session-id": f"{system[:30]}/{user}"}
    if strategy != DEFAULT:
        headers["routing-strategy"] = strategy
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Customer {user}, message {turn}: " + "details " * 40})
        body = orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True})
        async with gate:
            t0 = time.monotonic()
            first: float | None = None
            reply: list[str] = []
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    if resp.status != 200:
                        result.errors += 1
                        await resp.read()
                        return
                    async for line in resp.content:
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        chunk = orjson.loads(line[6:])
                        for choice in chunk.get("choices", []):
                            text = (choice.get("delta") or {}).get("content")
                            if text:
                                if first is None:
                                    first = time.monotonic()
                                reply.append(text)
            except aiohttp.ClientError:
                result.errors += 1
                return
        result.requests += 1
        if first is not None:
            result.ttft_s.append(first - t0)
        answer = "".join(reply)
        result.output_chars += len(answer)
        messages.append({"role": "assistant", "content": answer})


async def run_strategy(strategy: str, args: argparse.Namespace, workdir: Path) -> Result:
    result = Result(strategy)
    procs: list[subprocess.Popen[bytes]] = []
    sim_urls = []
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(args.sims):
                port = free_port()
                sim_args = ["sim", "--model", MODEL, "--port", str(port), "--id", f"sim{i}"]
                sim_args += ["--kv-blocks", str(args.kv_blocks), "--seed", str(i)]
                procs.append(start(sim_args, workdir / f"{strategy}-sim{i}.log"))
                sim_urls.append(f"http://127.0.0.1:{port}")
            for url, proc in zip(sim_urls, procs, strict=True):
                await wait_ready(session, url + "/health", proc, 30)
            gw_port = free_port()
            gw_args = [
                "serve",
                "--listen",
                f"127.0.0.1:{gw_port}",
                "--admin-listen",
                f"127.0.0.1:{free_port()}",
            ]
            for url in sim_urls:
                gw_args += ["--upstream", url]
            gateway = start([*gw_args, "--log-level", "warning"], workdir / f"{strategy}-gateway.log")
            procs.append(gateway)
            await wait_ready(session, f"http://127.0.0.1:{gw_port}/health", gateway, 30)

            url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
            systems = [system_prompt(k, args.system_chars) for k in range(args.prompts)]
            plan = [(k, u) for k in range(args.prompts) for u in range(args.users)]
            random.Random(42).shuffle(plan)
            gate = asyncio.Semaphore(args.concurrency)
            t0 = time.monotonic()
            await asyncio.gather(
                *(
                    conversation(
                        session, url, strategy, systems[k], u, args.turns, args.max_tokens, result, gate
                    )
                    for k, u in plan
                )
            )
            result.seconds = time.monotonic() - t0
            for i, sim_url in enumerate(sim_urls):
                async with session.get(sim_url + "/sim/stats") as resp:
                    stats = orjson.loads(await resp.read())
                result.per_sim[f"sim{i}"] = int(stats["requests_total"])
                result.hits_tokens += int(stats["prefix_hits_tokens"])
                result.queries_tokens += int(stats["prefix_queries_tokens"])
    finally:
        stop(procs)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sims", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=24, help="K distinct system prompts")
    parser.add_argument("--users", type=int, default=4, help="M users per system prompt")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--system-chars", type=int, default=12000, help="~3,000 tokens each")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--kv-blocks", type=int, default=1280, help="KV blocks of 16 tokens per sim (~7 system prompts)"
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="'default' = no header")
    parser.add_argument("--json", type=Path, help="also write one JSON object per strategy here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        for strategy in args.strategies.split(";") if ";" in args.strategies else args.strategies.split(","):
            rows.append(asyncio.run(run_strategy(strategy.strip(), args, Path(tmp))).row())
            print(orjson.dumps(rows[-1]).decode(), file=sys.stderr, flush=True)
    print(
        f"{args.sims} sims (--kv-blocks {args.kv_blocks}), {args.prompts} system prompts x {args.users}"
        f" users x {args.turns} turns, {args.concurrency} conversations in flight"
    )
    width = max(18, *(len(row["strategy"]) for row in rows))
    print(f"{'strategy':<{width}} {'hit rate':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'req/s':>7} max/min")
    for row in rows:
        print(
            f"{row['strategy']:<{width}} {row['hit_rate']:>8.1%} {row['ttft_p50_ms']:>7.0f}ms"
            f" {row['ttft_p90_ms']:>7.0f}ms {row['req_per_s']:>7.2f} {row['max_min_ratio']:>8.2f}"
            + (f"  ({row['errors']} errors)" if row["errors"] else "")
        )
    by_name = {row["strategy"]: row for row in rows}
    verdict = 0
    if DEFAULT in by_name and "random" in by_name:
        d, r = by_name[DEFAULT], by_name["random"]
        ratio = d["hit_rate"] / r["hit_rate"] if r["hit_rate"] else float("inf")
        ok = ratio >= 3.0 and d["max_min_ratio"] <= 1.3
        print(
            f"default vs random: hit rate x{ratio:.2f} (need >= 3), max/min {d['max_min_ratio']:.2f}"
            f" (need <= 1.3): {'PASS' if ok else 'FAIL'}"
        )
        verdict = 0 if ok else 1
    if args.json:
        args.json.write_bytes(b"\n".join(orjson.dumps(row) for row in rows) + b"\n")
    return verdict


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
