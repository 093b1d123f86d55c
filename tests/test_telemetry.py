"""Prometheus exposition and the access log, as an operator reads them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.access_log import BATCH
from gateway.config import AccessLogConfig, ReplicaSpec
from gateway.pool import Registry
from gateway.telemetry import Telemetry
from policies.least_request import LeastRequestRouter


def samples(telemetry: Telemetry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = telemetry.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def finished(telemetry: Telemetry, status: int = 200, replica: str = "r1", request_id: str = "req-1") -> None:
    telemetry.request_finished(
        model="m",
        replica_id=replica,
        status=status,
        duration_s=0.3,
        ttfb_s=0.02 if status < 400 else None,
        bytes_out=1234,
        request_id=request_id.encode(),
        strategy="least-request",
    )


def setup_registry(telemetry: Telemetry, *ids: str) -> Registry:
    registry = Registry(lambda model: LeastRequestRouter(), queue_max=10)
    telemetry.attach(registry)
    registry.apply(
        1, [ReplicaSpec(i, "m", f"http://127.0.0.1:{18000 + n}", capacity=1) for n, i in enumerate(ids)]
    )
    return registry


def test_request_metrics() -> None:
    t = Telemetry(AccessLogConfig())
    finished(t)
    finished(t)
    finished(t, status=503)
    s = samples(t)
    assert s[("llm_gateway_requests_total", (("model", "m"), ("replica", "r1"), ("status", "200")))] == 2
    assert s[("llm_gateway_requests_total", (("model", "m"), ("replica", "r1"), ("status", "503")))] == 1
    assert s[("llm_gateway_request_duration_seconds_count", (("model", "m"),))] == 3
    assert s[("llm_gateway_time_to_first_byte_seconds_count", (("model", "m"),))] == 2
    assert s[("llm_gateway_time_to_first_byte_seconds_bucket", (("le", "0.025"), ("model", "m")))] == 2
    assert s[("llm_gateway_response_bytes_total", (("model", "m"),))] == 3 * 1234


def test_error_counters() -> None:
    t = Telemetry(AccessLogConfig())
    t.upstream_error("r1", "connect")
    t.upstream_error("r1", "connect")
    t.upstream_error("r1", "midstream")
    t.retry("m")
    t.ejection("r1")
    t.routing_abstention("kv-cache")
    t.queue_depth("m", 4)
    s = samples(t)
    assert s[("llm_gateway_upstream_errors_total", (("kind", "connect"), ("replica", "r1")))] == 2
    assert s[("llm_gateway_upstream_errors_total", (("kind", "midstream"), ("replica", "r1")))] == 1
    assert s[("llm_gateway_retries_total", (("model", "m"),))] == 1
    assert s[("llm_gateway_ejections_total", (("replica", "r1"),))] == 1
    assert s[("llm_gateway_routing_abstentions_total", (("scorer", "kv-cache"),))] == 1
    assert s[("llm_gateway_queue_depth", (("model", "m"),))] == 4


async def test_reserved_slots_and_queue_depth_follow_the_pool() -> None:
    t = Telemetry(AccessLogConfig())
    registry = setup_registry(t, "a")
    pool = registry.pool("m")
    a = registry.find("a")
    assert a is not None
    key = ("llm_gateway_reserved_slots", (("model", "m"), ("replica", "a")))
    assert samples(t)[key] == 0
    slot = pool.try_reserve([a])
    assert slot is not None
    assert samples(t)[key] == 1
    waiter = asyncio.create_task(pool.reserve([a], 0, time.monotonic() + 5))
    await asyncio.sleep(0.01)
    assert samples(t)[("llm_gateway_queue_depth", (("model", "m"),))] == 1
    slot.release()
    second = await asyncio.wait_for(waiter, 5)
    assert samples(t)[key] == 1
    second.release()
    s = samples(t)
    assert s[key] == 0 and s[("llm_gateway_queue_depth", (("model", "m"),))] == 0


def test_removed_replicas_lose_their_series_and_an_id_reused_meanwhile_keeps_them() -> None:
    t = Telemetry(AccessLogConfig())
    registry = setup_registry(t, "a", "b")
    for rid in ("a", "b"):
        finished(t, replica=rid)
        t.upstream_error(rid, "timeout")
        t.ejection(rid)
        t.scrape_ok(rid, time.monotonic())
        t.scrape_failed(rid)
        t.health_check(rid, True)
        t.health_changed(rid, True)
    registry.apply(2, [ReplicaSpec("b", "m", "http://127.0.0.1:18001")])
    body = t.render()[0].decode()
    assert 'replica="a"' not in body
    assert 'replica="b"' in body
    # b is retired with a request in flight while a new b (new URL) takes over the id.
    b = registry.find("b")
    assert b is not None
    slot = registry.pool("m").try_reserve([b])
    assert slot is not None
    registry.apply(3, [ReplicaSpec("b", "m", "http://127.0.0.1:18099")])
    slot.release()
    registry.reap_retired()
    body = t.render()[0].decode()
    assert 'llm_gateway_reserved_slots{model="m",replica="b"} 0.0' in body


def test_scrape_age_is_computed_when_prometheus_asks() -> None:
    t = Telemetry(AccessLogConfig())
    t.scrape_ok("a", time.monotonic() - 3.0)
    age = samples(t)[("llm_gateway_scrape_age_seconds", (("replica", "a"),))]
    assert 3.0 <= age < 60.0


def test_two_instances_do_not_collide() -> None:
    Telemetry(AccessLogConfig())
    Telemetry(AccessLogConfig())  # each has its own registry: no duplicate-series error


@pytest.fixture(autouse=True)
def access_logger_at_info() -> Iterator[None]:
    """As `llm-gateway serve` sets it up (`--log-level info`); pytest leaves the root at WARNING."""
    access_logger = logging.getLogger("gateway.access")
    previous = access_logger.level
    access_logger.setLevel(logging.INFO)
    yield
    access_logger.setLevel(previous)


def access_lines(t: Telemetry, stream: io.StringIO) -> list[str]:
    t.flush_access_log()
    return stream.getvalue().splitlines()


def test_access_log_line() -> None:
    stream = io.StringIO()
    t = Telemetry(AccessLogConfig(), access_stream=stream)
    finished(t, request_id="abc123")
    assert stream.getvalue() == "", "lines are written in batches, not per request"
    [line] = access_lines(t, stream)
    for part in (
        "gateway.access",
        "abc123",
        "model=m",
        "replica=r1",
        "status=200",
        "ttfb=0.0200",
        "duration=0.3000",
        "bytes=1234",
    ):
        assert part in line


def test_access_log_json_lines_are_objects() -> None:
    stream = io.StringIO()
    t = Telemetry(AccessLogConfig(), access_stream=stream)
    t.access.fmt = "json"
    finished(t, request_id="j1")
    finished(t, status=502, request_id="j2")
    docs = [json.loads(line) for line in access_lines(t, stream)]
    assert [(d["request_id"], d["status"], d["logger"]) for d in docs] == [
        ("j1", 200, "gateway.access"),
        ("j2", 502, "gateway.access"),
    ]


def test_a_full_batch_is_written_without_waiting_for_the_timer() -> None:
    stream = io.StringIO()
    t = Telemetry(AccessLogConfig(), access_stream=stream)
    for i in range(BATCH):
        finished(t, request_id=f"r{i}")
    assert len(stream.getvalue().splitlines()) == BATCH


def test_sampling_keeps_every_error() -> None:
    stream = io.StringIO()
    t = Telemetry(AccessLogConfig(sample_rate=0.0), access_stream=stream)
    for i in range(20):
        finished(t, request_id=f"ok-{i}")
    finished(t, status=502, request_id="bad")
    finished(t, status=429, request_id="busy")
    lines = access_lines(t, stream)
    assert len(lines) == 2 and "bad model=" in lines[0] and "busy model=" in lines[1]


def test_access_log_obeys_the_logger_level() -> None:
    stream = io.StringIO()
    t = Telemetry(AccessLogConfig(), access_stream=stream)
    access_logger = logging.getLogger("gateway.access")
    previous = access_logger.level
    access_logger.setLevel(logging.WARNING)
    try:
        finished(t, status=500)
    finally:
        access_logger.setLevel(previous)
    assert access_lines(t, stream) == []


def test_disabled_access_log_writes_nothing() -> None:
    stream = io.StringIO()
    t = Telemetry(AccessLogConfig(enabled=False), access_stream=stream)
    finished(t)
    finished(t, status=500)
    assert access_lines(t, stream) == []
    assert (
        samples(t)[("llm_gateway_requests_total", (("model", "m"), ("replica", "r1"), ("status", "500")))]
        == 1
    )
