"""`prefix-cache`: send a prompt where its prefix is probably still cached, unless that replica is hot.

Score: `matched_blocks / prompt_blocks` from the prefix index (0 when below `cache_threshold`, or when the
prompt is shorter than one block: no signal, same score for all). Affinity yields to load like the SGLang
router's cache_aware policy, but per candidate instead of for the whole fleet: a matching replica whose
load `L = max(in_flight, running + waiting)` exceeds the least-loaded replica's by more than
`balance_abs_threshold` requests AND more than `balance_rel_threshold` times scores 0, so the load scorers
of the chain decide. A prompt with no usable match anywhere is a new prefix to place: every replica scores
`0.05 * (1 - fill)`, fill = remembered blocks / the replica's bound, so new prefixes go where the cache
has room (SGLang's "smallest tree") instead of piling onto whichever replica a stale metric favours;
0.05 keeps this below any real match. Used alone, ties go to the least-loaded replica first.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Final

from policies.base import ReplicaView, RouteRequest
from policies.least_request import LeastRequestScorer
from policies.scorer import ScoreContext

_in_flight = attrgetter("in_flight")
PLACEMENT_WEIGHT: Final = 0.05
"""Score span of the room-in-cache term for new prefixes: below any match worth having."""


class PrefixCacheScorer:
    name = "prefix-cache"
    sparse = True
    single_tiebreak = LeastRequestScorer()
    """Alone, prefix-cache breaks equal matches by load before the rendezvous hash."""

    def score(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        out = [0.0] * len(replicas)
        for i, value in self.score_sparse(req, replicas, now, ctx).items():
            out[i] = value
        return out

    def score_sparse(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> dict[int, float]:
        out: dict[int, float] = {}
        index = ctx.index
        hashes = index.hashes(req)
        if not hashes:
            return out
        matched = index.match(hashes, now)
        if not matched:
            return self._place(replicas, ctx, out)
        opts = ctx.options
        total = len(hashes)
        threshold = opts.cache_threshold
        least = -1.0  # computed only when some candidate is loaded enough to possibly be hot
        abs_threshold = opts.balance_abs_threshold
        cutoff = now - opts.stale_after_s
        for replica_id, depth in matched.items():
            frac = depth / total
            if frac < threshold:
                continue
            i = ctx.position(replicas, replica_id)
            if i is None:
                continue
            r = replicas[i]
            load = float(r.in_flight)
            s = r.signals
            if s is not None and s.scraped_at >= cutoff and s.running is not None:
                engine = s.running + (s.waiting or 0.0)
                if engine > load:
                    load = engine
            if load > abs_threshold:
                if least < 0.0:
                    least = float(min(map(_in_flight, replicas)))
                if load - least > abs_threshold and load > opts.balance_rel_threshold * least:
                    ctx.yields += 1
                    continue
            out[i] = frac
        if not out:
            return self._place(replicas, ctx, out)
        return out

    @staticmethod
    def _place(replicas: Sequence[ReplicaView], ctx: ScoreContext, out: dict[int, float]) -> dict[int, float]:
        fills = ctx.index.fills()
        if not fills:
            return out
        for i, r in enumerate(replicas):
            out[i] = PLACEMENT_WEIGHT * (1.0 - fills.get(r.id, 0.0))
        return out
