"""The router's memory of prefixes: affinity after dispatch, forgetting, TTL, and bounded memory."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from policies.base import EngineSignals
from policies.chain import StrategyError
from policies.options import RoutingOptions
from policies.prefix_index import PrefixIndex, block_hashes
from policies.router import make_router
from tests.test_policies_scorers import NOW, FakeReplica, req


def chat(system: int, user: int, turns: int = 1) -> str:
    head = f"<|system|>You are assistant number {system}. " + "Be helpful and precise. " * 40
    return head + "".join(f"<|user|>user {user} turn {t}: " + "tell me more. " * 12 for t in range(turns))


def test_block_hashes_are_chained_and_ignore_the_partial_tail() -> None:
    a = block_hashes("x" * 300, 128, 100)
    assert len(a) == 2
    b = block_hashes("x" * 256 + "y" * 40, 128, 100)
    assert a == b
    c = block_hashes("y" * 128 + "x" * 128, 128, 100)
    assert c[1] != a[1]  # same second block, different prefix: different hash
    assert len(block_hashes("é" * 128, 128, 100)) == 2  # bytes of UTF-8, not characters
    assert len(block_hashes("x" * 10_000, 128, 5)) == 5


def test_hashes_are_memoised_per_request() -> None:
    index = PrefixIndex(RoutingOptions())
    r = req("x" * 1000)
    assert index.hashes(r) is index.hashes(r)


def test_repeated_prefix_goes_back_to_the_same_replica() -> None:
    router = make_router(None, None)
    reps = [FakeReplica(f"r{i}") for i in range(8)]
    homes = {}
    for system in range(4):
        first = req(chat(system, 0))
        decision = router.select(first, reps, NOW)
        router.on_dispatch(first, decision.ranked[0], NOW)
        homes[system] = decision.ranked[0].id
    for system in range(4):
        for user in range(1, 5):
            follow = req(chat(system, user, turns=2))
            assert router.select(follow, reps, NOW + 1).ranked[0].id == homes[system]


def test_a_saturated_replica_is_avoided_despite_its_cache() -> None:
    router = make_router(None, None)
    reps = [FakeReplica("warm"), FakeReplica("cold")]
    first = req(chat(1, 0))
    router.on_dispatch(first, reps[0], NOW)
    assert router.select(req(chat(1, 1)), reps, NOW).ranked[0].id == "warm"
    reps[0].in_flight = 40
    assert router.select(req(chat(1, 2)), reps, NOW).ranked[0].id == "cold"
    assert router.affinity_yields == 1
    # Saturated by other gateways (engine queue), not by us: avoided too.
    reps[0].in_flight = 0
    reps[0].signals = EngineSignals(scraped_at=NOW, running=64.0, waiting=30.0, kv_usage=0.99)
    assert router.select(req(chat(1, 3)), reps, NOW).ranked[0].id == "cold"


def test_forget_drops_a_replica_and_frees_its_slot() -> None:
    router = make_router(None, None)
    index = router.ctx.index
    reps = [FakeReplica("a"), FakeReplica("b")]
    r = req(chat(1, 0))
    router.on_dispatch(r, reps[0], NOW)
    assert index.match(index.hashes(r), NOW) == {"a": len(index.hashes(r))}
    router.forget("a")
    assert index.match(index.hashes(r), NOW) == {}
    assert index.entries() == 0 and index.distinct_blocks() == 0
    router.on_dispatch(r, reps[1], NOW)
    assert set(index.match(index.hashes(r), NOW)) == {"b"}


def test_entries_expire_after_the_ttl() -> None:
    index = PrefixIndex(RoutingOptions(index_ttl_s=10.0))
    old = req(chat(1, 0))
    index.insert("a", index.hashes(old), NOW)
    assert index.match(index.hashes(old), NOW + 9)["a"] == len(index.hashes(old))
    assert index.match(index.hashes(old), NOW + 11) == {}
    # Refreshing the shared head keeps it, while the old tail has expired.
    shared = req(chat(1, 1))
    index.insert("a", index.hashes(shared), NOW + 11)
    matched = index.match(index.hashes(old), NOW + 12)["a"]
    assert 0 < matched < len(index.hashes(old))
    # Expired entries leave on the next insert.
    index.insert("a", index.hashes(req(chat(2, 0))), NOW + 100)
    assert index.entries() == len(index.hashes(req(chat(2, 0))))


def test_recency_has_a_one_second_resolution() -> None:
    """A hot prompt re-dispatched within a second is not touched again; after that it is refreshed."""
    index = PrefixIndex(RoutingOptions(index_ttl_s=10.0))
    hot = index.hashes(req(chat(1, 0)))
    index.insert("a", hot, NOW)
    index.insert("a", hot, NOW + 0.5)
    assert index.match(hot, NOW + 10.2) == {}  # recency stayed at NOW: expired 10 s after it
    index.insert("a", hot, NOW + 20)
    index.insert("a", hot, NOW + 21.5)
    assert index.match(hot, NOW + 31) == {"a": len(hot)}  # refreshed at NOW + 21.5
    # A longer prompt sharing the hot head is inserted in full even while the head is fresh.
    longer = index.hashes(req(chat(1, 0, turns=2)))
    assert longer[: len(hot)] == hot
    index.insert("a", longer, NOW + 21.7)
    assert index.match(longer, NOW + 22) == {"a": len(longer)}


def test_capacity_follows_the_engine_kv_size_and_evicts_tails_first() -> None:
    index = PrefixIndex(RoutingOptions())
    small = EngineSignals(scraped_at=NOW, num_gpu_blocks=64, block_size=16)  # 1024 tokens ~ 4096 bytes
    assert index.capacity(small) == 32
    for user in range(20):
        index.insert("a", index.hashes(req(chat(1, user))), NOW + user, small)
    assert index.replica_entries("a") <= 32
    # The shared system prompt (the head of every request) survived; old users' tails did not.
    head = req(chat(1, 99))
    assert index.match(index.hashes(head), NOW + 30)["a"] >= 7


def test_memory_stays_bounded_over_a_million_distinct_prompts() -> None:
    """production-stack's prefix trie never evicted (their OOM, issue #687); this index must not grow."""
    options = RoutingOptions(index_blocks_per_replica=4096, index_total_blocks=8192)
    index = PrefixIndex(options)
    replicas = ("a", "b", "c", "d")
    mask = 0xFFFFFFFFFFFFFFFF
    for i in range(850_000):
        index.insert(replicas[i & 3], ((i * 0x9E3779B97F4A7C15) & mask,), NOW)
    assert index.entries() <= 8192 and index.distinct_blocks() <= 8192
    gc.collect()
    tracemalloc.start()
    try:
        # Everything traced from here on replaces what the index held: what stays is one index's worth.
        for i in range(850_000, 1_000_000):
            index.insert(replicas[i & 3], ((i * 0x9E3779B97F4A7C15) & mask,), NOW)
            if i == 900_000:
                gc.collect()
                middle, _ = tracemalloc.get_traced_memory()
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.entries() <= 8192 and index.distinct_blocks() <= 8192
    assert end < 8192 * 512  # under 4 MiB for 8,192 remembered blocks
    assert end - middle < 64 * 1024  # no growth while 100,000 more distinct prompts pass


def test_an_invalid_default_strategy_fails_at_start() -> None:
    with pytest.raises(StrategyError):
        make_router(None, "least-request:1,pd")
    with pytest.raises(ValueError):
        make_router(None, "random,least-request")


def test_abstentions_are_plain_ints_per_scorer() -> None:
    router = make_router(None, "least-kv-cache:1,least-request:1")
    router.select(req("x"), [FakeReplica("a"), FakeReplica("b")], NOW)
    assert router.abstentions["least-kv-cache"] == 2
    assert all(isinstance(v, int) for v in router.abstentions.values())
    assert set(router.abstentions) >= {"least-request", "prefix-cache", "least-latency", "session-affinity"}
