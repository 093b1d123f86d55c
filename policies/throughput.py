"""`throughput`: fewest outstanding tokens (prompt + expected output of the requests in flight).

Score: `1 - min(1, outstanding_tokens / (capacity * tokens_per_slot))`. The gateway keeps the count
itself, so it is always current and never abstains; scaling by the replica's token budget keeps 1,000 vs
2,000 outstanding tokens a small difference on a large replica instead of AIBrix's 1 vs 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import ReplicaView, RouteRequest
from policies.scorer import ScoreContext


class ThroughputScorer:
    name = "throughput"

    def score(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        per_slot = float(ctx.options.tokens_per_slot)
        return [
            1.0 - t / b if (t := r.outstanding_tokens) < (b := r.capacity * per_slot) else 0.0
            for r in replicas
        ]
