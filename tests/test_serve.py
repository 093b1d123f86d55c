"""`llm-gateway serve` as an operator meets it: config errors, the `--upstream` quick form, the admin
listener, routing profiles and their reload, shutdown, and `--workers`."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.procs import REPO, free_port, http_get, spawn
from tests.test_proxy import (
    CHAT,
    SLOW_SIM,
    TOKEN,
    gateway,
    gateway_config,
    open_stream,
    post,
    read_to_close,
    reserved_slots,
    sim,
    sim_stats,
    wait_until,
)


def serve_fails(args: list[str], timeout: float = 20.0) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (
            "pools: [{model: m, replicas: [{id: a, url: 'http://x:1', capacity: lots}]}]",
            "$.pools[0].replicas[0].capacity",
            "Expected `int`",
        ),
        (
            "pools: [{model: m, replicas: [{id: a, url: 'ftp://x'}]}]",
            "$.pools[0].replicas[0]",
            "url must start",
        ),
        ("listen: nowhere", "$", "listen"),
        ("timeouts: {conect_s: 1}", "$.timeouts", "unknown field `conect_s`"),
        ("pools: [{model: m}, {model: m}]", "$", "appears twice"),
        ("queue: [1, 2", "", "not valid YAML"),
    ],
    ids=["type", "url", "listen", "unknown-field", "duplicate-model", "yaml"],
)
def test_bad_config_exits_non_zero_naming_file_field_and_reason(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, err = serve_fails(["--config", str(path)])
    assert code != 0
    assert str(path) in err
    assert field in err
    assert reason in err


def test_other_startup_errors_are_named(tmp_path: Path) -> None:
    code, err = serve_fails(["--config", str(tmp_path / "missing.yaml")])
    assert code != 0 and "missing.yaml" in err and "cannot read" in err
    code, err = serve_fails([])
    assert code != 0 and "--config" in err
    good = tmp_path / "good.yaml"
    good.write_text(f"listen: 127.0.0.1:{free_port()}\nadmin: {{listen: '127.0.0.1:{free_port()}'}}\n")
    code, err = serve_fails(["--config", str(good), "--listen", "nope"])
    assert code != 0 and "--listen" in err
    profiles = tmp_path / "profiles.json"
    profiles.write_text('{"profiles": {"p": {"routingStrategy": 5}}}')
    code, err = serve_fails(["--config", str(good), "--profiles", str(profiles)])
    assert code != 0 and "profiles.json" in err and "routingStrategy" in err
    code, err = serve_fails(["--upstream", f"http://127.0.0.1:{free_port()}", "--discovery-timeout", "0.5"])
    assert code != 0 and "/v1/models" in err


def test_upstream_quick_form_discovers_model_and_engine(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        s1 = sim(stack, tmp_path, "q1", model="qwen")
        s2 = sim(stack, tmp_path, "q2", model="llama")
        port, admin_port = free_port(), free_port()
        stack.enter_context(
            spawn(
                [
                    "serve",
                    "--upstream",
                    s1.url,
                    "--upstream",
                    s2.url,
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--admin-listen",
                    f"127.0.0.1:{admin_port}",
                ],
                port=port,
                log_dir=tmp_path,
                env={"LLM_GATEWAY_ADMIN_TOKEN": TOKEN},
            )
        )
        status, body = http_get(f"http://127.0.0.1:{port}/v1/models")
        assert sorted(m["id"] for m in json.loads(body)["data"]) == ["llama", "qwen"]
        status, body = http_get(
            f"http://127.0.0.1:{admin_port}/admin/v1/replicas", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200
        replicas = json.loads(body)["replicas"]
        assert {(r["model"], r["engine"], r["url"]) for r in replicas} == {
            ("qwen", "vllm", s1.url),
            ("llama", "vllm", s2.url),
        }
        status, headers, _ = post(port, "/v1/chat/completions", {**CHAT, "model": "llama"})
        assert status == 200 and headers["x-sim-replica-id"] == "q2"


def test_admin_needs_the_token_and_is_not_on_the_public_port(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        s1 = sim(stack, tmp_path, "s1")
        config, port, admin_port = gateway_config(tmp_path, [("s1", s1, 4)])
        gateway(stack, tmp_path, config, port)
        admin = f"http://127.0.0.1:{admin_port}"
        for path in ("/admin/v1/replicas", "/admin/v1/stats", "/metrics"):
            status, body = http_get(admin + path)
            assert status == 401 and json.loads(body)["error"]["message"]
            status, _ = http_get(admin + path, headers={"Authorization": "Bearer wrong"})
            assert status == 401
            assert http_get(admin + path, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
            status, _ = http_get(
                f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert status == 404


def test_admin_token_file_and_replica_set_changes_reach_the_data_plane(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        s1 = sim(stack, tmp_path, "s1")
        s2 = sim(stack, tmp_path, "s2")
        token_file = tmp_path / "token"
        token_file.write_text("file-token\n")
        config, port, admin_port = gateway_config(
            tmp_path, [("s1", s1, 4)], extra="access_log: {enabled: false}\n"
        )
        config.write_text(
            config.read_text().replace(
                f'admin: {{listen: "127.0.0.1:{admin_port}"}}',
                f'admin: {{listen: "127.0.0.1:{admin_port}", token_file: "{token_file}"}}',
            )
        )
        gateway(stack, tmp_path, config, port, token="")
        auth = {"Authorization": "Bearer file-token"}
        assert http_get(f"http://127.0.0.1:{admin_port}/admin/v1/stats", headers=auth)[0] == 200
        doc = {"generation": 5, "replicas": [{"id": "s2", "model": "m", "url": s2.url, "capacity": 4}]}
        req = urllib.request.Request(
            f"http://127.0.0.1:{admin_port}/admin/v1/replicas",
            data=json.dumps(doc).encode(),
            method="PUT",
            headers={**auth, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["added"] == ["s2"]
        for _ in range(5):
            status, headers, _ = post(port, "/v1/chat/completions", CHAT)
            assert status == 200 and headers["x-gateway-replica"] == "s2"


def test_profiles_header_echo_and_reload(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.json"
    profiles.write_text(
        json.dumps(
            {
                "defaultProfile": "default",
                "profiles": {
                    "default": {"routingStrategy": "least-request"},
                    "cache": {"routingStrategy": "prefix-cache"},
                },
            }
        )
    )
    with contextlib.ExitStack() as stack:
        s1 = sim(stack, tmp_path, "s1")
        config, port, _ = gateway_config(tmp_path, [("s1", s1, 4)])
        gw = gateway(stack, tmp_path, config, port, "--profiles", str(profiles))
        status, headers, _ = post(port, "/v1/chat/completions", CHAT)
        assert status == 200
        assert headers["routing-strategy"] == "least-request"
        assert headers["x-gateway-profile"] == "default"
        status, headers, _ = post(port, "/v1/chat/completions", CHAT, "config-profile: cache\r\n")
        assert headers["routing-strategy"] == "prefix-cache" and headers["x-gateway-profile"] == "cache"
        status, headers, _ = post(port, "/v1/chat/completions", CHAT, "routing-strategy: random\r\n")
        assert headers["routing-strategy"] == "random"
        # A broken file is rejected and the old profiles stay.
        profiles.write_text("{broken")
        gw.signal(signal.SIGHUP)
        wait_until(lambda: "new file rejected" in gw.log(), 5, "rejection logged")
        status, headers, _ = post(port, "/v1/chat/completions", CHAT)
        assert status == 200 and headers["x-gateway-profile"] == "default"
        # A good new file is picked up on change, without a signal.
        profiles.write_text(
            json.dumps({"defaultProfile": "other", "profiles": {"other": {"routingStrategy": "random"}}})
        )
        wait_until(
            lambda: post(port, "/v1/chat/completions", CHAT)[1].get("x-gateway-profile") == "other",
            5,
            "reload on change",
        )


def test_shutdown_grace_expiry_cancels_and_frees(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        slow = sim(stack, tmp_path, "slow", *SLOW_SIM, instant=False)
        config, port, admin_port = gateway_config(tmp_path, [("slow", slow, 4)])
        config.write_text(config.read_text().replace("shutdown_grace_s: 5", "shutdown_grace_s: 0.5"))
        gw = gateway(stack, tmp_path, config, port)
        sock = open_stream(port, {**CHAT, "max_tokens": 500})
        assert reserved_slots(admin_port) == {'{model="m",replica="slow"}': 1.0}
        with sock:
            gw.signal(signal.SIGTERM)
            rest = read_to_close(sock)
        assert b"data: [DONE]" not in rest, "a 20 s stream cannot have finished within the 0.5 s grace"
        assert gw.popen.wait(timeout=10) == 0
        wait_until(lambda: sim_stats(slow)["running"] == 0, 5, "engine abort")
        assert sim_stats(slow)["aborted_total"] == 1


def test_workers_share_the_port_each_with_its_admin_port(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        s1 = sim(stack, tmp_path, "s1")
        config, port, admin_port = gateway_config(tmp_path, [("s1", s1, 8)])
        admin_port = free_port()
        while free_port_pair(admin_port) is False:
            admin_port = free_port()
        gw = gateway(
            stack, tmp_path, config, port, "--workers", "2", "--admin-listen", f"127.0.0.1:{admin_port}"
        )
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def admin_up(i: int) -> bool:
            try:
                return http_get(f"http://127.0.0.1:{admin_port + i}/admin/v1/stats", headers=auth)[0] == 200
            except OSError:
                return False

        for i in range(2):
            wait_until(lambda i=i: admin_up(i), 10, f"worker {i} admin")
        for _ in range(20):
            assert post(port, "/v1/chat/completions", CHAT)[0] == 200
        served = 0
        for i in range(2):
            _, body = http_get(f"http://127.0.0.1:{admin_port + i}/admin/v1/stats", headers=auth)
            served += json.loads(body)["pools"]["m"]["replicas"]["s1"]["requests_total"]
        assert served >= 20
        gw.signal(signal.SIGTERM)
        assert gw.popen.wait(timeout=15) == 0


def free_port_pair(port: int) -> bool:
    """True when `port + 1` is free too."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port + 1))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "deploy").glob("gateway*.yaml")))
def test_example_configs_in_deploy_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import load_gateway_config
    from gateway.serve import _check_profiles

    monkeypatch.chdir(REPO)
    config = load_gateway_config(REPO / "deploy" / name)
    assert config.pools
    _check_profiles(config)


def test_a_taken_port_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gateway.yaml"
        config.write_text(f"listen: 127.0.0.1:{port}\nadmin: {{listen: '127.0.0.1:{free_port()}'}}\n")
        code, err = serve_fails(["--config", str(config)])
    assert code != 0
    assert "cannot serve" in err and "address already in use" in err.lower()
