"""Engine /metrics: the line scan on real captures, data-parallel sums, and the scraper over HTTP."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.config import AccessLogConfig, ReplicaSpec, ScrapeConfig
from gateway.pool import Registry
from gateway.scrape import (
    DiscoveryError,
    Scraper,
    detect_engine,
    discover,
    parse_metrics,
    parse_slots,
    spread,
)
from gateway.telemetry import Telemetry
from policies.least_request import LeastRequestRouter
from tests.procs import FIXTURES, free_port, http_get, spawn

METRICS = FIXTURES / "metrics"


def fixture(name: str) -> bytes:
    return (METRICS / name).read_bytes()


# --- the line scan on the fixtures ------------------------------------------------------------


def test_vllm_v011_fixture() -> None:
    s = parse_metrics("vllm", fixture("vllm.txt"), 12.5)
    assert s.scraped_at == 12.5
    assert (s.running, s.waiting) == (6.0, 2.0)
    assert s.kv_usage == pytest.approx(0.4213)
    assert (s.prefix_queries, s.prefix_hits) == (128256.0, 49248.0)
    assert (s.block_size, s.num_gpu_blocks) == (16, 9271)
    assert s.max_num_seqs is None  # not exposed by this version
    lean = parse_metrics("vllm", fixture("vllm.txt"), 12.5, info=False)
    assert (lean.running, lean.kv_usage, lean.prefix_hits) == (s.running, s.kv_usage, s.prefix_hits)
    assert lean.block_size is None and lean.num_gpu_blocks is None


def test_vllm_0_10_real_excerpt_mixes_current_and_deprecated_names() -> None:
    s = parse_metrics("vllm", fixture("vllm_v0.10.0_real_excerpt.txt"), 1.0)
    assert s.kv_usage == pytest.approx(9.75010481363281e-06)
    assert s.prefix_queries == 32.0  # vllm:prefix_cache_queries_total
    assert s.prefix_hits == 0.0  # only the deprecated vllm:gpu_prefix_cache_hits_total is in the excerpt
    assert s.running is None and s.waiting is None  # not in the excerpt: unknown, not zero


def test_sglang_fixture() -> None:
    s = parse_metrics("sglang", fixture("sglang.txt"), 1.0)
    assert (s.running, s.waiting) == (162.0, 2826.0)
    assert s.kv_usage == pytest.approx(0.28)
    assert s.max_num_seqs is None
    assert s.prefix_queries is None and s.prefix_hits is None


def test_llamacpp_fixture() -> None:
    s = parse_metrics("llamacpp", fixture("llamacpp.txt"), 1.0)
    assert (s.running, s.waiting) == (0.0, 0.0)
    assert s.kv_usage is None  # comes from /slots on current llama.cpp


def test_text_and_bytes_parse_alike() -> None:
    text = fixture("vllm.txt")
    assert parse_metrics("vllm", text, 1.0) == parse_metrics("vllm", text.decode(), 1.0)


@pytest.mark.parametrize(
    ("name", "engine"),
    [
        ("vllm.txt", "vllm"),
        ("vllm_v0.10.0_real_excerpt.txt", "vllm"),
        ("sglang.txt", "sglang"),
        ("llamacpp.txt", "llamacpp"),
    ],
)
def test_detect_engine_on_fixtures(name: str, engine: str) -> None:
    assert detect_engine(fixture(name)) == engine


def test_detect_engine_without_engine_metrics_is_openai() -> None:
    assert detect_engine(b"# TYPE python_info gauge\npython_info 1.0\n") == "openai"
    assert detect_engine("") == "openai"


# --- data parallel and legacy names -----------------------------------------------------------

VLLM_DP = b"""\
# TYPE vllm:num_requests_running_extra gauge
vllm:num_requests_running_extra{engine="0"} 99.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.4
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:gpu_prefix_cache_queries_total{engine="1",model_name="m"} 50.0
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 10.0
vllm:gpu_prefix_cache_hits_total{engine="1",model_name="m"} 5.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="32",engine="1",num_gpu_blocks="1000"} 1.0
# TYPE vllm:scheduler_config_info gauge
vllm:scheduler_config_info{engine="0",max_num_seqs="128"} 1.0
vllm:scheduler_config_info{engine="1",max_num_seqs="128"} 1.0
"""


def test_vllm_data_parallel_sums_over_engine_and_averages_kv() -> None:
    s = parse_metrics("vllm", VLLM_DP, 1.0)
    assert (s.running, s.waiting) == (7.0, 1.0)  # the _extra family with the same prefix is ignored
    assert s.kv_usage == pytest.approx(0.3)  # legacy gpu_cache_usage_perc, mean of the engines
    assert (s.prefix_queries, s.prefix_hits) == (150.0, 15.0)  # legacy gpu_prefix_* names
    assert (s.block_size, s.num_gpu_blocks) == (32, 2000)
    assert s.max_num_seqs == 256


def test_vllm_current_names_win_over_deprecated_ones() -> None:
    text = VLLM_DP + b'vllm:kv_cache_usage_perc{engine="0"} 0.9\nvllm:kv_cache_usage_perc{engine="1"} 0.7\n'
    assert parse_metrics("vllm", text, 1.0).kv_usage == pytest.approx(0.8)


def test_vllm_cache_not_sized_yet_leaves_blocks_unknown() -> None:
    s = parse_metrics("vllm", b'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0\n', 1.0)
    assert s.block_size == 16 and s.num_gpu_blocks is None


SGLANG_DP = b"""\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 5.0
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 5.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 3.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 3.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",model_name="m",tp_rank="0"} 2.0
sglang:num_queue_reqs{dp_rank="0",model_name="m",tp_rank="1"} 2.0
sglang:num_queue_reqs{dp_rank="1",model_name="m",tp_rank="0"} 1.0
sglang:num_queue_reqs{dp_rank="1",model_name="m",tp_rank="1"} 1.0
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",model_name="m",tp_rank="0"} 0.5
sglang:token_usage{dp_rank="0",model_name="m",tp_rank="1"} 0.5
sglang:token_usage{dp_rank="1",model_name="m",tp_rank="0"} 0.1
sglang:token_usage{dp_rank="1",model_name="m",tp_rank="1"} 0.1
# TYPE sglang:max_running_requests gauge
sglang:max_running_requests{dp_rank="0",model_name="m",tp_rank="0"} 48.0
sglang:max_running_requests{dp_rank="1",model_name="m",tp_rank="0"} 48.0
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m"} 1000.0
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{model_name="m"} 250.0
"""


def test_sglang_sums_over_dp_rank_not_tp_rank() -> None:
    s = parse_metrics("sglang", SGLANG_DP, 1.0)
    assert (s.running, s.waiting) == (8.0, 3.0)
    assert s.kv_usage == pytest.approx(0.3)
    assert s.max_num_seqs == 96.0
    assert (s.prefix_queries, s.prefix_hits) == (1000.0, 250.0)


def test_odd_but_valid_lines() -> None:
    text = (
        b"# HELP vllm:num_requests_running with a {brace} in help\n"
        b'vllm:num_requests_running{engine="0",model_name="a b}c"} 2 1700000000000\n'
        b"vllm:num_requests_waiting NaN\n"
    )
    s = parse_metrics("vllm", text, 1.0)
    assert s.running == 2.0  # label value with a brace and a space, sample with a timestamp
    assert s.waiting is None  # NaN is no number


def test_llamacpp_older_servers_report_kv_usage_directly() -> None:
    text = fixture("llamacpp.txt") + b"llamacpp:kv_cache_usage_ratio 0.25\n"
    assert parse_metrics("llamacpp", text, 1.0).kv_usage == 0.25


def test_unknown_engine_gives_an_empty_snapshot() -> None:
    s = parse_metrics("openai", fixture("vllm.txt"), 3.0)
    assert s.scraped_at == 3.0 and s.running is None


def slot(
    i: int, busy: bool, n_ctx: int = 1000, prompt: int | None = None, decoded: int = 0
) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": i, "n_ctx": n_ctx, "is_processing": busy}
    if prompt is not None:
        doc["n_prompt_tokens"] = prompt
        doc["next_token"] = [{"has_next_token": busy, "n_remain": -1, "n_decoded": decoded}]
    return doc


def test_llamacpp_slots_token_based_and_busy_based() -> None:
    token_based = [
        slot(0, True, prompt=300, decoded=100),
        slot(1, False, prompt=900),
        slot(2, True, prompt=50),
    ]
    assert parse_slots(token_based) == (pytest.approx(450 / 3000), 3)
    busy_based = [slot(0, True), slot(1, False), slot(2, False), slot(3, True)]
    assert parse_slots(busy_based) == (0.5, 4)
    old_shape = [
        {"id": 0, "n_ctx": 100, "is_processing": True, "n_prompt_tokens": 10, "next_token": {"n_decoded": 5}}
    ]
    assert parse_slots(old_shape) == (pytest.approx(0.15), 1)
    assert parse_slots([]) == (None, None)
    assert parse_slots({"error": "slots disabled"}) == (None, None)


# --- the scraper over HTTP ---------------------------------------------------------------------


class Engine:
    """A tiny engine double: serves a metrics fixture (real capture) and, for llama.cpp, /slots."""

    def __init__(self, metrics: bytes, slots: object = None, models: list[str] | None = None) -> None:
        self.metrics = metrics
        self.slots = slots
        self.models = models
        self.status = 200
        self.hits: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/slots", self.handle_slots)
        app.router.add_get("/v1/models", self.handle_models)
        return app

    async def handle_metrics(self, request: web.Request) -> web.Response:
        self.hits["metrics"] = self.hits.get("metrics", 0) + 1
        if self.status != 200:
            return web.Response(status=self.status)
        return web.Response(body=self.metrics, content_type="text/plain")

    async def handle_slots(self, request: web.Request) -> web.Response:
        self.hits["slots"] = self.hits.get("slots", 0) + 1
        if self.slots is None:
            return web.Response(status=501, text='{"error": "This server does not support slots endpoint."}')
        return web.Response(body=orjson.dumps(self.slots), content_type="application/json")

    async def handle_models(self, request: web.Request) -> web.Response:
        if self.models is None:
            return web.Response(status=404)
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        )


StartEngine = Callable[[Engine], Any]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def start_engine(aiohttp_server: Any) -> StartEngine:
    async def start(engine: Engine) -> str:
        server = await aiohttp_server(engine.app())
        return f"http://127.0.0.1:{server.port}"

    return start


def make_registry(*specs: ReplicaSpec) -> Registry:
    registry = Registry(lambda model: LeastRequestRouter(), queue_max=10)
    registry.apply(1, list(specs))
    return registry


def scrape_cfg(**kw: Any) -> ScrapeConfig:
    return ScrapeConfig(**{"interval_s": 0.05, "timeout_s": 1.0, "stale_after_s": 5.0, **kw})


async def test_scraper_fills_signals_of_every_dialect(
    start_engine: StartEngine, session: aiohttp.ClientSession
) -> None:
    vllm = await start_engine(Engine(fixture("vllm.txt")))
    sglang = await start_engine(Engine(fixture("sglang.txt")))
    slots = [slot(0, True, prompt=100, decoded=100), slot(1, False, prompt=10)]
    llama = await start_engine(Engine(fixture("llamacpp.txt"), slots=slots))
    registry = make_registry(
        ReplicaSpec("v", "m", vllm, engine="vllm"),
        ReplicaSpec("s", "m", sglang, engine="sglang"),
        ReplicaSpec("l", "m", llama, engine="llamacpp"),
    )
    telemetry = Telemetry(AccessLogConfig())
    scraper = Scraper(registry, scrape_cfg(), telemetry)
    before = time.monotonic()
    await scraper.scrape_all()
    await scraper.scrape_all()  # static config is read once a minute and carried over meanwhile
    v, s, lc = (registry.find(i) for i in "vsl")
    assert v is not None and s is not None and lc is not None
    assert v.signals is not None and v.signals.running == 6.0 and v.signals.num_gpu_blocks == 9271
    assert v.signals.scraped_at >= before and v.signals_error is None
    assert s.signals is not None and s.signals.waiting == 2826.0
    assert lc.signals is not None and lc.signals.kv_usage == pytest.approx(200 / 2000)
    assert lc.signals.max_num_seqs == 2
    body, _ = telemetry.render()
    assert b'llm_gateway_scrape_age_seconds{replica="v"}' in body


async def test_llamacpp_without_slots_endpoint_is_asked_rarely(
    start_engine: StartEngine, session: aiohttp.ClientSession
) -> None:
    engine = Engine(fixture("llamacpp.txt"), slots=None)
    registry = make_registry(ReplicaSpec("l", "m", await start_engine(engine), engine="llamacpp"))
    scraper = Scraper(registry, scrape_cfg(), Telemetry(AccessLogConfig()))
    for _ in range(3):
        await scraper.scrape_all()
    replica = registry.find("l")
    assert replica is not None and replica.signals is not None
    assert replica.signals.running == 0.0 and replica.signals.kv_usage is None
    assert engine.hits == {"metrics": 3, "slots": 1}


async def test_failed_scrapes_keep_the_snapshot_until_stale_then_unknown(
    start_engine: StartEngine, session: aiohttp.ClientSession
) -> None:
    engine = Engine(fixture("vllm.txt"))
    registry = make_registry(ReplicaSpec("v", "m", await start_engine(engine)))
    telemetry = Telemetry(AccessLogConfig())
    scraper = Scraper(registry, scrape_cfg(stale_after_s=0.2), telemetry)
    await scraper.scrape_all()
    replica = registry.find("v")
    assert replica is not None and replica.signals is not None
    engine.status = 500
    await scraper.scrape_all()
    assert replica.signals is not None, "one failure must not erase a fresh snapshot"
    assert replica.signals_error == "ValueError: HTTP 500"
    await asyncio.sleep(0.25)
    await scraper.scrape_all()
    assert replica.signals is None, "a stale snapshot is unknown, not zero"
    engine.status = 200
    await scraper.scrape_all()
    assert replica.signals is not None and replica.signals_error is None
    body, _ = telemetry.render()
    assert b'llm_gateway_scrape_errors_total{replica="v"} 2.0' in body


async def test_unreachable_replica_and_oversized_page_are_errors(
    start_engine: StartEngine, session: aiohttp.ClientSession
) -> None:
    big = await start_engine(Engine(fixture("vllm.txt") * 4))
    registry = make_registry(
        ReplicaSpec("down", "m", f"http://127.0.0.1:{free_port()}"),
        ReplicaSpec("big", "m", big),
    )
    scraper = Scraper(registry, scrape_cfg(), Telemetry(AccessLogConfig()), max_bytes=64 * 1024)
    await scraper.scrape_all()
    down, oversized = registry.find("down"), registry.find("big")
    assert down is not None and down.signals is None and (down.signals_error or "").startswith("connect")
    assert oversized is not None and oversized.signals is None
    assert "limit" in (oversized.signals_error or "")


async def test_scraper_loop_picks_up_replicas_added_at_run_time(
    start_engine: StartEngine, session: aiohttp.ClientSession
) -> None:
    url = await start_engine(Engine(fixture("sglang.txt")))
    registry = make_registry()
    scraper = Scraper(registry, scrape_cfg(), Telemetry(AccessLogConfig()))
    await scraper.start()
    try:
        registry.apply(
            2, [ReplicaSpec("s", "m", url, engine="sglang"), ReplicaSpec("o", "m", url, engine="openai")]
        )
        replica = registry.find("s")
        assert replica is not None
        for _ in range(100):
            if replica.signals is not None:
                break
            await asyncio.sleep(0.02)
        assert replica.signals is not None and replica.signals.running == 162.0
        other = registry.find("o")
        assert other is not None and other.signals is None  # plain OpenAI servers are not scraped
    finally:
        await scraper.stop()


# --- discover -----------------------------------------------------------------------------------


async def test_discover_reads_model_and_engine(
    start_engine: StartEngine, session: aiohttp.ClientSession
) -> None:
    url = await start_engine(Engine(fixture("vllm.txt"), models=["Qwen/Qwen3-8B", "lora-a"]))
    assert await discover(session, url + "/") == ("Qwen/Qwen3-8B", "vllm")
    plain = Engine(b"", models=["gpt-x"])
    plain.status = 404
    assert await discover(session, await start_engine(plain)) == ("gpt-x", "openai")


async def test_discover_failures_say_what_is_wrong(
    start_engine: StartEngine, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(DiscoveryError, match="connect"):
        await discover(session, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DiscoveryError, match="HTTP 404"):
        await discover(session, await start_engine(Engine(b"")))
    with pytest.raises(DiscoveryError, match="no model id"):
        await discover(session, await start_engine(Engine(b"", models=[])))


# --- pacing -------------------------------------------------------------------------------------


async def test_spread_starts_work_evenly_and_cancels_cleanly() -> None:
    loop = asyncio.get_running_loop()
    started: list[float] = []

    async def work(i: int) -> None:
        started.append(loop.time())

    t0 = loop.time()
    await spread(list(range(40)), work, 0.2)
    assert len(started) == 40
    assert started[-1] - t0 >= 0.15, "the last starts near the end of the window, not in the first burst"

    running: list[asyncio.Event] = []

    async def hang(i: int) -> None:
        event = asyncio.Event()
        running.append(event)
        try:
            await asyncio.sleep(30)
        finally:
            event.set()

    task = asyncio.create_task(spread(list(range(10)), hang, 1.0))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert running and all(e.is_set() for e in running), "started work is cancelled with the round"


# --- against real simulator processes ----------------------------------------------------------


def _post_chat(url: str, text: str) -> None:
    body = orjson.dumps(
        {"model": "sim-model", "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    )
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        resp.read()


@pytest.mark.parametrize(
    ("dialect", "extra"),
    [
        ("vllm", ["--data-parallel", "2"]),
        ("vllm", ["--vllm-legacy-metrics"]),
        ("sglang", ["--data-parallel", "2"]),
        ("llamacpp", []),
    ],
    ids=["vllm-dp2", "vllm-legacy", "sglang-dp2", "llamacpp"],
)
async def test_scraping_a_real_simulator_matches_its_own_counters(
    dialect: str, extra: list[str], tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    args = ["sim", "--dialect", dialect, "--model", "sim-model", "--port", str(port), "--instant"]
    args += ["--max-num-seqs", "8", "--kv-blocks", "500", "--block-size", "16", *extra]
    with spawn(args, port=port, log_dir=tmp_path) as sim:
        prompt = "a shared system prompt that is long enough to fill a few blocks " * 8
        for i in range(3):
            await asyncio.to_thread(_post_chat, sim.url, prompt + str(i))
        assert await discover(session, sim.url) == ("sim-model", dialect)
        registry = make_registry(ReplicaSpec("sim", "sim-model", sim.url, engine=dialect))  # type: ignore[arg-type]
        await Scraper(registry, scrape_cfg(), Telemetry(AccessLogConfig())).scrape_all()
        status, raw = http_get(sim.url + "/sim/stats")
        assert status == 200
        stats = orjson.loads(raw)
    replica = registry.find("sim")
    assert replica is not None and replica.signals_error is None
    s = replica.signals
    assert s is not None
    assert (s.running, s.waiting) == (stats["running"], stats["waiting"])
    assert s.kv_usage is not None and 0.0 <= s.kv_usage <= 1.0
    dp = 2 if "--data-parallel" in extra else 1
    if dialect == "vllm":
        assert (s.prefix_queries, s.prefix_hits) == (
            stats["prefix_queries_tokens"],
            stats["prefix_hits_tokens"],
        )
        assert s.prefix_hits is not None and s.prefix_hits > 0
        assert (s.block_size, s.num_gpu_blocks) == (16, 500 * dp)
    if dialect == "llamacpp":
        assert s.max_num_seqs == 8
