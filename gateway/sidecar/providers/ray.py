"""Ray provider: each gang is one placement group on an existing Ray cluster, each member an actor in it.

Reservation is all-or-nothing: a detached placement group named `<prefix><gang id>` with one bundle per
member (its GPUs, CPUs and custom resources) is created and waited for; if Ray cannot place it in time it
is removed again and `PlacementPending` says why, before any member exists. Members are named detached
actors (`<prefix><gang id>/<member id>` in the configured namespace), so they outlive the sidecar and a
restarted sidecar adopts them by name. Each actor starts its engine on its own node and stops it when it
dies (see `ray_member`). Stopping a gang kills its actors and removes its placement group.

Leaks: when it first connects, the provider removes placement groups with its prefix that no live actor
of ours uses (their owner is gone); if Ray's control store cannot be queried it removes nothing, because
releasing a live gang's reservation cannot be undone while keeping a leaked one can be fixed next time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shlex
from collections.abc import Callable, Collection
from typing import Any

# Read when `ray` is imported: Ray's crash handler would take over SIGTERM and abort the sidecar at
# `ray.shutdown`, after its graceful drain. The sidecar handles its own signals.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gateway.sidecar.providers.base import LaunchError, MemberHandle, MemberLaunch, Unschedulable, render
from gateway.sidecar.providers.ray_config import RayProviderConfig
from gateway.sidecar.providers.ray_member import EngineMember

log = logging.getLogger("gateway.sidecar.ray")

RemoteMember = ray.remote(EngineMember)

ORPHAN_GRACE_S = 5.0
"""An engine whose actor died gets SIGTERM from its watchdog, then SIGKILL after this."""


class PlacementPending(Unschedulable):
    """Ray cannot place the whole gang now (nothing of it was started): the gang waits, PENDING, and
    tries again; the message says why."""


def brief(exc: BaseException) -> str:
    """First line of an error: Ray's carry whole remote tracebacks, too long for a gang's reason."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def service_of(gang_id: str) -> str:
    """Gang ids are `SERVICE-N`."""
    return gang_id.rsplit("-", 1)[0]


def bundle_for(member: MemberLaunch, cpus: float, resources: dict[str, float]) -> dict[str, float]:
    bundle = {name: float(amount) for name, amount in resources.items() if amount > 0}
    if cpus > 0:
        bundle["CPU"] = cpus
    if member.gpus > 0:
        bundle["GPU"] = float(member.gpus)
    if not bundle:
        # Ray rejects empty bundles; a sliver of CPU still pins the member to a node.
        bundle["CPU"] = 0.001
    return bundle


def resources_text(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(name, 0.0) >= amount for name, amount in need.items())


def infeasible(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> str | None:
    """Why the bundles can never be placed on these nodes (their total resources), or None when they
    could be once others free resources. Checks what each strategy needs at least, not a full packing."""
    for bundle in bundles:
        if not any(_fits(bundle, node) for node in nodes):
            return f"no node has {resources_text(bundle)}"
    total: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0.0) + amount
    if strategy == "STRICT_PACK":
        if not any(_fits(total, node) for node in nodes):
            return f"no node has {resources_text(total)} for the whole gang"
        return None
    if strategy == "STRICT_SPREAD":
        # One distinct node per bundle: a bipartite matching of bundles to nodes that can hold them.
        owner: dict[int, int] = {}

        def assign(b: int, seen: set[int]) -> bool:
            for n, node in enumerate(nodes):
                if n in seen or not _fits(bundles[b], node):
                    continue
                seen.add(n)
                if n not in owner or assign(owner[n], seen):
                    owner[n] = b
                    return True
            return False

        placed = sum(assign(b, set()) for b in range(len(bundles)))
        if placed < len(bundles):
            return f"needs {len(bundles)} distinct nodes for its bundles, {placed} can hold them"
        return None
    cluster: dict[str, float] = {}
    for node in nodes:
        for name in total:
            cluster[name] = cluster.get(name, 0.0) + node.get(name, 0.0)
    if not _fits(total, cluster):
        return f"needs {resources_text(total)}, the whole cluster has {resources_text(cluster)}"
    return None


class RayProvider:
    """Gangs as placement groups, members as detached actors, on the cluster at `cfg.address`."""

    name = "ray"

    def __init__(self, cfg: RayProviderConfig) -> None:
        self.cfg = cfg
        self.actors: dict[str, Any] = {}
        """Member id -> actor handle, for members this sidecar launched or adopted."""
        self.watchers: dict[str, asyncio.Task[None]] = {}
        self.launching: set[str] = set()
        """Placement group names being created right now (never leaks, whatever the tables say)."""
        self._connected = False
        self._connect_lock = asyncio.Lock()
        self._init: asyncio.Future[None] | None = None
        self._threads: set[asyncio.Future[Any]] = set()
        """Blocking Ray calls still running in worker threads (even if their caller was cancelled)."""
        self._cleanups: set[asyncio.Task[None]] = set()

    def _thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run a blocking Ray call in a thread, tracked so that `close` never shuts Ray down under it."""
        future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))
        self._threads.add(future)
        future.add_done_callback(self._threads.discard)
        return future

    async def _blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.shield(self._thread(fn, *args, **kwargs))

    # connection and leak cleanup ---------------------------------------------------------------------
    async def connect(self) -> None:
        """Join the cluster as a driver (once), then remove leaked placement groups. An unreachable
        cluster is no gang failure: the gang waits (PENDING) and tries again."""
        async with self._connect_lock:
            if self._connected:
                return
            if self._init is None:
                self._init = self._thread(self._init_ray)
            init = self._init
            try:
                await asyncio.wait_for(asyncio.shield(init), self.cfg.call_timeout_s)
            except Exception as exc:  # whatever ray.init raises, the cluster is not there for us
                why = brief(exc) if init.done() else f"no answer within {self.cfg.call_timeout_s:g}s"
                if init.done():
                    self._init = None  # failed: the next attempt starts afresh
                raise PlacementPending(f"cannot reach the Ray cluster at {self.cfg.address}: {why}") from exc
            self._connected = True
            log.info("connected to Ray at %s, namespace %s", self.cfg.address, self.cfg.namespace)
            removed = await self.remove_leaked()
            if removed:
                log.warning("removed leaked placement groups: %s", ", ".join(removed))

    def _init_ray(self) -> None:
        if not ray.is_initialized():
            ray.init(
                address=self.cfg.address,
                namespace=self.cfg.namespace,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )

    def _live_actor_names(self) -> list[str]:
        """Named actors (not dead) of our namespace, from Ray's control store; raises if it cannot tell."""
        names: list[str] = ray.util.list_named_actors()
        return names

    def _our_groups(self) -> dict[str, str]:
        """Placement groups not yet removed whose name has our prefix: name -> id (hex)."""
        found = {}
        for pg_id, info in placement_group_table().items():
            name = info.get("name", "")
            if name.startswith(self.cfg.prefix) and info.get("state") != "REMOVED":
                found[name] = pg_id
        # Names are per namespace: keep only the groups that our namespace resolves to.
        return {name: pg_id for name, pg_id in found.items() if self._group_id(name) == pg_id}

    def _group_id(self, name: str) -> str | None:
        try:
            pg = get_placement_group(name)
        except ValueError:
            return None
        pg_id: str = pg.id.hex()
        return pg_id

    async def remove_leaked(self, known_gangs: Collection[str] | None = None) -> list[str]:
        """Remove placement groups with our prefix that no live actor of ours uses and that are not being
        launched (nor, if `known_gangs` is given, belong to one of those gangs). A failing query to Ray's
        control store removes nothing."""
        try:
            groups = await self._blocking(self._our_groups)
            actors = await self._blocking(self._live_actor_names)
        except Exception as exc:  # any failure of the query must mean "unknown", never "no actors"
            log.warning("skipping leaked placement group cleanup: cannot query Ray: %s", exc)
            return []
        used = {name.rsplit("/", 1)[0] for name in actors if "/" in name}
        known = {self.cfg.prefix + gang for gang in known_gangs or ()}
        leaked = sorted(
            name for name in groups if name not in used and name not in known and name not in self.launching
        )
        for name in leaked:
            await self._remove_group(name)
        return leaked

    async def _remove_group(self, name: str) -> None:
        def remove() -> None:
            try:
                pg = get_placement_group(name)
            except ValueError:
                return
            if placement_group_table(pg).get("state") != "REMOVED":
                remove_placement_group(pg)

        try:
            await self._blocking(remove)
        except (RayError, ValueError) as exc:
            log.warning("cannot remove placement group %s: %s", name, exc)

    # launch -----------------------------------------------------------------------------------------
    async def launch(
        self, gang_id: str, members: list[MemberLaunch], on_launched: Callable[[MemberHandle], None]
    ) -> list[MemberHandle]:
        await self.connect()
        pg_name = self.cfg.prefix + gang_id
        strategy, cpus, resources = self.cfg.placement(service_of(gang_id))
        bundles = [bundle_for(m, cpus, resources) for m in members]
        self.launching.add(pg_name)
        actors: list[tuple[MemberLaunch, Any]] = []
        try:
            # A group of the same name is a stale incarnation of this gang (its members are gone).
            await self._remove_group(pg_name)
            pg = await self._blocking(
                placement_group, bundles, strategy=strategy, name=pg_name, lifetime="detached"
            )
            placed = await self._blocking(pg.wait, self.cfg.placement_timeout_s)
            if not placed:
                reason = await self._blocking(self._pending_reason, bundles, strategy)
                await self._remove_group(pg_name)
                raise PlacementPending(f"{gang_id}: {reason}")
            for index, member in enumerate(members):
                actor = await self._blocking(self._create_actor, pg, pg_name, index, member, bundles[index])
                actors.append((member, actor))
            return await self._start_members(gang_id, pg_name, actors, on_launched)
        except PlacementPending:
            raise
        except asyncio.CancelledError:
            # The sidecar is going away mid-launch: release the reservation rather than leak it.
            task = asyncio.get_running_loop().create_task(self._teardown(pg_name, [a for _, a in actors]))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            raise
        except (LaunchError, RayError, OSError, ValueError, TimeoutError) as exc:
            started = [actor for _, actor in actors]
            await asyncio.gather(
                *(self._call(actor.stop.remote(0.0)) for actor in started), return_exceptions=True
            )
            await self._teardown(pg_name, started)
            for member, _ in actors:
                self.actors.pop(member.member_id, None)
            if isinstance(exc, LaunchError):
                raise
            raise LaunchError(f"{gang_id}: cannot start on Ray: {brief(exc)}") from exc
        finally:
            self.launching.discard(pg_name)

    def _pending_reason(self, bundles: list[dict[str, float]], strategy: str) -> str:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        why = infeasible(bundles, strategy, nodes)
        shape = ", ".join(resources_text(b) for b in bundles)
        state = f"infeasible: {why}" if why else "waiting for resources held by others"
        waited = self.cfg.placement_timeout_s
        return f"placement group {strategy} [{shape}] {state}; not placed within {waited:g}s"

    def _create_actor(
        self, pg: PlacementGroup, pg_name: str, index: int, member: MemberLaunch, bundle: dict[str, float]
    ) -> Any:
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        actor = RemoteMember.options(
            name=f"{pg_name}/{member.member_id}",
            namespace=self.cfg.namespace,
            lifetime="detached",
            max_restarts=0,
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            resources=custom,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        ).remote(member.member_id, self.cfg.log_dir)
        self.actors[member.member_id] = actor
        return actor

    async def _call(self, ref: Any, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout or self.cfg.call_timeout_s)

    async def _start_members(
        self,
        gang_id: str,
        pg_name: str,
        actors: list[tuple[MemberLaunch, Any]],
        on_launched: Callable[[MemberHandle], None],
    ) -> list[MemberHandle]:
        places = await asyncio.gather(
            *(self._call(actor.prepare.remote(self.cfg.bind_host)) for _, actor in actors)
        )
        peer_host, peer_port = places[0]["host"], str(places[0]["port"])
        handles = []
        for (member, actor), place in zip(actors, places, strict=True):
            gpus = list(place["gpus"])
            values = {
                **member.values,
                "python": place["python"],
                "host": place["host"],
                "port": str(place["port"]),
                "gpus": ",".join(gpus),
                "peer_host": peer_host,
                "peer_port": peer_port,
            }
            command = render(member.command, values)
            argv = shlex.split(command)
            if not argv:
                raise LaunchError(f"{member.member_id}: empty command")
            env = {**member.env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
            pid = await self._call(actor.start.remote(argv, env, ORPHAN_GRACE_S))
            handle = MemberHandle(
                member.member_id,
                self.name,
                place["host"],
                int(place["port"]),
                gpus,
                {
                    "actor": f"{pg_name}/{member.member_id}",
                    "pg": pg_name,
                    "node": str(place["node_id"]),
                    "pid": int(pid),
                },
            )
            handles.append(handle)
            log.info(
                "started %s on node %s pid %d at %s: %s",
                member.member_id,
                str(place["node_id"])[:12],
                pid,
                handle.url,
                command,
            )
            on_launched(handle)
        return handles

    # stop -------------------------------------------------------------------------------------------
    async def stop(self, handles: list[MemberHandle], grace_s: float) -> None:
        if not handles:
            return
        try:
            await self.connect()
        except LaunchError as exc:
            log.error("cannot stop %s: %s", ", ".join(h.member_id for h in handles), exc)
            return
        for handle in handles:
            self._unwatch(handle.member_id)
        actors = [a for a in [await self._actor(h) for h in handles] if a is not None]
        stops = [
            self._call(actor.stop.remote(grace_s), grace_s + self.cfg.call_timeout_s) for actor in actors
        ]
        for result in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, RayActorError):
                log.warning("stopping an engine through its actor failed: %s", result)
        for pg_name in sorted({str(h.ref.get("pg", "")) for h in handles} - {""}):
            await self._teardown(pg_name, actors)
        for handle in handles:
            self.actors.pop(handle.member_id, None)
            log.info("stopped %s (%s)", handle.member_id, handle.ref.get("actor"))

    async def _teardown(self, pg_name: str, actors: list[Any]) -> None:
        """Kill the gang's actors (also any we hold no handle of) and release its placement group."""

        def kill_all() -> None:
            for actor in actors:
                try:
                    ray.kill(actor, no_restart=True)
                except (RayError, ValueError):
                    pass
            for name in self._live_actor_names():
                if name.rsplit("/", 1)[0] == pg_name:
                    try:
                        ray.kill(ray.get_actor(name, namespace=self.cfg.namespace), no_restart=True)
                    except (RayError, ValueError):
                        pass

        try:
            await self._blocking(kill_all)
        except RayError as exc:
            log.warning("cannot list the actors of %s: %s", pg_name, exc)
        await self._remove_group(pg_name)

    async def _actor(self, handle: MemberHandle) -> Any | None:
        actor = self.actors.get(handle.member_id)
        if actor is not None:
            return actor
        name = str(handle.ref.get("actor", ""))
        if not name:
            return None
        try:
            actor = await self._blocking(ray.get_actor, name, namespace=self.cfg.namespace)
        except (ValueError, RayError):
            return None
        self.actors[handle.member_id] = actor
        return actor

    # liveness ---------------------------------------------------------------------------------------
    async def _status(self, handle: MemberHandle) -> dict[str, Any] | None:
        """The actor's view of its engine; None when the actor is gone or does not answer."""
        actor = await self._actor(handle)
        if actor is None:
            return None
        try:
            status: dict[str, Any] = await self._call(actor.status.remote())
        except (RayError, TimeoutError):
            return None
        return status

    async def alive(self, handle: MemberHandle) -> bool:
        watcher = self.watchers.get(handle.member_id)
        if watcher is not None:
            return not watcher.done()
        status = await self._status(handle)
        return status is not None and bool(status["running"])

    async def adopt(self, handle: MemberHandle) -> bool:
        try:
            await self.connect()
        except LaunchError as exc:
            log.warning("cannot adopt %s: %s", handle.member_id, exc)
            return False
        status = await self._status(handle)
        if status is None or not status["running"] or status["pid"] != handle.ref.get("pid"):
            self.actors.pop(handle.member_id, None)
            return False
        return True

    def address(self, handle: MemberHandle) -> tuple[str, int]:
        return handle.host, handle.port

    def watch_exit(self, handle: MemberHandle, callback: Callable[[], None]) -> None:
        """A long call into the actor that returns when the engine exits, and fails when the actor (or its
        node) dies: either way the member is gone."""
        actor = self.actors.get(handle.member_id)
        if actor is None:
            return
        self._unwatch(handle.member_id)
        self.watchers[handle.member_id] = asyncio.get_running_loop().create_task(
            self._watch(handle.member_id, actor, callback), name=f"ray watch {handle.member_id}"
        )

    async def _watch(self, member_id: str, actor: Any, callback: Callable[[], None]) -> None:
        while True:
            try:
                code = await asyncio.wrap_future(actor.wait_exit.remote().future())
                log.warning("%s: engine exited with %s", member_id, code)
                break
            except ActorUnavailableError:
                await asyncio.sleep(1.0)
            except RayActorError as exc:
                log.warning("%s: actor died: %s", member_id, brief(exc))
                break
            except RayError as exc:
                log.warning("%s: cannot watch: %s", member_id, exc)
                await asyncio.sleep(1.0)
        callback()

    def _unwatch(self, member_id: str) -> None:
        watcher = self.watchers.pop(member_id, None)
        if watcher is not None:
            watcher.cancel()

    async def close(self) -> None:
        """Leave the cluster; actors and placement groups stay for the next sidecar to adopt."""
        for member_id in list(self.watchers):
            self._unwatch(member_id)
        self.actors.clear()
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=self.cfg.call_timeout_s)
        if self._threads:
            await asyncio.wait(self._threads, timeout=self.cfg.placement_timeout_s + self.cfg.call_timeout_s)
        if self._threads:
            log.warning("leaving Ray with %d calls still running", len(self._threads))
            return
        if self._connected:
            await asyncio.to_thread(ray.shutdown)
            self._connected = False
            self._init = None
