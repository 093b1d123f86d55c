"""`least-request`: the gateway's own in-flight + reserved count scaled by capacity. Always current.

Score: `1 - in_flight / capacity` (0 when full). Capacity scaling keeps small differences small: 3 vs 4
requests on 64-slot replicas score 0.953 vs 0.938, where AIBrix's min-max normalization says 1 vs 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import Decision, ReplicaView, RouteRequest
from policies.scorer import ScoreContext


class LeastRequestScorer:
    name = "least-request"

    def score(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        return [1.0 - f / c if (f := r.in_flight) < (c := r.capacity) else 0.0 for r in replicas]


class LeastRequestRouter:
    """Interim router of the data plane until the weighted chains take over."""

    def select(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        ranked = sorted(replicas, key=lambda r: r.in_flight / r.capacity)
        return Decision(ranked=ranked, strategy="least-request")

    def on_dispatch(self, req: RouteRequest, replica: ReplicaView, now: float) -> None:
        return None

    def forget(self, replica_id: str) -> None:
        return None
