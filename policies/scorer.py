"""The scorer trait shared by every strategy, and the per-router state scorers may read.

A scorer gives each replica a score in [0, 1], higher is better, or `ABSTAIN` where its signal is missing
or stale for that replica. The chain turns abstentions into a neutral score and counts them; it never
turns them into randomness. Strategies that only make sense alone (`random`, `power-of-two`) rank
directly instead (`SoloStrategy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

import xxhash

from policies.base import ReplicaView, RouteRequest
from policies.options import RoutingOptions
from policies.prefix_index import PrefixIndex

ABSTAIN: Final = float("nan")
"""The abstention marker: any NaN score is an abstention (tested with `x != x`, never by identity, which
compiled code does not keep for floats)."""


class ScoreContext:
    """What one router holds for its scorers: options, the prefix index, counters, cached hash seeds."""

    __slots__ = ("_pos", "_pos_of", "abstentions", "index", "options", "seeds", "yields")

    def __init__(self, options: RoutingOptions) -> None:
        self.options = options
        self.index = PrefixIndex(options)
        self.abstentions: dict[str, int] = {}
        """Replica-abstentions per scorer name (exported as `llm_gateway_routing_abstentions_total`)."""
        self.yields = 0
        """Times prefix affinity gave way to load (the balance thresholds tripped)."""
        self.seeds: dict[str, int] = {}
        """Rendezvous seed of each replica id: xxh64 of the id, the same in every gateway process."""
        self._pos: dict[str, int] = {}
        self._pos_of: Sequence[ReplicaView] | None = None
        """The list `_pos` was built from: rebuilt at most once per list, not once per unknown id."""

    def seed(self, replica_id: str) -> int:
        seed = self.seeds.get(replica_id)
        if seed is None:
            seed = self.seeds[replica_id] = xxhash.xxh64_intdigest(replica_id.encode())
        return seed

    def position(self, replicas: Sequence[ReplicaView], replica_id: str) -> int | None:
        """Index of `replica_id` in `replicas`. The pool's eligible list keeps its order between requests,
        so a cached map is almost always right; it is checked on every use and rebuilt when wrong."""
        i = self._pos.get(replica_id)
        if i is not None and i < len(replicas) and replicas[i].id == replica_id:
            return i
        if self._pos_of is not replicas:
            self._pos_of = replicas
            self._pos = {r.id: k for k, r in enumerate(replicas)}
            return self._pos.get(replica_id)
        return None

    def forget(self, replica_id: str) -> None:
        self.seeds.pop(replica_id, None)
        self._pos = {}
        self._pos_of = None
        self.index.forget(replica_id)


class Scorer(Protocol):
    """One routing signal. Stateless: per-router state lives in the `ScoreContext`."""

    name: str
    """Canonical name (AIBrix spelling); counters are keyed by it."""

    def score(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        """One value per replica, in order: a score in [0, 1] (higher is better) or `ABSTAIN`."""
        ...


class SparseScorer(Protocol):
    """A scorer that is 0 for most replicas (prefix-cache): it names only the others, by position."""

    name: str
    sparse: bool
    """True: the chain calls `score_sparse` instead of `score`."""

    def score_sparse(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> dict[int, float]:
        """Position in `replicas` -> score in (0, 1]; every other replica scores 0. Never abstains."""
        ...


class SoloStrategy(Protocol):
    """A strategy that ranks on its own and cannot be weighted with others."""

    name: str

    def rank(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[ReplicaView]: ...


def fresh_signals_cutoff(now: float, options: RoutingOptions) -> float:
    """Snapshots scraped before this instant are stale."""
    return now - options.stale_after_s
