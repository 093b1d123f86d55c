"""Rendezvous (highest-random-weight) hashing: every gateway process orders replicas the same way for a key.

weight(key, replica) = xxh3_64(key, seed = xxh64(replica id)). Pure function of its inputs, so independent
gateway replicas agree without talking, and removing a replica moves only the keys it held.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from policies.base import ReplicaView
from policies.scorer import ScoreContext


def key_bytes(key: int | str) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8", "surrogatepass")
    return key.to_bytes(8, "little")


def weights(
    key: bytes, replicas: Sequence[ReplicaView], indices: Sequence[int], ctx: ScoreContext
) -> list[int]:
    """Rendezvous weight of each `replicas[i]` for i in `indices`, in that order."""
    digest = xxhash.xxh3_64_intdigest
    seed = ctx.seed
    return [digest(key, seed(replicas[i].id)) for i in indices]


def order(
    key: bytes, replicas: Sequence[ReplicaView], indices: Sequence[int], ctx: ScoreContext
) -> list[int]:
    """`indices` sorted by descending rendezvous weight."""
    w = weights(key, replicas, indices, ctx)
    ranked = sorted(range(len(w)), key=w.__getitem__, reverse=True)
    return [indices[k] for k in ranked]
