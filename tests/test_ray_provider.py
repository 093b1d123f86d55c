"""Ray provider on a real local Ray cluster: three worker nodes of 4 logical GPUs each, simulators as engines.

The gangs are run by the sidecar's own `Fleet` in this process with the Ray provider plugged in, so the
whole life of a gang is exercised: placement, member actors, health over HTTP, failure, restart, adoption.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

# Ray must keep to the loopback address (nodes, GCS and engines alike): set before `ray` is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import aiohttp
import msgspec
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table

from gateway.config import ConfigError, load_struct
from gateway.sidecar.gangs import PENDING, RUNNING, STARTING, Fleet, Gang
from gateway.sidecar.providers.base import MemberLaunch
from gateway.sidecar.providers.ray import (
    PlacementPending,
    RayProvider,
    RayProviderConfig,
    infeasible,
)
from gateway.sidecar.spec import SidecarConfig
from gateway.sidecar.store import Store
from tests.procs import http_get
from tests.test_sidecar_support import pid_alive, processes_with, service

pytestmark = pytest.mark.timeout(180)

NAMESPACE = "llm-gateway-test"
PREFIX = "llmgwtest-"
NODE_GPUS = 4


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head (no resources) plus three nodes with 4 logical GPUs each; node deaths noticed within ~2s."""
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "num_gpus": 0,
            "object_store_memory": 78643200,
            "include_dashboard": False,
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 3,
            },
        },
    )
    try:
        for _ in range(3):
            c.add_node(num_cpus=2, num_gpus=NODE_GPUS, object_store_memory=78643200)
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def provider_config(cluster: Cluster, tmp_path: Path, **overrides: Any) -> RayProviderConfig:
    doc: dict[str, Any] = {
        "address": cluster.address,
        "namespace": NAMESPACE,
        "prefix": PREFIX,
        "cpus": 0.25,
        "placement_timeout_s": 5.0,
        "call_timeout_s": 60.0,
        "log_dir": str(tmp_path / "engine-logs"),
    }
    doc.update(overrides)
    return msgspec.convert(doc, RayProviderConfig)


def our_groups() -> dict[str, dict[str, Any]]:
    """Live (not removed) placement groups with the test prefix, by name."""
    return {
        info["name"]: info
        for info in placement_group_table().values()
        if info["name"].startswith(PREFIX) and info["state"] != "REMOVED"
    }


def our_actors() -> list[str]:
    return [a for a in ray.util.list_named_actors() if a.startswith(PREFIX)]


async def until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class Sidecar:
    """The sidecar's gang machinery (store, Fleet) with a Ray provider, in this process."""

    def __init__(self, tmp_path: Path, cluster: Cluster, services: list[dict[str, Any]], **ray_cfg: Any):
        # The local GPU inventory check of the config does not apply to Ray: give it enough ids.
        doc = {
            "state_dir": str(tmp_path / "state"),
            "services": services,
            "gpus": [str(i) for i in range(16)],
        }
        self.cfg = msgspec.convert(doc, SidecarConfig)
        self.store = Store(tmp_path / "state" / "sidecar.db")
        self.provider = RayProvider(provider_config(cluster, tmp_path, **ray_cfg))
        self.closed = False
        self.session = aiohttp.ClientSession()
        self.registered: list[set[str]] = []
        """The serving replica ids offered to the gateways, after every change."""
        self.fleet = Fleet(self.cfg, self.store, self.provider, self.session, self._changed)

    def _changed(self) -> None:
        self.registered.append({r.replica_id for r in self.fleet.registrations()})

    async def start(self) -> Sidecar:
        await self.fleet.start()
        return self

    def gang(self, gang_id: str) -> Gang:
        return self.fleet.gangs[gang_id]

    def running(self) -> list[Gang]:
        return [g for g in self.fleet.gangs.values() if g.state == RUNNING and g.members]

    async def close(self, stop_engines: bool) -> None:
        self.closed = True
        await self.fleet.close(stop_engines)
        await self.session.close()
        await self.provider.close()
        self.store.close()


@pytest.fixture
async def sidecars(cluster: Cluster, tmp_path: Path) -> AsyncIterator[list[Sidecar]]:
    """Sidecars made by a test; at the end each is stopped with its engines, and anything of ours a failed
    test left on the cluster is wiped so that the next test starts clean."""
    made: list[Sidecar] = []
    yield made
    for sc in made:
        if not sc.closed:
            await sc.close(stop_engines=True)
    provider = RayProvider(provider_config(cluster, tmp_path))
    await provider.connect()
    try:
        for name in our_actors():
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        for name in our_groups():
            ray.util.remove_placement_group(ray.util.get_placement_group(name))
    finally:
        await provider.close()


async def open_sidecar(
    made: list[Sidecar], tmp_path: Path, cluster: Cluster, services: list[dict[str, Any]], **ray_cfg: Any
) -> Sidecar:
    sc = Sidecar(tmp_path, cluster, services, **ray_cfg)
    made.append(sc)
    return await sc.start()


def gang_of(size: int, gpus: int, roles: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"members": roles or [{"role": "engine", "count": size, "gpus": gpus}]}


def healthy(url: str) -> bool:
    try:
        return http_get(url + "/health", timeout=2.0)[0] == 200
    except OSError:
        return False


async def each_healthy(gang: Gang) -> None:
    for member in gang.members:
        assert await asyncio.to_thread(healthy, member.handle.url), member.id


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "ray.yaml"
    path.write_text("address: 10.0.0.5:6379\nservices:\n  llama: {strategy: DIAGONAL}\n")
    with pytest.raises(ConfigError, match=r"strategy: Invalid enum value 'DIAGONAL'"):
        load_struct(path, RayProviderConfig)
    path.write_text("placement_timeout_s: 0\n")
    with pytest.raises(ConfigError, match="placement_timeout_s: must be > 0"):
        load_struct(path, RayProviderConfig)


def test_infeasible_names_what_no_cluster_state_can_give() -> None:
    nodes = [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}]
    assert infeasible([{"GPU": 5.0}], "PACK", nodes) == "no node has {GPU: 5}"
    two_of_three = [{"GPU": 3.0}, {"GPU": 3.0}]
    assert infeasible(two_of_three, "STRICT_PACK", nodes) == "no node has {GPU: 6} for the whole gang"
    assert infeasible(two_of_three, "PACK", nodes) is None
    assert infeasible(two_of_three, "STRICT_SPREAD", nodes) is None
    assert infeasible(two_of_three * 2, "SPREAD", nodes) == "needs {GPU: 12}, the whole cluster has {GPU: 8}"
    three = [{"GPU": 1.0}] * 3
    spread = infeasible(three, "STRICT_SPREAD", nodes)
    assert spread == "needs 3 distinct nodes for its bundles, 2 can hold them"
    # A matching, not a greedy pass: the small bundle must not take the only big node.
    mixed = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 4.0}]
    assert infeasible(mixed, "STRICT_SPREAD", [{"CPU": 2.0, "GPU": 4.0}, {"CPU": 2.0, "GPU": 1.0}]) is None
    assert infeasible([{"CPU": 1.0, "accelerator_type:H100": 0.001}], "PACK", nodes) is not None


# placement ----------------------------------------------------------------------------------------------
async def test_strict_spread_gang_lands_on_two_nodes(
    tmp_path: Path, cluster: Cluster, model: str, sidecars: list[Sidecar]
) -> None:
    spec = service(model=model, gang=gang_of(2, 2))
    sc = await open_sidecar(sidecars, tmp_path, cluster, [spec], strategy="STRICT_SPREAD")
    gang = await until(lambda: sc.running(), what="gang running")
    gang = gang[0]
    nodes = [m.handle.ref["node"] for m in gang.members]
    assert len(set(nodes)) == 2, nodes
    assert all(len(m.handle.gpus) == 2 for m in gang.members)
    await each_healthy(gang)
    group = our_groups()[PREFIX + gang.id]
    assert group["strategy"] == "STRICT_SPREAD"
    assert sorted(group["bundles_to_node_id"].values()) == sorted(nodes)
    assert sorted(b["GPU"] for b in group["bundles"].values()) == [2.0, 2.0]
    # Both members serve: the gateways are offered both replicas.
    assert sc.registered[-1] == {m.id for m in gang.members}
    await sc.close(stop_engines=True)
    assert not our_groups() and not our_actors()
    assert not processes_with(model)


async def test_infeasible_gang_stays_pending_with_nothing_started(
    tmp_path: Path, cluster: Cluster, model: str, sidecars: list[Sidecar]
) -> None:
    provider = RayProvider(provider_config(cluster, tmp_path, placement_timeout_s=1.0))
    try:
        launches = [
            MemberLaunch(
                f"big-0.1.e{i}", "e", i, "{python} -m gateway sim", {"model": model}, {}, NODE_GPUS + 1
            )
            for i in range(2)
        ]
        started: list[str] = []
        with pytest.raises(PlacementPending) as info:
            await provider.launch("big-0", launches, lambda h: started.append(h.member_id))
        assert "infeasible: no node has {CPU: 0.25, GPU: 5}" in str(info.value)
        assert started == [] and not our_groups() and not our_actors()
    finally:
        await provider.close()
    # Through the sidecar: the gang never runs, shows why, and nothing of it exists on the cluster.
    spec = service(model=model, gang=gang_of(1, NODE_GPUS + 1), backoff_base_s=0.5)
    sc = await open_sidecar(sidecars, tmp_path, cluster, [spec], placement_timeout_s=1.0)
    gang = sc.gang("llama-0")
    await until(lambda: gang.state == PENDING and "infeasible" in gang.row.reason, what="pending gang")
    for _ in range(20):
        assert gang.state in (PENDING, STARTING) and not gang.members and gang.row.failures == 0
        assert not our_actors() and not processes_with(model)
        await asyncio.sleep(0.1)
    assert sc.registered == [] or sc.registered[-1] == set()
    # A sidecar leaving while the gang waits for placement does not leave the reservation behind.
    await sc.close(stop_engines=False)
    observer = RayProvider(provider_config(cluster, tmp_path, prefix="observer-"))
    await observer.connect()
    try:
        assert not our_groups()
    finally:
        await observer.close()


# failures -----------------------------------------------------------------------------------------------
async def test_killed_member_actor_replaces_the_whole_gang(
    tmp_path: Path, cluster: Cluster, model: str, sidecars: list[Sidecar]
) -> None:
    roles = [{"role": "head", "gpus": 1}, {"role": "worker", "gpus": 1, "serves": False}]
    spec = service(model=model, replicas=2, gang=gang_of(2, 1, roles))
    sc = await open_sidecar(sidecars, tmp_path, cluster, [spec])
    await until(lambda: len(sc.running()) == 2, what="two gangs running")
    victim, other = sc.gang("llama-0"), sc.gang("llama-1")
    old = {m.role: m for m in victim.members}
    untouched = [m.handle.ref["pid"] for m in other.members]
    head_pid, worker_pid = int(old["head"].handle.ref["pid"]), int(old["worker"].handle.ref["pid"])
    assert old["head"].id in sc.registered[-1]
    marks = len(sc.registered)
    # SIGKILL the worker's actor process: its engine must go too (the watchdog), then the whole gang.
    os.kill(parent_pid(worker_pid), signal.SIGKILL)
    await until(lambda: not pid_alive(worker_pid), timeout=20, what="orphaned engine stopped")
    await until(lambda: not pid_alive(head_pid), timeout=30, what="rest of the gang stopped")
    await until(
        lambda: victim.state == RUNNING and victim.row.incarnation == 2 and victim.members,
        what="gang started again",
    )
    assert victim.row.failures == 1
    # From the failure on, the broken gang's head was never offered again, and was withdrawn.
    after = sc.registered[marks:]
    assert after and old["head"].id not in after[-1]
    first_without = next(i for i, ids in enumerate(after) if old["head"].id not in ids)
    assert all(old["head"].id not in ids for ids in after[first_without:])
    new_head = next(m for m in victim.members if m.role == "head")
    assert new_head.id in sc.registered[-1]
    await each_healthy(victim)
    # The other gang was not touched.
    assert other.row.incarnation == 1 and [m.handle.ref["pid"] for m in other.members] == untouched
    assert all(pid_alive(int(p)) for p in untouched)
    assert set(our_groups()) == {PREFIX + "llama-0", PREFIX + "llama-1"}


async def test_removed_node_reschedules_the_gang(
    tmp_path: Path, cluster: Cluster, model: str, sidecars: list[Sidecar]
) -> None:
    spec = service(model=model, gang=gang_of(2, 1))
    sc = await open_sidecar(sidecars, tmp_path, cluster, [spec], strategy="STRICT_SPREAD")
    gang = (await until(lambda: sc.running(), what="gang running"))[0]
    first = {m.handle.ref["node"]: int(m.handle.ref["pid"]) for m in gang.members}
    victim_node = sorted(first)[1]
    # By object store socket: unique per node of a local cluster (older Rays repeat `Node.node_id` there).
    store = next(n["ObjectStoreSocketName"] for n in ray.nodes() if n["NodeID"] == victim_node)
    node = next(n for n in cluster.worker_nodes if n.plasma_store_socket_name == store)
    cluster.remove_node(node, allow_graceful=False)
    await until(
        lambda: gang.state == RUNNING and gang.row.incarnation == 2 and gang.members,
        timeout=90,
        what="gang rescheduled",
    )
    now = {m.handle.ref["node"] for m in gang.members}
    assert victim_node not in now and len(now) == 2
    assert gang.row.failures == 1
    await each_healthy(gang)
    await until(lambda: not any(pid_alive(p) for p in first.values()), timeout=20, what="old engines gone")


# restart and leaks --------------------------------------------------------------------------------------
async def test_restart_adopts_gangs_and_removes_leaked_groups(
    tmp_path: Path, cluster: Cluster, model: str, sidecars: list[Sidecar], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = service(model=model, gang=gang_of(2, 1))
    sc = await open_sidecar(sidecars, tmp_path, cluster, [spec])
    gang = (await until(lambda: sc.running(), what="gang running"))[0]
    pids = sorted(int(m.handle.ref["pid"]) for m in gang.members)
    # A group of ours that nobody uses: e.g. its sidecar died between reserving and starting members.
    placement_group([{"CPU": 0.25}], name=PREFIX + "ghost-0", lifetime="detached").wait(30)
    await sc.close(stop_engines=False)

    again = await open_sidecar(sidecars, tmp_path, cluster, [spec])
    adopted = again.gang(gang.id)
    assert adopted.state == RUNNING and adopted.row.incarnation == 1
    assert sorted(int(m.handle.ref["pid"]) for m in adopted.members) == pids
    assert set(our_groups()) == {PREFIX + gang.id}
    await each_healthy(adopted)
    # The seed's case: the control store query fails. Nothing is removed, not even a real leak.
    placement_group([{"CPU": 0.25}], name=PREFIX + "ghost-1", lifetime="detached").wait(30)

    def broken() -> list[str]:
        raise ray.exceptions.RpcError("GCS unavailable")

    monkeypatch.setattr(again.provider, "_live_actor_names", broken)
    assert await again.provider.remove_leaked() == []
    assert set(our_groups()) == {PREFIX + gang.id, PREFIX + "ghost-1"}
    monkeypatch.undo()
    assert await again.provider.remove_leaked() == [PREFIX + "ghost-1"]
    assert set(our_groups()) == {PREFIX + gang.id}
    assert all(pid_alive(p) for p in pids)
    # The adopted gang is watched like a launched one: a member's death is still noticed.
    assert await asyncio.gather(*(again.provider.alive(m.handle) for m in adopted.members)) == [True, True]
