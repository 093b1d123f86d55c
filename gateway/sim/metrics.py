"""`/metrics` of each dialect, rendered by hand in the engine's own names, types and label keys.

vLLM (V1, v0.11 line): one series per engine (`engine` label, `--data-parallel N` gives N), counters as
`X_total` plus an `X_created` gauge as prometheus_client renders them, the fixture's histogram buckets,
and `vllm:cache_config_info`. `--vllm-legacy-metrics` uses the pre-0.9.2 names `vllm:gpu_cache_usage_perc`
and `vllm:gpu_prefix_cache_{queries,hits}`. SGLang: `model_name` labels, plus `dp_rank` when there are
several data-parallel ranks. llama.cpp: the eleven unlabelled `llamacpp:` series of llama-server.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.sim.config import SimConfig
from gateway.sim.engine import Cluster, Engine
from gateway.sim.stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value))


class _Writer:
    """Appends exposition lines. A histogram series is given by its label text before and after `le`:
    `before` ends with "," or is empty, `after` starts with "," or is empty."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def head(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")

    def sample(self, name: str, labels: str, value: float) -> None:
        self.lines.append(f"{name}{{{labels}}} {_num(value)}\n" if labels else f"{name} {_num(value)}\n")

    def gauge(self, name: str, help_text: str, series: list[tuple[str, float]]) -> None:
        self.head(name, "gauge", help_text)
        for labels, value in series:
            self.sample(name, labels, value)

    def counter(
        self, base: str, help_text: str, series: list[tuple[str, float]], created: float | None
    ) -> None:
        self.head(base + "_total", "counter", help_text)
        for labels, value in series:
            self.sample(base + "_total", labels, value)
        if created is not None:
            self.head(base + "_created", "gauge", help_text)
            for labels, _ in series:
                self.sample(base + "_created", labels, created)

    def histogram(
        self,
        name: str,
        help_text: str,
        series: list[tuple[str, str, Histogram]],
        created: float | None,
        sum_first: bool = False,
    ) -> None:
        self.head(name, "histogram", help_text)
        out = self.lines
        for before, after, hist in series:
            both = before + after.lstrip(",")
            if sum_first:
                out.append(f"{name}_sum{{{both}}} {_num(hist.sum)}\n")
            acc = 0
            for bound, count in zip(hist.bounds, hist.counts, strict=False):
                acc += count
                out.append(f'{name}_bucket{{{before}le="{_num(bound)}"{after}}} {_num(acc)}\n')
            out.append(f'{name}_bucket{{{before}le="+Inf"{after}}} {_num(hist.count)}\n')
            out.append(f"{name}_count{{{both}}} {_num(hist.count)}\n")
            if not sum_first:
                out.append(f"{name}_sum{{{both}}} {_num(hist.sum)}\n")
        if created is not None:
            self.head(name + "_created", "gauge", help_text)
            for before, after, _ in series:
                both = before + after.lstrip(",")
                out.append(f"{name}_created{{{both}}} {_num(created)}\n")

    def text(self) -> str:
        return "".join(self.lines)


def _vllm(cfg: SimConfig) -> Callable[[Cluster], str]:
    model = _escape(cfg.model)
    legacy = cfg.vllm_legacy_metrics
    usage_name = "vllm:gpu_cache_usage_perc" if legacy else "vllm:kv_cache_usage_perc"
    usage_help = ("GPU " if legacy else "") + "KV-cache usage. 1 means 100 percent usage."
    prefix = "vllm:gpu_prefix_cache_" if legacy else "vllm:prefix_cache_"
    prefix_help = "GPU prefix cache" if legacy else "Prefix cache"

    def labels(e: Engine) -> str:
        return f'engine="{e.index}",model_name="{model}"'

    def split(e: Engine) -> tuple[str, str]:
        return f'engine="{e.index}",', f',model_name="{model}"'

    def render(cluster: Cluster) -> str:
        engines = cluster.engines
        created = engines[0].stats.created
        w = _Writer()
        w.gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            [(labels(e), len(e.running)) for e in engines],
        )
        w.gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            [(labels(e), len(e.waiting)) for e in engines],
        )
        w.gauge(usage_name, usage_help, [(labels(e), e.kv.usage()) for e in engines])
        w.counter(
            prefix + "queries",
            f"{prefix_help} queries, in terms of number of queried tokens.",
            [(labels(e), e.stats.prefix_queries) for e in engines],
            created,
        )
        w.counter(
            prefix + "hits",
            f"{prefix_help} hits, in terms of number of cached tokens.",
            [(labels(e), e.stats.prefix_hits) for e in engines],
            created,
        )
        w.counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            [(labels(e), e.stats.preemptions) for e in engines],
            created,
        )
        w.counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            [(labels(e), e.stats.prompt_tokens) for e in engines],
            created,
        )
        w.counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            [(labels(e), e.stats.generation_tokens) for e in engines],
            created,
        )
        w.counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [
                (f'engine="{e.index}",finished_reason="{reason}",model_name="{model}"', count)
                for e in engines
                for reason, count in e.stats.finished.items()
            ],
            created,
        )
        hists: list[tuple[str, str, Callable[[Engine], Histogram]]] = [
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
             lambda e: e.stats.request_prompt_tokens),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.",
             lambda e: e.stats.request_generation_tokens),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
             lambda e: e.stats.iteration_tokens),
            ("vllm:request_max_num_generation_tokens",
             "Histogram of maximum number of requested generation tokens.",
             lambda e: e.stats.request_max_tokens),
            ("vllm:request_params_n", "Histogram of the n request parameter.",
             lambda e: e.stats.request_params_n),
            ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
             lambda e: e.stats.request_max_tokens),
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             lambda e: e.stats.ttft),
            ("vllm:time_per_output_token_seconds",
             "Histogram of time per output token in seconds."
             + ("" if legacy else "DEPRECATED: Use vllm:inter_token_latency_seconds instead."),
             lambda e: e.stats.itl),
        ]  # fmt: skip
        if not legacy:
            hists.append(
                ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                 lambda e: e.stats.itl)
            )  # fmt: skip
        hists += [
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
             lambda e: e.stats.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
             lambda e: e.stats.queue_time),
            ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
             lambda e: e.stats.inference_time),
            ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
             lambda e: e.stats.prefill_time),
            ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
             lambda e: e.stats.decode_time),
        ]  # fmt: skip
        for name, help_text, get in hists:
            w.histogram(name, help_text, [(*split(e), get(e)) for e in engines], created)
        w.head("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
        for e in engines:
            w.sample("vllm:cache_config_info", cache_info(e), 1.0)
        return w.text()

    def cache_info(e: Engine) -> str:
        return (
            f'block_size="{cfg.block_size}",cache_dtype="auto",calculate_kv_scales="False",'
            'cpu_kvcache_space_bytes="None",cpu_offload_gb="0.0",enable_prefix_caching="True",'
            f'engine="{e.index}",gpu_memory_utilization="0.9",is_attention_free="False",'
            'kv_cache_memory_bytes="None",kv_sharing_fast_prefill="False",mamba_cache_dtype="auto",'
            'mamba_page_size_padded="None",mamba_ssm_cache_dtype="auto",num_cpu_blocks="None",'
            f'num_gpu_blocks="{cfg.kv_blocks}",num_gpu_blocks_override="None",'
            'prefix_caching_hash_algo="sha256",sliding_window="None",swap_space="0.0",'
            'swap_space_bytes="0.0"'
        )

    return render


def _sglang(cfg: SimConfig) -> Callable[[Cluster], str]:
    model = _escape(cfg.model)
    ranked = cfg.data_parallel > 1

    def labels(e: Engine) -> str:
        return f'dp_rank="{e.index}",model_name="{model}"' if ranked else f'model_name="{model}"'

    def split(e: Engine) -> tuple[str, str]:
        return (f'dp_rank="{e.index}",' if ranked else ""), f',model_name="{model}"'

    capacity = cfg.kv_blocks * cfg.block_size

    def render(cluster: Cluster) -> str:
        engines = cluster.engines
        w = _Writer()
        w.counter(
            "sglang:prompt_tokens",
            "Number of prefill tokens processed.",
            [(labels(e), e.stats.prompt_tokens) for e in engines],
            None,
        )
        w.counter(
            "sglang:generation_tokens",
            "Number of generation tokens processed.",
            [(labels(e), e.stats.generation_tokens) for e in engines],
            None,
        )
        w.gauge("sglang:token_usage", "The token usage", [(labels(e), e.kv.usage()) for e in engines])
        w.gauge(
            "sglang:cache_hit_rate",
            "The cache hit rate",
            [(labels(e), e.stats.recent_hit_rate()) for e in engines],
        )
        w.histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            [(*split(e), e.stats.ttft) for e in engines],
            None,
            sum_first=True,
        )
        w.histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            [(*split(e), e.stats.e2e) for e in engines],
            None,
            sum_first=True,
        )
        w.histogram(
            "sglang:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            [(*split(e), e.stats.tpot) for e in engines],
            None,
            sum_first=True,
        )
        func = Histogram(engines[0].stats.func_latency.bounds)
        for e in engines:
            src = e.stats.func_latency
            func.counts = [a + b for a, b in zip(func.counts, src.counts, strict=True)]
            func.sum += src.sum
            func.count += src.count
        w.histogram(
            "sglang:func_latency_seconds",
            "Function latency in seconds",
            [("", ',name="generate_request"', func)],
            None,
            sum_first=True,
        )
        w.gauge(
            "sglang:num_running_reqs",
            "The number of running requests",
            [(labels(e), len(e.running)) for e in engines],
        )
        w.gauge(
            "sglang:num_used_tokens",
            "The number of used tokens",
            [(labels(e), min(e.kv_tokens_used(), capacity)) for e in engines],
        )
        w.gauge(
            "sglang:gen_throughput",
            "The generate throughput (token/s)",
            [(labels(e), e.stats.gen_throughput()) for e in engines],
        )
        w.gauge(
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue",
            [(labels(e), len(e.waiting)) for e in engines],
        )
        return w.text()

    return render


def _llamacpp(cfg: SimConfig) -> Callable[[Cluster], str]:
    def render(cluster: Cluster) -> str:
        engines = cluster.engines
        prompt_tokens = sum(e.stats.prompt_tokens for e in engines)
        prompt_s = sum(e.stats.prompt_seconds for e in engines)
        predicted = sum(e.stats.generation_tokens for e in engines)
        predicted_s = sum(e.stats.decode_seconds for e in engines)
        steps = sum(e.stats.steps for e in engines)
        busy = sum(e.stats.step_busy_slots for e in engines)
        w = _Writer()
        for name, help_text, kind, value in (
            ("prompt_tokens_total", "Number of prompt tokens processed.", "counter", prompt_tokens),
            ("prompt_seconds_total", "Prompt process time", "counter", prompt_s),
            ("tokens_predicted_total", "Number of generation tokens processed.", "counter", predicted),
            ("tokens_predicted_seconds_total", "Predict process time", "counter", predicted_s),
            ("n_decode_total", "Total number of llama_decode() calls", "counter", steps),
            ("n_tokens_max", "Largest observed n_tokens.", "counter",
             max(e.stats.max_step_tokens for e in engines)),
            ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call", "counter",
             busy / steps if steps else 0.0),
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s.", "gauge",
             prompt_tokens / prompt_s if prompt_s else 0.0),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s.", "gauge",
             predicted / predicted_s if predicted_s else 0.0),
            ("requests_processing", "Number of requests processing.", "gauge",
             sum(len(e.running) for e in engines)),
            ("requests_deferred", "Number of requests deferred.", "gauge",
             sum(len(e.waiting) for e in engines)),
        ):  # fmt: skip
            w.head("llamacpp:" + name, kind, help_text)
            w.lines.append(f"llamacpp:{name} {_llamacpp_num(value)}\n")
        return w.text()

    return render


def _llamacpp_num(value: float) -> str:
    """C++ ostream default formatting: integers plain, floats with 6 significant digits."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


def renderer(cfg: SimConfig) -> Callable[[Cluster], str]:
    """The `/metrics` body builder of the configured dialect."""
    if cfg.dialect == "sglang":
        return _sglang(cfg)
    if cfg.dialect == "llamacpp":
        return _llamacpp(cfg)
    return _vllm(cfg)
