"""Keeping gateways and routers in sync: one reconcile loop per target, over HTTP only.

Gateway replicas get the full desired replica set with a generation (`PUT /admin/v1/replicas`); each
loop runs on its own, so a gateway that is down holds back nobody and converges when it is back (its
generation differs, it gets the set again). Slots are shared out: with N reachable gateways each gets
capacity // N (at least 1) of every engine replica. An SGLang router gets its worker list made right
through `/workers` (POST, GET, DELETE by worker id). Every response is read with a size bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import msgspec
import orjson

from gateway.config import ReplicaSet, ReplicaSpec
from gateway.sidecar.spec import ServiceSpec, SglangRouterTarget, SidecarConfig
from gateway.sidecar.store import Store

log = logging.getLogger("gateway.sidecar.sync")


class SyncError(Exception):
    """A target did not answer as the contract says; the message is shown in status."""


class Registration(msgspec.Struct):
    """One serving member that the targets should know."""

    replica_id: str
    service: ServiceSpec
    url: str
    draining: bool


class TargetStatus(msgspec.Struct):
    """What `sidecar status` shows per target."""

    kind: str
    url: str
    reachable: bool = True
    acked_generation: int | None = None
    """The generation this target has confirmed (for routers: the one whose worker list it matches)."""
    remote_generation: int | None = None
    last_error: str = ""
    last_ok_at: float | None = None
    failures: int = 0


class _Target:
    def __init__(self, status: TargetStatus, token: str | None) -> None:
        self.status = status
        self.token = token
        self.kick = asyncio.Event()
        self.counted = True
        """Counted among the N gateways that share slots."""
        self.replicas: list[dict[str, Any]] = []
        """Last replica list this gateway reported (for drain and status)."""

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        return headers


class SyncManager:
    """The desired replica set, its generation, and the loops that push it to every target."""

    def __init__(self, cfg: SidecarConfig, store: Store, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.store = store
        self.session = session
        self.source: Callable[[], list[Registration]] = list
        """Callable returning the current registrations (set by the controller to Fleet.registrations)."""
        self.generation = store.generation
        self._fingerprint: bytes = b""
        self._replicas: list[ReplicaSpec] = []
        self.gateways = [
            _Target(
                TargetStatus("gateway", g.admin_url.rstrip("/"), acked_generation=None), g.resolve_token()
            )
            for g in cfg.gateways
        ]
        self.routers = [
            (_Target(TargetStatus("sglang-router", r.url.rstrip("/")), r.api_key), r)
            for r in cfg.sglang_routers
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # desired state ----------------------------------------------------------------------------------
    def shares(self) -> int:
        counted = sum(1 for g in self.gateways if g.counted)
        return max(1, counted)

    def refresh(self) -> None:
        """Recompute the desired set; a different one gets the next generation and wakes every loop."""
        n = self.shares()
        specs = []
        for reg in sorted(self.source(), key=lambda r: r.replica_id):
            service = reg.service
            specs.append(
                ReplicaSpec(
                    id=reg.replica_id,
                    model=service.model,
                    url=reg.url,
                    engine=service.engine,
                    capacity=max(1, service.capacity // n),
                    labels={
                        **service.labels,
                        "service": service.name,
                        "gang": reg.replica_id.split(".", 1)[0],
                    },
                    draining=reg.draining,
                )
            )
        fingerprint = msgspec.json.encode(specs)
        if fingerprint == self._fingerprint:
            return
        self._fingerprint = fingerprint
        self._replicas = specs
        self.generation += 1
        self.store.generation = self.generation
        log.info("generation %d: %d replicas, slot shares for %d gateway(s)", self.generation, len(specs), n)
        self.kick()

    def kick(self) -> None:
        for gateway in self.gateways:
            gateway.kick.set()
        for router, _ in self.routers:
            router.kick.set()

    def desired(self) -> ReplicaSet:
        return ReplicaSet(self.generation, list(self._replicas))

    def _bump_above(self, remote: int) -> None:
        """A gateway holds a newer generation than ours (state lost or another sidecar): jump past it."""
        if remote >= self.generation:
            self.generation = remote + 1
            self.store.generation = self.generation
            log.warning("a gateway holds generation %d; ours is now %d", remote, self.generation)
            self.kick()

    # HTTP with bounded reads ------------------------------------------------------------------------
    async def _call(
        self, target: _Target, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, Any]:
        url = target.status.url + path
        timeout = aiohttp.ClientTimeout(total=self.cfg.sync.timeout_s)
        limit = self.cfg.sync.max_response_bytes
        try:
            async with self.session.request(
                method, url, data=body, headers=target.headers(), timeout=timeout
            ) as resp:
                if resp.content_length is not None and resp.content_length > limit:
                    raise SyncError(
                        f"{method} {path}: response of {resp.content_length} bytes is over {limit}"
                    )
                raw = await resp.content.read(limit + 1)
                if len(raw) > limit:
                    raise SyncError(f"{method} {path}: response over {limit} bytes")
                status = resp.status
        except aiohttp.ClientError as exc:
            raise SyncError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise SyncError(f"{method} {path}: no answer within {self.cfg.sync.timeout_s:g}s") from exc
        try:
            doc = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as exc:
            raise SyncError(f"{method} {path}: {status} with a body that is not JSON") from exc
        return status, doc

    @staticmethod
    def _error_text(status: int, doc: Any) -> str:
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            return f"{status}: {doc['error'].get('message')}"
        return f"{status}"

    # gateways ---------------------------------------------------------------------------------------
    async def _gateway_round(self, target: _Target) -> None:
        st = target.status
        status, doc = await self._call(target, "GET", "/admin/v1/replicas")
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("generation"), int):
            raise SyncError(f"GET /admin/v1/replicas: {self._error_text(status, doc)}")
        st.remote_generation = doc["generation"]
        target.replicas = [r for r in doc.get("replicas", []) if isinstance(r, dict)]
        if st.remote_generation == self.generation and st.acked_generation == self.generation:
            return
        if not target.counted:
            # Coming back: the gateways already counted get their smaller shares first, then this one.
            target.counted = True
            self.refresh()
            await self._others_acked(target, self.generation)
        desired = self.desired()
        status, doc = await self._call(target, "PUT", "/admin/v1/replicas", msgspec.json.encode(desired))
        if status == 409 and isinstance(doc, dict) and isinstance(doc.get("generation"), int):
            st.remote_generation = doc["generation"]
            self._bump_above(doc["generation"])
            raise SyncError(f"PUT /admin/v1/replicas: 409, gateway holds generation {doc['generation']}")
        if status != 200:
            raise SyncError(f"PUT /admin/v1/replicas: {self._error_text(status, doc)}")
        st.acked_generation = st.remote_generation = desired.generation
        self.store.set_ack(st.url, desired.generation)
        log.info("%s acknowledged generation %d", st.url, desired.generation)

    async def _others_acked(self, target: _Target, generation: int) -> None:
        deadline = time.monotonic() + 2 * self.cfg.sync.timeout_s
        while time.monotonic() < deadline:
            others = [g for g in self.gateways if g is not target and g.counted and g.status.reachable]
            if all((g.status.acked_generation or -1) >= generation for g in others):
                return
            await asyncio.sleep(0.05)

    def _gateway_failed(self, target: _Target, exc: SyncError) -> None:
        st = target.status
        st.failures += 1
        if st.last_error != str(exc):
            log.warning("gateway %s: %s", st.url, exc)
        st.last_error = str(exc)
        if st.failures >= self.cfg.sync.unreachable_after and st.reachable:
            st.reachable = False
            st.acked_generation = None
            if target.counted:
                target.counted = False
                log.warning("gateway %s unreachable: slots re-shared among the others", st.url)
                self.refresh()

    async def _loop(self, target: _Target, round_fn: Any, on_error: Any) -> None:
        while not self._closing:
            target.kick.clear()
            try:
                await round_fn(target)
            except SyncError as exc:
                on_error(target, exc)
            else:
                st = target.status
                st.failures = 0
                st.last_error = ""
                st.last_ok_at = time.time()
                if not st.reachable:
                    st.reachable = True
                    log.info("%s %s reachable again", st.kind, st.url)
                if (st.acked_generation or -1) < self.generation:
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(target.kick.wait(), self.cfg.sync.interval_s)

    # sglang-router ----------------------------------------------------------------------------------
    def _router_desired(self, spec: SglangRouterTarget) -> dict[str, str]:
        wanted = set(spec.services) if spec.services is not None else None
        return {
            r.url: r.service.model
            for r in self.source()
            if not r.draining and (wanted is None or r.service.name in wanted)
        }

    async def _router_round(self, target: _Target, spec: SglangRouterTarget) -> None:
        generation = self.generation
        desired = self._router_desired(spec)
        status, doc = await self._call(target, "GET", "/workers")
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("workers"), list):
            raise SyncError(f"GET /workers: {self._error_text(status, doc)}")
        present: dict[str, str] = {}
        changed = False
        for worker in doc["workers"]:
            if not isinstance(worker, dict):
                continue
            url, worker_id = str(worker.get("url", "")).rstrip("/"), str(worker.get("id", ""))
            if desired.get(url) == worker.get("model_id") and url not in present:
                present[url] = worker_id
                continue
            status, body = await self._call(target, "DELETE", f"/workers/{worker_id}")
            if status not in (200, 202, 204, 404):
                raise SyncError(f"DELETE /workers/{worker_id}: {self._error_text(status, body)}")
            log.info("sglang-router %s: removed worker %s (%s)", target.status.url, worker_id, url)
            changed = True
        for url, model in desired.items():
            if url in present:
                continue
            body = orjson.dumps({"url": url, "model_id": model})
            status, answer = await self._call(target, "POST", "/workers", body)
            if status not in (200, 201, 202):
                raise SyncError(f"POST /workers {url}: {self._error_text(status, answer)}")
            log.info("sglang-router %s: added worker %s (%s)", target.status.url, url, model)
            changed = True
        if changed:
            # The router registers in the background; the next round (at once) confirms the list.
            await asyncio.sleep(0.2)
            return
        target.status.acked_generation = target.status.remote_generation = generation

    def _router_failed(self, target: _Target, exc: SyncError) -> None:
        st = target.status
        st.failures += 1
        if st.last_error != str(exc):
            log.warning("sglang-router %s: %s", st.url, exc)
        st.last_error = str(exc)
        if st.failures >= self.cfg.sync.unreachable_after:
            st.reachable = False

    # drain and stats ---------------------------------------------------------------------------------
    async def drain(self, replica_ids: list[str], grace_s: float) -> bool:
        """Wait until every reachable gateway knows these replicas are draining and has nothing in flight
        on them (or the grace period ends). Unreachable gateways cannot be asked and are not waited for."""
        generation = self.generation
        wanted = set(replica_ids)
        deadline = time.monotonic() + grace_s
        while True:
            pending = False
            for target in self.gateways:
                if not target.status.reachable:
                    continue
                if (target.status.acked_generation or -1) < generation:
                    pending = True
                    continue
                try:
                    status, doc = await self._call(target, "GET", "/admin/v1/replicas")
                except SyncError:
                    pending = True
                    continue
                if status != 200 or not isinstance(doc, dict):
                    pending = True
                    continue
                for replica in doc.get("replicas", []):
                    if (
                        isinstance(replica, dict)
                        and replica.get("id") in wanted
                        and replica.get("in_flight", 0)
                    ):
                        pending = True
            if not pending:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def collect_stats(self) -> list[dict[str, Any] | None]:
        """`GET /admin/v1/stats` of every gateway; None for one that did not answer."""

        async def one(target: _Target) -> dict[str, Any] | None:
            try:
                status, doc = await self._call(target, "GET", "/admin/v1/stats")
            except SyncError as exc:
                log.debug("stats of %s: %s", target.status.url, exc)
                return None
            if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("pools"), dict):
                return None
            return doc

        return list(await asyncio.gather(*(one(g) for g in self.gateways)))

    # lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.refresh()
        for gateway in self.gateways:
            self._spawn(gateway, self._loop(gateway, self._gateway_round, self._gateway_failed))
        for router, spec in self.routers:

            async def round_fn(target: _Target, spec: SglangRouterTarget = spec) -> None:
                await self._router_round(target, spec)

            self._spawn(router, self._loop(router, round_fn, self._router_failed))

    def _spawn(self, target: _Target, loop: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(loop, name=f"sync {target.status.url}")

        def done(task: asyncio.Task[None]) -> None:
            # A bug must not stop a target's sync silently: it is logged and shown in status.
            if not task.cancelled() and task.exception() is not None:
                log.error("sync loop of %s crashed", target.status.url, exc_info=task.exception())
                target.status.reachable = False
                target.status.last_error = f"sync loop crashed: {task.exception()!r}"

        task.add_done_callback(done)
        self._tasks.append(task)

    async def flush(self, timeout_s: float) -> None:
        """Give every reachable target a chance to take the current generation (used at shutdown)."""
        deadline = time.monotonic() + timeout_s
        self.kick()
        while time.monotonic() < deadline:
            targets = [g.status for g in self.gateways] + [r.status for r, _ in self.routers]
            if all(not t.reachable or t.acked_generation == self.generation for t in targets):
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def statuses(self) -> list[TargetStatus]:
        return [g.status for g in self.gateways] + [r.status for r, _ in self.routers]
