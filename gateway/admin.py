"""The admin API of one gateway replica: a separate aiohttp listener behind a bearer token.

It is never mounted on the public listener (the seed's lesson: a router's worker list must not be
public). Without a configured token it does not start at all. Errors use OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import msgspec
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.config import AdminConfig, ReplicaSet, parse_hostport
from gateway.pool import Registry, Replica
from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
RATE_WINDOW_S = 10.0
"""`rps` in stats is the request rate over roughly this many recent seconds."""
RATE_SAMPLE_S = 2.0

REGISTRY_KEY = web.AppKey("registry", Registry)
TELEMETRY_KEY = web.AppKey("telemetry", Telemetry)


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    **extra: object,
) -> web.Response:
    body: dict[str, object] = {
        "error": {"message": message, "type": error_type, "param": param, "code": code}
    }
    body.update(extra)
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


class RequestRates:
    """Per-replica request rate from `requests_total` samples kept over a short sliding window."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: dict[str, tuple[Replica, deque[tuple[float, int]]]] = {}

    def sample(self, replicas: list[Replica], now: float) -> None:
        live: set[str] = set()
        for replica in replicas:
            live.add(replica.id)
            entry = self._samples.get(replica.id)
            if entry is None or entry[0] is not replica:
                entry = self._samples[replica.id] = (replica, deque())
            samples = entry[1]
            samples.append((now, replica.requests_total))
            # Keep one sample older than the window so a rare reader still gets a rate.
            while len(samples) > 2 and samples[1][0] <= now - self.window_s:
                samples.popleft()
        for rid in [rid for rid in self._samples if rid not in live]:
            del self._samples[rid]

    def rate(self, replica: Replica) -> float:
        entry = self._samples.get(replica.id)
        if entry is None or entry[0] is not replica or len(entry[1]) < 2:
            return 0.0
        (t0, n0), (t1, n1) = entry[1][0], entry[1][-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


RATES_KEY = web.AppKey("rates", RequestRates)


def _auth_middleware(token: str, metrics_public: bool) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (metrics_public and request.path == "/metrics" and request.method in ("GET", "HEAD")):
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                resp = error_response(
                    401,
                    "missing or invalid admin bearer token (Authorization: Bearer <token>)",
                    "authentication_error",
                    "invalid_token",
                )
                resp.headers["WWW-Authenticate"] = 'Bearer realm="llm-gateway-admin"'
                return resp
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(
                exc.status, exc.reason, "invalid_request_error", exc.reason.lower().replace(" ", "_")
            )

    return auth


def _replica_doc(replica: Replica, now: float) -> dict[str, object]:
    return {
        "id": replica.id,
        "model": replica.model,
        "url": replica.url,
        "engine": replica.engine,
        "capacity": replica.capacity,
        "labels": replica.labels,
        "draining": replica.draining,
        "healthy": replica.healthy,
        "ejected": replica.ejected_until > now,
        "in_flight": replica.in_flight,
        "removed": replica.removed,
    }


async def get_replicas(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    now = time.monotonic()
    docs = [_replica_doc(r, now) for r in registry.replicas()]
    docs.extend(_replica_doc(r, now) for r in registry.retired.values())
    return _json({"generation": registry.generation, "replicas": docs})


def _field_of(message: str) -> tuple[str, str | None]:
    """msgspec says `reason - at `$.a[0].b``: put the field first, and return it as `param`."""
    reason, sep, where = message.rpartition(" - at ")
    if not sep:
        return f"$: {message}", None
    field = where.strip("`")
    return f"{field}: {reason}", field


async def put_replicas(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    body = await request.read()
    try:
        desired = msgspec.json.decode(body, type=ReplicaSet)
    except msgspec.ValidationError as exc:
        message, field = _field_of(str(exc))
        return error_response(400, message, "invalid_request_error", "invalid_replica_set", field)
    except msgspec.DecodeError as exc:
        return error_response(400, f"body is not valid JSON: {exc}", "invalid_request_error", "invalid_json")
    current = registry.generation
    if desired.generation < current:
        return error_response(
            409,
            f"generation {desired.generation} is older than the applied generation {current}",
            "conflict_error",
            "stale_generation",
            "generation",
            generation=current,
        )
    added, removed, updated = registry.apply(desired.generation, desired.replicas)
    if added or removed or updated:
        log.info(
            "replica set generation %d applied: added %s, removed %s, updated %s",
            desired.generation,
            added,
            removed,
            updated,
        )
    return _json({"generation": registry.generation, "added": added, "removed": removed, "updated": updated})


async def drain_replica(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    replica_id = request.match_info["id"]
    replica = registry.drain(replica_id)
    if replica is None:
        return error_response(404, f"no replica {replica_id!r}", "not_found_error", "replica_not_found", "id")
    log.info("replica %s draining on admin request (%d in flight)", replica_id, replica.in_flight)
    return _json({"id": replica.id, "draining": True, "in_flight": replica.in_flight})


async def get_stats(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    rates = request.app[RATES_KEY]
    now = time.monotonic()
    rates.sample(list(registry.replicas()), now)
    pools: dict[str, object] = {}
    for model, pool in registry.pools.items():
        replicas: dict[str, object] = {}
        pool_rps = 0.0
        for replica in pool.replicas.values():
            rps = rates.rate(replica)
            pool_rps += rps
            signals = replica.signals
            replicas[replica.id] = {
                "in_flight": replica.in_flight,
                "capacity": replica.capacity,
                "healthy": replica.healthy,
                "draining": replica.draining,
                "ejected": replica.ejected_until > now,
                "requests_total": replica.requests_total,
                "errors_total": replica.errors_total,
                "rps": round(rps, 3),
                "engine": None
                if signals is None
                else {
                    "running": signals.running,
                    "waiting": signals.waiting,
                    "kv_usage": signals.kv_usage,
                    "age_s": round(now - signals.scraped_at, 3),
                },
            }
        pools[model] = {
            "queue_depth": len(pool.waiters),
            "in_flight": pool.in_flight,
            "capacity": sum(r.capacity for r in pool.replicas.values() if r.eligible(now)),
            "rps": round(pool_rps, 3),
            "replicas": replicas,
        }
    return _json({"generation": registry.generation, "pools": pools})


async def get_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[TELEMETRY_KEY].render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def _rate_sampler(app: web.Application) -> AsyncIterator[None]:
    """Sample request counters in the background so the first stats read already has a rate."""

    async def loop() -> None:
        while True:
            app[RATES_KEY].sample(list(app[REGISTRY_KEY].replicas()), time.monotonic())
            await asyncio.sleep(RATE_SAMPLE_S)

    task = asyncio.create_task(loop(), name="admin-rate-sampler")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def build_admin_app(
    registry: Registry, telemetry: Telemetry, token: str, metrics_public: bool
) -> web.Application:
    """The admin aiohttp app. `token` must be non-empty: every route needs it (bar a public /metrics)."""
    if not token:
        raise ValueError("the admin API needs a non-empty bearer token")
    app = web.Application(
        middlewares=[_auth_middleware(token, metrics_public)], client_max_size=MAX_BODY_BYTES
    )
    app[REGISTRY_KEY] = registry
    app[TELEMETRY_KEY] = telemetry
    app[RATES_KEY] = RequestRates()
    app.cleanup_ctx.append(_rate_sampler)
    app.router.add_get("/admin/v1/replicas", get_replicas)
    app.router.add_put("/admin/v1/replicas", put_replicas)
    app.router.add_post("/admin/v1/replicas/{id}/drain", drain_replica)
    app.router.add_get("/admin/v1/stats", get_stats)
    app.router.add_get("/metrics", get_metrics)
    return app


async def start_admin(
    registry: Registry, telemetry: Telemetry, cfg: AdminConfig, token: str | None
) -> web.AppRunner | None:
    """Start the admin listener on `cfg.listen`; without a token, log why and start nothing.

    Returns the runner (call `await runner.cleanup()` on shutdown) or None.
    """
    if not token:
        log.warning(
            "admin API not started: no token configured (set LLM_GATEWAY_ADMIN_TOKEN or admin.token_file); "
            "the replica set cannot be changed at run time and /metrics is not served"
        )
        return None
    host, port = parse_hostport(cfg.listen, "admin.listen")
    runner = web.AppRunner(build_admin_app(registry, telemetry, token, cfg.metrics_public), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("admin API listening on %s:%d", host, port)
    return runner
