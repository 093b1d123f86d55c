"""The router of one pool: profile, strategy precedence, rate limit, ranking, prefix memory.

Strategy precedence: the profile file's `lockedRoutingStrategy`, then the `routing-strategy` header, then
the resolved profile's `routingStrategy`, then the pool's default (built in: `chain.DEFAULT_STRATEGY`).
The profile is the `config-profile` header's (`auto`: the most specific whose hints match), else the file's
`defaultProfile`.
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import Decision, ReplicaView, RouteRequest, RoutingError
from policies.chain import (
    DEFAULT_STRATEGY,
    SCORER_NAMES,
    Chain,
    StrategyError,
    compile_strategy,
    parse_strategy,
)
from policies.options import RoutingOptions
from policies.prefix_index import PrefixIndex
from policies.profiles import Profile, ProfileSet
from policies.rate_limit import TokenBucket
from policies.scorer import ScoreContext

ERROR_HEADER = ("x-error-routing", "true")


def strategy_error(value: str) -> RoutingError:
    """AIBrix's answer to a bad strategy: 400 `incorrect routing strategy <value>`, `x-error-routing`."""
    return RoutingError(
        400,
        f"incorrect routing strategy {value}",
        headers=(ERROR_HEADER,),
        code="invalid_routing_strategy",
        param="routing-strategy",
    )


class ChainRouter:
    """Satisfies `policies.base.Router`, plus `set_profiles` for reloads."""

    def __init__(
        self,
        profiles: ProfileSet | None,
        default_strategy: str | None,
        options: RoutingOptions | None = None,
    ) -> None:
        self.options = options or RoutingOptions()
        self.ctx = ScoreContext(self.options)
        self.default = parse_strategy(default_strategy or DEFAULT_STRATEGY)
        for name in SCORER_NAMES:
            self.ctx.abstentions.setdefault(name, 0)
        self.profiles: ProfileSet | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self.set_profiles(profiles)

    @property
    def abstentions(self) -> dict[str, int]:
        """Replica-abstentions per scorer since start (a scorer without a fresh signal for a replica)."""
        return self.ctx.abstentions

    @property
    def affinity_yields(self) -> int:
        """Times prefix affinity gave way to load."""
        return self.ctx.yields

    @property
    def index(self) -> PrefixIndex:
        """The pool's prefix index (introspection: `entries()`, `distinct_blocks()`)."""
        return self.ctx.index

    def set_profiles(self, profiles: ProfileSet | None) -> None:
        """Swap in a new profile file; rate-limit state carries over for unchanged rates."""
        buckets: dict[str, TokenBucket] = {}
        if profiles is not None:
            for profile in profiles.profiles.values():
                old = self._buckets.get(profile.name)
                if profile.requests_per_second > 0:
                    if old is not None and old.rate == profile.requests_per_second:
                        buckets[profile.name] = old
                    else:
                        buckets[profile.name] = TokenBucket(profile.requests_per_second, float("-inf"))
        self._buckets = buckets
        self.profiles = profiles

    def select(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        profiles = self.profiles
        profile: Profile | None = None
        chain: Chain | None = None
        if profiles is not None:
            profile = profiles.resolve(req)
            if profiles.locked is not None:
                if profiles.locked_refusal is not None:
                    raise strategy_error(profiles.locked)
                chain = profiles.locked_chain
        if chain is None:
            header = req.strategy_header
            if header and not header.isspace():
                try:
                    chain = compile_strategy(header)
                except StrategyError:
                    raise strategy_error(header) from None
            elif profile is not None and profile.strategy is not None:
                if profile.refusal is not None:
                    raise strategy_error(profile.strategy)
                chain = profile.chain
        if chain is None:
            chain = self.default
        if profile is not None and profile.requests_per_second > 0:
            bucket = self._buckets.get(profile.name)
            if bucket is not None and not bucket.take(now):
                raise RoutingError(
                    429,
                    f"profile {profile.name!r} allows {profile.requests_per_second:g} requests per second",
                    error_type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers=(("retry-after", str(bucket.retry_after_s())),),
                )
        ranked = chain.rank(req, replicas, now, self.ctx)
        return Decision(ranked=ranked, strategy=chain.name, profile=profile.name if profile else None)

    def on_dispatch(self, req: RouteRequest, replica: ReplicaView, now: float) -> None:
        index = self.ctx.index
        hashes = index.hashes(req)
        if hashes:
            index.insert(replica.id, hashes, now, replica.signals)

    def forget(self, replica_id: str) -> None:
        self.ctx.forget(replica_id)


def make_router(
    profiles: ProfileSet | None,
    default_strategy: str | None,
    options: RoutingOptions | None = None,
) -> ChainRouter:
    """The router of one pool. Raises StrategyError (a ValueError) for an invalid `default_strategy`."""
    return ChainRouter(profiles, default_strategy, options)
