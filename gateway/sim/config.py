"""Simulator settings: one struct, one field per command-line flag, defaults from CALIBRATION.md.

The default profile is "Llama-3-8B bf16 on one H100, vLLM V1": a step costs ~6 ms, prefill runs at
40k tokens/s, the inter-token latency grows with the batch (6.1 ms at 1 sequence, 25 ms at 256), and
the KV cache holds 27,500 blocks of 16 tokens.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Dialect = Literal["vllm", "sglang", "llamacpp"]


class SimConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything `llm-gateway sim` can be told; the CLI flags map one to one onto these fields."""

    dialect: Dialect = "vllm"
    """Which engine to imitate: endpoints, metric names, error shape."""
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    """The one served model name (`/v1/models`, `model_name` label); other names get 404."""
    host: str = "127.0.0.1"
    port: int = 8001
    id: str = ""
    """Replica name echoed in the `x-sim-replica-id` header of every response; defaults to `sim-PORT`."""
    instant: bool = False
    """Turn every modelled delay off: answers come at once, metrics and the prefix cache still count."""
    max_num_seqs: int = 256
    """Running-batch limit (vLLM `--max-num-seqs`, SGLang `--max-running-requests`, llama.cpp slots)."""
    max_num_batched_tokens: int = 8192
    """Token budget of one engine step (chunked prefill: longer prompts take several steps)."""
    max_model_len: int = 8192
    """Longest prompt + completion a sequence may have; longer requests get 400 like vLLM."""
    kv_blocks: int = 27500
    """KV cache capacity in blocks (vLLM `num_gpu_blocks`)."""
    block_size: int = 16
    """Tokens per KV block; also the granularity of the prefix cache."""
    chars_per_token: int = 4
    """The deterministic tokenizer: one token per this many characters of the prompt text."""
    decode_ms_per_token: float = 6.0
    """Fixed cost of every engine step (one decode step of a batch of one)."""
    decode_batch_slowdown: float = 0.035
    """Extra step milliseconds per sequence decoding in the step."""
    decode_ms_per_1k_context: float = 0.04
    """Extra step milliseconds per 1000 context tokens of the decoding sequences (attention reads)."""
    prefill_overhead_ms: float = 4.0
    """Extra step milliseconds when the step prefills anything."""
    prefill_tokens_per_s: float = 40000.0
    """Prefill speed for uncached prompt tokens."""
    default_max_tokens: int = 16
    """Completion length when a request sets no max_tokens; such answers end with an EOS (`stop`)."""
    data_parallel: int = 1
    """Engines in this process, each with its own batch, queue and KV cache (vLLM `engine`, SGLang
    `dp_rank` label); requests go to the least loaded one."""
    vllm_legacy_metrics: bool = False
    """vLLM only: pre-0.9.2 names `vllm:gpu_cache_usage_perc` and `vllm:gpu_prefix_cache_*`."""
    seed: int = 0
    """Seed of the fault dice (`fault_error_rate`)."""
    fault_exit_after: int = 0
    """Exit (os._exit, like a crash) after N inference requests; a streaming N-th one is cut midway."""
    fault_hang_after: int = 0
    """After N inference requests stop answering anything, keeping sockets open."""
    fault_error_rate: float = 0.0
    """Probability that an inference request gets HTTP 500."""
    fault_startup_delay_s: float = 0.0
    """`/health` (and inference) answer 503 for this many seconds after start, like a model loading."""
    fault_unhealthy_after: int = 0
    """After N inference requests `/health` answers 503 while requests are still served."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_blocks", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.chars_per_token < 1:
            raise ValueError("chars_per_token must be >= 1")
        if self.data_parallel < 1:
            raise ValueError("data_parallel must be >= 1")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be > 0")
        if not 0.0 <= self.fault_error_rate <= 1.0:
            raise ValueError("fault_error_rate must be within [0, 1]")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if not self.id:
            self.id = f"sim-{self.port}"
