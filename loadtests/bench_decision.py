"""Benchmark 1: cost of one routing decision (CPU microseconds), over 8, 64 and 512 replicas.

A 3-scorer chain (the built-in default `prefix-cache:3,least-request:2,least-kv-cache:1`), an 8,000-character
chat prompt whose 2,000-character system prompt is cached on a few replicas, fresh engine snapshots, random
in-flight counts. Each decision is a new request (block hashing included), as on the hot path; the
`on_dispatch` that follows it (prefix-index update) is timed separately. Pure Python, no gateway needed:

    .venv/bin/python loadtests/bench_decision.py [--decisions N] [--json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from policies.base import EngineSignals, RouteRequest
from policies.router import make_router
from policies.text import chat_text

TARGET_US = 200.0
CHAIN = "prefix-cache:3,least-request:2,least-kv-cache:1"


class FakeReplica:
    """The fields of `ReplicaView`, as `gateway.pool.Replica` holds them."""

    __slots__ = ("capacity", "id", "in_flight", "itl_ewma_s", "outstanding_tokens", "signals", "ttft_ewma_s")

    def __init__(self, replica_id: str, now: float, rng: random.Random) -> None:
        self.id = replica_id
        self.capacity = 64
        self.in_flight = rng.randrange(0, 48)
        self.outstanding_tokens = self.in_flight * 2500
        self.signals: EngineSignals | None = EngineSignals(
            scraped_at=now,
            running=float(self.in_flight),
            waiting=0.0,
            kv_usage=rng.random(),
            max_num_seqs=256.0,
            num_gpu_blocks=30000,
            block_size=16,
        )
        self.ttft_ewma_s: float | None = None
        self.itl_ewma_s: float | None = None


def prompt(rng: random.Random, system: str, length: int = 8000) -> str:
    user = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length - len(system) - 20))
    return chat_text([{"role": "system", "content": system}, {"role": "user", "content": user}])


def run(replicas_n: int, decisions: int, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    now = time.monotonic()
    replicas = [FakeReplica(f"replica-{i}", now, rng) for i in range(replicas_n)]
    router = make_router(None, CHAIN)
    systems = ["".join(rng.choice("ABCDEFGH ") for _ in range(2000)) for _ in range(8)]
    for i, system in enumerate(systems):
        for k in range(3):
            req = RouteRequest("m", prompt(rng, system))
            router.on_dispatch(req, replicas[(i * 3 + k) % replicas_n], now)
    texts = [prompt(rng, systems[i % len(systems)]) for i in range(64)]
    select_cpu: list[float] = []
    select_wall: list[float] = []
    dispatch_cpu: list[float] = []
    cpu = time.thread_time_ns
    wall = time.perf_counter_ns
    for i in range(decisions):
        req = RouteRequest("m", texts[i % len(texts)], max_tokens=256)
        w0 = wall()
        c0 = cpu()
        decision = router.select(req, replicas, now)
        c1 = cpu()
        w1 = wall()
        router.on_dispatch(req, decision.ranked[0], now)
        c2 = cpu()
        select_cpu.append((c1 - c0) / 1000)
        select_wall.append((w1 - w0) / 1000)
        dispatch_cpu.append((c2 - c1) / 1000)
    select_cpu.sort()
    return {
        "replicas": replicas_n,
        "decisions": decisions,
        "select_cpu_p50_us": round(statistics.median(select_cpu), 1),
        "select_cpu_p99_us": round(select_cpu[int(len(select_cpu) * 0.99) - 1], 1),
        "select_wall_p50_us": round(statistics.median(select_wall), 1),
        "dispatch_cpu_p50_us": round(statistics.median(dispatch_cpu), 1),
    }


def reference_us(replicas_n: int = 512, rounds: int = 2000) -> float:
    """CPU time of one plain comprehension over 512 replicas: this machine's speed, for comparing runs."""
    rng = random.Random(2)
    replicas = [FakeReplica(f"replica-{i}", 0.0, rng) for i in range(replicas_n)]
    samples = []
    for _ in range(rounds):
        c0 = time.thread_time_ns()
        [1.0 - r.in_flight / r.capacity for r in replicas]
        samples.append((time.thread_time_ns() - c0) / 1000)
    return round(statistics.median(samples), 1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--json", action="store_true", help="one JSON object per fleet size")
    args = parser.parse_args()
    rows = [run(n, args.decisions) for n in (8, 64, 512)]
    reference = reference_us()
    for row in rows:
        row["reference_512_comprehension_us"] = reference
    if args.json:
        for row in rows:
            print(orjson.dumps(row).decode())
    else:
        print(f"chain: {CHAIN}; 8,000-character prompt; {args.decisions} decisions per size")
        print("CPU time of this thread (the cost of a decision), and wall time (adds waits for a busy CPU)")
        print(f"{'replicas':>8} {'select p50':>11} {'select p99':>11} {'wall p50':>10} {'on_dispatch':>12}")
        for row in rows:
            print(
                f"{row['replicas']:>8} {row['select_cpu_p50_us']:>9.1f}us {row['select_cpu_p99_us']:>9.1f}us"
                f" {row['select_wall_p50_us']:>8.1f}us {row['dispatch_cpu_p50_us']:>10.1f}us"
            )
        p50 = rows[-1]["select_cpu_p50_us"]
        verdict = "meets" if p50 < TARGET_US else "MISSES"
        print(f"512 replicas: p50 {p50:.1f}us {verdict} the {TARGET_US:.0f}us target")
        print(
            f"machine speed: one plain comprehension over 512 replicas takes {reference:.1f}us here;"
            f" a 512-replica decision costs {p50 / reference:.1f} of them"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
