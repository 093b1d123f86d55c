"""The engine model: a running batch, a FIFO waiting queue, KV blocks with a prefix cache, a step loop.

Each step (like vLLM V1's scheduler) first gives every running sequence its share of the step's token
budget - one token for a decoding sequence, a chunk of its prompt for a prefilling one - growing its KV
blocks as needed and preempting the most recently admitted sequence (recompute) when blocks run out.
Then, if nothing was preempted, it admits waiting sequences in FIFO order while the batch has room, the
budget lasts and KV blocks suffice; an admitted sequence first looks its prompt up in the prefix cache,
which counts the queried and hit tokens. The step lasts

    decode_ms_per_token
    + (prefill_overhead_ms + prefill tokens / prefill_tokens_per_s, if the step prefills anything)
    + decode_batch_slowdown x decoding sequences
    + decode_ms_per_1k_context x (context tokens of the decoding sequences / 1000)

and at its end every sequence whose prompt is fully computed gets one more token. With `instant`, a
sequence gets all its tokens on admission and holds its slot and blocks until its answer has been sent.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from gateway.sim.config import SimConfig
from gateway.sim.prefix_cache import BlockTable, CachedBlock, PrefixCache
from gateway.sim.stats import EngineStats
from gateway.sim.tokenizer import Prompt

WAITING = 0
RUNNING = 1
FINISHED = 2


class SimError(Exception):
    """A request the engine refuses, with the HTTP status and error type the engine would use."""

    def __init__(self, status: int, message: str, error_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


class Seq:
    """One request's sequence. `generated` only grows; `complete` is set once the last token exists."""

    __slots__ = (
        "arrival",
        "cached_tokens",
        "complete",
        "computed",
        "ends_with_eos",
        "engine",
        "finish_reason",
        "first_token_at",
        "generated",
        "last_token_at",
        "max_tokens",
        "prompt",
        "prompt_len",
        "scheduled_at",
        "state",
        "table",
        "waiter",
    )

    def __init__(self, prompt: Prompt, max_tokens: int, ends_with_eos: bool, arrival: float) -> None:
        self.prompt = prompt
        self.prompt_len = prompt.n_tokens
        self.max_tokens = max_tokens
        self.ends_with_eos = ends_with_eos
        self.arrival = arrival
        self.scheduled_at = -1.0
        self.first_token_at = -1.0
        self.last_token_at = -1.0
        self.generated = 0
        self.computed = 0
        self.cached_tokens = 0
        self.complete = False
        self.finish_reason = ""
        self.state = WAITING
        self.table = BlockTable()
        self.waiter: asyncio.Future[None] | None = None
        self.engine: Engine | None = None

    async def progress(self) -> None:
        """Wait for the next token (or the end); callers check `generated`/`complete` first."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        try:
            await waiter
        finally:
            self.waiter = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Engine:
    """One engine (one data-parallel rank): its batch, queue, KV cache, step loop and stats."""

    def __init__(self, cfg: SimConfig, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.instant = cfg.instant
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.kv = PrefixCache(cfg.kv_blocks, cfg.block_size)
        self.stats = EngineStats(cfg.dialect)
        self.aborted = 0
        self.completed = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.instant:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"sim-engine-{self.index}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def load(self) -> int:
        """vLLM's data-parallel balancing score: waiting requests weigh four times a running one."""
        return 4 * len(self.waiting) + len(self.running)

    def kv_tokens_used(self) -> int:
        return self.kv.used * self.cfg.block_size

    @staticmethod
    def now() -> float:
        """The engine clock (monotonic seconds; request arrival times use the same clock)."""
        return time.monotonic()

    def submit(self, seq: Seq) -> None:
        cfg = self.cfg
        need = seq.prompt_len + seq.max_tokens
        if need > cfg.kv_blocks * cfg.block_size:
            raise SimError(
                400,
                f"This request needs {need} tokens of KV cache but the engine only has "
                f"{cfg.kv_blocks * cfg.block_size} ({cfg.kv_blocks} blocks of {cfg.block_size}).",
            )
        seq.engine = self
        self.stats.requests += 1
        self.stats.request_max_tokens.observe(seq.max_tokens)
        self.stats.request_params_n.observe(1)
        self.waiting.append(seq)
        if self.instant:
            self._admit_instant()
        else:
            assert self._wakeup is not None
            self._wakeup.set()

    def release(self, seq: Seq, delivered: bool) -> None:
        """The request's handler is done with `seq`: finish it (instant mode) or abort it if unfinished."""
        if seq.state == FINISHED:
            return
        if delivered and seq.complete:
            self._finish(seq, seq.finish_reason, self.now())
        else:
            self.abort(seq)

    def abort(self, seq: Seq) -> None:
        """The client went away: free the slot and the KV blocks now."""
        if seq.state == FINISHED:
            return
        if seq.state == WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.kv.release(seq.table)
        seq.state = FINISHED
        seq.finish_reason = "abort"
        seq.complete = True
        self.aborted += 1
        self.stats.finished["abort"] += 1
        seq.wake()
        self._room_freed()

    def _room_freed(self) -> None:
        if self.instant:
            if self.waiting:
                self._admit_instant()
        elif self._wakeup is not None:
            self._wakeup.set()

    def _finish(self, seq: Seq, reason: str, now: float) -> None:
        self.running.remove(seq)
        self.kv.release(seq.table)
        seq.state = FINISHED
        seq.finish_reason = reason
        seq.complete = True
        self.completed += 1
        st = self.stats
        st.finished[reason] += 1
        st.e2e.observe(now - seq.arrival)
        st.func_latency.observe(now - seq.arrival)
        st.inference_time.observe(now - seq.scheduled_at)
        if seq.first_token_at >= 0:
            st.decode_time.observe(now - seq.first_token_at)
            st.decode_seconds += now - seq.first_token_at
            if seq.generated > 1:
                st.tpot.observe((now - seq.first_token_at) / (seq.generated - 1))
        st.request_prompt_tokens.observe(seq.prompt_len)
        st.request_generation_tokens.observe(seq.generated)
        seq.wake()
        self._room_freed()

    def _lookup(self, seq: Seq) -> tuple[list[CachedBlock], int]:
        """Cached prefix of `seq`; at least one token is always recomputed, as in vLLM."""
        bs = self.cfg.block_size
        total = seq.prompt_len + seq.generated
        hits = self.kv.lookup(seq.prompt.block_hashes, (total - 1) // bs)
        return hits, len(hits) * bs

    def _admitted(self, seq: Seq, hit_tokens: int, now: float) -> None:
        self.stats.on_prefix_lookup(seq.prompt_len + seq.generated, hit_tokens)
        if seq.scheduled_at < 0:
            seq.scheduled_at = now
            seq.cached_tokens = hit_tokens
            self.stats.queue_time.observe(now - seq.arrival)
        seq.state = RUNNING
        self.running.append(seq)

    def _admit_instant(self) -> None:
        cfg = self.cfg
        kv = self.kv
        waiting = self.waiting
        running = self.running
        st = self.stats
        now = self.now()
        while waiting and len(running) < cfg.max_num_seqs:
            seq = waiting[0]
            hits, hit_tokens = self._lookup(seq)
            final = seq.prompt_len + seq.max_tokens
            if not kv.can_allocate(hits, -(-final // cfg.block_size) - len(hits)):
                break
            waiting.popleft()
            kv.take_hits(seq.table, hits)
            kv.grow(seq.table, final)
            kv.register(seq.table, seq.prompt.block_hashes, seq.prompt_len)
            self._admitted(seq, hit_tokens, now)
            seq.computed = final
            seq.generated = seq.max_tokens
            seq.first_token_at = seq.last_token_at = now
            seq.finish_reason = "stop" if seq.ends_with_eos else "length"
            seq.complete = True
            st.prompt_tokens += seq.prompt_len
            st.generation_tokens += seq.max_tokens
            st.ttft.observe(now - seq.arrival)
            st.prefill_time.observe(0.0)
            st.steps += 1
            st.step_busy_slots += len(running)
            step_tokens = seq.prompt_len - hit_tokens + 1
            st.iteration_tokens.observe(step_tokens)
            if step_tokens > st.max_step_tokens:
                st.max_step_tokens = step_tokens
            seq.wake()

    async def _run(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        planned_end = 0.0
        while True:
            if not self.running and not self.waiting:
                wakeup.clear()
                await wakeup.wait()
            # Steps run back to back on a virtual clock, so the timer's ~1 ms rounding does not add up;
            # an engine that fell behind (busy CPU) restarts from now instead of catching up.
            now = time.monotonic()
            start = planned_end if now - planned_end < 0.002 else now
            batch, prefill_tokens, n_decode, context = self._schedule(now)
            if not batch:
                wakeup.clear()
                await wakeup.wait()
                continue
            cfg = self.cfg
            ms = cfg.decode_ms_per_token + cfg.decode_batch_slowdown * n_decode
            ms += cfg.decode_ms_per_1k_context * context / 1000.0
            if prefill_tokens:
                ms += cfg.prefill_overhead_ms + prefill_tokens * 1000.0 / cfg.prefill_tokens_per_s
            planned_end = start + ms / 1000.0
            delay = planned_end - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._complete(batch, time.monotonic(), prefill_tokens + n_decode)

    def _schedule(self, now: float) -> tuple[list[tuple[Seq, int]], int, int, int]:
        cfg = self.cfg
        kv = self.kv
        running = self.running
        waiting = self.waiting
        budget = cfg.max_num_batched_tokens
        batch: list[tuple[Seq, int]] = []
        prefill_tokens = n_decode = context = 0
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            total = seq.prompt_len + seq.generated
            n = min(total - seq.computed, budget)
            while not kv.grow(seq.table, seq.computed + n):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.state != RUNNING:
                break
            batch.append((seq, n))
            budget -= n
            if seq.generated and n == 1:
                n_decode += 1
                context += total
            else:
                prefill_tokens += n
            i += 1
        if not preempted:
            bs = cfg.block_size
            while waiting and len(running) < cfg.max_num_seqs and budget > 0:
                seq = waiting[0]
                hits, hit_tokens = self._lookup(seq)
                n = min(seq.prompt_len + seq.generated - hit_tokens, budget)
                if not kv.can_allocate(hits, -(-(hit_tokens + n) // bs) - len(hits)):
                    break
                waiting.popleft()
                kv.take_hits(seq.table, hits)
                kv.grow(seq.table, hit_tokens + n)
                seq.computed = hit_tokens
                self._admitted(seq, hit_tokens, now)
                batch.append((seq, n))
                budget -= n
                prefill_tokens += n
        return batch, prefill_tokens, n_decode, context

    def _preempt(self, seq: Seq) -> None:
        """Recompute preemption: drop the blocks, go back to the head of the queue."""
        self.kv.release(seq.table)
        seq.computed = 0
        seq.state = WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _complete(self, batch: list[tuple[Seq, int]], now: float, step_tokens: int) -> None:
        st = self.stats
        st.steps += 1
        st.step_busy_slots += len(batch)
        st.iteration_tokens.observe(step_tokens)
        if step_tokens > st.max_step_tokens:
            st.max_step_tokens = step_tokens
        kv = self.kv
        for seq, n in batch:
            if seq.state != RUNNING:
                continue
            seq.computed += n
            hashes = seq.prompt.block_hashes
            if len(seq.table.cached) < len(hashes):
                kv.register(seq.table, hashes, seq.computed)
            if seq.computed < seq.prompt_len + seq.generated:
                continue
            if seq.max_tokens == 0:
                if seq.first_token_at < 0:
                    seq.first_token_at = now
                    st.prompt_tokens += seq.prompt_len
                self._finish(seq, "stop", now)
                continue
            seq.generated += 1
            st.generation_tokens += 1
            if seq.first_token_at < 0:
                seq.first_token_at = now
                st.prompt_tokens += seq.prompt_len
                st.ttft.observe(now - seq.arrival)
                st.prefill_time.observe(now - seq.scheduled_at)
                st.prompt_seconds += now - seq.scheduled_at
            else:
                st.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            if seq.generated >= seq.max_tokens:
                self._finish(seq, "stop" if seq.ends_with_eos else "length", now)
            else:
                seq.wake()


class Cluster:
    """The engines of one simulator process (`--data-parallel N`); a request goes to the least loaded."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.engines = [Engine(cfg, i) for i in range(cfg.data_parallel)]
        self._next = 0

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    async def stop(self) -> None:
        for engine in self.engines:
            await engine.stop()

    def pick(self) -> Engine:
        engines = self.engines
        if len(engines) == 1:
            return engines[0]
        n = len(engines)
        start = self._next
        self._next = (start + 1) % n
        best = engines[start]
        best_load = best.load()
        for k in range(1, n):
            engine = engines[(start + k) % n]
            load = engine.load()
            if load < best_load:
                best, best_load = engine, load
        return best

    def submit(self, seq: Seq) -> None:
        self.pick().submit(seq)

    def snapshot(self) -> dict[str, int]:
        engines = self.engines
        return {
            "running": sum(len(e.running) for e in engines),
            "waiting": sum(len(e.waiting) for e in engines),
            "aborted_total": sum(e.aborted for e in engines),
            "completed_total": sum(e.completed for e in engines),
            "kv_blocks_used": sum(e.kv.used for e in engines),
            "prefix_queries_tokens": sum(e.stats.prefix_queries for e in engines),
            "prefix_hits_tokens": sum(e.stats.prefix_hits for e in engines),
            "preemptions_total": sum(e.stats.preemptions for e in engines),
        }
