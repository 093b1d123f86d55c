"""Active health checks: a replica leaves rotation after `unhealthy_threshold` failed checks in a row
and returns by itself after `healthy_threshold` good ones.

The replica list is read from the registry every round, and a replica added by `Registry.apply` is
checked at once (hook on `Registry.on_added`), so a new replica needs no restart and a dead one added
by mistake leaves rotation within one timeout. Checks run with bounded concurrency on the shared
client. Each round also finishes the removal of retired replicas whose last request ended.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.config import HealthConfig
from gateway.fetch import Fetcher, FetchError
from gateway.pool import Registry, Replica
from gateway.scrape import SPREAD_FRACTION, describe_error, report_crash, spread
from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)

HEALTH_BODY_LIMIT = 1024 * 1024
OPENAI_HEALTH_PATH = "/v1/models"
"""Plain OpenAI servers (engine `openai`) have no `/health`; their model list answers instead."""


class _State:
    __slots__ = ("failures", "replica", "successes")

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.successes = 0
        self.failures = 0


class HealthChecker:
    """Sets `replica.healthy` from periodic `GET <url><path>` checks; 2xx is healthy."""

    def __init__(
        self,
        registry: Registry,
        cfg: HealthConfig,
        telemetry: Telemetry,
        *,
        concurrency: int = 64,
        spread_s: float | None = None,
    ) -> None:
        self.registry = registry
        self.cfg = cfg
        self.telemetry = telemetry
        self.spread_s = cfg.interval_s * SPREAD_FRACTION if spread_s is None else spread_s
        """A round's checks start evenly over this many seconds (0: all at once)."""
        self.fetcher = Fetcher(max_bytes=HEALTH_BODY_LIMIT, user_agent="llm-gateway-health")
        """Raw keep-alive polls: at fleet scale aiohttp's per-request cost would dominate."""
        self._sem = asyncio.Semaphore(concurrency)
        self._states: dict[str, _State] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._task is not None:
            return
        self.registry.on_added.append(self._on_added)
        for replica in self.registry.replicas():
            self.telemetry.health_changed(replica.id, replica.healthy)
        self._task = asyncio.create_task(self._run(), name="health-checker")
        self._task.add_done_callback(report_crash)

    async def stop(self) -> None:
        if self._on_added in self.registry.on_added:
            self.registry.on_added.remove(self._on_added)
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        # A crash of the loop was already logged by report_crash; shutdown goes on.
        await asyncio.gather(*tasks, return_exceptions=True)
        self.fetcher.close()

    def _on_added(self, replica: Replica) -> None:
        self.telemetry.health_changed(replica.id, replica.healthy)
        if self._task is None:
            return
        task = asyncio.get_running_loop().create_task(self._bounded(replica))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.check_all()
            self.registry.reap_retired()
            await asyncio.sleep(max(0.0, self.cfg.interval_s - (loop.time() - started)))

    async def check_all(self) -> None:
        """One round over every current replica, started evenly over `spread_s` seconds."""
        replicas = list(self.registry.replicas())
        live = {r.id for r in replicas}
        for rid in [rid for rid in self._states if rid not in live]:
            del self._states[rid]
        await spread(replicas, self._bounded, self.spread_s)

    async def _bounded(self, replica: Replica) -> None:
        async with self._sem:
            ok, reason = await self.probe(replica)
        self.record(replica, ok, reason)

    async def probe(self, replica: Replica) -> tuple[bool, str]:
        path = OPENAI_HEALTH_PATH if replica.engine == "openai" else self.cfg.path
        try:
            status, _ = await self.fetcher.get(
                replica.host, replica.port, replica.base_path + path, self.cfg.timeout_s, tls=replica.tls
            )
        except (TimeoutError, OSError, FetchError) as exc:
            return False, describe_error(exc)
        if 200 <= status < 300:
            return True, ""
        return False, f"HTTP {status}"

    def record(self, replica: Replica, ok: bool, reason: str = "") -> None:
        """Count one check result and flip `replica.healthy` when a threshold is reached."""
        if replica.removed:
            return
        state = self._states.get(replica.id)
        if state is None or state.replica is not replica:
            state = self._states[replica.id] = _State(replica)
        self.telemetry.health_check(replica.id, ok)
        if ok:
            state.failures = 0
            state.successes += 1
            if not replica.healthy and state.successes >= self.cfg.healthy_threshold:
                replica.healthy = True
                log.info("replica %s (%s) is healthy again", replica.id, replica.url)
                self.telemetry.health_changed(replica.id, True)
                pool = self.registry.pools.get(replica.model)
                if pool is not None and replica.id in pool.replicas:
                    pool.pump()
        else:
            state.successes = 0
            state.failures += 1
            if replica.healthy and state.failures >= self.cfg.unhealthy_threshold:
                replica.healthy = False
                log.warning(
                    "replica %s (%s) is unhealthy after %d failed checks: %s",
                    replica.id,
                    replica.url,
                    state.failures,
                    reason,
                )
                self.telemetry.health_changed(replica.id, False)
