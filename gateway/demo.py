"""`llm-gateway demo` (what `make run` starts): one gateway, a sidecar, three simulated vLLM engines.

The gateway runs as a child process with an empty config; the sidecar runs in this process, provisions
the engines and registers them through the gateway's admin API, exactly as in production. Once a request
through the public port succeeds, a curl line and an `openai` snippet are printed. Ctrl-C or SIGTERM
drains and stops the engines, then the gateway; nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from gateway.sidecar.controller import Sidecar
from gateway.sidecar.providers.local import death_signal
from gateway.sidecar.spec import GatewayTarget, ServiceSpec, SidecarConfig, SyncSpec
from gateway.sidecar.store import StateInUse

log = logging.getLogger("gateway.demo")

MODEL = "llama-3.1-8b-instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="address of the gateway and the engines (default: %(default)s)")
    a("--port", type=int, default=8000, help="public port of the gateway (default: %(default)s)")
    a("--admin-port", type=int, default=9000, help="admin port of the gateway (default: %(default)s)")
    a("--status-port", type=int, default=9100, help="the sidecar's status endpoint (default: %(default)s)")
    a("--replicas", type=int, default=3, help="simulated engines (default: %(default)s)")
    a("--model", default=MODEL, help="model name the engines serve (default: %(default)s)")
    a("--instant", action="store_true", help="engines answer at once instead of at H100-like speed")
    a("--state-dir", help="sidecar state and logs (default: a temporary directory, removed at exit)")


def snippets(host: str, port: int, model: str) -> str:
    base = f"http://{host}:{port}"
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'
    return f"""
Try it:

curl -s {base}/v1/chat/completions -H 'content-type: application/json' -d '{body}'

python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="unused")
reply = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32
)
print(reply.choices[0].message.content)
EOF
"""


def _sidecar_config(args: argparse.Namespace, state_dir: Path, token: str) -> SidecarConfig:
    command = "{python} -m gateway sim --dialect vllm --host {host} --port {port} --model {model} --id {id}"
    if args.instant:
        command += " --instant"
    service = ServiceSpec(
        name="demo",
        model=args.model,
        command=command,
        engine="vllm",
        capacity=64,
        replicas=args.replicas,
        startup_timeout_s=60.0,
        health_interval_s=1.0,
        backoff_base_s=0.5,
        stop_grace_s=5.0,
        drain_grace_s=10.0,
    )
    return SidecarConfig(
        services=[service],
        gateways=[GatewayTarget(admin_url=f"http://{args.host}:{args.admin_port}", token=token)],
        host=args.host,
        state_dir=str(state_dir),
        status_listen=f"{args.host}:{args.status_port}",
        sync=SyncSpec(interval_s=1.0),
    )


def _start_gateway(args: argparse.Namespace, workdir: Path, token: str) -> subprocess.Popen[bytes]:
    config = workdir / "gateway.yaml"
    config.write_text("# the sidecar fills the pools through the admin API\n{}\n")
    log_path = workdir / "gateway.log"
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config),
                "--listen",
                f"{args.host}:{args.port}",
                "--admin-listen",
                f"{args.host}:{args.admin_port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LLM_GATEWAY_ADMIN_TOKEN": token},
            # Its own process group: Ctrl-C reaches only the demo, which drains the engines through the
            # gateway before stopping it; and it dies with the demo should the demo be killed outright.
            process_group=0,
            preexec_fn=death_signal(signal.SIGTERM),
        )


async def _admin_up(args: argparse.Namespace, gateway: subprocess.Popen[bytes], token: str) -> bool:
    """Wait for the gateway's admin API, so the sidecar's first sync finds it."""
    url = f"http://{args.host}:{args.admin_port}/admin/v1/replicas"
    headers = {"authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and gateway.poll() is None:
            try:
                async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    await resp.content.read(65536)
                    if resp.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    return False


async def _first_answer(
    args: argparse.Namespace, gateway: subprocess.Popen[bytes], stop: asyncio.Event
) -> bool:
    """Wait until a chat request through the public port succeeds (False if stopped or the gateway died)."""
    url = f"http://{args.host}:{args.port}/v1/chat/completions"
    body = {"model": args.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 4}
    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and not stop.is_set():
            if gateway.poll() is not None:
                return False
            try:
                async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.content.read(65536)
                    if resp.status == 200:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    return False


async def _main(args: argparse.Namespace, workdir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    token = secrets.token_urlsafe(24)
    state_dir = Path(args.state_dir) if args.state_dir else workdir / "state"
    sidecar = Sidecar(
        _sidecar_config(args, state_dir, token), stop_engines_on_exit=True, engines_die_with_sidecar=True
    )
    gateway = _start_gateway(args, workdir, token)
    code = 0
    try:
        if not await _admin_up(args, gateway, token):
            tail = (workdir / "gateway.log").read_text(errors="replace")[-2000:]
            print(f"llm-gateway demo: the gateway did not start\n{tail}", file=sys.stderr)
            return 1
        await sidecar.start()
        if await _first_answer(args, gateway, stop):
            print(
                f"llm-gateway demo: {args.replicas} simulated vLLM engines serving {args.model!r} behind the "
                f"gateway at http://{args.host}:{args.port}",
                flush=True,
            )
            print(snippets(args.host, args.port, args.model), flush=True)
            print(
                f"Sidecar status: llm-gateway sidecar status --url http://{args.host}:{sidecar.status_port}\n"
                f"Logs: {workdir} (gateway.log) and {state_dir / 'logs'}. Ctrl-C stops everything.",
                flush=True,
            )
            while not stop.is_set():
                if gateway.poll() is not None:
                    print(f"llm-gateway demo: the gateway exited ({gateway.returncode}), see {workdir}")
                    code = 1
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        elif not stop.is_set():
            tail = (workdir / "gateway.log").read_text(errors="replace")[-2000:]
            print(f"llm-gateway demo: no answer through the gateway\n{tail}", file=sys.stderr)
            code = 1
    finally:
        await sidecar.close()
        if gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait(timeout=5)
    print("llm-gateway demo: stopped", flush=True)
    return code


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.replicas <= 20:
        print("llm-gateway demo: --replicas must be within 1..20", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="llm-gateway-demo-") as tmp:
        try:
            return asyncio.run(_main(args, Path(tmp)))
        except (OSError, StateInUse) as exc:
            print(f"llm-gateway demo: {exc}", file=sys.stderr)
            return 1
