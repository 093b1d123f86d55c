"""Every scorer on hand-built replica snapshots, including missing and stale engine signals."""

from __future__ import annotations

import math

import pytest

from policies.base import EngineSignals, RouteRequest
from policies.chain import SCORERS
from policies.options import RoutingOptions
from policies.power_of_two import PowerOfTwoStrategy
from policies.prefix_cache import PLACEMENT_WEIGHT
from policies.random_choice import RandomStrategy
from policies.scorer import ABSTAIN, ScoreContext

NOW = 1000.0


class FakeReplica:
    """What `policies.base.ReplicaView` promises, as plain attributes."""

    def __init__(
        self,
        replica_id: str,
        *,
        capacity: int = 64,
        in_flight: int = 0,
        outstanding_tokens: int = 0,
        signals: EngineSignals | None = None,
        ttft: float | None = None,
        itl: float | None = None,
    ) -> None:
        self.id = replica_id
        self.capacity = capacity
        self.in_flight = in_flight
        self.outstanding_tokens = outstanding_tokens
        self.signals = signals
        self.ttft_ewma_s = ttft
        self.itl_ewma_s = itl


def sig(age_s: float = 0.0, **fields: float) -> EngineSignals:
    return EngineSignals(scraped_at=NOW - age_s, **fields)  # type: ignore[arg-type]


def ctx(**options: float) -> ScoreContext:
    return ScoreContext(RoutingOptions(**options))  # type: ignore[arg-type]


def req(text: str = "", **kw: object) -> RouteRequest:
    return RouteRequest("m", text, **kw)  # type: ignore[arg-type]


def is_abstain(x: float) -> bool:
    return math.isnan(x)


def test_least_request_scales_by_capacity_so_small_differences_stay_small() -> None:
    reps = [
        FakeReplica("a", in_flight=3),
        FakeReplica("b", in_flight=4),
        FakeReplica("c", capacity=4, in_flight=4),
    ]
    scores = SCORERS["least-request"].score(req(), reps, NOW, ctx())
    assert scores == pytest.approx([1 - 3 / 64, 1 - 4 / 64, 0.0])
    assert scores[0] - scores[1] == pytest.approx(1 / 64)


@pytest.mark.parametrize("name", ["least-kv-cache", "least-gpu-cache"])
def test_least_kv_cache_reads_usage_and_abstains_without_fresh_signal(name: str) -> None:
    reps = [
        FakeReplica("fresh", signals=sig(kv_usage=0.25)),
        FakeReplica("none"),
        FakeReplica("stale", signals=sig(age_s=6.0, kv_usage=0.0)),
        FakeReplica("unreported", signals=sig(running=3.0)),
        FakeReplica("edge", signals=sig(age_s=5.0, kv_usage=1.0)),
    ]
    scores = SCORERS[name].score(req(), reps, NOW, ctx())
    assert scores[0] == pytest.approx(0.75)
    assert [is_abstain(s) for s in scores] == [False, True, True, True, False]
    assert scores[4] == 0.0


def test_least_kv_cache_floors_a_stale_looking_usage_with_the_gateways_own_tokens() -> None:
    """A burst dispatched since the last scrape counts at once (no herd onto the emptiest-looking one)."""
    cache = {"num_gpu_blocks": 100, "block_size": 16}  # 1,600 tokens of KV
    reps = [
        FakeReplica("burst", outstanding_tokens=1200, signals=sig(kv_usage=0.1, **cache)),
        FakeReplica("quiet", outstanding_tokens=0, signals=sig(kv_usage=0.3, **cache)),
        FakeReplica("overfull", outstanding_tokens=5000, signals=sig(kv_usage=0.1, **cache)),
    ]
    assert SCORERS["least-kv-cache"].score(req(), reps, NOW, ctx()) == pytest.approx([0.25, 0.7, 0.0])


def test_staleness_threshold_is_configurable() -> None:
    reps = [FakeReplica("a", signals=sig(age_s=2.0, kv_usage=0.5))]
    assert is_abstain(SCORERS["least-kv-cache"].score(req(), reps, NOW, ctx(stale_after_s=1.0))[0])
    assert SCORERS["least-kv-cache"].score(req(), reps, NOW, ctx(stale_after_s=3.0))[0] == 0.5


def test_least_utilization_counts_waiting_and_floors_with_gateway_in_flight() -> None:
    reps = [
        FakeReplica("half", signals=sig(running=8.0, waiting=0.0, max_num_seqs=16.0)),
        FakeReplica("queued", signals=sig(running=16.0, waiting=4.0, max_num_seqs=16.0)),
        FakeReplica("burst", in_flight=12, signals=sig(running=4.0, max_num_seqs=16.0)),
        FakeReplica("nolimit", signals=sig(running=4.0)),
        FakeReplica("stale", signals=sig(age_s=60.0, running=0.0, max_num_seqs=16.0)),
    ]
    scores = SCORERS["least-utilization"].score(req(), reps, NOW, ctx())
    assert scores[:3] == pytest.approx([0.5, 0.0, 0.25])
    assert is_abstain(scores[3]) and is_abstain(scores[4])


def test_least_latency_is_relative_to_the_best_measured_replica() -> None:
    reps = [
        FakeReplica("fast", ttft=0.1, itl=0.01),
        FakeReplica("slow", ttft=0.3, itl=0.03),
        FakeReplica("new"),
    ]
    scores = SCORERS["least-latency"].score(req(max_tokens=10), reps, NOW, ctx())
    # predicted: 0.1 + 0.01*10 = 0.2 ; 0.3 + 0.03*10 = 0.6
    assert scores[:2] == pytest.approx([1.0, 0.2 / 0.6])
    assert is_abstain(scores[2])
    none_measured = SCORERS["least-latency"].score(req(), [FakeReplica("x"), FakeReplica("y")], NOW, ctx())
    assert all(is_abstain(s) for s in none_measured)


def test_throughput_scores_outstanding_tokens_against_the_token_budget() -> None:
    reps = [
        FakeReplica("light", capacity=4, outstanding_tokens=1000),
        FakeReplica("heavy", capacity=4, outstanding_tokens=2000),
        FakeReplica("over", capacity=1, outstanding_tokens=10_000),
    ]
    scores = SCORERS["throughput"].score(req(), reps, NOW, ctx(tokens_per_slot=1000))
    assert scores == pytest.approx([0.75, 0.5, 0.0])


def test_session_affinity_is_sticky_consistent_and_load_bounded() -> None:
    reps = [FakeReplica(f"r{i}", capacity=8) for i in range(4)]
    scorer = SCORERS["session-affinity"]
    first = scorer.score(req(session_id="alice"), reps, NOW, ctx())
    assert sorted(first) == [0.0, 0.0, 0.0, 1.0]
    home = first.index(1.0)
    # Same answer from an independent router (another gateway process has its own context).
    assert scorer.score(req(session_id="alice"), reps, NOW, ctx()).index(1.0) == home
    # Sessions spread over the replicas.
    homes = {scorer.score(req(session_id=f"s{i}"), reps, NOW, ctx()).index(1.0) for i in range(64)}
    assert homes == {0, 1, 2, 3}
    # The home replica is full: the session moves, to the same place for everyone.
    reps[home].in_flight = 8
    moved = scorer.score(req(session_id="alice"), reps, NOW, ctx()).index(1.0)
    assert moved != home
    # Far above its fair share (bounded load), even with free slots: moves too.
    reps[home].in_flight = 6
    assert scorer.score(req(session_id="alice"), reps, NOW, ctx()).index(1.0) == moved
    # No session header: abstains everywhere.
    assert all(is_abstain(s) for s in scorer.score(req(), reps, NOW, ctx()))


def test_prefix_cache_scores_the_matched_fraction() -> None:
    c = ctx()
    reps = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
    system = "S" * 1024  # 8 blocks of 128 bytes
    first = req(system + "U" * 1024)  # 16 blocks
    c.index.insert("a", c.index.hashes(first), NOW)
    same_system = req(system + "V" * 1024)
    scores = SCORERS["prefix-cache"].score(same_system, reps, NOW, c)
    assert scores == pytest.approx([0.5, 0.0, 0.0])
    assert SCORERS["prefix-cache"].score(req(system + "U" * 1024), reps, NOW, c)[0] == 1.0
    # Shorter than one block: no signal, the same for everybody.
    assert SCORERS["prefix-cache"].score(req("hi"), reps, NOW, c) == [0.0, 0.0, 0.0]


def test_prefix_cache_below_cache_threshold_is_no_affinity() -> None:
    c = ctx(cache_threshold=0.6)
    reps = [FakeReplica("a"), FakeReplica("b")]
    c.index.insert("a", c.index.hashes(req("S" * 1024 + "U" * 1024)), NOW)
    # No affinity: the prompt is placed as a new prefix, where the cache has room.
    scores = SCORERS["prefix-cache"].score(req("S" * 1024 + "V" * 1024), reps, NOW, c)
    assert scores[0] < scores[1] == PLACEMENT_WEIGHT


def test_new_prefixes_go_where_the_cache_has_room() -> None:
    c = ctx()
    reps = [FakeReplica("full"), FakeReplica("half"), FakeReplica("empty")]
    for user in range(40):
        c.index.insert("full", c.index.hashes(req(f"user {user} " * 200)), NOW)
    for user in range(20):
        c.index.insert("half", c.index.hashes(req(f"other {user} " * 200)), NOW)
    scores = SCORERS["prefix-cache"].score(req("a brand new prompt " * 100), reps, NOW, c)
    assert scores[0] < scores[1] < scores[2] == PLACEMENT_WEIGHT
    assert max(scores) < 0.1  # below any match worth having
    # Nothing remembered anywhere yet: no placement signal at all.
    assert SCORERS["prefix-cache"].score(req("x" * 1000), reps, NOW, ctx()) == [0.0, 0.0, 0.0]


def test_prefix_affinity_yields_when_both_balance_thresholds_trip() -> None:
    c = ctx(balance_abs_threshold=4, balance_rel_threshold=1.5)
    text = "S" * 2048
    c.index.insert("hot", c.index.hashes(req(text)), NOW)
    scorer = SCORERS["prefix-cache"]
    # 5 more than the idlest (abs > 4) and 5 > 1.5 * 0: yields.
    reps = [FakeReplica("hot", in_flight=5), FakeReplica("idle", in_flight=0)]
    yielded = scorer.score(req(text), reps, NOW, c)
    assert yielded[0] < yielded[1] <= PLACEMENT_WEIGHT  # placed like a new prefix: no affinity left
    assert c.yields == 1
    # Absolute gap 5 but relative 25 vs 20 < 1.5x: keeps affinity.
    reps = [FakeReplica("hot", in_flight=25), FakeReplica("idle", in_flight=20)]
    assert scorer.score(req(text), reps, NOW, c)[0] == 1.0
    # Engine load (other gateways' requests) counts too, when the snapshot is fresh.
    reps = [FakeReplica("hot", signals=sig(running=30.0, waiting=10.0)), FakeReplica("idle")]
    assert scorer.score(req(text), reps, NOW, c)[0] < PLACEMENT_WEIGHT
    reps = [FakeReplica("hot", signals=sig(age_s=30.0, running=30.0)), FakeReplica("idle")]
    assert scorer.score(req(text), reps, NOW, c)[0] == 1.0


def test_random_ranks_every_replica_and_varies_the_first() -> None:
    reps = [FakeReplica(f"r{i}") for i in range(5)]
    firsts = set()
    for _ in range(200):
        ranked = RandomStrategy().rank(req(), reps, NOW, ctx())
        assert sorted(r.id for r in ranked) == [r.id for r in reps]
        firsts.add(ranked[0].id)
    assert len(firsts) == 5


def test_power_of_two_prefers_the_less_loaded_of_its_pair() -> None:
    reps = [FakeReplica("busy", in_flight=10), FakeReplica("idle", in_flight=1)]
    for _ in range(20):
        assert [r.id for r in PowerOfTwoStrategy().rank(req(), reps, NOW, ctx())] == ["idle", "busy"]
    many = [FakeReplica(f"r{i}", in_flight=i) for i in range(8)]
    ranked = PowerOfTwoStrategy().rank(req(), many, NOW, ctx())
    assert ranked[0].in_flight < ranked[1].in_flight
    assert len(ranked) == 8 and [r.in_flight for r in ranked[2:]] == sorted(r.in_flight for r in ranked[2:])


def test_abstain_marker_is_nan() -> None:
    assert math.isnan(ABSTAIN)
