"""Strategy strings (AIBrix #2124 syntax), weighted combination numbers, abstention and tie-breaks."""

from __future__ import annotations

import pytest

from policies.chain import DEFAULT_STRATEGY, StrategyError, compile_strategy, parse_strategy
from policies.router import make_router
from tests.test_policies_scorers import NOW, FakeReplica, ctx, req, sig


def test_weights_default_to_one_and_are_normalized() -> None:
    chain = parse_strategy("least-request:40,prefix-cache:60")
    assert chain.name == "least-request:40,prefix-cache:60"
    assert chain.weights == pytest.approx((0.4, 0.6))
    chain = parse_strategy("least-request:2,throughput,least-kv-cache")
    assert chain.weights == pytest.approx((0.5, 0.25, 0.25))


def test_whitespace_is_trimmed_and_zero_weights_drop_a_scorer() -> None:
    chain = parse_strategy("  least-request : 3 ,  throughput:0 , least-gpu-cache ")
    assert chain.name == "least-request:3,least-gpu-cache:1"
    assert [s.name for s in chain.scorers] == ["least-request", "least-kv-cache"]
    assert chain.weights == pytest.approx((0.75, 0.25))
    single = parse_strategy("prefix-cache:5,least-request:0")
    assert single.name == "prefix-cache" and single.weights == (1.0,)


@pytest.mark.parametrize(
    "value",
    [
        "nope",
        "pd",
        "least-request,pd",
        "slo-pack-load",
        "vtc-basic",
        "least-request:-1",
        "least-request:+1",
        "least-request:1.5",
        "least-request:1000001",
        "least-request:",
        "least-request:abc",
        "least-request,,throughput",
        "least-request,",
        ",",
        "",
        "   ",
        "least-request,least-request:2",
        "least-kv-cache,least-gpu-cache",
        "random,least-request",
        "least-request:3,power-of-two",
        "random:0,least-request",
        "least-request:0,throughput:0",
        "random:0",
        "Least-Request",
        "least-request:٣",
    ],
)
def test_every_invalid_string_is_rejected_whole(value: str) -> None:
    with pytest.raises(StrategyError):
        parse_strategy(value)
    with pytest.raises(StrategyError):
        compile_strategy(value)


def test_max_weight_and_solo_strategies_are_accepted() -> None:
    assert parse_strategy("least-request:1000000,throughput:0").name == "least-request"
    assert parse_strategy("random").solo is not None
    assert parse_strategy("power-of-two:7").name == "power-of-two"


def test_unsupported_names_are_marked_for_profile_loading() -> None:
    with pytest.raises(StrategyError) as info:
        parse_strategy("pd")
    assert info.value.unsupported
    with pytest.raises(StrategyError) as info:
        parse_strategy("pd,typo")
    assert not info.value.unsupported


def test_weighted_combination_numbers() -> None:
    chain = parse_strategy("least-request:1,least-kv-cache:3")
    reps = [
        FakeReplica("a", capacity=10, in_flight=2, signals=sig(kv_usage=0.6)),
        FakeReplica("b", capacity=10, in_flight=6, signals=sig(kv_usage=0.2)),
    ]
    scores = chain.scores(req(), reps, NOW, ctx())
    # a: 0.25 * 0.8 + 0.75 * 0.4 = 0.5 ; b: 0.25 * 0.4 + 0.75 * 0.8 = 0.7
    assert scores == pytest.approx([0.5, 0.7])
    assert [r.id for r in chain.rank(req(), reps, NOW, ctx())] == ["b", "a"]


def test_capacity_scaling_keeps_three_vs_four_requests_close() -> None:
    """AIBrix's min-max would turn 3 vs 4 running into 1 vs 0 and let load swamp a prefix match."""
    c = ctx()
    text = "S" * 1024 + "U" * 1024
    c.index.insert("warm", c.index.hashes(req(text)), NOW)
    chain = parse_strategy("least-request:40,prefix-cache:60")
    reps = [FakeReplica("warm", in_flight=4), FakeReplica("cold", in_flight=3)]
    scores = chain.scores(req("S" * 1024 + "V" * 1024), reps, NOW, c)
    assert scores == pytest.approx([0.4 * (1 - 4 / 64) + 0.6 * 0.5, 0.4 * (1 - 3 / 64)])
    assert chain.rank(req("S" * 1024 + "V" * 1024), reps, NOW, c)[0].id == "warm"


def test_abstention_is_neutral_and_counted_never_random() -> None:
    c = ctx()
    chain = parse_strategy("least-kv-cache:1,least-request:1")
    reps = [
        FakeReplica("a", signals=sig(kv_usage=0.2)),
        FakeReplica("b", signals=sig(kv_usage=0.6)),
        FakeReplica("unknown"),
        FakeReplica("stale", signals=sig(age_s=10.0, kv_usage=0.0)),
    ]
    scores = chain.scores(req(), reps, NOW, c)
    mean = (0.8 + 0.4 + 0.5) / 3
    assert scores == pytest.approx([0.5 * 0.8 + 0.5, 0.5 * 0.4 + 0.5, 0.5 * mean + 0.5, 0.5 * mean + 0.5])
    assert c.abstentions["least-kv-cache"] == 2
    # Nobody reports: the scorer is constant, the load decides.
    nobody = [FakeReplica("x", in_flight=5), FakeReplica("y", in_flight=1)]
    assert [r.id for r in chain.rank(req(), nobody, NOW, c)] == ["y", "x"]
    assert c.abstentions["least-kv-cache"] == 4


def test_ties_follow_the_prompt_rendezvous_hash_in_every_gateway() -> None:
    reps = [FakeReplica(f"r{i}") for i in range(6)]
    chain = parse_strategy("least-request")
    prompts = [f"prompt number {i} " * 20 for i in range(120)]
    firsts_a = [chain.rank(req(p), reps, NOW, ctx())[0].id for p in prompts]
    # An independent router (another gateway replica) makes the same choices...
    other = make_router(None, "least-request")
    firsts_b = [other.select(req(p), reps, NOW).ranked[0].id for p in prompts]
    assert firsts_a == firsts_b
    # ...that still spread over every replica.
    assert set(firsts_a) == {r.id for r in reps}
    # Replica order in the input does not matter.
    assert chain.rank(req(prompts[0]), list(reversed(reps)), NOW, ctx())[0].id == firsts_a[0]


def test_ties_without_any_key_are_broken_at_random() -> None:
    reps = [FakeReplica(f"r{i}") for i in range(4)]
    chain = parse_strategy("least-request")
    firsts = {chain.rank(req(""), reps, NOW, ctx())[0].id for _ in range(200)}
    assert len(firsts) > 1


def test_prefix_cache_alone_breaks_equal_matches_by_load() -> None:
    chain = parse_strategy("prefix-cache")
    reps = [FakeReplica("a", in_flight=9), FakeReplica("b", in_flight=2), FakeReplica("c", in_flight=5)]
    assert [r.id for r in chain.rank(req("new prompt " * 40), reps, NOW, ctx())] == ["b", "c", "a"]


def test_default_chain_includes_prefix_and_load() -> None:
    names = [s.name for s in parse_strategy(DEFAULT_STRATEGY).scorers]
    assert "prefix-cache" in names and "least-request" in names


def test_rank_returns_every_replica_once() -> None:
    reps = [FakeReplica(f"r{i}", in_flight=i % 3) for i in range(100)]
    for strategy in ("random", "power-of-two", DEFAULT_STRATEGY, "session-affinity", "least-latency"):
        ranked = parse_strategy(strategy).rank(req("x" * 300, session_id="s"), reps, NOW, ctx())
        assert sorted(r.id for r in ranked) == sorted(r.id for r in reps), strategy
