"""The Ray side of a gang member: an actor that runs one engine process on the node of its bundle.

The actor owns the engine: it picks the port on its own node, starts the process in a session of its own,
reports where it serves, and stops it. The engine must not outlive the actor even when the actor is killed
with SIGKILL or its node's raylet dies, so every engine gets a small watchdog process
(`python -m gateway.sidecar.providers.ray_member PARENT PGID GRACE`) that kills the engine's process group
once its parent, the actor, is gone. Imported on Ray worker nodes, so it needs only the standard library
there (and `ray`, which the worker has already loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WATCH_INTERVAL_S = 0.5
"""How often a watchdog looks for its actor, and `wait_exit` for the engine."""


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class EngineMember:
    """Ray actor class (made remote by the provider with the bundle's resources)."""

    def __init__(self, member_id: str, log_dir: str) -> None:
        self.member_id = member_id
        self.log_dir = Path(log_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0

    async def prepare(self, bind_host: str | None) -> dict[str, Any]:
        """Where this member will serve: its node's address, a free port there, its GPUs, its python."""
        import ray

        self.host = bind_host or ray.util.get_node_ip_address()
        self.port = free_port(self.host)
        return {
            "host": self.host,
            "port": self.port,
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "python": sys.executable,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def start(self, argv: list[str], env: dict[str, str], grace_s: float) -> int:
        """Start the engine (own session, so its whole process group can be signalled) and its watchdog."""
        if self.proc is not None:
            raise RuntimeError(f"{self.member_id}: already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.member_id}.log"
        with open(log_path, "ab") as out:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out.write(f"--- {stamp} {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
        self.watchdog = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.sidecar.providers.ray_member",
                str(os.getpid()),
                str(self.proc.pid),
                str(grace_s),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self.proc.pid

    async def status(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "running": proc is not None and proc.poll() is None,
            "pid": proc.pid if proc is not None else None,
            "returncode": proc.returncode if proc is not None else None,
            "host": self.host,
            "port": self.port,
        }

    async def wait_exit(self) -> int | None:
        """Returns once the engine has exited (its exit code); the provider awaits this to learn fast."""
        while self.proc is not None and self.proc.poll() is None:
            await asyncio.sleep(WATCH_INTERVAL_S)
        return self.proc.returncode if self.proc is not None else None

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM to the engine's group, SIGKILL after `grace_s` (0: at once); returns its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None and grace_s > 0:
            kill_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and group_alive(proc.pid):
                await asyncio.sleep(0.05)
        kill_group(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
            self.watchdog.wait(timeout=5)
        return proc.returncode


def watchdog(parent: int, pgid: int, grace_s: float) -> int:
    """Kill process group `pgid` once process `parent` (the actor that started it) is gone."""
    while os.getppid() == parent:
        if not group_alive(pgid):
            return 0
        time.sleep(WATCH_INTERVAL_S)
    kill_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.05)
    kill_group(pgid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(watchdog(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
