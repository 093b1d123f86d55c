"""Sync target `sglang-router`: the real router from PyPI (offline, no tokenizer) in front of simulators."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import free_port, http_get, wait_http
from tests.test_sidecar_support import base_config, pid_alive, running_gangs, service, wait_for
from tests.test_sidecar_support import start_sidecar as start

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        importlib.util.find_spec("sglang_router") is None,
        reason="sglang-router (test extra) is not installed",
    ),
]


@pytest.fixture
def router(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "sglang-router.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sglang_router.launch_router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prometheus-port",
            str(free_port()),
            "--prometheus-host",
            "127.0.0.1",
            "--health-check-interval-secs",
            "1",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=30, proc=proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def workers(url: str) -> dict[str, str]:
    status, body = http_get(url + "/workers", timeout=3)
    assert status == 200, body
    return {w["url"]: w["model_id"] for w in json.loads(body)["workers"]}


def post(url: str, doc: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(doc).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


def test_sglang_router_worker_list_follows_the_gangs(tmp_path: Path, model: str, router: str) -> None:
    # A stale worker from before: the sidecar owns the list and removes it.
    stale = f"http://127.0.0.1:{free_port()}"
    post(router + "/workers", {"url": stale, "model_id": model})
    doc = base_config(tmp_path, services=[service(model=model, replicas=2)], sglang_routers=[{"url": router}])
    sc = start(tmp_path, doc)
    try:
        st = sc.wait(lambda s: len(running_gangs(s)) == 2, what="two running")
        urls = {m["url"] for g in st["gangs"] for m in g["members"]}
        wait_for(lambda: workers(router) == {u: model for u in urls}, timeout=30, what="router has the sims")
        sc.wait(lambda s: s["targets"][0]["acked_generation"] == s["generation"], what="router acked")
        status, body = post(
            router + "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert status == 200 and json.loads(body)["choices"]
        # A gang replaced after a crash: the router follows (old URL out, new URL in).
        victim = st["gangs"][0]
        os.kill(victim["members"][0]["pid"], signal.SIGKILL)
        st = sc.wait(
            lambda s: len(running_gangs(s)) == 2 and any(g["incarnation"] == 2 for g in s["gangs"]),
            what="replaced",
        )
        urls = {m["url"] for g in st["gangs"] for m in g["members"]}
        wait_for(lambda: workers(router) == {u: model for u in urls}, timeout=30, what="router follows")
        assert victim["members"][0]["url"] not in workers(router)
        assert not pid_alive(victim["members"][0]["pid"])
    finally:
        sc.stop()
    wait_for(lambda: workers(router) == {}, timeout=30, what="stop-on-exit empties the router")
