"""The simulator's engine model in-process: prefix cache, KV eviction, queueing, preemption, abort."""

from __future__ import annotations

import asyncio

from gateway.sim.config import SimConfig
from gateway.sim.engine import FINISHED, Cluster, Engine, Seq
from gateway.sim.tokenizer import tokenize_text


def _seq(cfg: SimConfig, text: str, max_tokens: int = 4) -> Seq:
    return Seq(tokenize_text(text, cfg.chars_per_token, cfg.block_size), max_tokens, False, 0.0)


async def _run_instant(engine: Engine, seq: Seq) -> Seq:
    seq.arrival = engine.now()
    engine.submit(seq)
    while not seq.complete:
        await asyncio.wait_for(seq.progress(), 5)
    engine.release(seq, True)
    return seq


async def _done(seq: Seq, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while seq.state != FINISHED:
            await seq.progress()


def test_tokenizer_counts_four_chars_a_token_and_chains_block_hashes() -> None:
    a = tokenize_text("x" * 400, 4, 16)
    assert a.n_tokens == 100 and len(a.block_hashes) == 6
    b = tokenize_text("x" * 256 + "y" * 144, 4, 16)
    assert b.block_hashes[:4] == a.block_hashes[:4]
    assert b.block_hashes[4:] != a.block_hashes[4:]
    c = tokenize_text("y" * 64 + "x" * 336, 4, 16)
    assert c.block_hashes[1] != a.block_hashes[1], "a block's hash depends on everything before it"
    assert tokenize_text("", 4, 16).n_tokens == 1


async def test_repeated_prompt_hits_the_prefix_cache() -> None:
    cfg = SimConfig(instant=True)
    engine = Engine(cfg, 0)
    engine.start()
    first = await _run_instant(engine, _seq(cfg, "q" * 400))
    second = await _run_instant(engine, _seq(cfg, "q" * 400))
    assert first.cached_tokens == 0
    assert second.cached_tokens == 96, "6 full blocks of 16; the 100th token is always recomputed"
    assert engine.stats.prefix_queries == 200
    assert engine.stats.prefix_hits == 96
    assert engine.kv.used == 0, "blocks are free (but cached) once the answers are sent"


async def test_kv_pressure_evicts_least_recently_used_prefixes() -> None:
    cfg = SimConfig(instant=True, kv_blocks=12, block_size=4)
    engine = Engine(cfg, 0)
    engine.start()
    prompt_a = "a" * 64  # 16 tokens, 4 full blocks
    await _run_instant(engine, _seq(cfg, prompt_a, 1))
    again = await _run_instant(engine, _seq(cfg, prompt_a, 1))
    assert again.cached_tokens == 12
    for i in range(6):
        await _run_instant(engine, _seq(cfg, chr(ord("b") + i) * 64, 1))
    assert engine.kv.evictions > 0
    evicted = await _run_instant(engine, _seq(cfg, prompt_a, 1))
    assert evicted.cached_tokens == 0, "six other prompts pushed A's blocks out of a 12-block cache"
    assert engine.kv.used == 0


async def test_requests_beyond_max_num_seqs_wait_in_fifo_order() -> None:
    cfg = SimConfig(max_num_seqs=2, decode_ms_per_token=2.0)
    engine = Engine(cfg, 0)
    engine.start()
    try:
        seqs = [_seq(cfg, f"prompt {i}", 10) for i in range(5)]
        for seq in seqs:
            seq.arrival = engine.now()
            engine.submit(seq)
        await asyncio.sleep(0.01)
        assert len(engine.running) == 2
        assert len(engine.waiting) == 3
        for seq in seqs:
            await _done(seq)
        assert [s.generated for s in seqs] == [10] * 5
        starts = [s.scheduled_at for s in seqs]
        assert starts == sorted(starts), "admission is first come, first served"
        assert seqs[4].scheduled_at >= seqs[0].first_token_at
        assert engine.kv.used == 0 and not engine.running and not engine.waiting
    finally:
        await engine.stop()


async def test_kv_exhaustion_preempts_and_recomputes() -> None:
    cfg = SimConfig(kv_blocks=10, block_size=4, decode_ms_per_token=0.5)
    engine = Engine(cfg, 0)
    engine.start()
    try:
        seqs = [_seq(cfg, c * 32, 16) for c in "xy"]  # 8 prompt tokens each, 24 at the end: 6 blocks each
        for seq in seqs:
            seq.arrival = engine.now()
            engine.submit(seq)
        for seq in seqs:
            await _done(seq)
        assert engine.stats.preemptions >= 1
        assert [s.generated for s in seqs] == [16, 16]
        assert [s.finish_reason for s in seqs] == ["length", "length"]
        assert engine.kv.used == 0
    finally:
        await engine.stop()


async def test_abort_frees_slot_and_blocks_at_once() -> None:
    cfg = SimConfig(decode_ms_per_token=5.0)
    engine = Engine(cfg, 0)
    engine.start()
    try:
        seq = _seq(cfg, "z" * 400, 1000)
        seq.arrival = engine.now()
        engine.submit(seq)
        async with asyncio.timeout(5):
            while seq.generated < 2:
                await seq.progress()
        assert engine.kv.used > 0 and len(engine.running) == 1
        engine.release(seq, delivered=False)
        assert engine.kv.used == 0 and not engine.running
        assert engine.aborted == 1 and engine.stats.finished["abort"] == 1
    finally:
        await engine.stop()


async def test_cached_prefix_shortens_time_to_first_token() -> None:
    cfg = SimConfig(prefill_tokens_per_s=20000.0, decode_ms_per_token=1.0, prefill_overhead_ms=0.0)
    engine = Engine(cfg, 0)
    engine.start()
    try:
        ttfts = []
        for _ in range(2):
            seq = _seq(cfg, "p" * 16000, 1)  # 4000 tokens: 200 ms of prefill when uncached
            seq.arrival = engine.now()
            engine.submit(seq)
            await _done(seq)
            ttfts.append(seq.first_token_at - seq.arrival)
        assert ttfts[0] >= 0.2
        assert ttfts[1] < ttfts[0] / 2
    finally:
        await engine.stop()


async def test_data_parallel_spreads_requests_over_engines() -> None:
    cfg = SimConfig(data_parallel=2, decode_ms_per_token=2.0)
    cluster = Cluster(cfg)
    cluster.start()
    try:
        seqs = [_seq(cfg, f"p{i}", 5) for i in range(4)]
        for seq in seqs:
            cluster.submit(seq)
        assert [len(e.running) + len(e.waiting) for e in cluster.engines] == [2, 2]
        for seq in seqs:
            await _done(seq)
    finally:
        await cluster.stop()
