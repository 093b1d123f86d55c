"""Sidecar config errors (file, field, reason), the 20-replica cap, placeholders, autoscaling decisions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError
from gateway.sidecar.autoscale import decide
from gateway.sidecar.providers.base import render
from gateway.sidecar.spec import AutoscaleSpec, ServiceSpec, load_sidecar_config
from tests.procs import REPO, free_port
from tests.test_sidecar_support import SidecarProc, base_config, service, write_config


def load_error(tmp_path: Path, doc: dict) -> str:
    path = write_config(tmp_path / "sidecar.yaml", doc)
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    return str(info.value)


def test_replicas_above_cap_is_a_clear_error(tmp_path: Path) -> None:
    msg = load_error(tmp_path, base_config(tmp_path, services=[service(replicas=21)]))
    assert "sidecar.yaml" in msg
    assert "$.services[0]" in msg
    assert "replicas: 21 is above the hard cap of 20 per service" in msg


def test_twenty_replicas_is_allowed(tmp_path: Path) -> None:
    path = write_config(tmp_path / "sidecar.yaml", base_config(tmp_path, services=[service(replicas=20)]))
    assert load_sidecar_config(path).services[0].replicas == 20


def test_autoscale_max_above_cap(tmp_path: Path) -> None:
    doc = base_config(tmp_path, services=[service(autoscale={"min_replicas": 1, "max_replicas": 50})])
    msg = load_error(tmp_path, doc)
    assert "$.services[0].autoscale" in msg and "hard cap of 20" in msg


@pytest.mark.parametrize(
    ("patch", "where", "reason"),
    [
        ({"capacity": "many"}, "$.services[0].capacity", "Expected `int`, got `str`"),
        ({"replicas": -1}, "$.services[0]", "replicas: must be >= 0"),
        ({"colour": "red"}, "$.services[0]", "unknown field `colour`"),
        ({"command": "run {modle}"}, "$.services[0]", "unknown placeholder {modle}"),
        ({"health_path": "health"}, "$.services[0]", "health_path: must start with /"),
        ({"engine": "tgi"}, "$.services[0].engine", "Invalid enum value 'tgi'"),
        ({"gang": {"members": [{"role": "w", "serves": False}]}}, "$.services[0].gang", "serves: true"),
        (
            {"gang": {"members": [{"role": "a", "gpus": 2}]}},
            "$",
            "needs 2 GPUs per gang, the inventory has 0",
        ),
    ],
)
def test_field_errors(tmp_path: Path, patch: dict, where: str, reason: str) -> None:
    msg = load_error(tmp_path, base_config(tmp_path, services=[service(**patch)]))
    assert f"{where}: " in msg or f"{where}." in msg, msg
    assert reason in msg, msg


def test_gateway_url_and_duplicate_service(tmp_path: Path) -> None:
    msg = load_error(tmp_path, base_config(tmp_path, gateways=[{"admin_url": "localhost:9000"}]))
    assert "$.gateways[0]" in msg and "admin_url" in msg
    msg = load_error(tmp_path, base_config(tmp_path, services=[service(), service()]))
    assert "names must be unique" in msg


def test_cli_reports_bad_config_and_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", base_config(tmp_path, services=[service(replicas=25)]))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "sidecar", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "bad.yaml: $.services[0]: replicas: 25 is above the hard cap of 20" in proc.stderr


def test_cli_missing_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "sidecar", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert proc.returncode == 2 and "nope.yaml: cannot read" in proc.stderr


def test_render_fills_known_placeholders_only() -> None:
    out = render("{python} -m x --port {port} --json '{\"a\": 1}' {unknown}", {"python": "py", "port": "5"})
    assert out == "py -m x --port 5 --json '{\"a\": 1}' {unknown}"


def _svc(**auto: float) -> ServiceSpec:
    spec = AutoscaleSpec(
        min_replicas=1, max_replicas=5, target_in_flight=4, up_cooldown_s=10, down_cooldown_s=30
    )
    for key, value in auto.items():
        setattr(spec, key, value)
    return ServiceSpec(name="s", model="m", command="x", replicas=1, autoscale=spec)


def _stats(in_flight: int, queue: int = 0) -> dict:
    return {"generation": 1, "pools": {"m": {"in_flight": in_flight, "queue_depth": queue, "replicas": {}}}}


def test_autoscale_scales_up_on_the_answers_it_has() -> None:
    d = decide(_svc(), current=1, stats=[_stats(10, 2), None], now=100.0, last_event=0.0)
    assert (d.action, d.wanted, d.gateways_answered) == ("up", 3, 1)


def test_autoscale_never_scales_down_on_missing_data() -> None:
    d = decide(_svc(), current=4, stats=[_stats(0), None], now=1000.0, last_event=0.0)
    assert (d.action, d.wanted) == ("missing-data", 4)
    d = decide(_svc(), current=4, stats=[_stats(1), _stats(0)], now=1000.0, last_event=0.0)
    assert (d.action, d.wanted) == ("down", 1)
    d = decide(_svc(), current=2, stats=[None, None], now=1000.0, last_event=0.0)
    assert d.action == "no-data"


def test_autoscale_cooldowns_both_ways_and_bounds() -> None:
    assert decide(_svc(), current=1, stats=[_stats(40)], now=5.0, last_event=0.0).action == "cooldown"
    up = decide(_svc(), current=1, stats=[_stats(400)], now=11.0, last_event=0.0)
    assert (up.action, up.wanted) == ("up", 5)
    assert decide(_svc(), current=3, stats=[_stats(0)], now=20.0, last_event=0.0).action == "cooldown"
    down = decide(_svc(), current=3, stats=[_stats(0)], now=31.0, last_event=0.0)
    assert (down.action, down.wanted) == ("down", 1)


def test_example_config_loads() -> None:
    cfg = load_sidecar_config(REPO / "deploy" / "sidecar.yaml")
    assert cfg.services[0].replicas <= 20 and cfg.gateways


def test_ray_example_config_loads() -> None:
    cfg = load_sidecar_config(REPO / "deploy" / "sidecar-ray.yaml")
    assert cfg.provider == "ray"
    assert cfg.ray.placement(cfg.services[0].name)[0] == "STRICT_SPREAD"


def test_second_sidecar_on_the_same_state_is_refused(tmp_path: Path) -> None:
    doc = base_config(tmp_path)
    first = SidecarProc(write_config(tmp_path / "a.yaml", doc), tmp_path / "a.log")
    try:
        first.wait(lambda s: s["gangs"] == [], what="first sidecar up")
        doc["status_listen"] = f"127.0.0.1:{free_port()}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "sidecar",
                "--config",
                str(write_config(tmp_path / "b.yaml", doc)),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        assert proc.returncode == 1
        assert f"is in use by another sidecar (pid {first.popen.pid})" in proc.stderr
    finally:
        assert first.stop() == 0
