"""Throughput of one `llm-gateway sim --instant` process on one core: tiny non-streaming chat requests.

The simulator is pinned to CPU 0 (taskset) and the load generator to CPU 1; all traffic stays on
127.0.0.1. The generator is `wrk` when installed (`apt-get install -y wrk`), otherwise a bounded aiohttp
client. Prints requests per second; the target is >= 2,000 so the sim never limits a gateway benchmark.

    .venv/bin/python loadtests/bench_sim.py [--duration 10] [--connections 64] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.procs import free_port, wait_http  # noqa: E402

MODEL = "bench/model"


def body(stream: bool, max_tokens: int) -> str:
    doc = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    if stream:
        doc["stream"] = True
    return json.dumps(doc)


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), so a busy shared machine does not hide the cost."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, payload: str, duration: float, connections: int) -> tuple[float, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(payload)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    try:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "-s", script.name, url]
        out = subprocess.run(pinned(1, argv), capture_output=True, text=True, timeout=duration + 30).stdout
    finally:
        os.unlink(script.name)
    print(out.rstrip())
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"{errors.group(1)} failed responses")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not match or not total:
        raise SystemExit("could not read wrk's output")
    return float(match.group(1)), int(total.group(1))


async def aiohttp_load(url: str, payload: str, duration: float, connections: int) -> tuple[float, int]:
    import aiohttp

    done = 0
    failed = 0
    data = payload.encode()
    deadline = time.monotonic() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done, failed
        while time.monotonic() < deadline:
            async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                if resp.status == 200:
                    done += 1
                else:
                    failed += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.monotonic() - start
    if failed:
        raise SystemExit(f"{failed} failed responses")
    return done / elapsed, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (default 64)")
    parser.add_argument("--stream", action="store_true", help="streaming requests instead")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per answer (default 4)")
    parser.add_argument("--generator", choices=["auto", "wrk", "aiohttp"], default="auto")
    parser.add_argument("--_client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    payload = body(args.stream, args.max_tokens)
    if args._client:
        rate, total = asyncio.run(aiohttp_load(args.url, payload, args.duration, args.connections))
        print(f"Requests/sec: {rate:.1f}\nRequests: {total}")
        return 0

    port = free_port()
    sim_argv = [sys.executable, "-m", "gateway", "sim", "--instant", "--model", MODEL, "--port", str(port)]
    sim_argv += ["--log-level", "warning"]
    sim = subprocess.Popen(pinned(0, sim_argv), cwd=REPO)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=sim)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        generator = args.generator
        if generator == "auto":
            generator = "wrk" if shutil.which("wrk") else "aiohttp"
        cpu_before = cpu_seconds(sim.pid)
        if generator == "wrk":
            rate, total = run_wrk(url, payload, args.duration, args.connections)
        else:
            client = [sys.executable, __file__, "--_client", "--url", url, "--duration", str(args.duration)]
            client += ["--connections", str(args.connections), "--max-tokens", str(args.max_tokens)]
            client += ["--stream"] if args.stream else []
            out = subprocess.run(
                pinned(1, client), capture_output=True, text=True, timeout=args.duration + 60
            )
            match = re.search(r"Requests/sec: ([\d.]+)\nRequests: (\d+)", out.stdout)
            if not match:
                raise SystemExit(f"load generator failed: {out.stderr[-2000:]}")
            rate, total = float(match.group(1)), int(match.group(2))
        cpu = cpu_seconds(sim.pid) - cpu_before
        kind = "streaming" if args.stream else "non-streaming"
        print(
            f"sim --instant on one core: {rate:,.0f} {kind} chat requests/s "
            f"({generator}, {args.connections} connections, {args.duration:g}s, max_tokens {args.max_tokens})"
        )
        if cpu > 0:
            print(
                f"sim CPU time: {cpu:.2f}s for {total:,} requests = {1e6 * cpu / total:.0f} us/request, "
                f"{total / cpu:,.0f} requests per CPU-second (what one uncontended core can serve)"
            )
        return 0 if rate >= 2000 else 1
    finally:
        sim.terminate()
        sim.wait(timeout=10)


if __name__ == "__main__":
    raise SystemExit(main())
