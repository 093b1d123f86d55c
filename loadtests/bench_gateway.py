"""Gateway vs direct: what `llm-gateway serve` adds in front of an `llm-gateway sim --instant` engine.

One `--instant` simulated vLLM engine (no modelled delays), and the gateway in front of it with its
default routing chain, slot reservation, limits and metrics on (access log off). wrk (1 thread, 32
connections by default) drives either the engine directly or the gateway, non-streaming (`chat`) and
streaming (`stream`), in interleaved, shuffled rounds so drift of a shared machine hits both alike.
When the machine has two cores or more, the gateway runs pinned to one core and the engine and wrk to
another (taskset). Note that a Python engine is the ceiling here: "direct" is the engine's own limit, so
the gateway's req/s is bounded by it; the added latency is the figure that speaks for the gateway. For
the gateway against nginx and the Rust routers on a canned C engine, see `bench_proxies.py`.

Output: a markdown table (medians over rounds; "added" = gateway minus direct within a round) and the
raw wrk numbers in loadtests/results/gateway-<time>/results.json.

    python loadtests/bench_gateway.py                          # 3 rounds of 5 s per cell, ~1.5 min
    python loadtests/bench_gateway.py --rounds 1 --duration 3  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
LUA = HERE / "wrk" / "openai.lua"
MODEL = "bench-model"
SCENARIOS = {
    "chat": {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly and precisely."},
            {"role": "user", "content": "Why should a gateway reserve a slot before it forwards a request?"},
        ],
        "max_tokens": 16,
    },
    "stream": {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly and precisely."},
            {"role": "user", "content": "Why should a gateway reserve a slot before it forwards a request?"},
        ],
        "max_tokens": 16,
        "stream": True,
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cores() -> tuple[list[str], list[str]]:
    """taskset prefixes: (gateway, engine and wrk)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2 or shutil.which("taskset") is None:
        return [], []
    return ["taskset", "-c", str(allowed[0])], ["taskset", "-c", str(allowed[1])]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout}s")


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
        found = shutil.which("wrk")
        if found:
            return found
    sys.exit("wrk is needed: apt-get install wrk (Debian/Ubuntu) or brew install wrk")


def run_wrk(prefix: list[str], port: int, body: Path, seconds: float, connections: int) -> dict[str, Any]:
    cmd = [
        *prefix,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}",
    ]
    env = {**os.environ, "WRK_BODY_FILE": str(body), "WRK_PATH": "/v1/chat/completions"}
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=seconds + 60, check=True
    ).stdout
    line = next(line for line in reversed(out.splitlines()) if line.startswith("{"))
    doc: dict[str, Any] = json.loads(line)
    return doc


def check_answer(port: int, doc: dict[str, Any]) -> None:
    """Both targets must answer the scenario with a 200 before they are measured."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
        if resp.status != 200 or not body:
            raise RuntimeError(f"port {port}: HTTP {resp.status}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per target (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--capacity", type=int, default=64, help="gateway slots on the engine (default 64)")
    parser.add_argument("--seed", type=int, default=1, help="shuffle seed")
    args = parser.parse_args()
    ensure_wrk()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir = RESULTS / f"gateway-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    gw_core, load_core = cores()
    sim_port, gw_port, admin_port = free_port(), free_port(), free_port()
    config = run_dir / "gateway.json"
    config.write_text(
        json.dumps(
            {
                "listen": f"127.0.0.1:{gw_port}",
                "admin": {"listen": f"127.0.0.1:{admin_port}"},
                "pools": [
                    {
                        "model": MODEL,
                        "replicas": [
                            {"id": "sim", "url": f"http://127.0.0.1:{sim_port}", "capacity": args.capacity}
                        ],
                    }
                ],
                "access_log": {"enabled": False},
            }
        )
    )
    bodies = {}
    for name, doc in SCENARIOS.items():
        bodies[name] = run_dir / f"{name}.json"
        bodies[name].write_text(json.dumps(doc))
    python = sys.executable
    sim_cmd = [
        *load_core,
        *(python, "-m", "gateway", "sim", "--instant", "--model", MODEL, "--id", "sim"),
        *("--port", str(sim_port), "--log-level", "warning"),
    ]
    gw_cmd = [*gw_core, python, "-m", "gateway", "serve", "--config", str(config), "--log-level", "warning"]
    sim = start(sim_cmd, run_dir / "sim.log")
    gateway = start(gw_cmd, run_dir / "gateway.log")
    targets = {"direct": sim_port, "gateway": gw_port}
    samples: list[dict[str, Any]] = []
    try:
        wait_ready(f"http://127.0.0.1:{sim_port}/health", sim)
        wait_ready(f"http://127.0.0.1:{gw_port}/ready", gateway)
        for port in targets.values():
            for doc in SCENARIOS.values():
                check_answer(port, doc)
        rng = random.Random(args.seed)
        print(
            f"gateway on {gw_core[-1] if gw_core else 'any core'}, engine and wrk on "
            f"{load_core[-1] if load_core else 'any core'}; {args.rounds} rounds x {args.duration:g} s, "
            f"{args.connections} connections",
            file=sys.stderr,
        )
        for rnd in range(args.rounds):
            order = [(t, s) for t in targets for s in SCENARIOS]
            rng.shuffle(order)
            for target, scenario in order:
                port = targets[target]
                if args.warmup > 0:
                    run_wrk(load_core, port, bodies[scenario], args.warmup, args.connections)
                res = run_wrk(load_core, port, bodies[scenario], args.duration, args.connections)
                errors = sum(v for k, v in res.items() if k.startswith("errors_"))
                rps = res["requests"] / (res["duration_us"] / 1e6)
                lat = res["latency_us"]
                samples.append(
                    {
                        "round": rnd,
                        "target": target,
                        "scenario": scenario,
                        "rps": rps,
                        "p50_ms": lat["p50"] / 1000,
                        "p99_ms": lat["p99"] / 1000,
                        "errors": errors,
                        "wrk": res,
                    }
                )
                print(
                    f"round {rnd} {target:8s} {scenario:6s} {rps:9.0f} req/s  p50 {lat['p50'] / 1000:.2f} ms"
                    f"  p99 {lat['p99'] / 1000:.2f} ms  errors {errors}",
                    file=sys.stderr,
                )
    finally:
        stop(gateway)
        stop(sim)
    table = summarize(samples, args.rounds)
    print(table)
    (run_dir / "table.md").write_text(table + "\n")
    (run_dir / "results.json").write_text(
        json.dumps(
            {
                "settings": vars(args) | {"gateway_core": gw_core, "load_core": load_core},
                "samples": samples,
            },
            indent=2,
        )
    )
    print(f"\nraw results: {run_dir / 'results.json'}")
    return 0


def summarize(samples: list[dict[str, Any]], rounds: int) -> str:
    def pick(target: str, scenario: str, rnd: int) -> dict[str, Any] | None:
        for s in samples:
            if s["target"] == target and s["scenario"] == scenario and s["round"] == rnd:
                return s
        return None

    lines = [
        "| scenario | direct req/s | gateway req/s | gateway / direct | direct p50 / p99 ms | "
        "gateway p50 / p99 ms | added p50 / p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:
        per_round = []
        for rnd in range(rounds):
            d, g = pick("direct", scenario, rnd), pick("gateway", scenario, rnd)
            if d is not None and g is not None:
                per_round.append((d, g))
        if not per_round:
            continue

        def med(values: list[float]) -> float:
            return statistics.median(values)

        d_rps = med([d["rps"] for d, _ in per_round])
        g_rps = med([g["rps"] for _, g in per_round])
        ratio = med([g["rps"] / d["rps"] for d, g in per_round])
        d50, d99 = med([d["p50_ms"] for d, _ in per_round]), med([d["p99_ms"] for d, _ in per_round])
        g50, g99 = med([g["p50_ms"] for _, g in per_round]), med([g["p99_ms"] for _, g in per_round])
        a50 = med([g["p50_ms"] - d["p50_ms"] for d, g in per_round])
        a99 = med([g["p99_ms"] - d["p99_ms"] for d, g in per_round])
        errors = sum(d["errors"] + g["errors"] for d, g in per_round)
        lines.append(
            f"| {scenario} | {d_rps:,.0f} | {g_rps:,.0f} | {ratio:.2f} | {d50:.2f} / {d99:.2f} | "
            f"{g50:.2f} / {g99:.2f} | {a50:+.2f} / {a99:+.2f} | {errors} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
