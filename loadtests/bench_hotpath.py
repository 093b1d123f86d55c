"""The gateway's Python cost per request, without sockets: the whole hot path driven in one process.

A client connection, the gateway's handler, a replica's pool and a keep-alive upstream connection are
wired as `serve` wires them, but their transports are in-memory: each iteration feeds the benchmark's
chat request to the client side and nginx's canned answer to the upstream side. What is timed is
exactly the gateway's own Python (parsing, routing, slot, relay, metrics), none of the kernel's work,
so features can be switched off one at a time and their cost read as a difference.

    python loadtests/bench_hotpath.py                  # every variant, fastest of 5 repetitions
    python loadtests/bench_hotpath.py --profile        # cProfile of the default variant, top functions

Costs are thread CPU time, and the fastest repetition is reported: on a shared VM, other work only ever
adds to a figure (cache misses, stolen cycles), so the minimum is the best estimate of the code's cost.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.config import GatewayConfig, replica_set_from_config  # noqa: E402
from gateway.http_server import ClientConnection, HttpServer  # noqa: E402
from gateway.pool import Registry  # noqa: E402
from gateway.proxy import Gateway  # noqa: E402
from gateway.serve import Routers  # noqa: E402
from gateway.telemetry import Telemetry  # noqa: E402
from gateway.upstream import UpstreamConnection, UpstreamPool  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
UPSTREAM = "http://127.0.0.1:8001"


def request_bytes(body: bytes) -> bytes:
    """What wrk sends (loadtests/wrk/openai.lua)."""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def answer_bytes(body: bytes, content_type: bytes) -> bytes:
    """What the canned nginx engine sends back."""
    return (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 10:00:00 GMT\r\n"
        b"Content-Type: %s\r\nContent-Length: %d\r\nLast-Modified: Mon, 30 Nov 2026 09:00:00 GMT\r\n"
        b"Connection: keep-alive\r\nAccept-Ranges: bytes\r\n\r\n%s" % (content_type, len(body), body)
    )


def chunked_parts(body: bytes, content_type: bytes) -> list[bytes]:
    """What an engine streaming for real sends: a chunked head, then each SSE event in a chunk of its own,
    each arriving in a read of its own (the last with the terminating chunk)."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n"
        b"date: Mon, 30 Nov 2026 10:00:00 GMT\r\nserver: uvicorn\r\n\r\n" % content_type
    )
    events = [e + b"\n\n" for e in body.split(b"\n\n") if e.strip()]
    parts = [head] + [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    parts[-1] += b"0\r\n\r\n"
    return parts


SCENARIOS = {
    "chat": (HERE / "wrk" / "chat-request.json", HERE / "nginx" / "chat.json", b"application/json"),
    "stream": (HERE / "wrk" / "stream-request.json", HERE / "nginx" / "stream.sse", b"text/event-stream"),
    "stream-chunked": (
        HERE / "wrk" / "stream-request.json",
        HERE / "nginx" / "stream.sse",
        b"text/event-stream",
    ),
}
"""`stream` is nginx's canned file (one Content-Length body, usually one read); `stream-chunked` is the
same 64 events as an engine sends them, one chunk per read, so the per-chunk cost shows."""

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "least-request only": {"routing": {"default_strategy": "least-request"}},
    "random only": {"routing": {"default_strategy": "random"}},
    "access log on": {"access_log": {"enabled": True}},
}


class MemoryTransport:
    """Enough of uvloop's transport for the hot path: writes are kept, flow control is a no-op."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, chunks: tuple[bytes, ...]) -> None:
        self.out.extend(chunks)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def make_config(variant: dict[str, Any], capacity: int) -> GatewayConfig:
    raw: dict[str, Any] = {
        "pools": [{"model": MODEL, "replicas": [{"id": "engine-0", "url": UPSTREAM, "capacity": capacity}]}],
        "access_log": {"enabled": False},
    }
    raw.update(variant)
    return msgspec.convert(raw, GatewayConfig)


class Rig:
    """One gateway as `serve` builds it, with in-memory transports on both sides."""

    def __init__(self, variant: dict[str, Any], scenario: str, access_log_sink: io.StringIO) -> None:
        request_path, answer_path, content_type = SCENARIOS[scenario]
        self.request = request_bytes(request_path.read_bytes())
        if scenario == "stream-chunked":
            self.answer_parts = chunked_parts(answer_path.read_bytes(), content_type)
        else:
            self.answer_parts = [answer_bytes(answer_path.read_bytes(), content_type)]
        self.answer = b"".join(self.answer_parts)
        config = make_config(variant, capacity=64)
        self.telemetry = Telemetry(config.access_log, access_stream=access_log_sink)
        routers = Routers(config)
        self.registry = Registry(routers.factory, queue_max=config.queue.max_size)
        for pool in config.pools:
            self.registry.pool(pool.model)
        self.telemetry.attach(self.registry)
        self.gateway = Gateway(config, self.registry, self.telemetry)
        initial = replica_set_from_config(config)
        self.registry.apply(initial.generation, initial.replicas)
        self.server = HttpServer(self.gateway, config.limits, config.timeouts)
        self.client_transport = MemoryTransport()
        self.client = ClientConnection(self.server)
        self.client.connection_made(self.client_transport)  # type: ignore[arg-type]
        replica = next(iter(self.registry.replicas()))
        pool: UpstreamPool = replica.upstream  # type: ignore[assignment]
        self.pool = pool
        self.upstream_transport = MemoryTransport()
        self.upstream = UpstreamConnection(pool)
        self.upstream.connection_made(self.upstream_transport)  # type: ignore[arg-type]
        pool.put(self.upstream)

    def one(self) -> None:
        self.client.data_received(self.request)
        upstream = self.upstream
        for part in self.answer_parts:
            upstream.data_received(part)

    def check(self) -> None:
        """The relay really happened: one request upstream, one 200 answer to the client."""
        self.client_transport.out.clear()
        self.upstream_transport.out.clear()
        self.one()
        sent = b"".join(self.upstream_transport.out)
        got = b"".join(self.client_transport.out)
        if not sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n"):
            raise SystemExit(f"nothing was sent upstream: {sent[:200]!r}")
        if not got.startswith(b"HTTP/1.1 200 OK\r\n") or not got.endswith(self.answer[-64:]):
            raise SystemExit(f"the client did not get the answer: {got[:300]!r}")
        if self.upstream.sink is not None or self.upstream not in self.pool.idle:
            raise SystemExit("the upstream connection did not go back to the pool after the answer")

    def run(self, n: int) -> float:
        """CPU microseconds per request over n requests."""
        one = self.one
        out_c, out_u = self.client_transport.out, self.upstream_transport.out
        t0 = time.thread_time_ns()
        for i in range(n):
            one()
            if i & 255 == 0:
                out_c.clear()
                out_u.clear()
        return (time.thread_time_ns() - t0) / n / 1000


async def measure(variant: dict[str, Any], scenario: str, n: int, reps: int) -> list[float]:
    sink = io.StringIO()
    rig = Rig(variant, scenario, sink)
    rig.check()
    rig.run(min(n, 2000))  # warm caches and the prefix index
    results = []
    for _ in range(reps):
        results.append(rig.run(n))
        sink.seek(0)
        sink.truncate()
    rig.gateway.close()
    return results


async def profile(scenario: str, n: int, top: int) -> str:
    rig = Rig({}, scenario, io.StringIO())
    rig.check()
    rig.run(2000)
    prof = cProfile.Profile()
    prof.enable()
    rig.run(n)
    prof.disable()
    rig.gateway.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per variant (medians reported)")
    parser.add_argument(
        "--scenarios",
        default="chat,stream,stream-chunked",
        help="comma-separated: chat,stream,stream-chunked",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the default variant instead")
    parser.add_argument("--top", type=int, default=30, help="functions shown by --profile")
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    if args.profile:
        for scenario in scenarios:
            print(f"## {scenario}")
            print(uvloop.run(profile(scenario, args.requests, args.top)))
        return 0
    print(f"Gateway hot path, Python CPU µs per request (fastest of {args.reps} x {args.requests:,}):\n")
    print("| variant | " + " | ".join(scenarios) + " |")
    print("|---|" + "---|" * len(scenarios))
    for name, variant in VARIANTS.items():
        cells = []
        for scenario in scenarios:
            runs = uvloop.run(measure(variant, scenario, args.requests, args.reps))
            cells.append(f"{min(runs):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
