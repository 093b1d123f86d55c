"""Proxy benchmark: the gateway against no proxy, nginx, a naive aiohttp proxy and the Rust routers.

Setup, per run: one canned nginx engine (static OpenAI answers, see loadtests/nginx/), then for every
measurement one proxy in front of it on 127.0.0.1, wrk as the client. The proxy is pinned to one core,
the engine and wrk to the other, so "req/s" means "what one core of this proxy relays". Each round runs
every proxy once per scenario, in a shuffled order, and the table shows medians over rounds; ratios
are taken within a round (proxy / direct of the same round) before the median, so drift of a shared
machine cancels out. The load runs inside a private network namespace (`unshare -n`) when possible.

Scenarios: `chat` (436-byte request, 603-byte JSON answer) and `stream` (436-byte request, 64 SSE
events, 14.7 KB). Every proxy is checked for a byte-exact answer before it is measured.

It installs what it needs: nginx and wrk from Debian packages when missing, vllm-router and
sglang-router from PyPI into their own venvs under loadtests/results/venvs/ (a peer that will not
install or start is reported as skipped, with the reason). Results: a markdown table on stdout, and
raw numbers with versions and settings in loadtests/results/proxies-<time>/results.json.

    python loadtests/bench_proxies.py                      # full run, about 7 minutes
    python loadtests/bench_proxies.py --rounds 1 --duration 3 --only gateway,nginx
    python loadtests/bench_proxies.py --profile            # plus a py-spy profile of the gateway
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NGINX_DIR = HERE / "nginx"
WRK_DIR = HERE / "wrk"
RESULTS = HERE / "results"
VENVS = RESULTS / "venvs"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ADMIN_TOKEN = "bench-admin-token"

SCENARIOS = {
    "chat": {"request": WRK_DIR / "chat-request.json", "answer": NGINX_DIR / "chat.json"},
    "stream": {"request": WRK_DIR / "stream-request.json", "answer": NGINX_DIR / "stream.sse"},
}
ROUTERS = {
    "vllm-router": {"package": "vllm-router", "version": "0.1.17"},
    "sglang-router": {"package": "sglang-router", "version": "0.3.2"},
}
ALL_PROXIES = ["direct", "nginx", "gateway", "vllm-router", "sglang-router", "naive-aiohttp", "prototype"]
TARGETS = (
    "chat req/s >= 2.0x vllm-router and >= 0.4x nginx; stream req/s >= 2.0x vllm-router; "
    "added latency vs direct: p50 <= 0.5 ms, p99 <= 2 ms"
)


class Skip(Exception):
    """A peer that cannot be measured here; the message is the reason shown in the table."""


# --- small process helpers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_text(cmd: list[str], timeout: float = 30.0) -> str:
    """stdout+stderr of a short command, or the reason it failed."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (out.stdout + out.stderr).strip()


def render(template: Path, dest: Path, **values: object) -> Path:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    dest.write_text(text)
    return dest


@dataclass
class Cores:
    """Which core runs the proxy and which one runs the engine and the load generator."""

    proxy: int | None
    load: int | None

    def pin(self, core: int | None, cmd: list[str]) -> list[str]:
        return cmd if core is None else ["taskset", "-c", str(core), *cmd]

    @classmethod
    def detect(cls) -> Cores:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(allowed[0], allowed[1])


class Process:
    """A started server: its own process group, stopped by id, log in the run directory."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log
        self.admin_port: int | None = None
        """The gateway's admin listener, to read its own request counter after a run."""
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=REPO,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


# --- HTTP checks -----------------------------------------------------------------------------------


def post(port: int, body: bytes, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer bench"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def check_answer(scenario: str, body: bytes) -> str | None:
    """None when `body` is the canned answer relayed intact, else what is wrong with it."""
    expected = SCENARIOS[scenario]["answer"].read_bytes()
    if body == expected:
        return None
    if scenario == "chat":
        try:
            same = json.loads(body) == json.loads(expected)
        except ValueError:
            same = False
        return None if same else f"answer differs ({len(body)} bytes, expected {len(expected)})"
    events = body.count(b"data: ")
    if events == 64 and body.rstrip().endswith(b"data: [DONE]"):
        return None
    return f"stream differs ({events} events, {len(body)} bytes; expected 64 events, {len(expected)} bytes)"


def wait_ready(port: int, scenario: str, proc: Process | None, timeout: float) -> None:
    """Until the proxy relays one canned answer intact; Skip with the reason when it never does."""
    body = SCENARIOS[scenario]["request"].read_bytes()
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise Skip(f"exited with {proc.popen.returncode}: {proc.tail(5)}")
        try:
            status, answer, _ = post(port, body, timeout=2.0)
            if status == 200:
                problem = check_answer(scenario, answer)
                if problem is None:
                    return
                raise Skip(problem)
            last = f"HTTP {status}: {answer[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise Skip(f"not ready within {timeout:.0f}s (last: {last})")


# --- setup: tools, venvs, network namespace -------------------------------------------------------


def ensure_debian_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if not missing:
        return
    print(f"installing {' '.join(missing)} from Debian packages ...", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=False, stdout=subprocess.DEVNULL)
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", *missing], check=False, stdout=subprocess.DEVNULL
    )
    if done.returncode != 0 or any(shutil.which(tool) is None for tool in missing):
        sys.exit(
            f"cannot install {' '.join(missing)} (apt-get exit {done.returncode}); install them and rerun"
        )


def ensure_router(name: str, install: bool) -> tuple[Path | None, str]:
    """(venv, version) of a router peer, installed on first use; (None, reason) when it is not there.

    A failed install leaves its reason in `<venv>.failed`, so the run inside the network namespace
    (which cannot reach PyPI) reports it instead of trying again.
    """
    spec = ROUTERS[name]
    venv = VENVS / name
    stamp = venv / ".installed"
    failed = VENVS / f"{name}.failed"
    wanted = f"{spec['package']}=={spec['version']}"
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return venv, spec["version"]
    if not install:
        reason = failed.read_text().strip() if failed.exists() else f"{wanted} is not installed"
        return None, reason
    print(f"installing {wanted} into {venv} ...", flush=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        pip = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", wanted],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"venv/pip failed: {exc}"
    else:
        if pip.returncode == 0:
            stamp.write_text(wanted)
            failed.unlink(missing_ok=True)
            return venv, spec["version"]
        errors = [line for line in pip.stderr.splitlines() if "ERROR" in line] or pip.stderr.splitlines()
        reason = f"pip install {wanted} failed: {' '.join(errors[-2:])[:300]}"
    failed.write_text(reason)
    return None, reason


def ensure_py_spy() -> str | None:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy>=0.3"], check=False)
    return str(spy) if spy.exists() else None


def netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, check=False
    )
    return probe.returncode == 0


# --- the peers -------------------------------------------------------------------------------------


@dataclass
class Peer:
    """How to start one proxy in front of an upstream URL; `start` returns (process or None, port)."""

    name: str
    version: str
    note: str
    start: Callable[[str, Path], tuple[Process | None, int]]
    skipped: str | None = None


def make_peers(names: list[str], args: argparse.Namespace, cores: Cores, run_dir: Path) -> list[Peer]:
    peers: list[Peer] = []
    pin = cores.pin

    def direct(upstream: str, log_dir: Path) -> tuple[Process | None, int]:
        return None, int(upstream.rsplit(":", 1)[1])

    def nginx(upstream: str, log_dir: Path) -> tuple[Process | None, int]:
        port = free_port()
        conf = render(
            NGINX_DIR / "reverse-proxy.conf.in",
            run_dir / f"nginx-proxy-{port}.conf",
            RUN_DIR=run_dir,
            NAME=f"nginx-proxy-{port}",
            PORT=port,
            UPSTREAM=upstream.removeprefix("http://"),
        )
        cmd = pin(cores.proxy, ["nginx", "-p", str(run_dir), "-c", str(conf)])
        return Process("nginx", cmd, log_dir / "nginx-proxy.log"), port

    def python_proxy(name: str, script: str) -> Callable[[str, Path], tuple[Process | None, int]]:
        """A peer that is one script of loadtests/ taking --listen and --upstream."""

        def start(upstream: str, log_dir: Path) -> tuple[Process | None, int]:
            port = free_port()
            listen = f"127.0.0.1:{port}"
            cmd = [sys.executable, str(HERE / script), "--listen", listen, "--upstream", upstream]
            return Process(name, pin(cores.proxy, cmd), log_dir / f"{name}.log"), port

        return start

    def gateway(upstream: str, log_dir: Path) -> tuple[Process | None, int]:
        port, admin = free_port(), free_port()
        config = {
            "listen": f"127.0.0.1:{port}",
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "pools": [
                {
                    "model": MODEL,
                    "replicas": [
                        {
                            "id": "engine-0",
                            "url": upstream,
                            "engine": "vllm",
                            "capacity": args.gateway_capacity,
                        }
                    ],
                }
            ],
            "access_log": {"enabled": args.gateway_access_log},
        }
        path = run_dir / f"gateway-{port}.json"
        path.write_text(json.dumps(config, indent=2))
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), *args.gateway_arg]
        env = {"LLM_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        proc = Process("gateway", pin(cores.proxy, cmd), log_dir / "gateway.log", env)
        proc.admin_port = admin
        return proc, port

    def router(name: str, venv: Path) -> Callable[[str, Path], tuple[Process | None, int]]:
        def start(upstream: str, log_dir: Path) -> tuple[Process | None, int]:
            port, prom = free_port(), free_port()
            common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", upstream]
            common += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom)]
            common += ["--policy", args.router_policy]
            if name == "vllm-router":
                cmd = [str(venv / "bin" / "vllm-router"), *common, "--log-level", "warning"]
            else:
                launch = [str(venv / "bin" / "python"), "-m", "sglang_router.launch_router"]
                cmd = [*launch, *common, "--log-level", "warn"]
            env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RUST_LOG": "warn"}
            return Process(name, pin(cores.proxy, cmd), log_dir / f"{name}.log", env), port

        return start

    for name in names:
        if name == "direct":
            peers.append(Peer("direct", "-", "no proxy: the limit", direct))
        elif name == "nginx":
            version = run_text(["nginx", "-v"]).removeprefix("nginx version: ")
            peers.append(
                Peer("nginx", version, "C; 1 worker, upstream keepalive, proxy_buffering off", nginx)
            )
        elif name == "naive-aiohttp":
            import aiohttp

            naive = python_proxy("naive-aiohttp", "naive_aiohttp_proxy.py")
            peers.append(Peer("naive-aiohttp", aiohttp.__version__, "aiohttp+uvloop, no routing", naive))
        elif name == "prototype":
            import uvloop

            note = "asyncio.Protocol+uvloop+httptools, no routing: the Python ceiling"
            prototype = python_proxy("prototype", "prototype_proxy.py")
            peers.append(Peer("prototype", uvloop.__version__, note, prototype))
        elif name == "gateway":
            peers.append(gateway_peer(args, gateway))
        else:
            venv, version = ensure_router(name, install=not (args.no_install or args.in_netns))
            peer = Peer(name, ROUTERS[name]["version"], f"Rust; policy {args.router_policy}", direct)
            if venv is None:
                peer.skipped = version
            else:
                peer.start = router(name, venv)
            peers.append(peer)
    return peers


def gateway_peer(args: argparse.Namespace, start: Callable[[str, Path], tuple[Process | None, int]]) -> Peer:
    from gateway import __version__

    rev = run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run_text(["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway", "policies"])
    version = f"{__version__} ({rev}{'+dirty' if dirty else ''})"
    note = "default routing chain, slots, limits, metrics on"
    if not args.gateway_access_log:
        note += ", access log off"
    peer = Peer("gateway", version, note, start)
    if importlib.util.find_spec("gateway.serve") is None:
        peer.skipped = "`llm-gateway serve` is not in this checkout yet (gateway/serve.py missing)"
    return peer


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class Sample:
    peer: str
    scenario: str
    round: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    requests: int
    wrk: dict[str, Any]
    gateway_counted: int | None = None
    """Requests the gateway's own metrics counted in the whole run (warm-up, checks and load)."""
    cpu_busy: float | None = None
    """Share of a core the proxy's processes used during the measured run (1.0 = its core was full)."""
    cpu_us_per_request: float | None = None
    """The proxy's CPU time per answered request: its cost, whether or not the load generator capped it."""


def wrk(cores: Cores, port: int, scenario: str, seconds: float, connections: int) -> dict[str, Any]:
    cmd = cores.pin(
        cores.load,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(WRK_DIR / "openai.lua"),
            f"http://127.0.0.1:{port}",
        ],
    )
    env = {**os.environ, "WRK_BODY_FILE": str(SCENARIOS[scenario]["request"])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise Skip(f"wrk printed no result (exit {out.returncode}): {(out.stderr + out.stdout).strip()[:300]}")


def measure(peer: Peer, scenario: str, rnd: int, ctx: Context) -> Sample:
    upstream = ctx.backend_urls[scenario]
    proc, port = peer.start(upstream, ctx.run_dir)
    try:
        wait_ready(port, scenario, proc, ctx.args.start_timeout)
        if ctx.args.warmup > 0:
            wrk(ctx.cores, port, scenario, ctx.args.warmup, ctx.args.connections)
        cpu_before = group_cpu_seconds(proc.popen.pid) if proc is not None else None
        res = wrk(ctx.cores, port, scenario, ctx.args.duration, ctx.args.connections)
        cpu_after = group_cpu_seconds(proc.popen.pid) if proc is not None else None
        if proc is not None and not proc.alive():
            raise Skip(f"died under load: {proc.tail(5)}")
        counted = gateway_counted(proc.admin_port) if proc is not None and proc.admin_port else None
        if ctx.profile_hook is not None and peer.name == "gateway" and proc is not None:
            ctx.profile_hook(proc, port, scenario)
    finally:
        if proc is not None:
            proc.stop()
    lat = res["latency_us"]
    errors = sum(int(v) for k, v in res.items() if k.startswith("errors_"))
    requests = int(res["requests"])
    seconds = int(res["duration_us"]) / 1e6
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return Sample(
        peer.name,
        scenario,
        rnd,
        rps=(requests - errors) / seconds,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        errors=errors,
        requests=requests,
        wrk=res,
        gateway_counted=counted,
        cpu_busy=None if cpu is None else cpu / seconds,
        cpu_us_per_request=None if cpu is None or not requests else cpu / requests * 1e6,
    )


def group_cpu_seconds(pgid: int) -> float | None:
    """User plus system CPU time of every process in the proxy's process group, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def gateway_counted(admin_port: int) -> int | None:
    """Sum of the gateway's own `llm_gateway_requests_total`: proof its metrics were on under load."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    except OSError:
        return None
    finally:
        conn.close()
    if resp.status != 200:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("llm_gateway_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


@dataclass
class Context:
    args: argparse.Namespace
    cores: Cores
    run_dir: Path
    backend_urls: dict[str, str]
    profile_hook: Callable[[Process, int, str], None] | None = None


@contextlib.contextmanager
def canned_backend(cores: Cores, run_dir: Path) -> Iterator[dict[str, str]]:
    """The engine: one nginx worker on the load core, a port per scenario."""
    ports = {"chat": free_port(), "stream": free_port()}
    common = dict(RUN_DIR=run_dir, CANNED_DIR=NGINX_DIR, MODEL=MODEL)
    render(NGINX_DIR / "backend-common.conf.in", run_dir / "backend-common.conf", **common)
    conf = render(
        NGINX_DIR / "backend.conf.in",
        run_dir / "backend.conf",
        CHAT_PORT=ports["chat"],
        STREAM_PORT=ports["stream"],
        **common,
    )
    proc = Process(
        "backend",
        cores.pin(cores.load, ["nginx", "-p", str(run_dir), "-c", str(conf)]),
        run_dir / "backend.log",
    )
    try:
        for scenario, port in ports.items():
            wait_ready(port, scenario, proc, 10)
        yield {scenario: f"http://127.0.0.1:{port}" for scenario, port in ports.items()}
    finally:
        proc.stop()


# --- reporting -------------------------------------------------------------------------------------


def summarize(
    samples: list[Sample], peers: list[Peer], scenarios: list[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """peer -> scenario -> medians (rps, p50, p99) and per-round-ratio medians against every peer."""
    by: dict[tuple[str, str, int], Sample] = {(s.peer, s.scenario, s.round): s for s in samples}
    out: dict[str, dict[str, dict[str, float]]] = {}
    names = [p.name for p in peers if p.skipped is None]
    for name in names:
        out[name] = {}
        for scenario in scenarios:
            mine = [s for s in samples if s.peer == name and s.scenario == scenario]
            if not mine:
                continue
            row = {
                "rps": statistics.median(s.rps for s in mine),
                "p50_ms": statistics.median(s.p50_ms for s in mine),
                "p90_ms": statistics.median(s.p90_ms for s in mine),
                "p99_ms": statistics.median(s.p99_ms for s in mine),
                "errors": float(sum(s.errors for s in mine)),
                "rounds": float(len(mine)),
            }
            cpu = [s.cpu_us_per_request for s in mine if s.cpu_us_per_request is not None]
            busy = [s.cpu_busy for s in mine if s.cpu_busy is not None]
            if cpu:
                row["cpu_us_per_request"] = statistics.median(cpu)
                row["cpu_busy"] = statistics.median(busy)
            for other in names:
                ratios = [
                    s.rps / by[(other, scenario, s.round)].rps
                    for s in mine
                    if (other, scenario, s.round) in by and by[(other, scenario, s.round)].rps > 0
                ]
                if ratios:
                    row[f"x_{other}"] = statistics.median(ratios)
                added50 = [
                    s.p50_ms - by[(other, scenario, s.round)].p50_ms
                    for s in mine
                    if (other, scenario, s.round) in by
                ]
                added99 = [
                    s.p99_ms - by[(other, scenario, s.round)].p99_ms
                    for s in mine
                    if (other, scenario, s.round) in by
                ]
                if other == "direct" and added50:
                    row["added_p50_ms"] = statistics.median(added50)
                    row["added_p99_ms"] = statistics.median(added99)
            out[name][scenario] = row
    return out


def fmt_rps(v: float) -> str:
    return f"{v:,.0f}"


def table(summary: dict[str, dict[str, dict[str, float]]], peers: list[Peer], scenarios: list[str]) -> str:
    lines = []
    head = ["proxy"]
    for sc in scenarios:
        head += [f"{sc} req/s", f"{sc} x direct", f"{sc} p50 / p99 ms", f"{sc} added p50 / p99 ms"]
        head += [f"{sc} proxy CPU µs/req (core busy)"]
    head += ["version", "notes"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for peer in peers:
        cells = [peer.name]
        for sc in scenarios:
            row = summary.get(peer.name, {}).get(sc)
            if row is None:
                cells += ["skipped", "", "", "", ""]
                continue
            err = f" ({int(row['errors'])} errors)" if row["errors"] else ""
            cells.append(fmt_rps(row["rps"]) + err)
            cells.append(f"{row.get('x_direct', float('nan')):.3f}")
            cells.append(f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f}")
            if peer.name == "direct":
                cells.append("-")
            else:
                nan = float("nan")
                cells.append(f"{row.get('added_p50_ms', nan):+.2f} / {row.get('added_p99_ms', nan):+.2f}")
            if "cpu_us_per_request" in row:
                cells.append(f"{row['cpu_us_per_request']:.1f} ({row['cpu_busy']:.0%})")
            else:
                cells.append("-")
        cells.append(peer.version)
        cells.append(f"skipped: {peer.skipped}" if peer.skipped else peer.note)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    measured = [p.name for p in peers if summary.get(p.name)]
    if len(measured) > 2:
        lines.append("")
        lines.append("Ratios, row / column (median of per-round ratios), " + " and ".join(scenarios) + ":")
        lines.append("")
        lines.append("| | " + " | ".join(measured) + " |")
        lines.append("|---|" + "---|" * len(measured))
        for name in measured:
            cells = [name]
            for other in measured:
                vals = [summary[name].get(sc, {}).get(f"x_{other}") for sc in scenarios]
                cells.append(" / ".join("-" if v is None else f"{v:.2f}" for v in vals))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The issue's targets for the gateway, each with the measured figure."""
    gw = summary.get("gateway")
    if not gw:
        return []
    checks: list[tuple[str, float | None, float, bool]] = []  # (what, value, bound, higher is better)
    chat, stream = gw.get("chat", {}), gw.get("stream", {})
    checks.append(("chat x vllm-router >= 2.0", chat.get("x_vllm-router"), 2.0, True))
    checks.append(("chat x nginx >= 0.4", chat.get("x_nginx"), 0.4, True))
    checks.append(("stream x vllm-router >= 2.0", stream.get("x_vllm-router"), 2.0, True))
    checks.append(("chat added p50 <= 0.5 ms", chat.get("added_p50_ms"), 0.5, False))
    checks.append(("chat added p99 <= 2 ms", chat.get("added_p99_ms"), 2.0, False))
    checks.append(("stream added p50 <= 0.5 ms", stream.get("added_p50_ms"), 0.5, False))
    checks.append(("stream added p99 <= 2 ms", stream.get("added_p99_ms"), 2.0, False))
    lines = []
    for what, value, bound, higher in checks:
        if value is None:
            lines.append(f"- {what}: not measured")
            continue
        ok = value >= bound if higher else value <= bound
        lines.append(f"- {what}: {value:.2f} -> {'PASS' if ok else 'FAIL'}")
    return lines


# --- profiling -------------------------------------------------------------------------------------


def make_profiler(ctx: Context, spy: str) -> Callable[[Process, int, str], None]:
    """Records the gateway with py-spy during an extra wrk run (not part of the table)."""
    done: set[str] = set()

    def hook(proc: Process, port: int, scenario: str) -> None:
        if scenario in done:
            return
        done.add(scenario)
        raw = ctx.run_dir / f"gateway-profile-{scenario}.txt"
        seconds = max(3, int(ctx.args.duration))
        spy_cmd = [
            spy,
            "record",
            "--pid",
            str(proc.popen.pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--format",
            "raw",
        ]
        spy_cmd += ["--nonblocking", "-o", str(raw)]
        recorder = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        wrk(ctx.cores, port, scenario, seconds, ctx.args.connections)
        recorder.wait(timeout=seconds + 30)
        if raw.exists():
            (ctx.run_dir / f"gateway-profile-{scenario}-top.txt").write_text(top_frames(raw))

    return hook


def top_frames(raw: Path, n: int = 25) -> str:
    """Self and inclusive sample shares of the hottest functions in a py-spy raw (collapsed) file."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count
    if not total:
        return "no samples\n"
    out = [f"{total} samples", "", "self %  function"]
    for frame, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:n]:
        out.append(f"{100 * count / total:5.1f}  {frame}")
    out += ["", "incl %  function"]
    for frame, count in sorted(incl_counts.items(), key=lambda kv: -kv[1])[:n]:
        out.append(f"{100 * count / total:5.1f}  {frame}")
    return "\n".join(out) + "\n"


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=4, help="measured seconds per run (default 4)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="unmeasured seconds before each run (default 2)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated peers (direct is always run): {','.join(ALL_PROXIES)}"
    )
    parser.add_argument("--scenarios", default="chat,stream", help="comma-separated: chat,stream")
    parser.add_argument("--seed", type=int, default=None, help="shuffle seed (default: from the clock)")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="seconds for a proxy to answer")
    parser.add_argument(
        "--router-policy",
        default="round_robin",
        help="--policy of vllm-router/sglang-router (default round_robin: their cheapest; with one engine "
        "every policy picks the same one, and cache_aware makes vllm-router call /tokenize per request)",
    )
    parser.add_argument("--gateway-capacity", type=int, default=64, help="slots on the engine (default 64)")
    parser.add_argument(
        "--gateway-access-log",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="gateway access log per request (default off, as for the other proxies)",
    )
    parser.add_argument(
        "--gateway-arg", action="append", default=[], help="extra `serve` argument (repeatable)"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="niceness of the benchmark's processes when run as root (default -10, 0 to leave it)",
    )
    parser.add_argument("--profile", action="store_true", help="also record the gateway with py-spy")
    parser.add_argument("--no-netns", action="store_true", help="use the host loopback, not `unshare -n`")
    parser.add_argument("--no-install", action="store_true", help="do not install the Rust routers")
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default loadtests/results/…)"
    )
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    names = [n for n in args.only.split(",") if n] or list(ALL_PROXIES)
    unknown += [n for n in names if n not in ALL_PROXIES]
    if unknown:
        sys.exit(f"unknown scenario or peer: {', '.join(unknown)}")
    names = ["direct", *[n for n in names if n != "direct"]]

    if not args.in_netns:
        ensure_debian_tools()
        if not args.no_install:
            for name in names:
                if name in ROUTERS:
                    ensure_router(name, install=True)
        if args.profile:
            ensure_py_spy()
        if not args.no_netns and netns_available():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            out = args.out or RESULTS / f"proxies-{stamp}"
            cmd = ["unshare", "-n", sys.executable, str(Path(__file__).resolve())]
            cmd += [*(argv if argv is not None else sys.argv[1:]), "--in-netns", "--out", str(out)]
            return run_in_netns(cmd)
        print("note: no private network namespace; using the host loopback", flush=True)
    else:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    stop_on_sigterm()
    run_dir = (args.out or RESULTS / f"proxies-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cores = Cores.detect()
    if args.nice and os.geteuid() == 0:
        os.nice(args.nice)  # inherited by the engine, the proxies and wrk: less noise from other work
    if cores.load is not None:
        os.sched_setaffinity(0, {cores.load})
    else:
        print("note: fewer than 2 usable cores (or no taskset); nothing is pinned", flush=True)
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    peers = make_peers(names, args, cores, run_dir)
    runnable = [p for p in peers if p.skipped is None]
    per_run = args.warmup + args.duration + 2
    estimate = args.rounds * len(runnable) * len(scenarios) * per_run
    print(
        f"proxy benchmark: {len(runnable)} proxies x {len(scenarios)} scenarios x {args.rounds} rounds, "
        f"{args.connections} connections, ~{estimate / 60:.1f} min; results in {run_dir}",
        flush=True,
    )
    samples: list[Sample] = []
    started = time.time()
    with canned_backend(cores, run_dir) as backend_urls:
        ctx = Context(args, cores, run_dir, backend_urls)
        for rnd in range(args.rounds):
            order = [p for p in peers if p.skipped is None]
            rng.shuffle(order)
            for peer in order:
                for scenario in scenarios:
                    if peer.skipped is not None:
                        break
                    try:
                        sample = measure(peer, scenario, rnd, ctx)
                    except Skip as exc:
                        peer.skipped = f"{scenario}: {exc}"
                        print(f"  round {rnd + 1}: {peer.name} {scenario}: skipped: {exc}", flush=True)
                        break
                    samples.append(sample)
                    print(
                        f"  round {rnd + 1}: {peer.name:14s} {scenario:6s} {sample.rps:10,.0f} req/s  "
                        f"p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms"
                        + (f"  errors {sample.errors}" if sample.errors else "")
                        + (f"  (its metrics: {sample.gateway_counted:,})" if sample.gateway_counted else ""),
                        flush=True,
                    )
        if args.profile and any(p.name == "gateway" and p.skipped is None for p in peers):
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            ctx.profile_hook = make_profiler(ctx, spy)
            gw = next(p for p in peers if p.name == "gateway")
            for scenario in scenarios:
                with contextlib.suppress(Skip):
                    measure(gw, scenario, -1, ctx)

    summary = summarize(samples, peers, scenarios)
    text = table(summary, peers, scenarios)
    checks = verdict(summary)
    network = "private namespace (unshare -n)" if args.in_netns else "host loopback"
    report = [
        f"## Proxy benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"One core of proxy (core {cores.proxy}); canned nginx engine and wrk (1 thread, {args.connections} "
        f"connections) on core {cores.load}; {args.rounds} interleaved rounds of {args.duration:g} s after "
        f"{args.warmup:g} s warm-up; medians. Network: {network}.",
        "",
        text,
    ]
    if checks:
        report += ["", f"Targets ({TARGETS}):", *checks]
    for scenario in scenarios:
        top = run_dir / f"gateway-profile-{scenario}-top.txt"
        if top.exists():
            report += ["", f"Gateway profile, {scenario} (py-spy, top self time):", "```"]
            report += [*top.read_text().splitlines()[:20], "```"]
    output = "\n".join(report)
    print()
    print(output)
    (run_dir / "table.md").write_text(output + "\n")
    raw = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "connections": args.connections,
            "scenarios": scenarios,
            "seed": seed,
            "cores": {"proxy": cores.proxy, "engine_and_wrk": cores.load},
            "network": network,
            "router_policy": args.router_policy,
            "gateway_capacity": args.gateway_capacity,
            "gateway_access_log": args.gateway_access_log,
            "gateway_args": args.gateway_arg,
            "nice": args.nice if os.geteuid() == 0 else 0,
            "model": MODEL,
            "request_bytes": {sc: SCENARIOS[sc]["request"].stat().st_size for sc in scenarios},
            "answer_bytes": {sc: SCENARIOS[sc]["answer"].stat().st_size for sc in scenarios},
        },
        "versions": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpu": cpu_model(),
            "nginx": run_text(["nginx", "-v"]),
            "wrk": run_text(["wrk", "--version"]).splitlines()[0] if shutil.which("wrk") else "missing",
            **{p.name: p.version for p in peers},
        },
        "peers": {p.name: {"note": p.note, "skipped": p.skipped} for p in peers},
        "summary": summary,
        "samples": [s.__dict__ for s in samples],
    }
    (run_dir / "results.json").write_text(json.dumps(raw, indent=2))
    print(f"\nraw results: {run_dir / 'results.json'}")
    return 0


def run_in_netns(cmd: list[str]) -> int:
    """Run the benchmark again inside `unshare -n`, passing SIGTERM on so it stops what it started."""
    child = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    return child.wait()


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every started server is stopped by the `finally` blocks."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
