"""`session-affinity`: one `x-session-id`, one replica, as long as that replica is not overloaded.

The session's replica is the first in rendezvous order (so every gateway replica agrees and a removed
replica moves only its own sessions) whose load stays within a bound, as in consistent hashing with
bounded loads: `in_flight_i + 1 <= max(1, ceil(c * (T + 1) * capacity_i / C))` with T and C the pool's
in-flight and capacity totals and c = `session_load_factor`, and never a full replica. Score: 1 for that
replica, 0 for the others. Abstains (neutral) on every replica for a request without a session id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policies import rendezvous
from policies.base import ReplicaView, RouteRequest
from policies.scorer import ABSTAIN, ScoreContext


class SessionAffinityScorer:
    name = "session-affinity"

    def score(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        n = len(replicas)
        if not req.session_id:
            return [ABSTAIN] * n
        key = rendezvous.key_bytes(req.session_id)
        total_in_flight = 0
        total_capacity = 0
        for r in replicas:
            total_in_flight += r.in_flight
            total_capacity += r.capacity
        share = ctx.options.session_load_factor * (total_in_flight + 1) / max(1, total_capacity)
        out = [0.0] * n
        for i in rendezvous.order(key, replicas, range(n), ctx):
            r = replicas[i]
            if r.in_flight < r.capacity and r.in_flight + 1 <= max(1, math.ceil(share * r.capacity)):
                out[i] = 1.0
                break
        return out
