"""Metric parity: the simulator's /metrics against the real engines' captures in the shared fixtures."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim.config import SimConfig
from gateway.sim.engine import Cluster
from gateway.sim.metrics import renderer
from tests.procs import FIXTURES

# name -> (type, label keys); samples' label keys are unioned, `le` included for histograms.
Shape = dict[str, tuple[str, frozenset[str]]]

ROUTER_FAMILIES = {
    "vllm": [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:cache_config_info",
        "vllm:time_to_first_token_seconds",
    ],
    "sglang": [
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "sglang:time_to_first_token_seconds",
    ],
    "llamacpp": [
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        "llamacpp:prompt_tokens",
        "llamacpp:n_busy_slots_per_decode",
    ],
}


def shape(text: str) -> Shape:
    out: Shape = {}
    for family in text_string_to_metric_families(text):
        keys = frozenset(k for sample in family.samples for k in sample.labels)
        out[family.name] = (family.type, keys)
    return out


def fixture(name: str) -> Shape:
    return shape((FIXTURES / "metrics" / name).read_text())


def sim_metrics(**kwargs: object) -> str:
    cfg = SimConfig(instant=True, **kwargs)  # type: ignore[arg-type]
    return renderer(cfg)(Cluster(cfg))


@pytest.mark.parametrize(
    ("dialect", "fixture_name"),
    [("vllm", "vllm.txt"), ("sglang", "sglang.txt"), ("llamacpp", "llamacpp.txt")],
)
def test_router_families_match_the_fixture(dialect: str, fixture_name: str) -> None:
    real = fixture(fixture_name)
    sim = shape(sim_metrics(dialect=dialect))
    for name in ROUTER_FAMILIES[dialect]:
        assert name in real, name
        assert sim.get(name) == real[name], name


@pytest.mark.parametrize(
    ("dialect", "fixture_name"),
    [("vllm", "vllm.txt"), ("sglang", "sglang.txt"), ("llamacpp", "llamacpp.txt")],
)
def test_every_engine_family_of_the_fixture_is_served_alike(dialect: str, fixture_name: str) -> None:
    real = {k: v for k, v in fixture(fixture_name).items() if k.startswith(dialect + ":")}
    sim = shape(sim_metrics(dialect=dialect))
    assert {k: sim.get(k) for k in real} == real


def test_vllm_cache_config_reports_block_size_and_gpu_blocks() -> None:
    families = {f.name: f for f in text_string_to_metric_families(sim_metrics(kv_blocks=1234, block_size=32))}
    [sample] = families["vllm:cache_config_info"].samples
    assert sample.labels["block_size"] == "32"
    assert sample.labels["num_gpu_blocks"] == "1234"
    assert sample.value == 1.0


def test_vllm_legacy_names_match_the_v0_10_capture() -> None:
    real = fixture("vllm_v0.10.0_real_excerpt.txt")
    sim = shape(sim_metrics(vllm_legacy_metrics=True))
    assert sim["vllm:gpu_prefix_cache_hits"] == real["vllm:gpu_prefix_cache_hits"]
    assert sim["vllm:gpu_prefix_cache_queries"] == ("counter", frozenset({"engine", "model_name"}))
    assert sim["vllm:gpu_cache_usage_perc"] == ("gauge", frozenset({"engine", "model_name"}))
    assert "vllm:kv_cache_usage_perc" not in sim
    assert "vllm:prefix_cache_queries" not in sim


def test_vllm_data_parallel_reports_one_engine_series_each() -> None:
    families = {f.name: f for f in text_string_to_metric_families(sim_metrics(data_parallel=3))}
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits"):
        engines = sorted(s.labels["engine"] for s in families[name].samples)
        assert engines == ["0", "1", "2"], name


def test_sglang_data_parallel_reports_dp_rank_series() -> None:
    families = {
        f.name: f for f in text_string_to_metric_families(sim_metrics(dialect="sglang", data_parallel=2))
    }
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"):
        assert sorted(s.labels["dp_rank"] for s in families[name].samples) == ["0", "1"], name
