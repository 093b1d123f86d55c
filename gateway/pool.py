"""Replicas of a model, their slots, and the bounded FIFO queue in front of them.

A slot is taken in the same step as the choice (no gap between picking and counting, the AIBrix burst
bug), waiters are served strictly in arrival order, and every `Slot` is released exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from gateway.config import ReplicaSpec, RetryConfig
from policies.base import EngineSignals, Router

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The pool's wait queue is at its limit: answer 429 at once."""


class QueueTimeout(Exception):
    """No slot became free before the request's deadline: answer 429 with Retry-After."""


class NoReplicas(Exception):
    """The pool has no eligible replica at all (none healthy, all draining or ejected): answer 503."""


class Replica:
    """One engine replica as this gateway sees it. Satisfies `policies.base.ReplicaView`."""

    __slots__ = (
        "base_path",
        "capacity",
        "consecutive_failures",
        "draining",
        "ejected_until",
        "ejections",
        "engine",
        "errors_total",
        "healthy",
        "host",
        "id",
        "in_flight",
        "itl_ewma_s",
        "labels",
        "model",
        "outstanding_tokens",
        "port",
        "removed",
        "requests_total",
        "signals",
        "signals_error",
        "tls",
        "ttft_ewma_s",
        "upstream",
        "url",
    )

    def __init__(self, spec: ReplicaSpec) -> None:
        self.id = spec.id
        self.model = spec.model
        self.url = spec.url.rstrip("/")
        parts = urlsplit(self.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.base_path = parts.path.rstrip("/")
        """Path prefix of the replica's URL (usually empty), for the gateway's own polls."""
        self.engine = spec.engine
        self.capacity = spec.capacity
        self.labels = dict(spec.labels)
        self.draining = spec.draining
        self.in_flight = 0
        self.outstanding_tokens = 0
        self.signals: EngineSignals | None = None
        self.signals_error: str | None = None
        self.ttft_ewma_s: float | None = None
        self.itl_ewma_s: float | None = None
        # Optimistic until the first health check says otherwise, so a fresh gateway serves at once.
        self.healthy = True
        self.removed = False
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.requests_total = 0
        self.errors_total = 0
        self.upstream: object | None = None
        """The data plane's connection pool to this replica (owned by `gateway.upstream`)."""

    def eligible(self, now: float) -> bool:
        return self.healthy and not self.draining and not self.removed and self.ejected_until <= now

    def record_failure(self, now: float, retry: RetryConfig) -> bool:
        """A connect/first-byte failure. Returns True when it ejects the replica."""
        self.errors_total += 1
        self.consecutive_failures += 1
        if self.consecutive_failures < retry.eject_after_failures:
            return False
        backoff = min(retry.eject_max_s, retry.eject_base_s * (2 ** min(self.ejections, 16)))
        self.ejections += 1
        self.consecutive_failures = 0
        self.ejected_until = now + backoff
        log.warning(
            "replica %s ejected for %.1fs after %d consecutive failures",
            self.id,
            backoff,
            retry.eject_after_failures,
        )
        return True

    def record_success(self) -> None:
        if self.consecutive_failures or self.ejections:
            self.consecutive_failures = 0
            self.ejections = 0

    def observe_latency(self, ttft_s: float | None, itl_s: float | None, alpha: float = 0.2) -> None:
        if ttft_s is not None:
            prev = self.ttft_ewma_s
            self.ttft_ewma_s = ttft_s if prev is None else prev + alpha * (ttft_s - prev)
        if itl_s is not None:
            prev = self.itl_ewma_s
            self.itl_ewma_s = itl_s if prev is None else prev + alpha * (itl_s - prev)


class Slot:
    """One reserved unit of a replica's capacity. `release()` is idempotent."""

    __slots__ = ("pool", "released", "replica", "tokens")

    def __init__(self, pool: Pool, replica: Replica, tokens: int) -> None:
        self.pool = pool
        self.replica = replica
        self.tokens = tokens
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        replica = self.replica
        replica.in_flight -= 1
        replica.outstanding_tokens -= self.tokens
        pool = self.pool
        if pool.on_change is not None:
            pool.on_change(replica)
        if pool.waiters:
            pool.pump()


class _Waiter:
    __slots__ = ("future", "ranked", "tokens")

    def __init__(self, future: asyncio.Future[Slot], ranked: list[Replica], tokens: int) -> None:
        self.future = future
        self.ranked = ranked
        self.tokens = tokens


class Pool:
    """The replicas serving one model, and the FIFO of requests waiting for a slot on them."""

    def __init__(
        self,
        model: str,
        router: Router,
        *,
        queue_max: int,
        on_change: Callable[[Replica], None] | None = None,
    ) -> None:
        self.model = model
        self.router = router
        self.replicas: dict[str, Replica] = {}
        self.queue_max = queue_max
        self.waiters: deque[_Waiter] = deque()
        self.on_change: Callable[[Replica], None] | None = on_change
        """Called after every reservation change of a replica (a hook for tests and tools)."""

    def eligible(self, now: float) -> list[Replica]:
        return [r for r in self.replicas.values() if r.eligible(now)]

    def has_eligible(self, now: float) -> bool:
        return any(r.eligible(now) for r in self.replicas.values())

    def _take(self, replica: Replica, tokens: int) -> Slot:
        replica.in_flight += 1
        replica.outstanding_tokens += tokens
        replica.requests_total += 1
        if self.on_change is not None:
            self.on_change(replica)
        return Slot(self, replica, tokens)

    def try_reserve(
        self, ranked: Iterable[Replica], tokens: int = 0, now: float | None = None
    ) -> Slot | None:
        """A slot on the best-ranked replica that has one, without waiting. Never jumps the queue."""
        if self.waiters:
            return None
        if now is None:
            now = time.monotonic()
        for replica in ranked:
            if replica.in_flight < replica.capacity and replica.eligible(now):
                return self._take(replica, tokens)
        return None

    async def reserve(self, ranked: list[Replica], tokens: int, deadline: float) -> Slot:
        """`try_reserve`, else wait FIFO until a ranked replica frees a slot or `deadline` passes."""
        slot = self.try_reserve(ranked, tokens)
        if slot is not None:
            return slot
        if not ranked:
            raise NoReplicas(self.model)
        if len(self.waiters) >= self.queue_max:
            raise QueueFull(self.model)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), ranked, tokens)
        self.waiters.append(waiter)
        # Room may have appeared since try_reserve declined (it never jumps a non-empty queue).
        self.pump()
        timeout = deadline - time.monotonic()
        try:
            if timeout <= 0:
                raise TimeoutError
            async with asyncio.timeout(timeout):
                return await asyncio.shield(waiter.future)
        except (TimeoutError, asyncio.CancelledError) as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(self.model) from None
            raise

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiter gave up: leave the queue, and give back a slot it was handed meanwhile."""
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result().release()
        elif not fut.done():
            fut.cancel()

    def pump(self) -> None:
        """Hand free slots to waiters in strict arrival order.

        A waiter takes its best-ranked replica with room; failing that, any eligible replica with room
        (one that was added, recovered or un-ejected after the waiter's ranking was made): a request
        that already waited is better served anywhere now than on its favourite later. Stops as soon
        as the pool has no free slot, so a release in a saturated pool costs O(replicas).
        """
        waiters = self.waiters
        if not waiters:
            return
        now = time.monotonic()
        room = self._room(now)
        while waiters and room > 0:
            head = waiters.popleft()
            if head.future.done():
                continue
            replica = self._first_with_room(head.ranked, now) or self._first_with_room(
                self.replicas.values(), now
            )
            if replica is None:
                waiters.appendleft(head)
                return
            head.future.set_result(self._take(replica, head.tokens))
            room -= 1

    @staticmethod
    def _first_with_room(replicas: Iterable[Replica], now: float) -> Replica | None:
        for replica in replicas:
            if replica.in_flight < replica.capacity and replica.eligible(now):
                return replica
        return None

    def _room(self, now: float) -> int:
        """Free slots on the pool's eligible replicas."""
        room = 0
        for replica in self.replicas.values():
            free = replica.capacity - replica.in_flight
            if free > 0 and replica.eligible(now):
                room += free
        return room

    def fail_waiters(self, exc_factory: Callable[[], Exception]) -> None:
        """Wake every waiter with an error (shutdown, or the pool lost all its replicas)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc_factory())

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas.values())


class Registry:
    """Every pool of this gateway replica, and the generation of the replica set it applied."""

    def __init__(
        self,
        router_factory: Callable[[str], Router],
        *,
        queue_max: int,
        on_change: Callable[[Replica], None] | None = None,
    ) -> None:
        self.router_factory = router_factory
        self.queue_max = queue_max
        self.on_change = on_change
        self.pools: dict[str, Pool] = {}
        self.generation = -1
        self.retired: dict[str, Replica] = {}
        """Removed replicas that still have requests in flight; dropped once they reach 0. Keyed by
        id (`id#n` when an older replica of the same id is still finishing too)."""
        self.on_added: list[Callable[[Replica], None]] = []
        self.on_removed: list[Callable[[Replica], None]] = []

    def pool(self, model: str) -> Pool:
        pool = self.pools.get(model)
        if pool is None:
            pool = Pool(model, self.router_factory(model), queue_max=self.queue_max, on_change=self.on_change)
            self.pools[model] = pool
        return pool

    def replicas(self) -> Iterable[Replica]:
        for pool in self.pools.values():
            yield from pool.replicas.values()

    def find(self, replica_id: str) -> Replica | None:
        for pool in self.pools.values():
            replica = pool.replicas.get(replica_id)
            if replica is not None:
                return replica
        return None

    def apply(self, generation: int, specs: list[ReplicaSpec]) -> tuple[list[str], list[str], list[str]]:
        """Make the pools hold exactly `specs`. Returns ids (added, removed, updated).

        Removed replicas get no new requests at once; their in-flight requests finish (they sit in
        `retired` until then). A changed URL or model is a new replica under the same id.
        """
        wanted = {spec.id: spec for spec in specs}
        added: list[str] = []
        removed: list[str] = []
        updated: list[str] = []
        for pool in self.pools.values():
            for replica in list(pool.replicas.values()):
                spec = wanted.get(replica.id)
                if spec is not None and spec.model == pool.model and spec.url.rstrip("/") == replica.url:
                    changed = (
                        replica.capacity != spec.capacity
                        or replica.draining != spec.draining
                        or replica.engine != spec.engine
                        or replica.labels != spec.labels
                    )
                    replica.capacity = spec.capacity
                    replica.draining = spec.draining
                    replica.engine = spec.engine
                    replica.labels = dict(spec.labels)
                    if changed:
                        updated.append(replica.id)
                        pool.pump()
                    continue
                self._remove(pool, replica)
                removed.append(replica.id)
        for spec in specs:
            pool = self.pool(spec.model)
            if spec.id in pool.replicas:
                continue
            replica = Replica(spec)
            pool.replicas[spec.id] = replica
            added.append(spec.id)
            for callback in self.on_added:
                callback(replica)
            pool.pump()
        self.generation = generation
        return added, removed, updated

    def _remove(self, pool: Pool, replica: Replica) -> None:
        del pool.replicas[replica.id]
        replica.removed = True
        pool.router.forget(replica.id)
        if replica.in_flight:
            # An older replica under the same id may still be finishing: keep both.
            key, n = replica.id, 1
            while key in self.retired:
                key, n = f"{replica.id}#{n}", n + 1
            self.retired[key] = replica
        else:
            self._finish_removal(replica)

    def _finish_removal(self, replica: Replica) -> None:
        for callback in self.on_removed:
            callback(replica)

    def reap_retired(self) -> None:
        """Finish removing retired replicas whose last request ended (called on a timer)."""
        for replica_id, replica in list(self.retired.items()):
            if replica.in_flight == 0:
                del self.retired[replica_id]
                self._finish_removal(replica)

    def drain(self, replica_id: str) -> Replica | None:
        replica = self.find(replica_id)
        if replica is not None:
            replica.draining = True
        return replica
