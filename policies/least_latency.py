"""`least-latency`: the latency the gateway itself measured on each replica.

Predicted latency of this request on replica i: `ttft_i + itl_i * expected_output`, from the gateway's
moving averages of time to first token and inter-token latency (expected_output = the request's
`max_tokens`, else `default_output_tokens`). Score: `best / predicted_i` where best is the lowest prediction
among measured replicas, so 3 s vs 4 s scores 1 vs 0.75 instead of min-max's 1 vs 0. Abstains for a replica
not measured yet (neutral score: it gets traffic and thereby a measurement).
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import ReplicaView, RouteRequest
from policies.scorer import ABSTAIN, ScoreContext


class LeastLatencyScorer:
    name = "least-latency"

    def score(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        out_tokens = (
            req.max_tokens if req.max_tokens and req.max_tokens > 0 else ctx.options.default_output_tokens
        )
        predicted: list[float] = []
        best = float("inf")
        for r in replicas:
            ttft = r.ttft_ewma_s
            if ttft is None:
                predicted.append(ABSTAIN)
                continue
            p = ttft + (r.itl_ewma_s or 0.0) * out_tokens
            predicted.append(p)
            if p < best:
                best = p
        if best == float("inf"):
            return predicted
        if best <= 0.0:
            return [p if p != p else (1.0 if p <= 0.0 else 0.0) for p in predicted]
        return [p if p != p else best / p for p in predicted]
