"""The sidecar with real `llm-gateway serve` processes: traffic during a gang failure, a gateway restart,
two gateways sharing one public port (slot shares), drain of in-flight streams, kill -9 of the sidecar."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.procs import http_get
from tests.test_sidecar_support import (
    RealGateway,
    SidecarProc,
    base_config,
    chat,
    member_pids,
    pid_alive,
    processes_with,
    running_gangs,
    service,
    sim_command,
    wait_for,
    write_config,
)
from tests.test_sidecar_support import start_sidecar as start

pytestmark = pytest.mark.timeout(120)


class Traffic:
    """Sequential chat requests through a gateway on a thread, each answer recorded (bounded in time)."""

    def __init__(self, url: str, model: str, limit_s: float = 60.0) -> None:
        self.url, self.model = url, model
        self.answers: list[tuple[float, int, str]] = []
        """(wall-clock time sent, status, x-sim-replica-id)."""
        self.stop = threading.Event()
        self.deadline = time.monotonic() + limit_s
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            sent = time.time()
            try:
                status, replica, _ = chat(self.url, self.model, timeout=5.0)
            except OSError as exc:
                status, replica = 0, type(exc).__name__
            self.answers.append((sent, status, replica))
            time.sleep(0.005)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_member_killed_under_traffic(tmp_path: Path, model: str) -> None:
    gw = RealGateway(tmp_path)
    gang = {"members": [{"role": "head"}, {"role": "worker", "serves": False}]}
    doc = base_config(
        tmp_path, services=[service(model=model, replicas=2, gang=gang)], gateways=[gw.target()]
    )
    with gw.running():
        sc = start(tmp_path, doc)
        try:
            st = sc.wait(lambda s: len(running_gangs(s)) == 2, what="two running gangs")
            wait_for(lambda: len(gw.replicas()) == 2, what="both heads on the gateway")
            victim = next(g for g in st["gangs"] if g["id"] == "llama-0")
            old_ids = {m["id"] for m in victim["members"]}
            worker = next(m for m in victim["members"] if m["role"] == "worker")
            with Traffic(gw.url, model) as traffic:
                wait_for(lambda: len(traffic.answers) >= 20, what="traffic flowing")
                killed_at = time.time()
                os.kill(worker["pid"], signal.SIGKILL)
                st = sc.wait(
                    lambda s: any(
                        g["id"] == "llama-0" and g["state"] == "running" and g["incarnation"] == 2
                        for g in s["gangs"]
                    ),
                    what="gang replaced",
                )
                again = next(g for g in st["gangs"] if g["id"] == "llama-0")
                new_head = next(m["id"] for m in again["members"] if m["role"] == "head")
                wait_for(lambda: any(r == new_head for _, _, r in traffic.answers), what="new head serves")
            assert all(not pid_alive(m["pid"]) for m in victim["members"]), "a partial gang stayed up"
            failed = [a for a in traffic.answers if a[1] != 200]
            assert not failed, failed
            # From the moment the sidecar acted on the failure, the rest of the gang was dead and no request
            # reached it (the answers' x-sim-replica-id say who served them).
            down_at = again["failed_at"]
            assert down_at is not None and down_at >= killed_at
            after = [a for a in traffic.answers if a[0] >= down_at and a[2] in old_ids]
            assert not after, f"requests reached the partial gang after it was taken down: {after}"
            window = [a for a in traffic.answers if killed_at <= a[0] < down_at and a[2] in old_ids]
            print(
                f"detection took {1000 * (down_at - killed_at):.1f} ms; old head answered {len(window)} then"
            )
            assert set(gw.replicas()) == {m["id"] for g in st["gangs"] for m in g["members"] if m["serves"]}
        finally:
            sc.stop()


def test_gateway_restart_converges_and_serves_again(tmp_path: Path, model: str) -> None:
    gw_a, gw_b = RealGateway(tmp_path), RealGateway(tmp_path)
    doc = base_config(
        tmp_path,
        services=[service(model=model, replicas=2, capacity=8)],
        gateways=[gw_a.target(), gw_b.target()],
    )
    with gw_a.running():
        sc = start(tmp_path, doc)
        try:
            with gw_b.running() as proc_b:
                sc.wait(
                    lambda s: (
                        all(t["acked_generation"] == s["generation"] for t in s["targets"])
                        and len(running_gangs(s)) == 2
                    ),
                    what="both gateways synced",
                )
                assert chat(gw_b.url, model)[0] == 200
                proc_b.kill()
            # While b is down: a gets the whole capacity, the sidecar keeps serving through a.
            wait_for(
                lambda: {r["capacity"] for r in gw_a.replicas().values()} == {8}, what="a holds all slots"
            )
            assert chat(gw_a.url, model)[0] == 200
            st = sc.status()
            assert st["targets"][1]["reachable"] is False and st["targets"][1]["last_error"]
            with gw_b.running():
                st = sc.wait(
                    lambda s: all(t["acked_generation"] == s["generation"] for t in s["targets"]),
                    what="b converged after its restart",
                )
                assert set(gw_b.replicas()) == set(gw_a.replicas()) and len(gw_b.replicas()) == 2
                assert {r["capacity"] for r in gw_b.replicas().values()} == {4}
                assert {r["capacity"] for r in gw_a.replicas().values()} == {4}
                status, replica, _ = chat(gw_b.url, model)
                assert status == 200 and replica.startswith("llama-")
        finally:
            sc.stop()


def test_two_gateways_share_one_public_port_and_the_slots(tmp_path: Path, model: str) -> None:
    gw_a = RealGateway(tmp_path)
    gw_b = RealGateway(tmp_path, port=gw_a.port)
    doc = base_config(
        tmp_path,
        services=[service(model=model, replicas=1, capacity=5)],
        gateways=[gw_a.target(), gw_b.target()],
    )
    with gw_a.running(reuse_port=True), gw_b.running(reuse_port=True):
        sc = start(tmp_path, doc)
        try:
            sc.wait(
                lambda s: (
                    all(t["acked_generation"] == s["generation"] for t in s["targets"])
                    and len(running_gangs(s)) == 1
                ),
                what="synced",
            )
            shares = [r["capacity"] for gw in (gw_a, gw_b) for r in gw.replicas().values()]
            assert shares == [2, 2], "each of 2 gateways gets 5 // 2 slots; never more than 5 in total"
            for _ in range(10):
                assert chat(gw_a.url, model)[0] == 200
        finally:
            sc.stop()


def stream(url: str, model: str, results: list[dict[str, Any]]) -> None:
    """One streamed chat completion through the gateway; records who served it and whether it finished."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "tell"}],
        "max_tokens": 60,
        "stream": True,
    }
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        results.append(
            {
                "status": resp.status,
                "replica": resp.getheader("x-sim-replica-id"),
                "done": b"[DONE]" in data,
                "ended": time.monotonic(),
            }
        )
    except OSError as exc:
        results.append({"status": 0, "error": repr(exc), "done": False, "ended": time.monotonic()})
    finally:
        conn.close()


def test_scale_down_drains_in_flight_streams(tmp_path: Path, model: str) -> None:
    gw = RealGateway(tmp_path)
    slow = sim_command().replace(" --instant", "") + " --decode-ms-per-token 40 --decode-batch-slowdown 0"
    two = base_config(
        tmp_path, services=[service(model=model, replicas=2, command=slow)], gateways=[gw.target()]
    )
    with gw.running():
        first = SidecarProc(
            write_config(tmp_path / "two.yaml", two), tmp_path / "first.log"
        )  # leaves engines
        try:
            st = first.wait(lambda s: len(running_gangs(s)) == 2, what="two running")
            wait_for(lambda: len(gw.replicas()) == 2, what="registered")
        finally:
            first.stop()
        victim = next(g for g in st["gangs"] if g["id"] == "llama-1")
        victim_pid = victim["members"][0]["pid"]
        results: list[dict[str, Any]] = []
        threads = [threading.Thread(target=stream, args=(gw.url, model, results)) for _ in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: sum(r["in_flight"] for r in gw.replicas().values()) == 6, what="6 streams in flight")
        on_victim = gw.replicas()[victim["members"][0]["id"]]["in_flight"]
        assert on_victim > 0
        # The same state, now wanting one replica: llama-1 is adopted, then drained, then stopped.
        one = dict(two, services=[service(model=model, replicas=1, command=slow)])
        sc = start(tmp_path, one, name="second")
        try:
            sc.wait(lambda s: any(g["state"] == "draining" for g in s["gangs"]), what="draining")
            while any(t.is_alive() for t in threads):
                victim_streams = [r for r in results if r.get("replica") == victim["members"][0]["id"]]
                if len(victim_streams) < on_victim:
                    assert pid_alive(victim_pid), "stopped while its streams were still running"
                time.sleep(0.02)
            for t in threads:
                t.join(timeout=30)
            assert len(results) == 6 and all(r["status"] == 200 and r["done"] for r in results), results
            sc.wait(lambda s: [g["id"] for g in s["gangs"]] == ["llama-0"], what="victim stopped")
            wait_for(lambda: not pid_alive(victim_pid), what="victim process gone")
            assert list(gw.replicas()) == [m["id"] for g in sc.status()["gangs"] for m in g["members"]]
            code, body = http_get(sc.status_url + "/history")
            stopped = next(g for g in json.loads(body) if g["id"] == "llama-1")
            assert code == 200 and stopped["state"] == "stopped" and stopped["deleted_at"], "history kept"
        finally:
            sc.stop()


def test_kill9_sidecar_data_plane_keeps_serving_and_nothing_doubles(tmp_path: Path, model: str) -> None:
    gw = RealGateway(tmp_path)
    gang = {"members": [{"role": "head"}, {"role": "worker", "serves": False}]}
    doc = base_config(
        tmp_path, services=[service(model=model, replicas=2, gang=gang)], gateways=[gw.target()]
    )
    with gw.running():
        sc = start(tmp_path, doc)
        st = sc.wait(lambda s: len(running_gangs(s)) == 2, what="running")
        wait_for(lambda: len(gw.replicas()) == 2, what="registered")
        before = member_pids(st)
        generation = gw.admin("/admin/v1/replicas")["generation"]
        sc.kill9()
        for _ in range(10):
            assert chat(gw.url, model)[0] == 200, "the data plane needs no sidecar"
        assert gw.admin("/admin/v1/replicas")["generation"] == generation
        sc2 = start(tmp_path, doc, name="sidecar2")
        try:
            st = sc2.wait(
                lambda s: len(running_gangs(s)) == 2 and s["targets"][0]["acked_generation"], what="adopted"
            )
            assert member_pids(st) == before
            assert sorted(processes_with(f"--model {model} ")) == sorted(before)
            assert set(gw.replicas()) == {m["id"] for g in st["gangs"] for m in g["members"] if m["serves"]}
            assert chat(gw.url, model)[0] == 200
            code, _ = http_get(sc2.status_url + "/health")
            assert code == 200
        finally:
            sc2.stop()
        assert all(not pid_alive(pid) for pid in before)
