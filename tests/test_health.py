"""Active health checks against real HTTP servers on 127.0.0.1 whose /health can be switched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.config import AccessLogConfig, HealthConfig, ReplicaSpec
from gateway.health import HealthChecker
from gateway.pool import Registry, Replica
from gateway.telemetry import Telemetry
from policies.least_request import LeastRequestRouter
from tests.procs import free_port, spawn


class Backend:
    """An engine double whose /health answers `status`, or hangs when `hang` is set."""

    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.checks = 0
        self.paths: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.handle)
        app.router.add_get("/v1/models", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.checks += 1
        self.paths.append(request.path)
        if self.hang:
            await asyncio.sleep(10)
        return web.Response(status=self.status)


@pytest.fixture
def start_backend(aiohttp_server: Any) -> Callable[[Backend], Any]:
    async def start(backend: Backend) -> str:
        server = await aiohttp_server(backend.app())
        return f"http://127.0.0.1:{server.port}"

    return start


def registry_with(*specs: ReplicaSpec) -> Registry:
    registry = Registry(lambda model: LeastRequestRouter(), queue_max=10)
    registry.apply(1, list(specs))
    return registry


def cfg(**kw: Any) -> HealthConfig:
    return HealthConfig(
        **{"interval_s": 0.05, "timeout_s": 0.5, "healthy_threshold": 2, "unhealthy_threshold": 2, **kw}
    )


def find(registry: Registry, rid: str) -> Replica:
    replica = registry.find(rid)
    assert replica is not None
    return replica


async def test_thresholds_take_a_replica_out_and_bring_it_back(
    start_backend: Callable[[Backend], Any],
) -> None:
    backend = Backend()
    registry = registry_with(ReplicaSpec("a", "m", await start_backend(backend)))
    telemetry = Telemetry(AccessLogConfig())
    checker = HealthChecker(registry, cfg(), telemetry)
    a = find(registry, "a")
    backend.status = 503
    await checker.check_all()
    assert a.healthy, "one failure is below the unhealthy threshold"
    await checker.check_all()
    assert not a.healthy and not a.eligible(time.monotonic())
    assert b'llm_gateway_replica_healthy{replica="a"} 0.0' in telemetry.render()[0]
    backend.status = 200
    await checker.check_all()
    assert not a.healthy, "one success is below the healthy threshold"
    await checker.check_all()
    assert a.healthy
    body = telemetry.render()[0]
    assert b'llm_gateway_replica_healthy{replica="a"} 1.0' in body
    assert b'llm_gateway_health_checks_total{replica="a",result="fail"} 2.0' in body


async def test_hanging_and_refusing_replicas_fail_their_checks(
    start_backend: Callable[[Backend], Any],
) -> None:
    hanging = Backend()
    hanging.hang = True
    registry = registry_with(
        ReplicaSpec("hang", "m", await start_backend(hanging)),
        ReplicaSpec("refused", "m", f"http://127.0.0.1:{free_port()}"),
    )
    checker = HealthChecker(registry, cfg(timeout_s=0.1, unhealthy_threshold=1), Telemetry(AccessLogConfig()))
    started = time.monotonic()
    await checker.check_all()
    assert time.monotonic() - started < 5
    assert not find(registry, "hang").healthy
    assert not find(registry, "refused").healthy


async def test_recovery_pumps_waiters_onto_the_replica(start_backend: Callable[[Backend], Any]) -> None:
    backend = Backend()
    registry = registry_with(ReplicaSpec("a", "m", await start_backend(backend), capacity=1))
    checker = HealthChecker(
        registry, cfg(healthy_threshold=1, unhealthy_threshold=1), Telemetry(AccessLogConfig())
    )
    pool = registry.pool("m")
    a = find(registry, "a")
    held = pool.try_reserve([a])
    assert held is not None
    waiter = asyncio.create_task(pool.reserve([a], 0, time.monotonic() + 10))
    await asyncio.sleep(0.01)
    backend.status = 500
    await checker.check_all()
    assert not a.healthy
    held.release()  # the slot is free, but the replica is unhealthy: the waiter keeps waiting
    await asyncio.sleep(0.01)
    assert not waiter.done() and a.in_flight == 0
    backend.status = 200
    await checker.check_all()
    slot = await asyncio.wait_for(waiter, 5)
    assert slot.replica is a
    slot.release()
    assert a.in_flight == 0


async def test_replicas_added_at_run_time_are_checked_at_once(
    start_backend: Callable[[Backend], Any],
) -> None:
    backend = Backend()
    url = await start_backend(backend)
    registry = registry_with(ReplicaSpec("a", "m", url))
    # A long interval: only the on_added hook can check the new replicas quickly.
    checker = HealthChecker(registry, cfg(interval_s=30, unhealthy_threshold=1), Telemetry(AccessLogConfig()))
    await checker.start()
    try:
        await asyncio.sleep(0.1)
        first_round = backend.checks
        registry.apply(
            2, [ReplicaSpec("a", "m", url), ReplicaSpec("dead", "m", f"http://127.0.0.1:{free_port()}")]
        )
        dead = find(registry, "dead")
        for _ in range(100):
            if not dead.healthy:
                break
            await asyncio.sleep(0.02)
        assert not dead.healthy
        assert backend.checks == first_round, "existing replicas wait for their round"
    finally:
        await checker.stop()
    assert checker._on_added not in registry.on_added


async def test_loop_keeps_checking_and_reaps_retired_replicas(
    start_backend: Callable[[Backend], Any],
) -> None:
    backend = Backend()
    url = await start_backend(backend)
    registry = registry_with(ReplicaSpec("a", "m", url), ReplicaSpec("b", "m", url))
    removed: list[str] = []
    registry.on_removed.append(lambda r: removed.append(r.id))
    pool = registry.pool("m")
    b = find(registry, "b")
    slot = pool.try_reserve([b])
    assert slot is not None
    registry.apply(2, [ReplicaSpec("a", "m", url)])
    assert registry.retired == {"b": b}
    checker = HealthChecker(registry, cfg(), Telemetry(AccessLogConfig()))
    await checker.start()
    try:
        slot.release()
        for _ in range(100):
            if removed and backend.checks >= 3:
                break
            await asyncio.sleep(0.02)
        assert removed == ["b"] and registry.retired == {}
        assert backend.checks >= 3
        assert set(checker._states) <= {"a"}
    finally:
        await checker.stop()


async def test_plain_openai_servers_are_checked_on_their_model_list(
    start_backend: Callable[[Backend], Any],
) -> None:
    backend = Backend()
    registry = registry_with(ReplicaSpec("o", "m", await start_backend(backend), engine="openai"))
    await HealthChecker(registry, cfg(), Telemetry(AccessLogConfig())).check_all()
    assert backend.paths == ["/v1/models"]


async def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_a_real_simulator_leaves_rotation_rejoins_by_itself_and_leaves_when_killed(
    tmp_path: Path,
) -> None:
    port = free_port()
    args = ["sim", "--port", str(port), "--instant", "--fault-startup-delay-s", "1.5"]
    with spawn(args, port=port, ready_path=None, log_dir=tmp_path) as sim:
        registry = registry_with(ReplicaSpec("sim", "m", sim.url))
        telemetry = Telemetry(AccessLogConfig())
        fast = cfg(interval_s=0.1, timeout_s=0.5, healthy_threshold=1, unhealthy_threshold=1)
        checker = HealthChecker(registry, fast, telemetry)
        replica = find(registry, "sim")
        await checker.start()
        try:
            assert await _until(lambda: not replica.healthy), "a starting engine (503) is out of rotation"
            assert await _until(lambda: replica.healthy), sim.log()
            sim.kill()
            assert await _until(lambda: not replica.healthy), "a dead engine leaves rotation"
        finally:
            await checker.stop()
