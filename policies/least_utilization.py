"""`least-utilization`: how full the engine's running batch is, from its scraped metrics.

Score: `1 - min(1, occupancy / max_num_seqs)` with `occupancy = max(running + waiting, in_flight)`: queued
sequences count as batch pressure, and the gateway's own always-current in-flight count is a floor under a
snapshot that is up to one scrape interval old (it catches bursts between scrapes). Abstains when the
snapshot is missing or stale, or the engine reports no running count or batch limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import ReplicaView, RouteRequest
from policies.scorer import ABSTAIN, ScoreContext


class LeastUtilizationScorer:
    name = "least-utilization"

    def score(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        cutoff = now - ctx.options.stale_after_s
        out: list[float] = []
        append = out.append
        for r in replicas:
            s = r.signals
            if s is None or s.scraped_at < cutoff or s.running is None or not s.max_num_seqs:
                append(ABSTAIN)
                continue
            occupancy = max(s.running + (s.waiting or 0.0), float(r.in_flight))
            append(1.0 - occupancy / s.max_num_seqs if occupancy < s.max_num_seqs else 0.0)
        return out
