"""Least-request ranking: the gateway's own in-flight count scaled by capacity. Always current."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import Decision, ReplicaView, RouteRequest


class LeastRequestRouter:
    """Interim router of the data plane until the weighted chains take over."""

    def select(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        ranked = sorted(replicas, key=lambda r: r.in_flight / r.capacity)
        return Decision(ranked=ranked, strategy="least-request")

    def on_dispatch(self, req: RouteRequest, replica: ReplicaView, now: float) -> None:
        return None

    def forget(self, replica_id: str) -> None:
        return None
