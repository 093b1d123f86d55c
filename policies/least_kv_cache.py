"""`least-kv-cache` (alias `least-gpu-cache`): the engine's KV-cache usage, from its scraped metrics.

Score: `1 - max(kv_usage, outstanding_tokens / kv_tokens)`. kv_usage in [0, 1] as the scraper reports it
(vLLM `kv_cache_usage_perc` or the legacy `gpu_cache_usage_perc`, SGLang `token_usage`, llama.cpp estimated
from `/slots`); kv_tokens = `num_gpu_blocks * block_size` when the engine reports its cache config. The
second term is the gateway's own always-current token count: a snapshot up to one scrape old cannot make
a burst pile onto the replica that looked emptiest (the herd effect of stale metrics). Abstains for a
replica without a snapshot, with one older than `stale_after_s`, or whose engine does not report usage.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import ReplicaView, RouteRequest
from policies.scorer import ABSTAIN, ScoreContext


class LeastKvCacheScorer:
    name = "least-kv-cache"

    def score(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        cutoff = now - ctx.options.stale_after_s
        nan = ABSTAIN
        # One comprehension (this runs per request over every replica): u = the larger of the scraped
        # usage and the gateway's own token share; the score is 1 - u, floored at 0.
        return [
            (
                (1.0 - kv if kv < 1.0 else 0.0)
                if not (nb := s.num_gpu_blocks)
                or not (bs := s.block_size)
                or (own := r.outstanding_tokens / (nb * bs)) < kv
                else (1.0 - own if own < 1.0 else 0.0)
            )
            if (s := r.signals) is not None and s.scraped_at >= cutoff and (kv := s.kv_usage) is not None
            else nan
            for r in replicas
        ]
