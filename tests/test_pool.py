"""Pool and Registry: slots, the FIFO queue, deadlines, cancellation, and replica-set generations."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from gateway.config import ReplicaSpec, RetryConfig
from gateway.pool import NoReplicas, Pool, QueueFull, QueueTimeout, Registry, Replica
from policies.least_request import LeastRequestRouter


def spec(
    rid: str, model: str = "m", capacity: int = 1, url: str | None = None, draining: bool = False
) -> ReplicaSpec:
    return ReplicaSpec(
        rid,
        model,
        url or f"http://127.0.0.1:{10000 + sum(map(ord, rid))}",
        capacity=capacity,
        draining=draining,
    )


def make_pool(*capacities: int, queue_max: int = 100) -> tuple[Pool, list[Replica]]:
    pool = Pool("m", LeastRequestRouter(), queue_max=queue_max)
    replicas = []
    for i, cap in enumerate(capacities):
        replica = Replica(spec(f"r{i}", capacity=cap))
        pool.replicas[replica.id] = replica
        replicas.append(replica)
    return pool, replicas


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds


async def test_slots_go_to_the_first_ranked_replica_with_room() -> None:
    pool, (a, b) = make_pool(1, 2)
    s1 = pool.try_reserve([a, b])
    s2 = pool.try_reserve([a, b])
    assert s1 is not None and s1.replica is a
    assert s2 is not None and s2.replica is b
    assert (a.in_flight, b.in_flight) == (1, 1)
    s1.release()
    s1.release()  # idempotent
    assert a.in_flight == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    pool, (a,) = make_pool(1)
    held = pool.try_reserve([a])
    assert held is not None
    order: list[int] = []

    async def wait(i: int) -> None:
        slot = await pool.reserve([a], 0, deadline(5))
        order.append(i)
        await asyncio.sleep(0)
        slot.release()

    tasks = [asyncio.create_task(wait(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert len(pool.waiters) == 5
    held.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3, 4]
    assert a.in_flight == 0


async def test_a_newcomer_does_not_jump_the_queue() -> None:
    pool, (a,) = make_pool(1)
    held = pool.try_reserve([a])
    assert held is not None
    waiter = asyncio.create_task(pool.reserve([a], 0, deadline(5)))
    await asyncio.sleep(0.01)
    held.release()  # the slot goes to the waiter, not to a fresh try_reserve
    assert pool.try_reserve([a]) is None
    slot = await asyncio.wait_for(waiter, 5)
    slot.release()
    assert a.in_flight == 0


async def test_full_queue_answers_queue_full_at_once() -> None:
    pool, (a,) = make_pool(1, queue_max=2)
    held = pool.try_reserve([a])
    assert held is not None
    waiters = [asyncio.create_task(pool.reserve([a], 0, deadline(5))) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await pool.reserve([a], 0, deadline(5))
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    held.release()
    assert a.in_flight == 0 and not pool.waiters


async def test_deadline_gives_queue_timeout_and_leaves_the_queue() -> None:
    pool, (a,) = make_pool(1)
    held = pool.try_reserve([a])
    assert held is not None
    with pytest.raises(QueueTimeout):
        await pool.reserve([a], 0, deadline(0.05))
    with pytest.raises(QueueTimeout):
        await pool.reserve([a], 0, deadline(-1))
    assert not pool.waiters
    held.release()
    assert a.in_flight == 0


async def test_no_candidates_is_no_replicas() -> None:
    pool, _ = make_pool()
    with pytest.raises(NoReplicas):
        await pool.reserve([], 0, deadline(1))


async def test_cancel_while_waiting_never_leaks_a_slot() -> None:
    pool, (a,) = make_pool(1)
    held = pool.try_reserve([a])
    assert held is not None
    waiter = asyncio.create_task(pool.reserve([a], 0, deadline(5)))
    await asyncio.sleep(0.01)
    # The slot is handed over and the waiter is cancelled before it runs again.
    held.release()
    assert a.in_flight == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert a.in_flight == 0
    assert not pool.waiters


async def test_cancel_before_any_slot_frees_leaves_nothing_behind() -> None:
    pool, (a,) = make_pool(1)
    held = pool.try_reserve([a])
    assert held is not None
    waiter = asyncio.create_task(pool.reserve([a], 0, deadline(5)))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert not pool.waiters
    held.release()
    assert a.in_flight == 0


async def test_fail_waiters_wakes_everyone_with_the_error() -> None:
    pool, (a,) = make_pool(1)
    held = pool.try_reserve([a])
    assert held is not None
    waiters = [asyncio.create_task(pool.reserve([a], 0, deadline(5))) for _ in range(3)]
    await asyncio.sleep(0.01)
    pool.fail_waiters(lambda: NoReplicas("m"))
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, NoReplicas) for r in results)
    held.release()
    assert a.in_flight == 0


async def test_a_waiter_never_gets_a_slot_on_an_unhealthy_or_ejected_replica() -> None:
    pool, (a, b) = make_pool(1, 1)
    sa, sb = pool.try_reserve([a]), pool.try_reserve([b])
    assert sa is not None and sb is not None
    waiter = asyncio.create_task(pool.reserve([a, b], 0, deadline(5)))
    await asyncio.sleep(0.01)
    a.healthy = False
    sa.release()
    await asyncio.sleep(0.01)
    assert not waiter.done(), "a slot on an unhealthy replica was handed out"
    b.ejected_until = time.monotonic() + 60
    sb.release()
    await asyncio.sleep(0.01)
    assert not waiter.done(), "a slot on an ejected replica was handed out"
    b.ejected_until = 0.0
    pool.pump()
    slot = await asyncio.wait_for(waiter, 5)
    assert slot.replica is b
    slot.release()
    assert (a.in_flight, b.in_flight) == (0, 0)


async def test_waiters_are_served_in_arrival_order_on_whichever_replica_frees() -> None:
    """A queued request has already waited: the first free slot anywhere goes to the oldest waiter."""
    pool, (a, b) = make_pool(1, 1)
    sa, sb = pool.try_reserve([a]), pool.try_reserve([b])
    assert sa is not None and sb is not None
    head = asyncio.create_task(pool.reserve([a], 0, deadline(5)))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(pool.reserve([b], 0, deadline(5)))
    await asyncio.sleep(0.01)
    sb.release()
    head_slot = await asyncio.wait_for(head, 5)
    assert head_slot.replica is b and not second.done()
    sa.release()
    slot = await asyncio.wait_for(second, 5)
    assert slot.replica is a
    head_slot.release()
    slot.release()
    assert (a.in_flight, b.in_flight) == (0, 0)


async def test_capacity_is_never_exceeded_and_every_slot_comes_back() -> None:
    rng = random.Random(7)
    pool, replicas = make_pool(2, 3, 1, queue_max=1000)
    worst = {r.id: 0 for r in replicas}
    pool.on_change = lambda r: worst.__setitem__(r.id, max(worst[r.id], r.in_flight))
    outcomes = {"ok": 0, "timeout": 0, "cancel": 0, "full": 0}

    async def one(i: int) -> None:
        ranked = rng.sample(replicas, k=rng.randint(1, len(replicas)))
        try:
            slot = await pool.reserve(ranked, rng.randint(0, 50), deadline(rng.choice([0.02, 0.2, 1.0])))
        except QueueTimeout:
            outcomes["timeout"] += 1
            return
        except QueueFull:
            outcomes["full"] += 1
            return
        try:
            assert all(r.in_flight <= r.capacity for r in replicas)
            await asyncio.sleep(rng.random() * 0.01)
            outcomes["ok"] += 1
        finally:
            slot.release()

    tasks = [asyncio.create_task(one(i)) for i in range(300)]
    await asyncio.sleep(0.02)
    for task in rng.sample(tasks, 40):
        if task.cancel():
            outcomes["cancel"] += 1
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
    assert all(worst[r.id] <= r.capacity for r in replicas), worst
    assert [r.in_flight for r in replicas] == [0, 0, 0]
    assert [r.outstanding_tokens for r in replicas] == [0, 0, 0]
    assert not pool.waiters
    assert outcomes["ok"] > 0


class CountingRanking(list[Replica]):
    """A ranking that counts how many candidates the pool looks at."""

    visits = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for replica in list.__iter__(self):
            CountingRanking.visits += 1
            yield replica


async def test_saturated_pool_release_does_not_walk_every_waiter_times_every_replica() -> None:
    """512 full replicas and a long queue: one release hands one slot over and stops, instead of an
    O(waiters x replicas) walk (counted in candidates looked at, not timed)."""
    pool, replicas = make_pool(*([1] * 512), queue_max=2000)
    held = [pool.try_reserve(replicas) for _ in replicas]
    assert all(h is not None for h in held)
    ranking = CountingRanking(replicas)
    waiters = [asyncio.create_task(pool.reserve(ranking, 0, deadline(10))) for _ in range(300)]
    await asyncio.sleep(0.01)
    CountingRanking.visits = 0
    first = held[0]
    assert first is not None
    first.release()
    assert CountingRanking.visits <= 2 * 512, CountingRanking.visits
    assert sum(r.in_flight for r in replicas) == 512
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    for h in held:
        if h is not None:
            h.release()
    assert all(r.in_flight == 0 for r in replicas)


# --- Registry -----------------------------------------------------------------------------------


def make_registry() -> tuple[Registry, list[str], list[str]]:
    registry = Registry(lambda model: LeastRequestRouter(), queue_max=10)
    added: list[str] = []
    removed: list[str] = []
    registry.on_added.append(lambda r: added.append(r.id))
    registry.on_removed.append(lambda r: removed.append(r.id))
    return registry, added, removed


def test_apply_adds_updates_removes_and_records_the_generation() -> None:
    registry, added_cb, removed_cb = make_registry()
    assert registry.apply(1, [spec("a"), spec("b", model="n")]) == (["a", "b"], [], [])
    assert registry.generation == 1
    assert set(registry.pools) == {"m", "n"}
    assert added_cb == ["a", "b"]
    # Same set again: idempotent.
    assert registry.apply(1, [spec("a"), spec("b", model="n")]) == ([], [], [])
    # Capacity change is an update of the same replica object.
    a = registry.find("a")
    assert registry.apply(2, [spec("a", capacity=5), spec("b", model="n")]) == ([], [], ["a"])
    assert registry.find("a") is a and a is not None and a.capacity == 5
    # b leaves.
    assert registry.apply(3, [spec("a", capacity=5)]) == ([], ["b"], [])
    assert registry.find("b") is None
    assert removed_cb == ["b"]
    assert registry.generation == 3


def test_a_changed_url_or_model_is_a_new_replica_under_the_same_id() -> None:
    registry, _, removed_cb = make_registry()
    registry.apply(1, [spec("a", url="http://127.0.0.1:1001")])
    old = registry.find("a")
    assert registry.apply(2, [spec("a", url="http://127.0.0.1:1002")]) == (["a"], ["a"], [])
    new = registry.find("a")
    assert old is not None and new is not None and new is not old and old.removed
    assert registry.apply(3, [spec("a", model="other", url="http://127.0.0.1:1002")]) == (["a"], ["a"], [])
    moved = registry.find("a")
    assert moved is not None and moved.model == "other" and "a" not in registry.pools["m"].replicas
    assert removed_cb == ["a", "a"]


def test_removed_replica_with_requests_in_flight_retires_until_they_end() -> None:
    registry, _, removed_cb = make_registry()
    registry.apply(1, [spec("a", capacity=2), spec("b")])
    pool = registry.pool("m")
    a = registry.find("a")
    assert a is not None
    slot = pool.try_reserve([a])
    assert slot is not None
    registry.apply(2, [spec("b")])
    assert a.removed and registry.retired == {"a": a}
    assert removed_cb == []
    assert pool.try_reserve([a]) is None, "a removed replica must get no new request"
    registry.reap_retired()
    assert registry.retired == {"a": a}
    slot.release()
    registry.reap_retired()
    assert registry.retired == {} and removed_cb == ["a"]


def test_drain_stops_new_requests_and_an_update_can_undrain() -> None:
    registry, _, _ = make_registry()
    registry.apply(1, [spec("a")])
    a = registry.find("a")
    assert a is not None
    assert registry.drain("a") is a and a.draining
    assert registry.drain("nope") is None
    assert registry.pool("m").try_reserve([a]) is None
    assert not a.eligible(time.monotonic())
    assert registry.apply(2, [spec("a")]) == ([], [], ["a"])
    assert not a.draining


async def test_capacity_increase_by_apply_serves_waiters() -> None:
    registry, _, _ = make_registry()
    registry.apply(1, [spec("a", capacity=1)])
    pool = registry.pool("m")
    a = registry.find("a")
    assert a is not None
    held = pool.try_reserve([a])
    assert held is not None
    waiter = asyncio.create_task(pool.reserve([a], 0, deadline(5)))
    await asyncio.sleep(0.01)
    registry.apply(2, [spec("a", capacity=2)])
    slot = await asyncio.wait_for(waiter, 5)
    assert a.in_flight == 2
    slot.release()
    held.release()
    assert a.in_flight == 0


def test_record_failure_ejects_with_growing_backoff_and_success_resets() -> None:
    retry = RetryConfig(eject_after_failures=2, eject_base_s=1.0, eject_max_s=3.0)
    r = Replica(spec("a"))
    now = 100.0
    assert not r.record_failure(now, retry)
    assert r.record_failure(now, retry)
    assert r.ejected_until == now + 1.0 and not r.eligible(now)
    r.record_failure(now, retry)
    assert r.record_failure(now, retry)
    assert r.ejected_until == now + 2.0
    r.record_failure(now, retry)
    assert r.record_failure(now, retry)
    assert r.ejected_until == now + 3.0  # capped
    assert r.eligible(now + 3.0)
    r.record_success()
    assert r.ejections == 0 and r.consecutive_failures == 0


async def test_a_waiter_takes_a_replica_that_recovered_after_its_ranking() -> None:
    """The head was ranked while c was out; when c comes back it serves the head at once, rather
    than leaving it to wait for the busy replica it ranked."""
    pool, (a, c) = make_pool(1, 1)
    held = pool.try_reserve([a])
    assert held is not None
    c.healthy = False
    head = asyncio.create_task(pool.reserve([a], 0, deadline(5)))
    await asyncio.sleep(0.01)
    assert not head.done()
    c.healthy = True
    pool.pump()  # what the health checker does when c comes back
    slot = await asyncio.wait_for(head, 1)
    assert slot.replica is c
    newcomer = asyncio.create_task(pool.reserve([a, c], 0, deadline(5)))
    await asyncio.sleep(0.01)
    assert not newcomer.done(), "both replicas are full: the newcomer must wait"
    held.release()
    later = await asyncio.wait_for(newcomer, 1)
    assert later.replica is a
    later.release()
    slot.release()
    assert (a.in_flight, c.in_flight) == (0, 0)


def test_two_generations_of_one_id_retiring_at_once_are_both_finished() -> None:
    registry, _, _ = make_registry()
    finished: list[Replica] = []
    registry.on_removed.append(finished.append)
    registry.apply(1, [spec("a", url="http://127.0.0.1:1001")])
    first = registry.find("a")
    assert first is not None
    s1 = registry.pool("m").try_reserve([first])
    registry.apply(2, [spec("a", url="http://127.0.0.1:1002")])
    second = registry.find("a")
    assert second is not None
    s2 = registry.pool("m").try_reserve([second])
    registry.apply(3, [spec("a", url="http://127.0.0.1:1003")])
    assert s1 is not None and s2 is not None
    assert {id(r) for r in registry.retired.values()} == {id(first), id(second)}
    s1.release()
    s2.release()
    registry.reap_retired()
    assert registry.retired == {}
    assert {id(r) for r in finished} == {id(first), id(second)}, "each retired replica is finished once"
