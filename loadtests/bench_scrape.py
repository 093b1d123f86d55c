"""Scrape cost: the gateway's engine scraper over 512 replicas once a second, in CPU share of one core.

One nginx serves the same vLLM `/metrics` page (loadtests/nginx/metrics-vllm.txt, 38 KB) for every
replica: replica NNN is `http://127.0.0.1:PORT/r/NNN`. By default every replica has its own port, as
in a real fleet where each engine is another host and needs its own keep-alive connection;
`--ports 1` puts them all behind one port. The gateway's own `Scraper` (gateway/scrape.py, with its
keep-alive poll client, parser and telemetry) runs in this process on uvloop, pinned to one core, nginx on
the other. Measured after one warm-up round: process CPU time / wall time, the duration of each
scrape round, event-loop lag (how late a 5 ms timer fires), and that every replica has fresh signals.
Target from the issue: under 10% of one core.

    python loadtests/bench_scrape.py                  # 512 replicas, 20 s, 512 ports then 1 port
    python loadtests/bench_scrape.py --replicas 64 --seconds 10 --ports 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import aiohttp  # noqa: E402
import uvloop  # noqa: E402
from bench_proxies import run_in_netns, stop_on_sigterm  # noqa: E402  (loadtests/ is on sys.path)

from gateway.config import AccessLogConfig, ReplicaSpec, ScrapeConfig  # noqa: E402
from gateway.pool import Registry  # noqa: E402
from gateway.scrape import Scraper, parse_metrics  # noqa: E402
from gateway.telemetry import Telemetry  # noqa: E402
from policies.least_request import LeastRequestRouter  # noqa: E402

NGINX_DIR = HERE / "nginx"
RESULTS = HERE / "results"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TARGET_PCT = 10.0


class CountingScraper(Scraper):
    """The gateway's Scraper, timing each round it runs."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.round_s: list[float] = []

    async def scrape_all(self) -> None:
        started = time.perf_counter()
        await super().scrape_all()
        self.round_s.append(time.perf_counter() - started)


def start_nginx(run_dir: Path, ports: list[int], core: int | None) -> subprocess.Popen[bytes]:
    listens = "\n".join(f"        listen 127.0.0.1:{port} backlog=4096;" for port in sorted(set(ports)))
    text = (NGINX_DIR / "scrape.conf.in").read_text()
    for key, value in {"RUN_DIR": run_dir, "CANNED_DIR": NGINX_DIR, "LISTENS": listens}.items():
        text = text.replace("{{" + key + "}}", str(value))
    conf = run_dir / "scrape-nginx.conf"
    conf.write_text(text)
    cmd = ["nginx", "-p", str(run_dir), "-c", str(conf)]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    with open(run_dir / "scrape-nginx.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports[0]}/r/0/metrics"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"nginx exited with {proc.returncode}; see {run_dir / 'scrape-nginx-error.log'}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return proc
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"nginx did not serve {url}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def lag_probe(samples: list[float], stop_at: float) -> None:
    """How late a 5 ms sleep wakes up: the event-loop starvation a request would see."""
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        before = loop.time()
        await asyncio.sleep(0.005)
        samples.append(loop.time() - before - 0.005)


async def measure(urls: list[str], seconds: float, interval: float) -> dict[str, float]:
    registry = Registry(lambda model: LeastRequestRouter(), queue_max=1024)
    specs = [ReplicaSpec(id=f"r{i:03d}", model=MODEL, url=url, engine="vllm") for i, url in enumerate(urls)]
    registry.apply(1, specs)
    telemetry = Telemetry(AccessLogConfig(enabled=False))
    telemetry.attach(registry)
    cfg = ScrapeConfig(enabled=True, interval_s=interval, timeout_s=1.0, stale_after_s=5.0)
    scraper = CountingScraper(registry, cfg, telemetry)
    await scraper.start()
    loop = asyncio.get_running_loop()
    while len(scraper.round_s) < 1:  # warm-up: connections opened, first parse done
        await asyncio.sleep(0.05)
    warm_rounds = len(scraper.round_s)
    lag: list[float] = []
    wall0, cpu0, ru0 = loop.time(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    await lag_probe(lag, wall0 + seconds)
    wall, cpu, ru1 = (
        loop.time() - wall0,
        time.process_time() - cpu0,
        resource.getrusage(resource.RUSAGE_SELF),
    )
    await scraper.stop()
    now = time.monotonic()
    replicas = list(registry.replicas())
    fresh = sum(
        1 for r in replicas if r.signals is not None and now - r.signals.scraped_at < 2 * interval + 1
    )
    errors = sum(1 for r in replicas if r.signals_error is not None)
    rounds = scraper.round_s[warm_rounds:]
    lag_ms = sorted(x * 1000 for x in lag)
    return {
        "replicas": len(replicas),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 3),
        "cpu_pct_of_one_core": round(100 * cpu / wall, 2),
        "user_s": round(ru1.ru_utime - ru0.ru_utime, 3),
        "system_s": round(ru1.ru_stime - ru0.ru_stime, 3),
        "rounds": len(rounds),
        "round_ms_median": round(1000 * statistics.median(rounds), 1) if rounds else float("nan"),
        "round_ms_max": round(1000 * max(rounds), 1) if rounds else float("nan"),
        "loop_lag_ms_p50": round(lag_ms[len(lag_ms) // 2], 2) if lag_ms else float("nan"),
        "loop_lag_ms_p99": round(lag_ms[int(len(lag_ms) * 0.99)], 2) if lag_ms else float("nan"),
        "loop_lag_ms_max": round(lag_ms[-1], 2) if lag_ms else float("nan"),
        "replicas_fresh": fresh,
        "replicas_with_error": errors,
    }


def parse_cost_us(repeat: int = 2000) -> float:
    """Microseconds `parse_metrics` takes for one vLLM page: the part of a scrape that is not HTTP."""
    page = (NGINX_DIR / "metrics-vllm.txt").read_bytes()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeat):
            parse_metrics("vllm", page, 0.0)
        best = min(best, (time.perf_counter() - started) / repeat)
    return best * 1e6


def run(args: argparse.Namespace) -> int:
    if shutil.which("nginx") is None:
        subprocess.run(["apt-get", "update", "-q"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], check=False, stdout=subprocess.DEVNULL)
        if shutil.which("nginx") is None:
            sys.exit("nginx is missing and could not be installed")
    allowed = sorted(os.sched_getaffinity(0))
    mine, nginx_core = (allowed[0], allowed[1]) if len(allowed) > 1 else (None, None)
    if args.nice and os.geteuid() == 0:
        os.nice(args.nice)  # inherited by nginx: less noise from other work on a shared machine
    run_dir = (args.out or RESULTS / f"scrape-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for ports_n in args.ports:
        n_ports = min(ports_n, args.replicas)
        ports = [args.base_port + i for i in range(n_ports)]
        nginx = start_nginx(run_dir, ports, nginx_core)
        try:
            if mine is not None:
                os.sched_setaffinity(0, {mine})
            urls = [f"http://127.0.0.1:{ports[i % n_ports]}/r/{i:03d}" for i in range(args.replicas)]
            res = uvloop.run(measure(urls, args.seconds, args.interval))
        finally:
            if mine is not None:
                os.sched_setaffinity(0, set(allowed))
            stop(nginx)
        res["ports"] = n_ports
        results.append(res)
        ok = res["cpu_pct_of_one_core"] < TARGET_PCT and res["replicas_fresh"] == args.replicas
        print(
            f"{args.replicas} replicas on {n_ports} port(s), every {args.interval:g} s for "
            f"{res['wall_s']:g} s: {res['cpu_pct_of_one_core']:.1f}% of one core (target < {TARGET_PCT:g}%: "
            f"{'PASS' if ok else 'FAIL'}); round median {res['round_ms_median']} ms, "
            f"max {res['round_ms_max']} ms; "
            f"loop lag p99 {res['loop_lag_ms_p99']} ms, max {res['loop_lag_ms_max']} ms; "
            f"fresh {res['replicas_fresh']}/{args.replicas}, errors {res['replicas_with_error']}",
            flush=True,
        )
    parse_us = parse_cost_us()
    parse_pct = parse_us * args.replicas / args.interval / 1e4
    print(f"parse_metrics alone: {parse_us:.0f} us per page = {parse_pct:.1f}% of one core at this rate")
    raw = {
        "parse_metrics_us_per_page": round(parse_us, 1),
        "parse_metrics_pct_of_one_core": round(parse_pct, 2),
        "settings": {
            "replicas": args.replicas,
            "interval_s": args.interval,
            "seconds": args.seconds,
            "metrics_bytes": (NGINX_DIR / "metrics-vllm.txt").stat().st_size,
            "cores": {"scraper": mine, "nginx": nginx_core},
            "network": "private namespace (unshare -n)" if args.in_netns else "host loopback",
            "nice": args.nice if os.geteuid() == 0 else 0,
            "aiohttp": aiohttp.__version__,
            "python": sys.version.split()[0],
        },
        "results": results,
    }
    (run_dir / "results.json").write_text(json.dumps(raw, indent=2))
    print(f"raw results: {run_dir / 'results.json'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured wall time per setup")
    parser.add_argument("--interval", type=float, default=1.0, help="scrape interval in seconds")
    parser.add_argument(
        "--ports",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[512, 1],
        help="comma-separated setups: ports the replicas are spread over (default 512,1)",
    )
    parser.add_argument("--base-port", type=int, default=21000, help="first nginx port")
    parser.add_argument("--nice", type=int, default=-10, help="niceness when run as root (0 to leave it)")
    parser.add_argument("--no-netns", action="store_true", help="use the host loopback, not `unshare -n`")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.in_netns and not args.no_netns and os.geteuid() == 0 and shutil.which("unshare"):
        probe = subprocess.run(
            ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            cmd = [
                "unshare",
                "-n",
                sys.executable,
                str(Path(__file__).resolve()),
                *sys.argv[1:],
                "--in-netns",
            ]
            return run_in_netns(cmd)
    if args.in_netns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    stop_on_sigterm()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
