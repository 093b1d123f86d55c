"""Autoscaling: engine replicas from the in-flight (and queued) requests the gateways report.

Demand is summed over the gateway replicas that answered `/admin/v1/stats`. One that did not answer must
not break scaling: the others' data still scales up, but a scale-down needs every gateway's numbers,
because a missing one could be carrying the load. Cooldowns hold each direction after any scale event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from gateway.sidecar.spec import ServiceSpec

log = logging.getLogger("gateway.sidecar.autoscale")


class Decision(msgspec.Struct):
    """The last decision, shown in status."""

    at: float
    """Unix time of the decision (in status)."""
    current: int
    wanted: int
    demand: float
    gateways_answered: int
    gateways_total: int
    action: str
    """`up`, `down`, `hold`, `cooldown`, `no-data` or `missing-data` (a scale-down held back)."""


def demand_of(model: str, stats: list[dict[str, Any] | None]) -> tuple[float, int]:
    """(in-flight + queued requests for `model` summed over the answers, number of answers)."""
    total = 0.0
    answered = 0
    for doc in stats:
        if doc is None:
            continue
        answered += 1
        pool = doc.get("pools", {}).get(model)
        if isinstance(pool, dict):
            total += float(pool.get("in_flight", 0) or 0) + float(pool.get("queue_depth", 0) or 0)
    return total, answered


def decide(
    spec: ServiceSpec,
    current: int,
    stats: list[dict[str, Any] | None],
    now: float,
    last_event: float,
) -> Decision:
    """Pure: what the replica count should be given the gateways' answers."""
    assert spec.autoscale is not None
    auto = spec.autoscale
    demand, answered = demand_of(spec.model, stats)
    total = len(stats)
    wanted = max(auto.min_replicas, min(auto.max_replicas, math.ceil(demand / auto.target_in_flight)))

    def result(count: int, action: str) -> Decision:
        return Decision(now, current, count, demand, answered, total, action)

    if answered == 0:
        return result(current, "no-data")
    if wanted > current:
        if now - last_event < auto.up_cooldown_s:
            return result(current, "cooldown")
        return result(wanted, "up")
    if wanted < current:
        if answered < total:
            return result(current, "missing-data")
        if now - last_event < auto.down_cooldown_s:
            return result(current, "cooldown")
        return result(wanted, "down")
    return result(current, "hold")


class Autoscaler:
    """One loop per autoscaled service."""

    def __init__(
        self,
        spec: ServiceSpec,
        current: Callable[[], int],
        apply: Callable[[int], None],
        collect: Callable[[], Awaitable[list[dict[str, Any] | None]]],
    ) -> None:
        assert spec.autoscale is not None
        self.spec = spec
        self.current = current
        self.apply = apply
        self.collect = collect
        self.last_event = float("-inf")
        self.last: Decision | None = None
        self.task: asyncio.Task[None] | None = None

    async def step(self) -> Decision:
        stats = await self.collect()
        now = time.monotonic()
        decision = decide(self.spec, self.current(), stats, now, self.last_event)
        decision.at = time.time()
        if decision.action in ("up", "down"):
            log.info(
                "%s: scale %s %d -> %d (demand %.1f from %d/%d gateways)",
                self.spec.name,
                decision.action,
                decision.current,
                decision.wanted,
                decision.demand,
                decision.gateways_answered,
                decision.gateways_total,
            )
            self.last_event = now
            self.apply(decision.wanted)
        self.last = decision
        return decision

    async def run(self) -> None:
        assert self.spec.autoscale is not None
        while True:
            await asyncio.sleep(self.spec.autoscale.interval_s)
            await self.step()

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"autoscale {self.spec.name}")
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        """A bug must not stop autoscaling silently: logged, and shown in status as the last action."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("autoscaler of %s crashed", self.spec.name, exc_info=task.exception())
        current = self.current()
        self.last = Decision(time.time(), current, current, 0.0, 0, 0, f"crashed: {task.exception()!r}")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
