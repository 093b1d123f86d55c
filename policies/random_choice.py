"""`random`: a uniformly random first choice, for baselines. Alone only (it has no score to weigh).

Ranking: the replicas rotated to start at a random one, so a full first choice falls through to the next
in a fixed order at O(n) cost.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from policies.base import ReplicaView, RouteRequest
from policies.scorer import ScoreContext


class RandomStrategy:
    name = "random"

    def rank(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[ReplicaView]:
        items = list(replicas)
        if len(items) < 2:
            return items
        start = random.randrange(len(items))
        return items[start:] + items[:start]
