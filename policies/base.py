"""The contract between the data plane and the routing policies.

The data plane's replica objects satisfy `ReplicaView` directly (duck typing), so ranking never copies
state per request. Everything here is pure: no I/O, no clock reads beyond the `now` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from policies.request import RouteRequest as RouteRequest  # re-exported: part of the contract


class EngineSignals(msgspec.Struct):
    """What one scrape of an engine's `/metrics` said. None: the engine does not report it."""

    scraped_at: float
    """time.monotonic() of the scrape; scorers treat old snapshots as unknown, not zero."""
    running: float | None = None
    """Sequences in the running batch (summed over data-parallel ranks)."""
    waiting: float | None = None
    """Sequences queued in the engine."""
    kv_usage: float | None = None
    """KV-cache usage in [0, 1]."""
    max_num_seqs: float | None = None
    """Running-batch limit, when the engine reports it."""
    prefix_queries: float | None = None
    """Cumulative prefix-cache queries (tokens for vLLM)."""
    prefix_hits: float | None = None
    block_size: int | None = None
    """Engine KV block size in tokens."""
    num_gpu_blocks: int | None = None
    """Engine KV capacity in blocks."""


class ReplicaView(Protocol):
    """What a scorer may read about a replica. The gateway's counters are always current."""

    id: str
    capacity: int
    """Slots this gateway replica may use on it."""
    in_flight: int
    """Requests this gateway has reserved or in flight on it."""
    outstanding_tokens: int
    """Prompt + expected output tokens of the requests in flight."""
    signals: EngineSignals | None
    ttft_ewma_s: float | None
    """Moving estimate of time to first token measured by the gateway; None until measured."""
    itl_ewma_s: float | None
    """Moving estimate of inter-token (inter-chunk) latency measured by the gateway."""


class RoutingError(Exception):
    """A request the router refuses: the data plane answers `status` in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        headers: Sequence[tuple[str, str]] = (),
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = tuple(headers)
        self.code = code
        """OpenAI's `error.code` (e.g. `rate_limit_exceeded`); None renders as null."""
        self.param = param
        """OpenAI's `error.param`: the offending input (here a header name), or None."""


class Decision(msgspec.Struct):
    """A ranking: candidates best first, and what produced it (echoed in response headers)."""

    ranked: list[ReplicaView]
    strategy: str
    profile: str | None = None


class Router(Protocol):
    """One per pool. `select` must be cheap: it runs once per request on the event loop."""

    def select(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> Decision:
        """Rank the eligible replicas (healthy, not draining) or raise RoutingError."""
        ...

    def on_dispatch(self, req: RouteRequest, replica: ReplicaView, now: float) -> None:
        """The request was sent to `replica` (e.g. remember its prefix there)."""
        ...

    def forget(self, replica_id: str) -> None:
        """The replica left the pool: drop everything held about it."""
        ...
