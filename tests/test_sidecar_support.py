"""Helpers for the sidecar tests: a contract-faithful stand-in gateway admin API, configs, process checks.

The stand-in implements `PUT/GET /admin/v1/replicas`, `POST .../drain` and `GET /admin/v1/stats` exactly as
CONTRACTS.md says, on a real socket, so a test can take one gateway "down" and bring it back on the same
port, or report load, without a data plane. Tests that need real proxying use `llm-gateway serve`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import yaml
from aiohttp import web

from gateway.config import ReplicaSet
from tests.procs import REPO, Proc, free_port, http_get, spawn

TOKEN = "test-token"


class FakeGateway:
    """The admin API of one gateway replica, with knobs for load."""

    def __init__(self, port: int | None = None, token: str = TOKEN) -> None:
        self.port = port or free_port()
        self.token = token
        self.generation = -1
        self.replicas: dict[str, dict[str, Any]] = {}
        self.in_flight: dict[str, int] = {}
        self.queue_depth: dict[str, int] = {}
        self.put_log: list[tuple[float, int, int]] = []
        """(monotonic time, generation, largest capacity) of every PUT since the last start()."""
        self.runner: web.AppRunner | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread()

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _auth(self, request: web.Request) -> web.Response | None:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return web.json_response(
                {
                    "error": {
                        "message": "bad token",
                        "type": "authentication_error",
                        "param": None,
                        "code": 401,
                    }
                },
                status=401,
            )
        return None

    def _view(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            **spec,
            "healthy": True,
            "ejected": False,
            "in_flight": self.in_flight.get(spec["id"], 0),
            "removed": False,
        }

    async def _get(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied:
            return denied
        return web.json_response(
            {"generation": self.generation, "replicas": [self._view(r) for r in self.replicas.values()]}
        )

    async def _put(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied:
            return denied
        try:
            body = msgspec.json.decode(await request.read(), type=ReplicaSet)
        except msgspec.ValidationError as exc:
            return web.json_response(
                {"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400
            )
        if body.generation < self.generation:
            return web.json_response(
                {"error": {"message": "stale generation", "type": "conflict"}, "generation": self.generation},
                status=409,
            )
        new = {r.id: msgspec.to_builtins(r) for r in body.replicas}
        added = [i for i in new if i not in self.replicas]
        removed = [i for i in self.replicas if i not in new]
        updated = [i for i in new if i in self.replicas and self.replicas[i] != new[i]]
        self.replicas = new
        self.generation = body.generation
        self.put_log.append(
            (time.monotonic(), body.generation, max((r.capacity for r in body.replicas), default=0))
        )
        return web.json_response(
            {"generation": self.generation, "added": added, "removed": removed, "updated": updated}
        )

    async def _drain(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied:
            return denied
        rid = request.match_info["id"]
        if rid not in self.replicas:
            return web.json_response(
                {"error": {"message": "unknown replica", "type": "not_found"}}, status=404
            )
        self.replicas[rid]["draining"] = True
        return web.json_response({"id": rid, "draining": True, "in_flight": self.in_flight.get(rid, 0)})

    async def _stats(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied:
            return denied
        pools: dict[str, Any] = {}
        for r in self.replicas.values():
            pool = pools.setdefault(
                r["model"],
                {"queue_depth": self.queue_depth.get(r["model"], 0), "in_flight": 0, "replicas": {}},
            )
            n = self.in_flight.get(r["id"], 0)
            pool["in_flight"] += n
            pool["replicas"][r["id"]] = {
                "in_flight": n,
                "capacity": r["capacity"],
                "healthy": True,
                "draining": r["draining"],
                "requests_total": 0,
                "errors_total": 0,
                "rps": 0.0,
            }
        return web.json_response({"generation": self.generation, "pools": pools})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/admin/v1/replicas", self._get)
        app.router.add_put("/admin/v1/replicas", self._put)
        app.router.add_post("/admin/v1/replicas/{id}/drain", self._drain)
        app.router.add_get("/admin/v1/stats", self._stats)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def forget(self) -> None:
        """Lose the replica set, as a restarted gateway process does."""
        self.generation = -1
        self.replicas = {}

    @property
    def put_times(self) -> list[float]:
        return [t for t, _, _ in self.put_log]

    def share_at(self, when: float) -> int:
        """The largest slot share this gateway held at `when` (0 before its first PUT)."""
        held = 0
        for t, _, capacity in self.put_log:
            if t <= when:
                held = capacity
        return held

    def start(self) -> None:
        """Serve on a thread of its own, so a test can block while the sidecar process talks to it."""
        self.put_log = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        if self.loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        self.loop = None


def sim_command(extra: str = "") -> str:
    return (
        "{python} -m gateway sim --dialect vllm --instant"
        " --host {host} --port {port} --model {model} --id {id}" + (" " + extra if extra else "")
    )


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def base_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "status_listen": f"127.0.0.1:{free_port()}",
        "sync": {"interval_s": 0.2, "timeout_s": 1.0, "unreachable_after": 2},
        "services": [],
        "gateways": [],
    }
    doc.update(overrides)
    return doc


def service(name: str = "llama", model: str = "m", **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "model": model,
        "command": sim_command(),
        "capacity": 8,
        "replicas": 1,
        "startup_timeout_s": 20,
        "health_interval_s": 0.2,
        "health_timeout_s": 1.0,
        "backoff_base_s": 0.2,
        "backoff_max_s": 1.0,
        "stop_grace_s": 3,
        "drain_grace_s": 10,
    }
    doc.update(overrides)
    return doc


class SidecarProc:
    """`llm-gateway sidecar` as a real process."""

    def __init__(self, config: Path, log_path: Path, extra: list[str] | None = None) -> None:
        self.config = config
        self.doc = yaml.safe_load(config.read_text())
        self.status_url = "http://" + self.doc["status_listen"]
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "gateway", "sidecar", "--config", str(config), *(extra or [])],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        code, body = http_get(self.status_url + "/status", timeout=3.0)
        assert code == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def wait(self, predicate: Any, timeout: float = 30.0, what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.popen.returncode}\n{self.log()[-4000:]}")
            try:
                last = self.status()
            except OSError as exc:
                last = exc
            else:
                if predicate(last):
                    return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last status: {last}\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode

    def kill9(self) -> None:
        self.popen.kill()
        self.popen.wait(timeout=10)


def running_gangs(status: dict[str, Any], service_name: str | None = None) -> list[dict[str, Any]]:
    return [
        g
        for g in status["gangs"]
        if g["state"] == "running" and (service_name is None or g["service"] == service_name)
    ]


def member_pids(status: dict[str, Any]) -> set[int]:
    return {m["pid"] for g in status["gangs"] for m in g["members"] if m["pid"]}


def pid_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def processes_with(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (the process table, read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def unique_model() -> Iterator[str]:
    """A model name unique to one test: every engine process carries it on its command line, so the
    process table tells whether anything was left behind (and the leftovers are killed)."""
    name = f"m-{uuid.uuid4().hex[:10]}"
    yield name
    leaked = processes_with(name)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"processes left behind: {leaked}"


def start_sidecar(
    tmp_path: Path, doc: dict[str, Any], extra: list[str] | None = None, name: str = "sidecar"
) -> SidecarProc:
    """A sidecar process that drains and stops its engines when the test stops it."""
    cfg = write_config(tmp_path / f"{name}.yaml", doc)
    return SidecarProc(cfg, tmp_path / f"{name}.log", ["--stop-on-exit", *(extra or [])])


class RealGateway:
    """`llm-gateway serve` with an empty config, filled by the sidecar through its admin API."""

    def __init__(self, tmp_path: Path, port: int | None = None, admin_port: int | None = None) -> None:
        self.tmp_path = tmp_path
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "gateway-empty.yaml"
        self.config.write_text("{}\n")

    @contextmanager
    def running(self, reuse_port: bool = False) -> Iterator[Proc]:
        args = [
            "serve",
            "--config",
            str(self.config),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin-listen",
            f"127.0.0.1:{self.admin_port}",
        ]
        if reuse_port:
            args.append("--reuse-port")
        log_dir = self.tmp_path / f"gateway-{self.admin_port}"
        with spawn(args, port=self.port, log_dir=log_dir, env={"LLM_GATEWAY_ADMIN_TOKEN": TOKEN}) as proc:
            yield proc

    def admin(self, path: str) -> dict[str, Any]:
        status, body = http_get(self.admin_url + path, headers={"authorization": f"Bearer {TOKEN}"})
        assert status == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def replicas(self) -> dict[str, dict[str, Any]]:
        try:
            return {r["id"]: r for r in self.admin("/admin/v1/replicas")["replicas"]}
        except OSError:
            return {}

    def target(self) -> dict[str, str]:
        return {"admin_url": self.admin_url, "token": TOKEN}


def chat(url: str, model: str, max_tokens: int = 4, timeout: float = 10.0) -> tuple[int, str, bytes]:
    """POST a chat completion; (status, x-sim-replica-id, body)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    )
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=body.encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("x-sim-replica-id", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("x-sim-replica-id", ""), exc.read()
