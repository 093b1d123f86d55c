"""Real sidecar and engine processes against contract-faithful stand-in admin endpoints (exact control of
reachability and reported load): a gateway down at start converges, share ordering, stale generations,
replacement after a spec change, autoscaling with one gateway unreachable."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import REPO, free_port
from tests.test_sidecar_support import (
    TOKEN,
    FakeGateway,
    SidecarProc,
    base_config,
    pid_alive,
    running_gangs,
    service,
    sim_command,
    wait_for,
    write_config,
)
from tests.test_sidecar_support import (
    start_sidecar as start,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def gateways() -> Iterator[list[FakeGateway]]:
    made: list[FakeGateway] = []
    yield made
    for gw in made:
        gw.stop()


def targets(*gws: FakeGateway) -> list[dict]:
    return [{"admin_url": gw.admin_url, "token": TOKEN} for gw in gws]


def capacities(gw: FakeGateway) -> set[int]:
    return {r["capacity"] for r in gw.replicas.values()}


def test_gateway_down_during_sync_converges_when_back(
    tmp_path: Path, model: str, gateways: list[FakeGateway]
) -> None:
    up, down = FakeGateway(), FakeGateway()
    gateways += [up, down]
    up.start()
    doc = base_config(tmp_path, services=[service(model=model, replicas=2)], gateways=targets(up, down))
    sc = start(tmp_path, doc)
    try:
        st = sc.wait(
            lambda s: len(running_gangs(s)) == 2 and s["targets"][1]["reachable"] is False,
            what="running, second gateway unreachable",
        )
        wait_for(lambda: len(up.replicas) == 2, what="the reachable gateway has both replicas")
        gen = sc.status()["generation"]
        wait_for(lambda: up.generation == sc.status()["generation"], what="up acked")
        assert st["targets"][1]["acked_generation"] is None and st["targets"][1]["last_error"]
        down.start()
        st = sc.wait(
            lambda s: all(t["acked_generation"] == s["generation"] for t in s["targets"]),
            what="both gateways acknowledged the current generation",
        )
        assert st["generation"] > gen
        assert down.replicas.keys() == up.replicas.keys() and len(down.replicas) == 2
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "sidecar", "status", "--url", sc.status_url],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        rows = [line.split() for line in out.stdout.splitlines() if line.startswith("gateway ")]
        # TARGET URL REACHABLE (ok Ns ago) ACKED-GENERATION LAST-ERROR, one row per gateway
        assert [(r[1], r[2], r[-2], r[-1]) for r in rows] == [
            (gw.admin_url, "yes", str(st["generation"]), "-") for gw in (up, down)
        ], out.stdout
    finally:
        sc.stop()


def test_slot_shares_follow_the_reachable_gateways(
    tmp_path: Path, model: str, gateways: list[FakeGateway]
) -> None:
    a, b = FakeGateway(), FakeGateway()
    gateways += [a, b]
    a.start()
    b.start()
    doc = base_config(
        tmp_path, services=[service(model=model, replicas=2, capacity=9)], gateways=targets(a, b)
    )
    sc = start(tmp_path, doc)
    try:
        sc.wait(lambda s: len(running_gangs(s)) == 2, what="running")
        wait_for(lambda: len(a.replicas) == 2 and capacities(a) == {4} and capacities(b) == {4}, what="4 + 4")
        b.stop()
        wait_for(lambda: capacities(a) == {9}, what="a takes all 9 slots while b is away")
        b.forget()
        b.start()
        wait_for(lambda: capacities(a) == {4} and capacities(b) == {4}, what="4 + 4 again")
        # b got its share only after a had given back its extra slots (never 9 + 4 at once).
        assert a.share_at(b.put_times[0]) + 4 <= 9
    finally:
        sc.stop()


def test_gateway_with_newer_generation_makes_the_sidecar_jump(
    tmp_path: Path, model: str, gateways: list[FakeGateway]
) -> None:
    gw = FakeGateway()
    gateways.append(gw)
    gw.generation = 100
    gw.start()
    doc = base_config(tmp_path, services=[service(model=model)], gateways=targets(gw))
    sc = start(tmp_path, doc)
    try:
        st = sc.wait(
            lambda s: len(running_gangs(s)) == 1 and s["targets"][0]["acked_generation"] == s["generation"],
            what="converged",
        )
        assert st["generation"] > 100 and gw.generation == st["generation"] and len(gw.replicas) == 1
    finally:
        sc.stop()


def test_autoscaling_with_one_gateway_unreachable(
    tmp_path: Path, model: str, gateways: list[FakeGateway]
) -> None:
    a = FakeGateway()
    b = FakeGateway(port=free_port())  # configured but down at first
    gateways += [a, b]
    a.start()
    auto = {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_in_flight": 2,
        "interval_s": 0.2,
        "up_cooldown_s": 0.5,
        "down_cooldown_s": 0.5,
    }
    doc = base_config(
        tmp_path, services=[service(model=model, replicas=1, autoscale=auto)], gateways=targets(a, b)
    )
    sc = start(tmp_path, doc)
    try:
        sc.wait(lambda s: len(running_gangs(s)) == 1, what="one running")
        a.queue_depth[model] = 5  # demand 5 / target 2 -> 3 replicas, seen on a alone
        st = sc.wait(lambda s: len(running_gangs(s)) == 3, what="scaled up on a's data")
        assert st["services"][0]["autoscale"]["gateways_answered"] == 1
        a.queue_depth[model] = 0
        st = sc.wait(lambda s: s["services"][0]["autoscale"]["action"] == "missing-data", what="held back")
        time.sleep(1.0)
        assert len(running_gangs(sc.status())) == 3, "scaled down although b's numbers were missing"
        b.start()
        st = sc.wait(lambda s: len(s["gangs"]) == 1 and len(running_gangs(s)) == 1, what="scaled down")
        assert st["services"][0]["desired"] == 1
    finally:
        sc.stop()


def test_changed_command_replaces_running_gangs_with_drain(
    tmp_path: Path, model: str, gateways: list[FakeGateway]
) -> None:
    gw = FakeGateway()
    gateways.append(gw)
    gw.start()
    doc = base_config(tmp_path, services=[service(model=model)], gateways=targets(gw))
    first = SidecarProc(write_config(tmp_path / "first.yaml", doc), tmp_path / "first.log")  # leaves engines
    try:
        st = first.wait(lambda s: len(running_gangs(s)) == 1, what="running")
    finally:
        first.stop()
    old = st["gangs"][0]["members"][0]
    gw.in_flight[old["id"]] = 1
    changed = dict(doc, services=[service(model=model, command=sim_command("--max-num-seqs 8"))])
    sc = start(tmp_path, changed, name="second")
    try:
        st = sc.wait(
            lambda s: [g["state"] for g in s["gangs"]] == ["draining", "running"],
            what="new gang up, old draining",
        )
        assert st["gangs"][1]["id"] == "llama-1" and pid_alive(old["pid"])
        wait_for(lambda: gw.replicas.get(old["id"], {}).get("draining") is True, what="old one draining")
        gw.in_flight[old["id"]] = 0
        st = sc.wait(lambda s: [g["id"] for g in s["gangs"]] == ["llama-1"], what="old gang stopped")
        wait_for(lambda: not pid_alive(old["pid"]), what="old process gone")
        assert list(gw.replicas) == [st["gangs"][0]["members"][0]["id"]]
    finally:
        sc.stop()
