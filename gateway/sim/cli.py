"""`llm-gateway sim`: flags onto `SimConfig`, then serve on uvloop until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import msgspec
import uvloop

from gateway.sim.config import SimConfig
from gateway.sim.server import serve

log = logging.getLogger("gateway.sim")
_D = SimConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--dialect", choices=["vllm", "sglang", "llamacpp"], default=_D.dialect, help="engine to imitate")
    a("--model", default=_D.model, help=f"served model name (default: {_D.model})")
    a("--host", default=_D.host, help=f"listen address (default: {_D.host})")
    a("--port", type=int, default=_D.port, help=f"listen port (default: {_D.port})")
    a("--id", default="", help="replica name for the x-sim-replica-id header (default: sim-PORT)")
    a("--instant", action="store_true", help="no modelled delays; metrics and prefix cache still count")
    a("--max-num-seqs", type=int, default=_D.max_num_seqs, help="running batch limit (default: %(default)s)")
    a(
        "--max-num-batched-tokens",
        type=int,
        default=_D.max_num_batched_tokens,
        help="token budget per engine step, chunked prefill (default: %(default)s)",
    )
    a("--max-model-len", type=int, default=_D.max_model_len, help="context length (default: %(default)s)")
    a("--kv-blocks", type=int, default=_D.kv_blocks, help="KV cache blocks (default: %(default)s)")
    a("--block-size", type=int, default=_D.block_size, help="tokens per KV block (default: %(default)s)")
    a(
        "--chars-per-token",
        type=int,
        default=_D.chars_per_token,
        help="tokenizer: characters per token (default: %(default)s)",
    )
    a(
        "--decode-ms-per-token",
        type=float,
        default=_D.decode_ms_per_token,
        help="base engine step time in ms (default: %(default)s)",
    )
    a(
        "--decode-batch-slowdown",
        type=float,
        default=_D.decode_batch_slowdown,
        help="extra step ms per decoding sequence (default: %(default)s)",
    )
    a(
        "--decode-ms-per-1k-context",
        type=float,
        default=_D.decode_ms_per_1k_context,
        help="extra step ms per 1000 context tokens being decoded (default: %(default)s)",
    )
    a(
        "--prefill-overhead-ms",
        type=float,
        default=_D.prefill_overhead_ms,
        help="extra ms of a step that prefills (default: %(default)s)",
    )
    a(
        "--prefill-tokens-per-s",
        type=float,
        default=_D.prefill_tokens_per_s,
        help="prefill speed of uncached tokens (default: %(default)s)",
    )
    a(
        "--default-max-tokens",
        type=int,
        default=_D.default_max_tokens,
        help="answer length without max_tokens (default: %(default)s)",
    )
    a(
        "--data-parallel",
        type=int,
        default=_D.data_parallel,
        help="engines (DP ranks) in this process (default: %(default)s)",
    )
    a("--vllm-legacy-metrics", action="store_true", help="pre-0.9.2 vLLM gpu_* metric names")
    a("--seed", type=int, default=_D.seed, help="seed of --fault-error-rate (default: %(default)s)")
    a("--fault-exit-after", type=int, default=0, metavar="N", help="crash after N inference requests")
    a("--fault-hang-after", type=int, default=0, metavar="N", help="hang after N inference requests")
    a("--fault-error-rate", type=float, default=0.0, metavar="P", help="HTTP 500 with probability P")
    a("--fault-startup-delay-s", type=float, default=0.0, metavar="S", help="/health 503 for S seconds")
    a("--fault-unhealthy-after", type=int, default=0, metavar="N", help="/health 503 after N requests")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    fields = {name: getattr(args, name) for name in SimConfig.__struct_fields__ if hasattr(args, name)}
    return msgspec.convert(fields, SimConfig)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (msgspec.ValidationError, ValueError) as exc:
        log.error("sim: %s", exc)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    uvloop.run(main())
    return 0
