"""What one simulated engine counts: plain counters and fixed-bucket histograms, rendered by `metrics.py`.

Observation is a bisect and two additions, so it stays cheap on the per-token path.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque

TOKENS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip
SGLANG_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0,
    25.0, 30.0,
)  # fmt: skip
SGLANG_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
)  # fmt: skip
SGLANG_TPOT_BUCKETS = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
SGLANG_FUNC_BUCKETS = tuple(0.05 * 1.5**i for i in range(18))

FINISH_REASONS = ("stop", "length", "abort")


class Histogram:
    """Cumulative-on-render histogram with Prometheus `le` buckets (+Inf implied)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n


class EngineStats:
    """Counters and histograms of one engine (one `engine`/`dp_rank` label value)."""

    def __init__(self, dialect: str) -> None:
        self.created = time.time()
        self.requests = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.steps = 0
        self.step_busy_slots = 0
        self.max_step_tokens = 0
        self.prompt_seconds = 0.0
        self.decode_seconds = 0.0
        self._recent: deque[tuple[int, int]] = deque()
        self._recent_queries = 0
        self._recent_hits = 0
        self._gen_mark = (time.monotonic(), 0)
        self._gen_rate = 0.0
        self.request_prompt_tokens = Histogram(TOKENS_BUCKETS)
        self.request_generation_tokens = Histogram(TOKENS_BUCKETS)
        self.request_max_tokens = Histogram(TOKENS_BUCKETS)
        self.request_params_n = Histogram(N_BUCKETS)
        self.iteration_tokens = Histogram(ITERATION_BUCKETS)
        if dialect == "sglang":
            self.ttft = Histogram(SGLANG_TTFT_BUCKETS)
            self.itl = Histogram(SGLANG_TPOT_BUCKETS)
            self.e2e = Histogram(SGLANG_E2E_BUCKETS)
        else:
            self.ttft = Histogram(VLLM_TTFT_BUCKETS)
            self.itl = Histogram(VLLM_ITL_BUCKETS)
            self.e2e = Histogram(VLLM_LATENCY_BUCKETS)
        self.tpot = Histogram(self.itl.bounds)
        self.queue_time = Histogram(VLLM_LATENCY_BUCKETS)
        self.inference_time = Histogram(VLLM_LATENCY_BUCKETS)
        self.prefill_time = Histogram(VLLM_LATENCY_BUCKETS)
        self.decode_time = Histogram(VLLM_LATENCY_BUCKETS)
        self.func_latency = Histogram(SGLANG_FUNC_BUCKETS)

    def on_prefix_lookup(self, queried: int, hit: int) -> None:
        self.prefix_queries += queried
        self.prefix_hits += hit
        recent = self._recent
        recent.append((queried, hit))
        self._recent_queries += queried
        self._recent_hits += hit
        if len(recent) > 256:
            q, h = recent.popleft()
            self._recent_queries -= q
            self._recent_hits -= h

    def recent_hit_rate(self) -> float:
        """Hit rate over the last 256 admissions, like SGLang's per-interval `cache_hit_rate`."""
        return self._recent_hits / self._recent_queries if self._recent_queries else 0.0

    def gen_throughput(self) -> float:
        """Generated tokens per second since the previous reading at least a second ago."""
        now = time.monotonic()
        mark_t, mark_tokens = self._gen_mark
        if now - mark_t >= 1.0:
            self._gen_rate = (self.generation_tokens - mark_tokens) / (now - mark_t)
            self._gen_mark = (now, self.generation_tokens)
        return self._gen_rate
