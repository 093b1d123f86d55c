"""Which replica probably holds which prompt prefix in its KV cache: a bounded LRU of block hashes.

The routing text is cut into fixed-size byte blocks (default 128, as AIBrix ships); block i's hash is
xxh64(block_i, seed=hash_{i-1}), so one 64-bit value names a whole prefix. Each replica keeps an LRU of the
hashes dispatched to it, bounded by the engine's KV size when known, by a per-pool budget, and by a TTL.
An inverted map hash -> bitmask of replicas makes a lookup cost one dict probe per block, not per replica.

A request's blocks are touched deepest-first, so the first block is always the most recently used: like
vLLM, the tail of a prefix is evicted before its head, and a deeper block is never fresher than a shallower
one (the TTL check walks back from the deepest match only when needed). Recency has a resolution of
`_REFRESH_S`: a prefix whose deepest block was dispatched to the same replica less than that long ago is
not touched again, so a hot prompt costs one dict probe per dispatch instead of a walk over its blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import xxhash

from policies.base import EngineSignals, RouteRequest
from policies.options import RoutingOptions

_KEY_BLOCKS: Final = 4
"""The tie-break key names the first 4 blocks (512 B): requests sharing a system prompt share it."""
_MIN_REPLICA_BLOCKS: Final = 16
_NEVER: Final = float("-inf")
_REFRESH_S: Final = 1.0
_XXH64: Final = xxhash.xxh64_intdigest


def block_hashes(text: str, block: int, max_blocks: int) -> tuple[int, ...]:
    """Chained xxh64 of the full `block`-byte blocks of the UTF-8 text (a partial tail block is ignored).

    Written for mypyc: a bytes slice and a counted `range` are native operations, a memoryview slice and a
    `range` with a variable step are not."""
    data = text.encode("utf-8", "surrogatepass")
    count = min(len(data) // block, max_blocks)
    if not count:
        return ()
    digest = _XXH64
    out = []
    h = 0
    start = 0
    for _ in range(count):
        end = start + block
        h = digest(data[start:end], h)
        out.append(h)
        start = end
    return tuple(out)


class _ReplicaBlocks:
    __slots__ = ("bit", "cap", "cap_for", "check_at", "id", "lru", "slot")

    def __init__(self, replica_id: str, slot: int) -> None:
        self.id = replica_id
        self.slot = slot
        self.bit = 1 << slot
        self.cap = 1
        """The bound applied at its last insert."""
        self.cap_for: tuple[EngineSignals | None, int] | None = None
        """(signals, replicas in the index) `cap` was computed for: recomputed only when either changes
        (the scraper assigns a new snapshot each time), not on every dispatch."""
        self.lru: OrderedDict[int, float] = OrderedDict()
        """block hash -> time of its last dispatch; oldest first."""
        self.check_at = _NEVER
        """When the oldest block passes the TTL: until then, and within `cap`, nothing needs evicting."""


class PrefixIndex:
    """Per-replica LRU + TTL of dispatched block hashes, with an inverted hash -> replicas bitmask."""

    def __init__(self, options: RoutingOptions) -> None:
        self.block = options.block_chars
        self.max_prompt_blocks = options.max_prompt_blocks
        self.per_replica = options.index_blocks_per_replica
        self.total = options.index_total_blocks
        self.ttl = options.index_ttl_s
        self.chars_per_token = options.chars_per_token
        self._masks: dict[int, int] = {}
        self._replicas: dict[str, _ReplicaBlocks] = {}
        self._slots: list[_ReplicaBlocks | None] = []
        self._free: list[int] = []

    # -- per request -----------------------------------------------------------------------------
    def hashes(self, req: RouteRequest) -> tuple[int, ...]:
        """The request's block hashes, computed once and memoised on the request."""
        cached = req.prefix_hashes
        if cached is None:
            cached = req.prefix_hashes = block_hashes(req.text, self.block, self.max_prompt_blocks)
        return cached

    def prefix_key(self, req: RouteRequest) -> int | None:
        """A 64-bit key of the prompt's head for rendezvous tie-breaks; None for an empty text."""
        if req.prefix_key_known:
            return req.prefix_key
        hashes = self.hashes(req)
        if hashes:
            key: int | None = hashes[min(len(hashes), _KEY_BLOCKS) - 1]
        elif req.text:
            key = xxhash.xxh64_intdigest(req.text.encode("utf-8", "surrogatepass"))
        else:
            key = None
        req.prefix_key = key
        req.prefix_key_known = True
        return key

    def match(self, hashes: tuple[int, ...], now: float) -> dict[str, int]:
        """Replica id -> number of leading blocks it holds (only replicas with at least one)."""
        if not hashes:
            return {}
        masks = self._masks
        alive = masks.get(hashes[0], 0)
        if not alive:
            return {}
        found: dict[str, int] = {}
        depth = 1
        for depth in range(1, len(hashes)):
            nxt = alive & masks.get(hashes[depth], 0)
            if nxt != alive:
                self._collect(alive ^ nxt, depth, hashes, now, found)
                if not nxt:
                    return found
                alive = nxt
        else:
            depth = len(hashes)
        self._collect(alive, depth, hashes, now, found)
        return found

    def _collect(
        self, bits: int, depth: int, hashes: tuple[int, ...], now: float, found: dict[str, int]
    ) -> None:
        oldest = now - self.ttl
        slots = self._slots
        while bits:
            low = bits & -bits
            bits ^= low
            rb = slots[low.bit_length() - 1]
            if rb is None:
                continue
            lru = rb.lru
            d = depth
            while d and lru.get(hashes[d - 1], _NEVER) < oldest:
                d -= 1
            if d:
                found[rb.id] = d

    # -- on dispatch ---------------------------------------------------------------------------------
    def insert(
        self, replica_id: str, hashes: tuple[int, ...], now: float, signals: EngineSignals | None = None
    ) -> None:
        """Remember that `replica_id` now holds these blocks; evict beyond its bound and its TTL."""
        if not hashes:
            return
        rb = self._replicas.get(replica_id)
        if rb is None:
            rb = self._add(replica_id)
        lru = rb.lru
        last = lru.get(hashes[-1])
        if last is not None and now - last < _REFRESH_S and now < rb.check_at and len(lru) <= rb.cap:
            return  # the whole prefix is there and fresh (its shallower blocks are at least as fresh)
        masks = self._masks
        bit = rb.bit
        for h in reversed(hashes):
            if h in lru:
                lru[h] = now
                lru.move_to_end(h)
            else:
                lru[h] = now
                masks[h] = masks.get(h, 0) | bit
        cap_for = rb.cap_for
        n = len(self._replicas)
        if cap_for is None or cap_for[0] is not signals or cap_for[1] != n:
            rb.cap = self.capacity(signals)
            rb.cap_for = (signals, n)
        cap = rb.cap
        oldest = now - self.ttl
        while lru:
            if len(lru) <= cap:
                head_at = lru[next(iter(lru))]
                if head_at >= oldest:
                    rb.check_at = head_at + self.ttl
                    break
            h, _ = lru.popitem(last=False)
            self._unmask(h, bit)

    def capacity(self, signals: EngineSignals | None) -> int:
        """Blocks this replica may keep: the engine's KV size when known, within the pool's budget."""
        cap = min(self.per_replica, max(_MIN_REPLICA_BLOCKS, self.total // max(1, len(self._replicas))))
        if signals is not None and signals.num_gpu_blocks and signals.block_size:
            engine_chars = signals.num_gpu_blocks * signals.block_size * self.chars_per_token
            cap = min(cap, max(_MIN_REPLICA_BLOCKS, int(engine_chars // self.block)))
        return cap

    def _unmask(self, h: int, bit: int) -> None:
        masks = self._masks
        m = masks.get(h, 0) & ~bit
        if m:
            masks[h] = m
        else:
            masks.pop(h, None)

    def _add(self, replica_id: str) -> _ReplicaBlocks:
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._slots)
            self._slots.append(None)
        rb = _ReplicaBlocks(replica_id, slot)
        self._slots[slot] = rb
        self._replicas[replica_id] = rb
        return rb

    def forget(self, replica_id: str) -> None:
        """The replica left: drop its blocks and free its bit for a newcomer."""
        rb = self._replicas.pop(replica_id, None)
        if rb is None:
            return
        for h in rb.lru:
            self._unmask(h, rb.bit)
        rb.lru.clear()
        self._slots[rb.slot] = None
        self._free.append(rb.slot)

    # -- introspection -------------------------------------------------------------------------------
    def entries(self) -> int:
        """Blocks remembered over all replicas (what bounds the memory)."""
        return sum(len(rb.lru) for rb in self._replicas.values())

    def fills(self) -> dict[str, float]:
        """Replica id -> remembered blocks / its bound, in [0, 1] (replicas never dispatched to: absent)."""
        return {rb.id: min(1.0, len(rb.lru) / rb.cap) for rb in self._replicas.values()}

    def distinct_blocks(self) -> int:
        return len(self._masks)

    def replica_entries(self, replica_id: str) -> int:
        rb = self._replicas.get(replica_id)
        return len(rb.lru) if rb is not None else 0
