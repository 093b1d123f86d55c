"""Gangs: the members of one engine replica, started, registered, failed and stopped as one.

One supervising task per gang. A gang is offered to the gateways only once every member answers its
health check; any member that fails to start, fails health or exits takes the whole gang down at once
(SIGKILL, deregistered) and the gang starts again after a growing backoff. A failure counts once per gang
incarnation; past `max_restarts` the gang is FAILED and shows why. Scale-down drains first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp
import msgspec

from gateway.sidecar.providers.base import LaunchError, MemberHandle, MemberLaunch, Provider, Unschedulable
from gateway.sidecar.spec import MAX_REPLICAS, ServiceSpec, SidecarConfig
from gateway.sidecar.store import GangRow, MemberRow, Store
from gateway.sidecar.sync import Registration

log = logging.getLogger("gateway.sidecar.gangs")

STARTING = "starting"
RUNNING = "running"
DRAINING = "draining"
BACKOFF = "backoff"
PENDING = "pending"
"""Waiting for resources (GPUs); not a failure."""
FAILED = "failed"
STOPPING = "stopping"
STOPPED = "stopped"

WATCH_TICK_S = 0.25
"""How often member processes are polled for exit, besides the provider's exit notifications."""


class GangFailure(Exception):
    """A member failed; the message says which and why."""


class Drainer(Protocol):
    async def drain(self, replica_ids: list[str], grace_s: float) -> bool: ...


def spec_hash(spec: ServiceSpec) -> str:
    """What a running gang was started from; another value means it must be replaced."""
    fields = (spec.model, spec.command, spec.env, spec.engine, spec.gang, spec.health_path)
    return hashlib.sha256(msgspec.json.encode(fields)).hexdigest()[:16]


class Gang:
    """A gang and the handles of its current incarnation."""

    def __init__(self, row: GangRow, spec: ServiceSpec) -> None:
        self.row = row
        self.spec = spec
        self.members: list[MemberRow] = []
        self.retire = asyncio.Event()
        """Set when the gang is no longer wanted (scale-down, replacement, shutdown with stop)."""
        self.exited = asyncio.Event()
        """Set by the provider the moment a member of the current incarnation exits."""
        self.outdated = False
        """Started from an older service spec: replaced (drained and stopped) once new gangs serve."""
        self.failed_at: float | None = None
        """Wall-clock time the last failure was acted on (the broken gang's members already killed)."""
        self.task: asyncio.Task[None] | None = None
        self.running_since: float | None = None
        self.health_failures: dict[str, int] = {}
        self.last_health_error: dict[str, str] = {}

    @property
    def id(self) -> str:
        return self.row.id

    @property
    def state(self) -> str:
        return self.row.state

    @property
    def seq(self) -> int:
        return int(self.row.id.rsplit("-", 1)[1])

    @property
    def handles(self) -> list[MemberHandle]:
        return [m.handle for m in self.members]

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the gang is retired or a member exits."""
        waits = [asyncio.ensure_future(self.retire.wait()), asyncio.ensure_future(self.exited.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def serving(self) -> list[MemberRow]:
        return [m for m in self.members if m.serves]


class Fleet:
    """Every gang of every service, and the number of gangs each service should have."""

    def __init__(
        self,
        cfg: SidecarConfig,
        store: Store,
        provider: Provider,
        session: aiohttp.ClientSession,
        on_change: Callable[[], None],
        drainer: Drainer | None = None,
    ) -> None:
        self.cfg = cfg
        self.services = {s.name: s for s in cfg.services}
        self.store = store
        self.provider = provider
        self.session = session
        self.on_change = on_change
        self.drainer = drainer
        self.gangs: dict[str, Gang] = {}
        self.desired: dict[str, int] = {}
        self._closing = False
        self._cleanups: set[asyncio.Future[None]] = set()

    # desired counts ---------------------------------------------------------------------------------
    def _initial_desired(self, spec: ServiceSpec) -> int:
        if spec.autoscale is None:
            return spec.replicas
        saved = self.store.get_meta(f"desired:{spec.name}")
        if not saved:
            return spec.replicas
        return max(spec.autoscale.min_replicas, min(spec.autoscale.max_replicas, int(saved)))

    def set_desired(self, service: str, count: int) -> None:
        count = max(0, min(MAX_REPLICAS, count))
        self.desired[service] = count
        self.store.set_meta(f"desired:{service}", str(count))
        self.reconcile()

    def active(self, service: str) -> list[Gang]:
        return [g for g in self.gangs.values() if g.row.service == service and not g.retire.is_set()]

    def reconcile(self) -> None:
        """Start or retire gangs until each service has its desired count (FAILED gangs count)."""
        if self._closing:
            return
        for name, spec in self.services.items():
            want = self.desired.get(name, spec.replicas)
            active = [g for g in self.active(name) if not g.outdated]
            outdated = [g for g in self.active(name) if g.outdated]
            for _ in range(want - len(active)):
                self._create(spec)
            if len(active) > want:
                order = {FAILED: 0, PENDING: 1, BACKOFF: 2, STARTING: 3, RUNNING: 4}
                victims = sorted(active, key=lambda g: (order.get(g.state, 0), -g.seq))[: len(active) - want]
                for gang in victims:
                    log.info("retiring %s (service %s wants %d)", gang.id, name, want)
                    gang.retire.set()
            # Replacement of gangs started from an older spec: without GPUs the new gangs come up first
            # and each old one drains once a new one serves; with GPUs the old ones make room first.
            ready = sum(1 for g in active if g.state == RUNNING)
            keep = 0 if spec.gang.gpus else max(0, min(want, len(outdated)) - ready)
            for gang in sorted(outdated, key=lambda g: g.seq)[: max(0, len(outdated) - keep)]:
                log.info("replacing %s (its service spec changed)", gang.id)
                gang.retire.set()

    def _create(self, spec: ServiceSpec) -> Gang:
        now = time.time()
        row = GangRow(
            self.store.next_gang_id(spec.name), spec.name, 0, STARTING, "", 0, spec_hash(spec), now, now
        )
        self.store.save_gang(row)
        gang = Gang(row, spec)
        self._run(gang, adopted=False)
        return gang

    def _run(self, gang: Gang, adopted: bool) -> None:
        self.gangs[gang.id] = gang
        gang.task = asyncio.create_task(self._supervise(gang, adopted), name=f"gang {gang.id}")
        gang.task.add_done_callback(functools.partial(self._supervisor_done, gang))

    def _supervisor_done(self, gang: Gang, task: asyncio.Task[None]) -> None:
        """A bug in a supervisor must not leave its gang half-managed: kill it and show the error."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("supervisor of %s crashed; its members are stopped", gang.id, exc_info=exc)
        self._set(gang, FAILED, f"sidecar error: {exc!r}")
        cleanup = asyncio.ensure_future(self._force_stop(gang))
        self._cleanups.add(cleanup)
        cleanup.add_done_callback(self._cleanups.discard)

    # recovery ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Adopt complete gangs from the store, stop leaked members, then start what is missing."""
        for spec in self.cfg.services:
            self.desired[spec.name] = self._initial_desired(spec)
        all_members = self.store.members()
        for row in self.store.gangs():
            found = self.services.get(row.service)
            members = [m for m in all_members if m.gang_id == row.id]
            current = [m for m in members if m.incarnation == row.incarnation]
            stale = [m for m in members if m.incarnation != row.incarnation]
            await self._stop_leaked(stale)
            complete = (
                found is not None
                and row.state in (RUNNING, DRAINING)
                and len(current) == found.gang.size
                and all([await self.provider.adopt(m.handle) for m in current])
            )
            going = row.state == STOPPING or (row.state == DRAINING and not complete)
            if found is None or row.state == FAILED or going:
                # Not configured any more, FAILED (a sidecar restart retries: a new gang takes its place),
                # or already on its way out: stop whatever of it still runs, keep the row as history.
                await self._stop_leaked(current)
                if found is None:
                    row.reason = "service no longer configured"
                row.state, row.deleted_at = STOPPED, time.time()
                self.store.save_gang(row)
                continue
            gang = Gang(row, found)
            if complete:
                gang.members = current
                for member in current:
                    self.provider.watch_exit(member.handle, gang.exited.set)
                gang.running_since = time.monotonic()
                log.info("adopted %s (%s): %s", row.id, row.state, ", ".join(m.id for m in current))
                if row.state == DRAINING:
                    gang.retire.set()
                gang.outdated = row.spec_hash != spec_hash(found)
            else:
                await self._stop_leaked(current)
                row.state, row.spec_hash = STARTING, spec_hash(found)
                self.store.save_gang(row)
            self._run(gang, adopted=complete)
        self.reconcile()
        self.on_change()

    async def _stop_leaked(self, members: list[MemberRow]) -> None:
        if not members:
            return
        alive = [m.handle for m in members if await self.provider.adopt(m.handle)]
        if alive:
            log.warning("stopping leaked members: %s", ", ".join(h.member_id for h in alive))
            await self.provider.stop(alive, 0.0)
        self.store.delete_members([m.id for m in members])

    # one gang's life --------------------------------------------------------------------------------
    async def _supervise(self, gang: Gang, adopted: bool) -> None:
        if not adopted:
            gang.members = []
        while not gang.retire.is_set():
            if not gang.members and not await self._start(gang):
                if gang.state == FAILED:
                    await gang.retire.wait()
                continue
            reason = await self._watch(gang)
            if reason is None:
                break
            await self._fail(gang, reason)
        await self._retire(gang)

    def _set(self, gang: Gang, state: str, reason: str | None = None) -> None:
        gang.row.state = state
        if reason is not None:
            gang.row.reason = reason
        self.store.save_gang(gang.row)

    def _launches(self, gang: Gang) -> list[MemberLaunch]:
        spec = gang.spec
        launches = []
        rank = 0
        for role in spec.gang.members:
            for k in range(role.count):
                member_id = f"{gang.id}.{gang.row.incarnation}.{role.role}{k}"
                values = {
                    "model": spec.model,
                    "python": sys.executable,
                    "id": member_id,
                    "role": role.role,
                    "rank": str(rank),
                    "gang": gang.id,
                }
                env = {**spec.env, **role.env}
                launches.append(
                    MemberLaunch(member_id, role.role, rank, spec.template_for(role), values, env, role.gpus)
                )
                rank += 1
        return launches

    async def _start(self, gang: Gang) -> bool:
        gang.row.incarnation += 1
        gang.exited.clear()
        gang.health_failures.clear()
        gang.last_health_error.clear()
        if gang.state != PENDING:
            self._set(gang, STARTING)
        roles = {r.role: r for r in gang.spec.gang.members}
        launches = self._launches(gang)
        by_id = {launch.member_id: launch for launch in launches}

        def persist(handle: MemberHandle) -> None:
            launch = by_id[handle.member_id]
            row = MemberRow(
                handle.member_id,
                gang.id,
                gang.row.incarnation,
                launch.role,
                launch.rank,
                roles[launch.role].serves,
                handle,
                time.time(),
            )
            self.store.add_member(row)
            gang.members.append(row)
            self.provider.watch_exit(handle, gang.exited.set)

        try:
            await self.provider.launch(gang.id, launches, persist)
            if gang.state == PENDING:
                self._set(gang, STARTING, "")
            await self._wait_healthy(gang)
        except Unschedulable as exc:
            await self._force_stop(gang)
            gang.row.incarnation -= 1
            if gang.state != PENDING:
                log.info("gang %s waits for resources: %s", gang.id, exc)
            self._set(gang, PENDING, str(exc))
            await gang.pause(gang.spec.backoff_base_s)
            return False
        except (LaunchError, GangFailure) as exc:
            await self._force_stop(gang)
            gang.failed_at = time.time()
            if gang.retire.is_set():
                return False
            await self._fail(gang, str(exc), stopped=True)
            return False
        if gang.retire.is_set():
            await self._force_stop(gang)
            return False
        gang.running_since = time.monotonic()
        self._set(gang, RUNNING, "")
        self.reconcile()
        log.info("%s running: %s", gang.id, ", ".join(f"{m.id}@{m.handle.url}" for m in gang.members))
        self.on_change()
        return True

    def _health_checked(self, gang: Gang) -> list[MemberRow]:
        roles = {r.role: r for r in gang.spec.gang.members}
        return [m for m in gang.members if roles[m.role].health]

    async def _check(self, gang: Gang, member: MemberRow) -> str | None:
        """None when healthy, else the reason."""
        url = member.handle.url + gang.spec.health_path
        timeout = aiohttp.ClientTimeout(total=gang.spec.health_timeout_s)
        try:
            async with self.session.get(url, timeout=timeout) as resp:
                await resp.content.read(4096)
                if 200 <= resp.status < 300:
                    return None
                return f"{gang.spec.health_path} answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{gang.spec.health_path}: {type(exc).__name__} {exc}".strip()

    async def _exited(self, gang: Gang) -> str | None:
        for member in gang.members:
            if not await self.provider.alive(member.handle):
                return f"member {member.id} exited"
        return None

    async def _wait_healthy(self, gang: Gang) -> None:
        deadline = time.monotonic() + gang.spec.startup_timeout_s
        pending = self._health_checked(gang)
        while pending:
            exited = await self._exited(gang)
            if exited:
                raise GangFailure(f"{exited} during startup")
            if gang.retire.is_set():
                return
            results = await asyncio.gather(*(self._check(gang, m) for m in pending))
            for member, error in zip(pending, results, strict=True):
                if error is not None:
                    gang.last_health_error[member.id] = error
            pending = [m for m, error in zip(pending, results, strict=True) if error is not None]
            if not pending:
                break
            if time.monotonic() >= deadline:
                member = pending[0]
                raise GangFailure(
                    f"member {member.id} not healthy within {gang.spec.startup_timeout_s:g}s "
                    f"({gang.last_health_error.get(member.id, 'no answer')})"
                )
            await gang.pause(min(0.1, gang.spec.health_interval_s))
        exited = await self._exited(gang)
        if exited:
            raise GangFailure(f"{exited} during startup")

    async def _watch(self, gang: Gang) -> str | None:
        """Returns a failure reason, or None once the gang is to retire."""
        spec = gang.spec
        next_health = time.monotonic() + spec.health_interval_s
        while not gang.retire.is_set():
            exited = await self._exited(gang)
            if exited:
                return exited
            now = time.monotonic()
            if now >= next_health:
                next_health = now + spec.health_interval_s
                checked = self._health_checked(gang)
                results = await asyncio.gather(*(self._check(gang, m) for m in checked))
                for member, error in zip(checked, results, strict=True):
                    if error is None:
                        gang.health_failures[member.id] = 0
                        continue
                    gang.last_health_error[member.id] = error
                    count = gang.health_failures.get(member.id, 0) + 1
                    gang.health_failures[member.id] = count
                    if count >= spec.unhealthy_threshold:
                        return f"member {member.id} failed health {count} times: {error}"
                if (
                    gang.row.failures
                    and gang.running_since is not None
                    and now - gang.running_since >= spec.stable_after_s
                ):
                    gang.row.failures = 0
                    self.store.save_gang(gang.row)
            await gang.pause(min(WATCH_TICK_S, spec.health_interval_s))
        return None

    async def _force_stop(self, gang: Gang) -> None:
        """Kill every member at once (a partial gang must not serve) and forget them."""
        members = gang.members
        gang.members = []
        gang.running_since = None
        if members:
            self.on_change()
            await self.provider.stop([m.handle for m in members], 0.0)
            self.store.delete_members([m.id for m in members])
            self.on_change()

    async def _fail(self, gang: Gang, reason: str, stopped: bool = False) -> None:
        log.warning("gang %s failed: %s", gang.id, reason)
        if not stopped:
            # Kill first: the rest of a broken gang must not answer one more request.
            await self._force_stop(gang)
            gang.failed_at = time.time()
        gang.row.failures += 1
        if gang.row.failures > gang.spec.max_restarts:
            self._set(
                gang,
                FAILED,
                f"{reason} (failed {gang.row.failures} times, max_restarts {gang.spec.max_restarts})",
            )
            log.error("gang %s FAILED: %s", gang.id, gang.row.reason)
            self.on_change()
            return
        delay = min(gang.spec.backoff_max_s, gang.spec.backoff_base_s * 2 ** (gang.row.failures - 1))
        self._set(
            gang, BACKOFF, f"{reason}; restart {gang.row.failures}/{gang.spec.max_restarts} in {delay:g}s"
        )
        self.on_change()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gang.retire.wait(), delay)

    async def _retire(self, gang: Gang) -> None:
        """Drain (gateways finish what they sent), then stop gracefully, then keep the row as history."""
        if gang.members and gang.state in (RUNNING, DRAINING) and self.drainer is not None:
            self._set(gang, DRAINING)
            self.on_change()
            ids = [m.id for m in gang.serving()]
            drained = await self._drain_watching(gang, ids)
            log.info("%s %s", gang.id, "drained" if drained else "drain grace ended")
        self._set(gang, STOPPING)
        members = gang.members
        gang.members = []
        self.on_change()
        if members:
            await self.provider.stop([m.handle for m in members], gang.spec.stop_grace_s)
            self.store.delete_members([m.id for m in members])
        gang.row.deleted_at = time.time()
        self._set(gang, STOPPED)
        self.gangs.pop(gang.id, None)
        self.on_change()

    async def _drain_watching(self, gang: Gang, ids: list[str]) -> bool:
        """Wait for the drain, but stop waiting if a member dies meanwhile."""
        assert self.drainer is not None
        drain = asyncio.ensure_future(self.drainer.drain(ids, gang.spec.drain_grace_s))
        try:
            while not drain.done():
                if await self._exited(gang):
                    drain.cancel()
                    return False
                await asyncio.wait({drain}, timeout=WATCH_TICK_S)
            return drain.result()
        finally:
            if not drain.done():
                drain.cancel()

    # shutdown ---------------------------------------------------------------------------------------
    async def close(self, stop_engines: bool) -> None:
        """Stop supervising. With `stop_engines`, drain and stop every gang; else leave them to adopt."""
        self._closing = True
        gangs = list(self.gangs.values())
        if stop_engines:
            for gang in gangs:
                gang.retire.set()
            tasks = [g.task for g in gangs if g.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        else:
            for gang in gangs:
                if gang.task is not None:
                    gang.task.cancel()
            await asyncio.gather(*(g.task for g in gangs if g.task is not None), return_exceptions=True)

    def registrations(self) -> list[Registration]:
        """Serving members of complete, healthy gangs (and of draining ones, marked so)."""
        regs = []
        for gang in self.gangs.values():
            if gang.state not in (RUNNING, DRAINING) or not gang.members:
                continue
            for member in gang.serving():
                regs.append(Registration(member.id, gang.spec, member.handle.url, gang.state == DRAINING))
        return regs
