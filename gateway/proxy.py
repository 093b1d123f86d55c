"""One request's life on the hot path: decode the routing fields, rank, reserve a slot, dispatch, relay.

The common case runs start to finish in callbacks without a task: a free slot on the best-ranked replica
and an idle keep-alive connection to it mean the request goes upstream inside `data_received`, and the
response's last byte releases the slot inside the upstream's `data_received`. A task exists only when
something has to wait: the pool's queue, a new upstream connection, a retry's backoff.

The slot is released exactly once on every path (done, upstream error, timeout, client gone, shutdown),
synchronously, so cancellation can neither interrupt nor mask it. Retries happen only before the first
response byte; afterwards an upstream failure ends an SSE stream with an OpenAI-shaped error event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from itertools import count
from typing import Final

import msgspec
import orjson

from gateway.config import GatewayConfig
from gateway.http_server import ClientConnection, Request, Route, error_body
from gateway.pool import NoReplicas, Pool, QueueFull, QueueTimeout, Registry, Replica, Slot
from gateway.request_fields import RoutingFields
from gateway.telemetry import Telemetry
from gateway.upstream import UpstreamConnection, UpstreamPool
from policies.base import RouteRequest, RoutingError
from policies.text import chat_text, completion_text

log = logging.getLogger(__name__)

_monotonic: Final = time.monotonic

DEFAULT_OUTPUT_TOKENS: Final = 256
"""Expected output length of a request that names no `max_tokens` (for `outstanding_tokens`)."""

CHAT: Final = "chat"
COMPLETIONS: Final = "completions"
EMBEDDINGS: Final = "embeddings"
_PROXY_KINDS: Final = frozenset((CHAT, COMPLETIONS, EMBEDDINGS))

ROUTES: Final[dict[bytes, Route]] = {
    b"/v1/chat/completions": Route(CHAT, (b"POST",)),
    b"/v1/completions": Route(COMPLETIONS, (b"POST",)),
    b"/v1/embeddings": Route(EMBEDDINGS, (b"POST",)),
    b"/v1/models": Route("models", (b"GET", b"HEAD")),
    b"/health": Route("health", (b"GET", b"HEAD")),
    b"/ready": Route("ready", (b"GET", b"HEAD")),
}


_decoder: Final = msgspec.json.Decoder(RoutingFields)

_HEALTH_BODY: Final = b'{"status":"ok"}'
_READY_BODY: Final = b'{"status":"ready"}'
_NOT_READY_BODY: Final = error_body("no healthy replica in any pool", "service_unavailable", "not_ready")
_BAD_JSON: Final = error_body(
    "We could not parse the JSON body of your request: it must be a JSON object.",
    "invalid_request_error",
    "invalid_json",
)
_NO_MODEL: Final = error_body("you must provide a model parameter", "invalid_request_error", "missing_model")
_SSE_ERROR: Final = (
    b'data: {"error": {"message": "the upstream replica failed during the stream", '
    b'"type": "upstream_error", "param": null, "code": "%s"}}\n\n'
)


_LINE_CACHE_MAX: Final = 1024
"""Distinct strategies a client can name by header are many: the cache of their header lines is bounded."""


def _header_line(cache: dict[str, bytes], name: bytes, value: str) -> bytes:
    line = cache.get(value)
    if line is None:
        line = b"%s: %s\r\n" % (name, value.encode("latin-1", "replace"))
        if len(cache) < _LINE_CACHE_MAX:
            cache[value] = line
    return line


class _Ids:
    """Request ids: a random per-process prefix and a counter; unique across workers, ~free to make."""

    def __init__(self) -> None:
        self.prefix = os.urandom(5).hex().encode() + b"-"
        self.counter = count(1)

    def next(self) -> bytes:
        return b"%s%x" % (self.prefix, next(self.counter))


class Gateway:
    """The public listener's handler: local endpoints, and proxying of the OpenAI POST endpoints."""

    routes = ROUTES

    def __init__(self, config: GatewayConfig, registry: Registry, telemetry: Telemetry) -> None:
        """Build inside the running loop (it is kept: asyncio.get_running_loop() costs a getpid())."""
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.registry = registry
        self.telemetry = telemetry
        self.retry = config.retry
        self.timeouts = config.timeouts
        self.queue_timeout_s = config.queue.timeout_s
        self.ids = _Ids()
        self.watched: set[Exchange] = set()
        """Exchanges waiting for or relaying a response: their upstream timeouts are swept, so the
        per-request path never creates a timer."""
        self.sweep_s = max(
            0.01,
            min(0.1, self.timeouts.first_byte_s / 4, self.timeouts.idle_s / 4, self.timeouts.total_s / 4),
        )
        self._sweeper: asyncio.TimerHandle | None = self.loop.call_later(self.sweep_s, self._sweep)
        self._models_cache: tuple[object, bytes] | None = None
        self._strategy_lines: dict[str, bytes] = {}
        self._profile_lines: dict[str, bytes] = {}
        registry.on_added.append(self._replica_added)
        registry.on_removed.append(self._replica_removed)
        for replica in registry.replicas():
            self._replica_added(replica)

    def _sweep(self) -> None:
        now = _monotonic()
        try:
            for exchange in list(self.watched):
                exchange.check_timeouts(now)
        except Exception:
            log.exception("timeout sweep failed")
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    def close(self) -> None:
        """Stop the timeout sweep and close every upstream connection pool."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for replica in list(self.registry.replicas()):
            self._replica_removed(replica)

    # -- replicas come and go ----------------------------------------------------------------------

    def _replica_added(self, replica: Replica) -> None:
        replica.upstream = UpstreamPool(
            replica.host,
            replica.port,
            replica.id,
            max_idle=replica.capacity,
            connect_timeout=self.timeouts.connect_s,
            tls=replica.url.startswith("https://"),
        )

    def _replica_removed(self, replica: Replica) -> None:
        upstream = replica.upstream
        if isinstance(upstream, UpstreamPool):
            upstream.close()

    # -- handler --------------------------------------------------------------------------------

    def handle(self, conn: ClientConnection, req: Request) -> None:
        route = req.route
        assert route is not None
        kind = route.kind
        if kind in _PROXY_KINDS:
            self._proxy(conn, req, kind)
        elif kind == "health":
            conn.respond(200, _HEALTH_BODY, req)
        elif kind == "ready":
            if self._ready():
                conn.respond(200, _READY_BODY, req)
            else:
                conn.respond(503, _NOT_READY_BODY, req)
        else:
            conn.respond(200, self._models(), req)

    def _ready(self) -> bool:
        now = _monotonic()
        return any(pool.has_eligible(now) for pool in self.registry.pools.values())

    def _models(self) -> bytes:
        registry = self.registry
        key = (registry.generation, tuple((m, len(p.replicas)) for m, p in registry.pools.items()))
        cached = self._models_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "llm-gateway"}
            for model, pool in registry.pools.items()
            if pool.replicas
        ]
        body = orjson.dumps({"object": "list", "data": data})
        self._models_cache = (key, body)
        return body

    def _proxy(self, conn: ClientConnection, req: Request, kind: str) -> None:
        start = _monotonic()
        try:
            fields = _decoder.decode(req.body)
        except msgspec.ValidationError as exc:
            self._refuse(
                conn, req, "", 400, error_body(f"invalid request body: {exc}", "invalid_request_error")
            )
            return
        except msgspec.DecodeError:
            self._refuse(conn, req, "", 400, _BAD_JSON)
            return
        model = fields.model
        if not model:
            self._refuse(conn, req, "", 400, _NO_MODEL)
            return
        pool = self.registry.pools.get(model)
        if pool is None or not pool.replicas:
            body = error_body(
                f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found"
            )
            self._refuse(conn, req, "", 404, body)  # a client-chosen name must not become a label
            return
        if kind == CHAT:
            text = chat_text(fields.messages) if fields.messages else ""
        elif kind == COMPLETIONS:
            text = completion_text(fields.prompt)
        else:
            text = completion_text(fields.input)
        max_tokens = fields.max_tokens if fields.max_tokens is not None else fields.max_completion_tokens
        rreq = RouteRequest(
            model,
            text,
            max_tokens=max_tokens,
            session_id=req.session_id or fields.user,
            strategy_header=req.strategy,
            profile_header=req.profile,
        )
        tokens = rreq.prompt_tokens
        if kind != EMBEDDINGS:
            tokens += max_tokens if max_tokens is not None and max_tokens > 0 else DEFAULT_OUTPUT_TOKENS
        eligible = pool.eligible(start)
        if not eligible:
            body = error_body(
                f"no healthy replica for model `{model}`", "service_unavailable", "no_healthy_replica"
            )
            self._refuse(conn, req, model, 503, body)
            return
        try:
            decision = pool.router.select(rreq, eligible, start)
        except RoutingError as exc:
            headers = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in exc.headers)
            body = error_body(exc.message, exc.error_type, exc.code, exc.param)
            self._refuse(conn, req, model, exc.status, body, headers)
            return
        ranked: list[Replica] = decision.ranked  # type: ignore[assignment]
        exchange = Exchange(self, conn, req, pool, rreq, ranked, tokens, start)
        exchange.strategy = decision.strategy
        routing = _header_line(self._strategy_lines, b"routing-strategy", decision.strategy)
        if decision.profile:
            routing += _header_line(self._profile_lines, b"x-gateway-profile", decision.profile)
        exchange.routing_headers = routing
        conn.active = exchange
        exchange.start()

    def _refuse(
        self, conn: ClientConnection, req: Request, model: str, status: int, body: bytes, headers: bytes = b""
    ) -> None:
        rid = req.request_id or self.ids.next()
        conn.respond(status, body, req, b"x-request-id: %s\r\n%s" % (rid, headers))
        self.telemetry.request_finished(
            model=model,
            replica_id="",
            status=status,
            duration_s=0.0,
            ttfb_s=None,
            bytes_out=len(body),
            request_id=rid,
            strategy=None,
        )


class Exchange:
    """One proxied request, from reservation to the last byte; the sink of its upstream connection."""

    __slots__ = (
        "attempts",
        "bytes_out",
        "client",
        "client_http11",
        "client_keep_alive",
        "close_client",
        "conn",
        "finished",
        "fresh",
        "gw",
        "head_at",
        "pool",
        "ranked",
        "replica",
        "req",
        "request_id",
        "routing_headers",
        "rreq",
        "sent_at",
        "slot",
        "sse",
        "status",
        "strategy",
        "t0",
        "task",
        "tokens",
        "tried",
        "up",
    )

    def __init__(
        self,
        gw: Gateway,
        conn: ClientConnection,
        req: Request,
        pool: Pool,
        rreq: RouteRequest,
        ranked: list[Replica],
        tokens: int,
        start: float,
    ) -> None:
        self.gw = gw
        self.conn = conn
        transport = conn.transport
        assert transport is not None
        self.client: asyncio.Transport = transport
        self.req = req
        self.pool = pool
        self.rreq = rreq
        self.ranked = ranked
        self.tokens = tokens
        self.t0 = start
        self.request_id = req.request_id or gw.ids.next()
        self.client_http11 = req.http11
        self.client_keep_alive = req.keep_alive
        self.strategy: str | None = None
        self.routing_headers = b""
        """Response header lines naming the routing decision (`routing-strategy`, `x-gateway-profile`)."""
        self.slot: Slot | None = None
        self.replica: Replica | None = None
        self.up: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.finished = False
        self.fresh = False
        self.attempts = 0
        self.tried: list[Replica] = []
        self.status = 0
        self.sse = False
        self.close_client = False
        self.bytes_out = 0
        self.sent_at = 0.0
        self.head_at = 0.0

    # -- getting a slot and a connection ------------------------------------------------------------

    def start(self) -> None:
        slot = self.pool.try_reserve(self.ranked, self.tokens, self.t0)
        if slot is not None:
            self.slot = slot
            self.replica = slot.replica
            upstream: UpstreamPool = slot.replica.upstream  # type: ignore[assignment]
            up = upstream.take_idle()
            if up is not None:
                self._send(up, self.t0)  # still the same callback: no need to read the clock again
                return
        self.task = self.gw.loop.create_task(self._acquire(0.0))

    async def _acquire(self, delay: float) -> None:
        """The slow path: wait for a slot, open a connection, back off between attempts."""
        try:
            if delay:
                await asyncio.sleep(delay)
            while True:
                slot = self.slot
                if slot is None:
                    deadline = min(self.t0 + self.gw.queue_timeout_s, self.t0 + self.gw.timeouts.total_s)
                    slot = await self.pool.reserve(self.ranked, self.tokens, deadline)
                    self.slot = slot
                    self.replica = slot.replica
                upstream: UpstreamPool = slot.replica.upstream  # type: ignore[assignment]
                up = None if self.fresh else upstream.take_idle()
                self.fresh = False
                if up is None:
                    try:
                        up = await upstream.connect()
                    except (OSError, TimeoutError) as exc:
                        kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
                        wait = self._prepare_retry(kind)
                        if wait is None:
                            return
                        await asyncio.sleep(wait)
                        continue
                self.task = None
                self._send(up, _monotonic())
                return
        except QueueFull:
            self._fail(
                429,
                "too many requests waiting for this model; retry later",
                "rate_limit_exceeded",
                "queue_full",
                b"retry-after: 1\r\n",
            )
        except QueueTimeout:
            self._fail(
                429,
                "no replica became free in time; retry later",
                "rate_limit_exceeded",
                "queue_timeout",
                b"retry-after: 1\r\n",
            )
        except NoReplicas:
            self._fail(
                503,
                f"no healthy replica for model `{self.pool.model}`",
                "service_unavailable",
                "no_healthy_replica",
            )
        except asyncio.CancelledError:
            self._release()
            raise
        except Exception:
            log.exception("request %s failed", self.request_id.decode("latin-1"))
            self._fail(500, "internal gateway error", "server_error", None)

    def _send(self, up: UpstreamConnection, now: float) -> None:
        replica = self.replica
        assert replica is not None
        upstream: UpstreamPool = replica.upstream  # type: ignore[assignment]
        self.up = up
        if self.conn.paused_writing:
            up.pause()
        req = self.req
        body = req.body
        self.sent_at = now
        up.send(
            self,
            b"%s %s HTTP/1.1\r\n%s%scontent-length: %d\r\nx-request-id: %s\r\n\r\n%s"
            % (
                req.method,
                req.url,
                upstream.host_header,
                b"".join(req.forward),
                len(body),
                self.request_id,
                body,
            ),
        )
        self.gw.watched.add(self)
        self.pool.router.on_dispatch(self.rreq, replica, now)

    # -- what the upstream connection reports ---------------------------------------------------

    def on_head(self, status: int, sse: bool, close_client: bool) -> None:
        self.status = status
        self.sse = sse
        self.close_client = close_client
        up = self.up
        self.head_at = up.last_at if up is not None else _monotonic()  # the head's arrival, just read
        replica = self.replica
        assert replica is not None
        if status >= 500:
            self.gw.telemetry.upstream_error(replica.id, "status_5xx")
        elif replica.consecutive_failures or replica.ejections:
            replica.record_success()

    def on_complete(self, last_at: float, n_chunks: int) -> None:
        replica = self.replica
        if replica is not None and last_at:
            itl = None
            if self.sse and n_chunks > 1:
                itl = (last_at - self.head_at) / (n_chunks - 1)
            replica.observe_latency(self.head_at - self.sent_at, itl)
        self._end(self.status, self.close_client, last_at)

    def on_failed(self, kind: str, *, before_head: bool, stale: bool, clean_cut: bool) -> None:
        up = self.up
        self.up = None
        if self.finished:
            return
        self._unwatch()
        if before_head:
            if stale:
                # A keep-alive connection the replica had closed; resend once on a fresh one, same slot.
                self.fresh = True
                self.task = self.gw.loop.create_task(self._acquire(0.0))
                return
            self._retry_or_fail(kind)
            return
        self._midstream(kind, up, clean_cut)

    # -- the client side --------------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client disconnected: drop the upstream connection (the engine aborts), free the slot."""
        if self.finished:
            return
        self.finished = True
        self._unwatch()
        up = self.up
        if up is not None:
            self.up = None
            up.abort()
        task = self.task
        if task is not None:
            self.task = None
            task.cancel()
        self._release()
        self._report(499)

    def pause(self) -> None:
        if self.up is not None:
            self.up.pause()

    def resume(self) -> None:
        if self.up is not None:
            self.up.resume()

    # -- endings ----------------------------------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        """Called by the gateway's sweep while a response is awaited or relayed."""
        up = self.up
        if up is None or self.finished:
            self._unwatch()
            return
        timeouts = self.gw.timeouts
        total_at = self.t0 + timeouts.total_s
        if not up.head_done:
            if now >= total_at:
                self._unwatch()
                self.up = None
                up.abort()
                if self.replica is not None:
                    self.gw.telemetry.upstream_error(self.replica.id, "timeout")
                self._fail(504, "the request took longer than the total timeout", "timeout", "timeout")
            elif now >= self.sent_at + timeouts.first_byte_s:
                self._unwatch()
                self.up = None
                up.abort()
                self._retry_or_fail("first_byte_timeout")
            return
        idle_at = up.last_at + timeouts.idle_s
        if now >= idle_at or now >= total_at:
            self._unwatch()
            self.up = None
            clean_cut = not up.in_chunk
            up.abort()
            self._midstream("idle_timeout" if now >= idle_at else "timeout", up, clean_cut)

    def _unwatch(self) -> None:
        self.gw.watched.discard(self)

    def _midstream(self, kind: str, up: UpstreamConnection | None, clean_cut: bool) -> None:
        """The response already started: no retry. Close an SSE stream with an error event."""
        replica = self.replica
        if replica is not None:
            self.gw.telemetry.upstream_error(replica.id, kind)
            if kind == "midstream" and replica.record_failure(_monotonic(), self.gw.retry):
                self.gw.telemetry.ejection(replica.id)
        if self.sse and clean_cut and up is not None and not self.conn.closed:
            event = _SSE_ERROR % kind.encode()
            if up.raw and up.chunked:
                self.client.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            elif not up.raw:
                self.client.write(event)
            self.bytes_out += len(event)
        self._end(502, close=True)

    def _prepare_retry(self, kind: str) -> float | None:
        """Count the failure, free the slot, pick the candidates left. The backoff, or None if it answered."""
        gw = self.gw
        replica = self.replica
        now = _monotonic()
        self._release()
        if replica is not None:
            gw.telemetry.upstream_error(replica.id, kind)
            if replica.record_failure(now, gw.retry):
                gw.telemetry.ejection(replica.id)
            self.tried.append(replica)
        self.attempts += 1
        status = 504 if kind in ("timeout", "first_byte_timeout") else 502
        message = f"upstream {replica.id if replica else '?'} failed: {kind}"
        if self.attempts >= gw.retry.max_attempts or now >= self.t0 + gw.timeouts.total_s:
            self._fail(status, message, "upstream_error", kind)
            return None
        eligible = [r for r in self.ranked if r.eligible(now)]
        fresh = [r for r in eligible if r not in self.tried]
        ranked = fresh or eligible
        if not ranked:
            self._fail(status, message, "upstream_error", kind)
            return None
        self.ranked = ranked
        gw.telemetry.retry(self.pool.model)
        return min(gw.retry.backoff_max_s, gw.retry.backoff_base_s * (2 ** (self.attempts - 1)))

    def _retry_or_fail(self, kind: str) -> None:
        wait = self._prepare_retry(kind)
        if wait is not None:
            self.task = self.gw.loop.create_task(self._acquire(wait))

    def _release(self) -> None:
        slot = self.slot
        if slot is not None:
            self.slot = None
            try:
                slot.release()
            except Exception:
                log.exception("releasing a slot of %s failed", slot.replica.id)

    def _fail(
        self, status: int, message: str, error_type: str, code: str | None, headers: bytes = b""
    ) -> None:
        """Answer an error before any response byte went out."""
        if self.finished:
            return
        self.finished = True
        self._unwatch()
        self._release()
        body = error_body(message, error_type, code)
        self.bytes_out = len(body)
        self._report(status)
        self.conn.respond(
            status,
            body,
            self.req,
            b"x-request-id: %s\r\n%s%s" % (self.request_id, self.routing_headers, headers),
        )

    def _end(self, status: int, close: bool, now: float = 0.0) -> None:
        """The response is over (`now`: when its last byte arrived, if known)."""
        if self.finished:
            return
        self.finished = True
        self.gw.watched.discard(self)
        if self.slot is not None:
            self._release()
        if not now:
            now = _monotonic()
        self._report(status, now)
        self.conn.finish(close, now)

    def _report(self, status: int, now: float = 0.0) -> None:
        replica = self.replica
        self.gw.telemetry.request_finished(
            model=self.pool.model,
            replica_id=replica.id if replica is not None else "",
            status=status,
            duration_s=(now or _monotonic()) - self.t0,
            ttfb_s=self.head_at - self.t0 if self.head_at else None,
            bytes_out=self.bytes_out,
            request_id=self.request_id,
            strategy=self.strategy,
        )
