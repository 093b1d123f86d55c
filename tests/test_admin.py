"""The admin API over real sockets on 127.0.0.1 (aiohttp test client) against a real Registry."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from gateway.admin import build_admin_app, start_admin
from gateway.config import AccessLogConfig, AdminConfig
from gateway.pool import Registry
from gateway.telemetry import Telemetry
from policies.least_request import LeastRequestRouter
from tests.procs import free_port

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def replica(rid: str, model: str = "m", port: int = 18001, **kw: Any) -> dict[str, Any]:
    return {"id": rid, "model": model, "url": f"http://127.0.0.1:{port}", **kw}


@pytest.fixture
def registry() -> Registry:
    return Registry(lambda model: LeastRequestRouter(), queue_max=10)


@pytest.fixture
def telemetry(registry: Registry) -> Telemetry:
    telemetry = Telemetry(AccessLogConfig())
    telemetry.attach(registry)
    return telemetry


@pytest.fixture
async def client(aiohttp_client: Any, registry: Registry, telemetry: Telemetry) -> Any:
    return await aiohttp_client(build_admin_app(registry, telemetry, TOKEN, metrics_public=False))


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    doc = await resp.json()
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    return doc


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/v1/replicas"),
        ("PUT", "/admin/v1/replicas"),
        ("POST", "/admin/v1/replicas/a/drain"),
        ("GET", "/admin/v1/stats"),
        ("GET", "/metrics"),
        ("GET", "/no/such/path"),
    ],
)
async def test_every_path_needs_the_token(client: Any, method: str, path: str) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": "Basic x"},
    ):
        resp = await client.request(method, path, headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        doc = await error_of(resp)
        assert doc["error"]["type"] == "authentication_error"


async def test_put_get_and_generations(client: Any, registry: Registry) -> None:
    body = {
        "generation": 3,
        "replicas": [replica("a", capacity=4, labels={"zone": "x"}), replica("b", "n", 18002)],
    }
    resp = await client.put("/admin/v1/replicas", json=body, headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"generation": 3, "added": ["a", "b"], "removed": [], "updated": []}
    # Same set again: idempotent.
    resp = await client.put("/admin/v1/replicas", json=body, headers=AUTH)
    assert await resp.json() == {"generation": 3, "added": [], "removed": [], "updated": []}
    resp = await client.get("/admin/v1/replicas", headers=AUTH)
    doc = await resp.json()
    assert doc["generation"] == 3
    a = next(r for r in doc["replicas"] if r["id"] == "a")
    assert a == {
        "id": "a",
        "model": "m",
        "url": "http://127.0.0.1:18001",
        "engine": "vllm",
        "capacity": 4,
        "labels": {"zone": "x"},
        "draining": False,
        "healthy": True,
        "ejected": False,
        "in_flight": 0,
        "removed": False,
    }
    # An older generation is refused and names the current one.
    resp = await client.put("/admin/v1/replicas", json={"generation": 2, "replicas": []}, headers=AUTH)
    assert resp.status == 409
    doc = await error_of(resp)
    assert doc["generation"] == 3 and doc["error"]["param"] == "generation"
    assert registry.find("a") is not None
    # A newer one removes b and updates a.
    body = {"generation": 4, "replicas": [replica("a", capacity=8)]}
    resp = await client.put("/admin/v1/replicas", json=body, headers=AUTH)
    assert await resp.json() == {"generation": 4, "added": [], "removed": ["b"], "updated": ["a"]}


async def test_removed_replica_with_requests_in_flight_is_listed_as_removed(
    client: Any, registry: Registry
) -> None:
    await client.put("/admin/v1/replicas", json={"generation": 1, "replicas": [replica("a")]}, headers=AUTH)
    a = registry.find("a")
    assert a is not None
    slot = registry.pool("m").try_reserve([a])
    assert slot is not None
    await client.put("/admin/v1/replicas", json={"generation": 2, "replicas": []}, headers=AUTH)
    doc = await (await client.get("/admin/v1/replicas", headers=AUTH)).json()
    assert [(r["id"], r["removed"], r["in_flight"]) for r in doc["replicas"]] == [("a", True, 1)]
    slot.release()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"generation": "x", "replicas": []}, "$.generation"),
        ({"generation": 1}, "$"),
        ({"generation": 1, "replicas": [{"id": "a", "model": "m", "url": "ftp://x"}]}, "$.replicas[0]"),
        ({"generation": 1, "replicas": [{"id": "a", "model": "m", "url": "http://h:1", "capacity": "9"}]},
         "$.replicas[0].capacity"),
        ({"generation": 1, "replicas": [{"id": "a", "model": "m", "url": "http://h:1", "engine": "tgi"}]},
         "$.replicas[0].engine"),
        ({"generation": 1, "replicas": [{"id": "a", "model": "m", "url": "http://h:1", "colour": "red"}]},
         "$.replicas[0]"),
        ({"generation": 1, "replicas": [replica("a"), replica("a")]}, "$"),
    ],
)  # fmt: skip
async def test_bad_bodies_are_400_naming_the_field(
    client: Any, registry: Registry, body: Any, field: str
) -> None:
    resp = await client.put("/admin/v1/replicas", json=body, headers=AUTH)
    assert resp.status == 400
    doc = await error_of(resp)
    assert doc["error"]["message"].startswith(field + ":")
    assert registry.generation == -1, "nothing applied"


async def test_invalid_json_is_400(client: Any) -> None:
    resp = await client.put("/admin/v1/replicas", data=b"{not json", headers=AUTH)
    assert resp.status == 400
    assert (await error_of(resp))["error"]["code"] == "invalid_json"


async def test_drain(client: Any, registry: Registry) -> None:
    await client.put("/admin/v1/replicas", json={"generation": 1, "replicas": [replica("a")]}, headers=AUTH)
    a = registry.find("a")
    assert a is not None
    slot = registry.pool("m").try_reserve([a])
    resp = await client.post("/admin/v1/replicas/a/drain", headers=AUTH)
    assert await resp.json() == {"id": "a", "draining": True, "in_flight": 1}
    assert registry.pool("m").try_reserve([a]) is None
    assert slot is not None
    slot.release()
    resp = await client.post("/admin/v1/replicas/zz/drain", headers=AUTH)
    assert resp.status == 404
    assert (await error_of(resp))["error"]["code"] == "replica_not_found"


async def test_stats_show_what_an_autoscaler_needs(client: Any, registry: Registry) -> None:
    body = {"generation": 7, "replicas": [replica("a", capacity=2), replica("b", port=18002, capacity=3)]}
    await client.put("/admin/v1/replicas", json=body, headers=AUTH)
    pool = registry.pool("m")
    a = registry.find("a")
    assert a is not None
    slots = [pool.try_reserve([a]) for _ in range(2)]
    a.errors_total = 1
    doc = await (await client.get("/admin/v1/stats", headers=AUTH)).json()
    assert doc["generation"] == 7
    m = doc["pools"]["m"]
    assert (m["queue_depth"], m["in_flight"], m["capacity"]) == (0, 2, 5)
    ra = m["replicas"]["a"]
    assert {
        k: ra[k] for k in ("in_flight", "capacity", "healthy", "draining", "requests_total", "errors_total")
    } == {
        "in_flight": 2,
        "capacity": 2,
        "healthy": True,
        "draining": False,
        "requests_total": 2,
        "errors_total": 1,
    }
    assert isinstance(ra["rps"], float) and ra["engine"] is None
    for slot in slots:
        assert slot is not None
        # More requests between two reads give a positive rate.
        slot.release()
    for _ in range(3):
        s = pool.try_reserve([a])
        assert s is not None
        s.release()
    doc = await (await client.get("/admin/v1/stats", headers=AUTH)).json()
    assert doc["pools"]["m"]["replicas"]["a"]["rps"] > 0
    assert doc["pools"]["m"]["replicas"]["a"]["requests_total"] == 5


async def test_metrics_with_token_and_series_follow_the_replica_set(client: Any, registry: Registry) -> None:
    await client.put("/admin/v1/replicas", json={"generation": 1, "replicas": [replica("a")]}, headers=AUTH)
    a = registry.find("a")
    assert a is not None
    slot = registry.pool("m").try_reserve([a])
    resp = await client.get("/metrics", headers=AUTH)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'llm_gateway_reserved_slots{model="m",replica="a"} 1.0' in text
    assert slot is not None
    slot.release()
    await client.put("/admin/v1/replicas", json={"generation": 2, "replicas": []}, headers=AUTH)
    text = await (await client.get("/metrics", headers=AUTH)).text()
    assert 'replica="a"' not in text


async def test_public_metrics_only_when_configured(
    aiohttp_client: Any, registry: Registry, telemetry: Telemetry
) -> None:
    client = await aiohttp_client(build_admin_app(registry, telemetry, TOKEN, metrics_public=True))
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert "llm_gateway_queue_depth" in await resp.text() or "llm_gateway_requests_total" in await resp.text()
    assert (await client.get("/admin/v1/replicas")).status == 401
    assert (await client.put("/metrics")).status == 401


async def test_start_admin_refuses_without_token_and_says_why(
    registry: Registry, telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.admin"):
        runner = await start_admin(registry, telemetry, AdminConfig(listen=f"127.0.0.1:{free_port()}"), None)
    assert runner is None
    assert "admin API not started: no token configured" in caplog.text
    with pytest.raises(ValueError):
        build_admin_app(registry, telemetry, "", metrics_public=False)


async def test_start_admin_listens_on_its_own_port(registry: Registry, telemetry: Telemetry) -> None:
    port = free_port()
    runner = await start_admin(registry, telemetry, AdminConfig(listen=f"127.0.0.1:{port}"), TOKEN)
    assert runner is not None
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/admin/v1/replicas") as resp:
                assert resp.status == 401
            async with session.get(f"http://127.0.0.1:{port}/admin/v1/replicas", headers=AUTH) as resp:
                assert resp.status == 200
                assert (await resp.json())["generation"] == -1
    finally:
        await runner.cleanup()
