"""Local provider: one subprocess per member, each in its own process group and session.

Members outlive the sidecar on purpose (a sidecar restart must not take engines down); the persisted pid
and its start time (from /proc) let a restarted sidecar adopt them without mistaking a reused pid.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from gateway.sidecar.providers.base import LaunchError, MemberHandle, MemberLaunch, Unschedulable, render

log = logging.getLogger("gateway.sidecar.local")


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    if not rest or rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def death_signal(sig: int) -> Callable[[], None] | None:
    """A preexec function asking Linux to send `sig` to the child when its parent dies (PR_SET_PDEATHSIG).
    libc is looked up here, in the parent: between fork and exec only the call itself runs."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, 1, int(sig))


class LocalProvider:
    """Subprocesses on this machine, GPUs taken from a fixed inventory."""

    name = "local"

    def __init__(
        self, log_dir: str | Path, gpus: list[str], host: str = "127.0.0.1", die_with_sidecar: bool = False
    ) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._preexec = death_signal(signal.SIGKILL) if die_with_sidecar else None
        """With `die_with_sidecar` members get SIGKILL when the sidecar dies (the demo); normally they
        outlive it, to be adopted by the next sidecar."""
        self.inventory = list(gpus)
        self.gpus_in_use: dict[str, str] = {}
        """GPU id -> member id."""
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.exit_watches: dict[str, int] = {}
        """Member id -> pidfd registered with the event loop."""

    def _take_gpus(self, member_id: str, count: int) -> list[str]:
        free = [g for g in self.inventory if g not in self.gpus_in_use]
        if count > len(free):
            raise Unschedulable(
                f"{member_id}: needs {count} GPUs, {len(free)} of {len(self.inventory)} are free"
            )
        taken = free[:count]
        for gpu in taken:
            self.gpus_in_use[gpu] = member_id
        return taken

    def _release_gpus(self, handle: MemberHandle) -> None:
        for gpu in handle.gpus:
            if self.gpus_in_use.get(gpu) == handle.member_id:
                del self.gpus_in_use[gpu]

    async def launch(
        self, gang_id: str, members: list[MemberLaunch], on_launched: Callable[[MemberHandle], None]
    ) -> list[MemberHandle]:
        handles: list[MemberHandle] = []
        try:
            ports = [free_port(self.host) for _ in members]
            gpus = [self._take_gpus(m.member_id, m.gpus) for m in members]
            peer_host, peer_port = self.host, str(ports[0])
            for member, port, member_gpus in zip(members, ports, gpus, strict=True):
                handle = MemberHandle(member.member_id, self.name, self.host, port, member_gpus)
                # Until the process exists, the handle owns its GPUs so a failure below releases them.
                handles.append(handle)
                values = {
                    **member.values,
                    "host": self.host,
                    "port": str(port),
                    "gpus": ",".join(member_gpus),
                    "peer_host": peer_host,
                    "peer_port": peer_port,
                }
                self._spawn(handle, member, render(member.command, values))
                on_launched(handle)
        except (LaunchError, OSError, ValueError) as exc:
            await self.stop([h for h in handles if "pid" in h.ref], 0.0)
            for handle in handles:
                self._release_gpus(handle)
            if isinstance(exc, LaunchError):
                raise
            raise LaunchError(f"{gang_id}: cannot start: {exc}") from exc
        return handles

    def _spawn(self, handle: MemberHandle, member: MemberLaunch, command: str) -> None:
        argv = shlex.split(command)
        if not argv:
            raise ValueError(f"{member.member_id}: empty command")
        env = {**os.environ, **member.env}
        env["CUDA_VISIBLE_DEVICES"] = ",".join(handle.gpus)
        log_path = self.log_dir / f"{member.member_id}.log"
        with open(log_path, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {command}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        self.children[popen.pid] = popen
        handle.ref = {
            "pid": popen.pid,
            "pgid": popen.pid,
            "start_time": process_start_time(popen.pid) or 0,
            "log": str(log_path),
        }
        log.info("started %s pid %d port %d: %s", member.member_id, popen.pid, handle.port, command)

    def _is_running(self, handle: MemberHandle) -> bool:
        pid = int(handle.ref.get("pid", 0))
        if pid <= 0:
            return False
        child = self.children.get(pid)
        if child is not None:
            if child.poll() is None:
                return True
            del self.children[pid]
            return False
        started = process_start_time(pid)
        return started is not None and started == int(handle.ref.get("start_time", -1))

    def _group_running(self, handle: MemberHandle) -> bool:
        """The leader or any other process of the member's group is still there."""
        if self._is_running(handle):
            return True
        pgid = int(handle.ref.get("pgid", 0))
        if pgid <= 0:
            return False
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return self._owns_group(handle)

    def _owns_group(self, handle: MemberHandle) -> bool:
        """The group id still belongs to this member: its leader was ours, so a live leader must match."""
        pid = int(handle.ref.get("pid", 0))
        started = process_start_time(pid)
        return started is None or started == int(handle.ref.get("start_time", -1))

    def _signal(self, handle: MemberHandle, sig: signal.Signals) -> None:
        pgid = int(handle.ref.get("pgid", 0))
        if pgid <= 0 or not self._owns_group(handle):
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def watch_exit(self, handle: MemberHandle, callback: Callable[[], None]) -> None:
        pid = int(handle.ref.get("pid", 0))
        if pid <= 0 or not hasattr(os, "pidfd_open"):
            return
        self._unwatch(handle)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            if self.exit_watches.get(handle.member_id) == fd:
                self._unwatch(handle)
                callback()

        self.exit_watches[handle.member_id] = fd
        loop.add_reader(fd, fire)

    def _unwatch(self, handle: MemberHandle) -> None:
        fd = self.exit_watches.pop(handle.member_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def stop(self, handles: list[MemberHandle], grace_s: float) -> None:
        if not handles:
            return
        for handle in handles:
            self._unwatch(handle)
        if grace_s > 0:
            for handle in handles:
                self._signal(handle, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(self._group_running(h) for h in handles):
                await asyncio.sleep(0.05)
        for handle in handles:
            if self._group_running(handle):
                log.warning("%s did not stop within %.1fs: SIGKILL", handle.member_id, grace_s)
                self._signal(handle, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(self._is_running(h) for h in handles):
            await asyncio.sleep(0.02)
        for handle in handles:
            self._release_gpus(handle)
            log.info("stopped %s (pid %s)", handle.member_id, handle.ref.get("pid"))

    async def alive(self, handle: MemberHandle) -> bool:
        return self._is_running(handle)

    async def adopt(self, handle: MemberHandle) -> bool:
        if not self._is_running(handle):
            return False
        for gpu in handle.gpus:
            self.gpus_in_use[gpu] = handle.member_id
        return True

    def address(self, handle: MemberHandle) -> tuple[str, int]:
        return handle.host, handle.port

    async def close(self) -> None:
        for member_id in list(self.exit_watches):
            fd = self.exit_watches.pop(member_id)
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        for pid, child in list(self.children.items()):
            if child.poll() is not None:
                del self.children[pid]
