"""KV blocks and the exact prefix cache, shaped like vLLM's block pool.

A full prompt block that has been computed is kept under its chained hash. While some sequence holds it,
it is in use; once nobody does, it stays cached but becomes free (evictable), in LRU order. Allocating a
new block takes a never-cached free block first and otherwise evicts the least recently freed cached one.
KV usage is blocks in use / all blocks, as vLLM reports it (cached-but-free blocks count as free).
"""

from __future__ import annotations

from collections import OrderedDict


class CachedBlock:
    __slots__ = ("hash", "ref")

    def __init__(self, block_hash: int) -> None:
        self.hash = block_hash
        self.ref = 1


class BlockTable:
    """The blocks one sequence holds: cached (hashed, shared) ones in prompt order, then anonymous ones."""

    __slots__ = ("cached", "n_anon")

    def __init__(self) -> None:
        self.cached: list[CachedBlock] = []
        self.n_anon = 0

    def __len__(self) -> int:
        return len(self.cached) + self.n_anon


class PrefixCache:
    """A pool of `num_blocks` KV blocks with an LRU of cached prefix blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.used = 0
        self.free_plain = num_blocks
        self.by_hash: dict[int, CachedBlock] = {}
        self.evictable: OrderedDict[int, CachedBlock] = OrderedDict()
        self.evictions = 0

    @property
    def free(self) -> int:
        return self.num_blocks - self.used

    def usage(self) -> float:
        return self.used / self.num_blocks

    def lookup(self, block_hashes: list[int], max_blocks: int) -> list[CachedBlock]:
        """The longest cached prefix of these block hashes, at most `max_blocks` long (no side effects)."""
        hits: list[CachedBlock] = []
        by_hash = self.by_hash
        for h in block_hashes[:max_blocks]:
            block = by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, hits: list[CachedBlock], new_blocks: int) -> bool:
        reclaimed = 0
        for block in hits:
            if block.ref == 0:
                reclaimed += 1
        return new_blocks + reclaimed <= self.free

    def take_hits(self, table: BlockTable, hits: list[CachedBlock]) -> None:
        evictable = self.evictable
        for block in hits:
            if block.ref == 0:
                del evictable[block.hash]
                self.used += 1
            block.ref += 1
            table.cached.append(block)

    def grow(self, table: BlockTable, tokens: int) -> bool:
        """Make `table` hold enough blocks for `tokens` tokens; False (and no change) if KV is short."""
        need = -(-tokens // self.block_size) - len(table)
        if need <= 0:
            return True
        if need > self.free:
            return False
        self.used += need
        table.n_anon += need
        plain = min(need, self.free_plain)
        self.free_plain -= plain
        evictable = self.evictable
        for _ in range(need - plain):
            _, block = evictable.popitem(last=False)
            del self.by_hash[block.hash]
            self.evictions += 1
        return True

    def register(self, table: BlockTable, block_hashes: list[int], computed_tokens: int) -> None:
        """Cache the sequence's prompt blocks that are now fully computed (one anonymous block each)."""
        full = min(computed_tokens // self.block_size, len(block_hashes))
        by_hash = self.by_hash
        cached = table.cached
        while len(cached) < full and table.n_anon > 0:
            h = block_hashes[len(cached)]
            if h in by_hash:
                return
            block = CachedBlock(h)
            by_hash[h] = block
            cached.append(block)
            table.n_anon -= 1

    def release(self, table: BlockTable) -> None:
        """Free every block of the table; cached ones become evictable, the sequence's tail first."""
        freed = table.n_anon
        self.free_plain += table.n_anon
        table.n_anon = 0
        evictable = self.evictable
        for block in reversed(table.cached):
            block.ref -= 1
            if block.ref == 0:
                evictable[block.hash] = block
                freed += 1
        self.used -= freed
        table.cached = []
