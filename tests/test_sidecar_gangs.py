"""Gangs as real processes: all-or-nothing replacement, FAILED after max_restarts, GPUs, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import REPO, http_get
from tests.test_sidecar_support import (
    TOKEN,
    FakeGateway,
    base_config,
    member_pids,
    pid_alive,
    processes_with,
    running_gangs,
    service,
    sim_command,
    wait_for,
)
from tests.test_sidecar_support import (
    start_sidecar as start,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    gw = FakeGateway()
    gw.start()
    yield gw
    gw.stop()


def test_member_exit_replaces_the_whole_gang(tmp_path: Path, model: str, gateway: FakeGateway) -> None:
    gang = {"members": [{"role": "head"}, {"role": "worker", "count": 2, "serves": False}]}
    doc = base_config(
        tmp_path,
        services=[service(model=model, replicas=2, gang=gang)],
        gateways=[{"admin_url": gateway.admin_url, "token": TOKEN}],
    )
    sc = start(tmp_path, doc)
    try:
        st = sc.wait(lambda s: len(running_gangs(s)) == 2, what="two running gangs")
        victim = next(g for g in st["gangs"] if g["id"] == "llama-0")
        other = next(g for g in st["gangs"] if g["id"] != victim["id"])
        head = next(m for m in victim["members"] if m["role"] == "head")
        worker = next(m for m in victim["members"] if m["role"] == "worker")
        wait_for(lambda: head["id"] in gateway.replicas, what="head registered")
        os.kill(worker["pid"], signal.SIGKILL)
        # The head of the broken gang is stopped too and leaves the gateway's replica set.
        wait_for(lambda: not pid_alive(head["pid"]), what="the rest of the gang stopped")
        wait_for(lambda: head["id"] not in gateway.replicas, what="head deregistered")
        st = sc.wait(
            lambda s: any(
                g["id"] == victim["id"] and g["state"] == "running" and g["incarnation"] == 2
                for g in s["gangs"]
            ),
            what="gang restarted as a whole",
        )
        again = next(g for g in st["gangs"] if g["id"] == victim["id"])
        assert again["failures"] == 1
        assert {m["pid"] for m in again["members"]}.isdisjoint({m["pid"] for m in victim["members"]})
        assert all(not pid_alive(m["pid"]) for m in victim["members"])
        # The healthy gang was not touched.
        same = next(g for g in st["gangs"] if g["id"] == other["id"])
        assert same["incarnation"] == 1 and all(pid_alive(m["pid"]) for m in same["members"])
        new_head = next(m for m in again["members"] if m["role"] == "head")
        wait_for(lambda: new_head["id"] in gateway.replicas, what="new head registered")
    finally:
        assert sc.stop() == 0
    assert sc.popen.returncode == 0


def test_gang_failed_after_max_restarts_shows_reason(tmp_path: Path, model: str) -> None:
    crash = "{python} -c 'import sys; sys.exit(3)' " + model
    gang = {"members": [{"role": "a", "count": 3}]}
    doc = base_config(
        tmp_path, services=[service(model=model, command=crash, max_restarts=2, gang=gang, replicas=1)]
    )
    sc = start(tmp_path, doc)
    try:
        st = sc.wait(lambda s: any(g["state"] == "failed" for g in s["gangs"]), what="gang FAILED")
        failed = st["gangs"][0]
        # Three members die each time, but each incarnation counts one failure.
        assert failed["failures"] == 3 and failed["incarnation"] == 3
        assert "exited" in failed["reason"] and "max_restarts 2" in failed["reason"]
        assert failed["members"] == []
        # The FAILED gang keeps its place: no new gang is started in a crash loop.
        assert [g["id"] for g in st["gangs"]] == ["llama-0"]
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "sidecar", "status", "--url", sc.status_url],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert "llama-0  failed" in out.stdout and "max_restarts 2" in out.stdout
        code, body = http_get(sc.status_url + "/history")
        assert code == 200 and json.loads(body)[0]["state"] == "failed"
    finally:
        sc.stop()


def test_gpus_come_from_the_inventory(tmp_path: Path, model: str) -> None:
    gang = {"members": [{"role": "tp", "count": 2, "gpus": 2}]}
    doc = base_config(
        tmp_path, gpus=["0", "1", "2", "3", "4"], services=[service(model=model, gang=gang, replicas=2)]
    )
    sc = start(tmp_path, doc)
    try:
        st = sc.wait(
            lambda s: sorted(g["state"] for g in s["gangs"]) == ["pending", "running"], what="one gang fits"
        )
        running = running_gangs(st)[0]
        waiting = next(g for g in st["gangs"] if g["state"] == "pending")
        # Waiting for GPUs is no failure: it does not count towards max_restarts.
        assert waiting["failures"] == 0 and "needs 2 GPUs, 1 of 5 are free" in waiting["reason"]
        seen = []
        for member in running["members"]:
            environ = Path(f"/proc/{member['pid']}/environ").read_bytes().split(b"\0")
            cuda = next(e for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES="))
            assert cuda.decode().split("=", 1)[1] == ",".join(member["gpus"])
            seen += member["gpus"]
        assert sorted(seen) == ["0", "1", "2", "3"]
    finally:
        sc.stop()


def test_kill9_during_startup_stops_leaked_members(tmp_path: Path, model: str) -> None:
    # Members that never become healthy: the sidecar dies while the gang is incomplete.
    slow = "{python} -c 'import time; time.sleep(60)' " + model
    doc = base_config(
        tmp_path,
        services=[
            service(
                model=model, command=slow, startup_timeout_s=60, gang={"members": [{"role": "a", "count": 2}]}
            )
        ],
    )
    sc = start(tmp_path, doc)
    sc.wait(lambda s: len(member_pids(s)) == 2, what="members started")
    leaked = processes_with(model)
    assert len(leaked) == 2
    sc.kill9()
    assert all(pid_alive(pid) for pid in leaked)
    sc2 = start(tmp_path, doc, name="sidecar2")
    try:
        st = sc2.wait(
            lambda s: len(member_pids(s)) == 2 and s["gangs"][0]["incarnation"] == 2, what="restart"
        )
        wait_for(lambda: all(not pid_alive(pid) for pid in leaked), what="leaked members stopped")
        assert len(processes_with(model)) == 2
        assert member_pids(st).isdisjoint(leaked)
    finally:
        sc2.stop()


def test_gang_registered_only_when_every_member_is_healthy(
    tmp_path: Path, model: str, gateway: FakeGateway
) -> None:
    # One member answers /health with 503 for a long time: its healthy partner must never be offered to the
    # gateway, and when the startup timeout ends both are stopped.
    slow = sim_command("--fault-startup-delay-s 60")
    gang = {"members": [{"role": "head"}, {"role": "late", "command": slow}]}
    doc = base_config(
        tmp_path,
        services=[service(model=model, gang=gang, startup_timeout_s=2, max_restarts=0)],
        gateways=[{"admin_url": gateway.admin_url, "token": TOKEN}],
    )
    sc = start(tmp_path, doc)
    try:
        st = sc.wait(lambda s: len(member_pids(s)) == 2, what="members started")
        pids = member_pids(st)
        st = sc.wait(lambda s: s["gangs"][0]["state"] == "failed", what="gang failed")
        reason = st["gangs"][0]["reason"]
        assert "late0 not healthy within 2s" in reason and "503" in reason, reason
        assert all(not pid_alive(pid) for pid in pids)
        assert gateway.put_log and all(capacity == 0 for _, _, capacity in gateway.put_log), (
            "never registered"
        )
        assert gateway.replicas == {}
    finally:
        sc.stop()


def test_member_failing_health_replaces_the_gang(tmp_path: Path, model: str) -> None:
    gang = {"members": [{"role": "a"}, {"role": "b"}]}
    doc = base_config(
        tmp_path,
        services=[service(model=model, gang=gang, health_timeout_s=0.5, unhealthy_threshold=2)],
    )
    sc = start(tmp_path, doc)
    try:
        st = sc.wait(lambda s: len(running_gangs(s)) == 1, what="running")
        frozen, partner = st["gangs"][0]["members"]
        os.kill(frozen["pid"], signal.SIGSTOP)  # alive, but no longer answers /health
        st = sc.wait(lambda s: [(g["incarnation"], g["state"]) for g in s["gangs"]] == [(2, "running")])
        assert st["gangs"][0]["failures"] == 1
        assert not pid_alive(frozen["pid"]) and not pid_alive(partner["pid"])
        assert f"member {frozen['id']} failed health 2 times" in sc.log()
    finally:
        sc.stop()
