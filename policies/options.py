"""Tunables of the routing brain, with defaults an operator of a small vLLM/SGLang fleet can keep."""

from __future__ import annotations

import msgspec


class RoutingOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Knobs shared by every scorer of one router (one router per pool)."""

    stale_after_s: float = 5.0
    """An engine snapshot older than this is unknown to the scorers (they abstain), never zero."""
    block_chars: int = 128
    """Prefix-index block size in bytes of UTF-8 routing text (AIBrix ships 128)."""
    max_prompt_blocks: int = 2048
    """Only the first this-many blocks of a prompt are hashed (256 KiB at 128 B): bounded per-request cost."""
    index_blocks_per_replica: int = 16384
    """Upper bound of remembered blocks per replica; the engine's KV size lowers it when known."""
    index_total_blocks: int = 262144
    """Upper bound over all replicas of a pool (~300 bytes each): caps the index near 80 MB."""
    index_ttl_s: float = 600.0
    """A block not dispatched again within this is forgotten (engines evict idle prefixes too)."""
    chars_per_token: float = 4.0
    """Converts the engine's KV size in tokens into routing-text characters."""
    cache_threshold: float = 0.1
    """A matched fraction below this counts as no affinity (SGLang `cache_threshold`)."""
    balance_abs_threshold: float = 8.0
    """Affinity yields when a replica's load exceeds the least-loaded one by more than this many requests
    (SGLang `balance_abs_threshold`) ..."""
    balance_rel_threshold: float = 2.0
    """... and by more than this factor (SGLang `balance_rel_threshold`). Both must hold."""
    session_load_factor: float = 1.25
    """Session affinity moves a session off a replica loaded above this multiple of the fair share."""
    tokens_per_slot: int = 4096
    """Token budget of one slot, for the `throughput` scorer's capacity scaling."""
    default_output_tokens: int = 256
    """Expected output length of a request without `max_tokens` (latency estimates)."""

    def __post_init__(self) -> None:
        if self.block_chars < 8:
            raise ValueError("block_chars must be >= 8")
        if self.stale_after_s <= 0:
            raise ValueError("stale_after_s must be > 0")
        if self.index_blocks_per_replica < 1 or self.index_total_blocks < 1:
            raise ValueError("index sizes must be >= 1")
        if self.balance_rel_threshold < 1.0:
            raise ValueError("balance_rel_threshold must be >= 1")
