"""Strategy strings (AIBrix #2124 syntax), weights, score combination and the tie-break.

`name[:weight]` items separated by commas, e.g. `least-request:40,prefix-cache:60`. Weight: an integer in
0..1,000,000, default 1; 0 drops the item; weights are normalized by their sum. Whitespace around names
and weights is trimmed. Any invalid item invalidates the whole string (the request gets 400): an unknown
or unimplemented name, a bad weight, an empty item, a duplicate, nothing left after dropping zeros, or
`random` / `power-of-two` together with anything else.

Combination: `score_i = sum_j w_j * s_ij` with each s_ij in [0, 1]. A scorer that abstains for a replica
gives it a neutral score: the mean of the scores it did give, shrunk toward 0.5 by one pseudo-observation
(`(sum + 0.5) / (k + 1)`, so one lone report does not make the signal inert; 0.5 when none). Never random.
Ranking: best first; equal best scores are ordered by a rendezvous hash of the request's prefix key (so
independent gateway replicas pick the same replica for the same prompt), then at random.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from operator import itemgetter
from typing import Final, cast

from policies import rendezvous
from policies.base import ReplicaView, RouteRequest
from policies.least_kv_cache import LeastKvCacheScorer
from policies.least_latency import LeastLatencyScorer
from policies.least_request import LeastRequestScorer
from policies.least_utilization import LeastUtilizationScorer
from policies.power_of_two import PowerOfTwoStrategy
from policies.prefix_cache import PrefixCacheScorer
from policies.random_choice import RandomStrategy
from policies.scorer import ScoreContext, Scorer, SoloStrategy, SparseScorer
from policies.session_affinity import SessionAffinityScorer
from policies.throughput import ThroughputScorer

MAX_WEIGHT: Final = 1_000_000
_least_kv = LeastKvCacheScorer()
_LEAST_REQUEST = LeastRequestScorer()
SCORERS: dict[str, Scorer | SparseScorer] = {
    "least-request": _LEAST_REQUEST,
    "least-kv-cache": _least_kv,
    "least-gpu-cache": _least_kv,
    "prefix-cache": PrefixCacheScorer(),
    "least-utilization": LeastUtilizationScorer(),
    "least-latency": LeastLatencyScorer(),
    "throughput": ThroughputScorer(),
    "session-affinity": SessionAffinityScorer(),
}
"""Weighable scorers by the names AIBrix spells (`least-gpu-cache` is an alias of `least-kv-cache`)."""
SOLO: dict[str, SoloStrategy] = {"random": RandomStrategy(), "power-of-two": PowerOfTwoStrategy()}
"""Strategies that cannot be combined with others."""
UNSUPPORTED = frozenset(
    {"pd", "vtc-basic", "least-busy-time", "least-load", "load-balance", "pack-load", "lora-affinity"}
)
"""AIBrix strategies this gateway does not implement (as well as every `slo*`): a request naming one gets
400; a profile file naming one still loads, with a warning."""
DEFAULT_STRATEGY = "prefix-cache:3,least-request:2,least-kv-cache:1"
"""Prefix affinity has the largest single weight (a warm cache saves most of a prefill), the two load
signals together weigh as much: the gateway's own count is always current, KV usage adds what other
gateways and long prompts put on the engine. Hot spots are bounded by the balance thresholds."""
SCORER_NAMES = tuple(dict.fromkeys([s.name for s in SCORERS.values()] + list(SOLO)))


class StrategyError(ValueError):
    """An invalid strategy string. `unsupported`: only known-but-unimplemented AIBrix names were wrong."""

    def __init__(self, value: str, reason: str, *, unsupported: bool = False) -> None:
        super().__init__(f"incorrect routing strategy {value}: {reason}")
        self.value = value
        self.reason = reason
        self.unsupported = unsupported


def is_unsupported(name: str) -> bool:
    return name in UNSUPPORTED or name.startswith("slo")


class Chain:
    """A validated strategy: either one solo strategy or weighted scorers. Immutable, shared."""

    __slots__ = (
        "dense",
        "dense_weights",
        "least_request_weight",
        "name",
        "scorers",
        "solo",
        "sparse",
        "tiebreak",
        "weights",
    )

    def __init__(
        self,
        name: str,
        scorers: Sequence[Scorer | SparseScorer] = (),
        weights: Sequence[float] = (),
        solo: SoloStrategy | None = None,
    ) -> None:
        self.name = name
        """Canonical text (items trimmed, zero weights dropped): echoed as the `routing-strategy` header."""
        self.scorers = tuple(scorers)
        self.weights = tuple(weights)
        self.solo = solo
        dense: list[Scorer] = []
        dense_weights: list[float] = []
        sparse: list[tuple[SparseScorer, float]] = []
        for scorer, weight in zip(self.scorers, self.weights, strict=True):
            if getattr(scorer, "sparse", False):
                sparse.append((cast("SparseScorer", scorer), weight))
            else:
                dense.append(cast("Scorer", scorer))
                dense_weights.append(weight)
        # least-request never abstains and is cheap to inline: it is folded into the final combining pass
        # (one pass less over every replica on every request) instead of producing its own list.
        self.least_request_weight = 0.0
        if _LEAST_REQUEST in dense:
            k = dense.index(_LEAST_REQUEST)
            dense.pop(k)
            self.least_request_weight = dense_weights.pop(k)
        self.dense = tuple(dense)
        self.dense_weights = tuple(dense_weights)
        self.sparse = tuple(sparse)
        self.tiebreak: Scorer | None = None
        if len(self.scorers) == 1:
            self.tiebreak = getattr(self.scorers[0], "single_tiebreak", None)

    def scores(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[float]:
        """Combined score per replica (weighted chains only)."""
        n = len(replicas)
        lists: list[list[float]] = []
        for scorer in self.dense:
            s = scorer.score(req, replicas, now, ctx)
            abstained = sum(1 for x in s if x != x)  # NaN: abstained
            if abstained:
                s = _neutral(s, abstained, n)
                ctx.abstentions[scorer.name] = ctx.abstentions.get(scorer.name, 0) + abstained
            lists.append(s)
        wl = self.least_request_weight
        if self.tiebreak is not None:
            combined = [1e-6 * x for x in self.tiebreak.score(req, replicas, now, ctx)]
        elif wl:
            # w * (1 - in_flight / capacity), as LeastRequestScorer, fused with the other scorers' sum.
            if not lists:
                combined = [
                    wl * (1.0 - f / c) if (f := r.in_flight) < (c := r.capacity) else 0.0 for r in replicas
                ]
            else:
                rest = _combine(lists, self.dense_weights) if len(lists) > 1 else None
                if rest is None:
                    w1 = self.dense_weights[0]
                    combined = [
                        (wl * (1.0 - f / c) if (f := r.in_flight) < (c := r.capacity) else 0.0) + w1 * x
                        for r, x in zip(replicas, lists[0], strict=False)
                    ]
                else:
                    combined = [
                        (wl * (1.0 - f / c) if (f := r.in_flight) < (c := r.capacity) else 0.0) + x
                        for r, x in zip(replicas, rest, strict=False)
                    ]
        elif lists:
            combined = _combine(lists, self.dense_weights)
        else:
            combined = [0.0] * n
        for sparse, w in self.sparse:
            for i, value in sparse.score_sparse(req, replicas, now, ctx).items():
                combined[i] += w * value
        return combined

    def rank(
        self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float, ctx: ScoreContext
    ) -> list[ReplicaView]:
        n = len(replicas)
        if n < 2:
            return list(replicas)
        if self.solo is not None:
            return self.solo.rank(req, replicas, now, ctx)
        combined = self.scores(req, replicas, now, ctx)
        order = sorted(range(n), key=combined.__getitem__, reverse=True)
        best = combined[order[0]]
        if combined[order[1]] == best:
            tied = combined.count(best)
            order[:tied] = _break_ties(req, replicas, order[:tied], ctx)
        return list(itemgetter(*order)(replicas))


def _combine(lists: list[list[float]], weights: tuple[float, ...]) -> list[float]:
    """sum_j w_j * s_ij in one pass for the usual chain lengths (each pass over 512 replicas costs)."""
    if len(lists) == 1:
        w = weights[0]
        return list(lists[0]) if w == 1.0 else [w * x for x in lists[0]]
    if len(lists) == 2:
        w1, w2 = weights
        return [w1 * a + w2 * b for a, b in zip(*lists, strict=False)]
    if len(lists) == 3:
        w1, w2, w3 = weights
        return [w1 * a + w2 * b + w3 * c for a, b, c in zip(*lists, strict=False)]
    if len(lists) == 4:
        w1, w2, w3, w4 = weights
        return [w1 * a + w2 * b + w3 * c + w4 * d for a, b, c, d in zip(*lists, strict=False)]
    combined = [weights[0] * x for x in lists[0]]
    for w, s in zip(weights[1:], lists[1:], strict=True):
        combined = [c + w * x for c, x in zip(combined, s, strict=False)]
    return combined


_FULL_ORDER_TIES: Final = 64
"""Up to this many tied replicas get a full rendezvous order; beyond, only the winner moves first."""


def _break_ties(
    req: RouteRequest, replicas: Sequence[ReplicaView], tied: list[int], ctx: ScoreContext
) -> list[int]:
    key = ctx.index.prefix_key(req)
    if key is None:
        if req.session_id:
            kb = rendezvous.key_bytes(req.session_id)
        else:
            if len(tied) <= _FULL_ORDER_TIES:
                random.shuffle(tied)
            else:
                _swap_first(tied, random.randrange(len(tied)))
            return tied
    else:
        kb = rendezvous.key_bytes(key)
    if len(tied) <= _FULL_ORDER_TIES:
        return rendezvous.order(kb, replicas, tied, ctx)
    w = rendezvous.weights(kb, replicas, tied, ctx)
    _swap_first(tied, w.index(max(w)))
    return tied


def _swap_first(items: list[int], k: int) -> None:
    items.insert(0, items.pop(k))


def _neutral(scores: list[float], abstained: int, n: int) -> list[float]:
    if abstained == n:
        return [0.5] * n
    known = [x for x in scores if x == x]
    neutral = (sum(known) + 0.5) / (len(known) + 1)
    return [x if x == x else neutral for x in scores]


_CACHE: Final[dict[str, Chain | StrategyError]] = {}
_CACHE_MAX: Final = 1024
"""Strategy strings come from a client header: the memo is bounded (cleared when full)."""


def compile_strategy(value: str) -> Chain:
    """`parse_strategy`, memoised per string (errors too, so a bad header costs one dict probe)."""
    hit = _CACHE.get(value)
    if hit is None:
        try:
            hit = parse_strategy(value)
        except StrategyError as exc:
            hit = exc
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[value] = hit
    if isinstance(hit, StrategyError):
        raise StrategyError(hit.value, hit.reason, unsupported=hit.unsupported)
    return hit


def parse_strategy(value: str) -> Chain:
    """Validate a strategy string into a Chain, or raise StrategyError naming what is wrong."""
    text = value.strip()
    if not text:
        raise StrategyError(value, "empty strategy")
    items: list[tuple[str, int]] = []
    seen: set[str] = set()
    unsupported_only = True
    problems: list[str] = []
    for raw in text.split(","):
        name, sep, weight_text = raw.partition(":")
        name = name.strip()
        if not name:
            problems.append("empty item")
            unsupported_only = False
            continue
        weight = 1
        if sep:
            weight_text = weight_text.strip()
            if not weight_text.isdigit() or not weight_text.isascii():
                problems.append(f"weight of {name!r} must be an integer in 0..{MAX_WEIGHT}")
                unsupported_only = False
                continue
            weight = int(weight_text)
            if weight > MAX_WEIGHT:
                problems.append(f"weight of {name!r} must be an integer in 0..{MAX_WEIGHT}")
                unsupported_only = False
                continue
        if name not in SCORERS and name not in SOLO:
            if is_unsupported(name):
                problems.append(f"{name!r} is not implemented by this gateway")
            else:
                problems.append(f"unknown strategy {name!r}")
                unsupported_only = False
            continue
        canonical = SCORERS[name].name if name in SCORERS else name
        if canonical in seen:
            problems.append(f"{name!r} appears twice")
            unsupported_only = False
            continue
        seen.add(canonical)
        items.append((name, weight))
    if problems:
        raise StrategyError(value, "; ".join(problems), unsupported=unsupported_only)
    solo_names = [name for name, _ in items if name in SOLO]
    if solo_names and len(items) > 1:
        raise StrategyError(value, f"{solo_names[0]!r} cannot be combined with other strategies")
    kept = [(name, w) for name, w in items if w > 0]
    if not kept:
        raise StrategyError(value, "every weight is 0")
    if len(kept) == 1:
        name = kept[0][0]
        if name in SOLO:
            return Chain(name, solo=SOLO[name])
        return Chain(name, [SCORERS[name]], [1.0])
    total = float(sum(w for _, w in kept))
    return Chain(
        ",".join(f"{name}:{w}" for name, w in kept),
        [SCORERS[name] for name, _ in kept],
        [w / total for _, w in kept],
    )
