"""`power-of-two`: two random candidates, the less loaded (in_flight / capacity) first. Alone only.

The rest follow by least load, so a full pair falls through to the next best rather than at random.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from policies.base import ReplicaView, RouteRequest
from policies.scorer import ScoreContext


def _load(r: ReplicaView) -> float:
    return r.in_flight / r.capacity


class PowerOfTwoStrategy:
    name = "power-of-two"

    def rank(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[ReplicaView]:
        n = len(replicas)
        if n < 2:
            return list(replicas)
        a, b = random.sample(range(n), 2)
        if _load(replicas[b]) < _load(replicas[a]):
            a, b = b, a
        rest = [r for i, r in enumerate(replicas) if i != a and i != b]
        rest.sort(key=_load)
        return [replicas[a], replicas[b], *rest]
