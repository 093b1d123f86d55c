"""Response bodies shaped like vLLM's OpenAI server: objects, SSE chunks, usage, and each engine's errors.

Stream chunks are built from per-request byte templates so a token costs one small `orjson.dumps`.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import Any

import orjson
import xxhash

from gateway.sim.tokenizer import PIECES

_ids = itertools.count()
_ID_BASE = os.urandom(12).hex()
EMBEDDING_DIM = 32

_LLAMACPP_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def request_id(prefix: str) -> str:
    return f"{prefix}{_ID_BASE}{next(_ids) & 0xFFFFFFFF:08x}"


def error_body(dialect: str, status: int, message: str, error_type: str) -> bytes:
    """vLLM: OpenAI's `{"error": {...}}`; SGLang: its flat `{"object": "error", ...}`; llama.cpp: its own."""
    if dialect == "sglang":
        doc: dict[str, Any] = {
            "object": "error",
            "message": message,
            "type": error_type,
            "param": None,
            "code": status,
        }
    elif dialect == "llamacpp":
        doc = {
            "error": {
                "code": status,
                "message": message,
                "type": _LLAMACPP_ERROR_TYPES.get(status, "server_error"),
            }
        }
    else:
        doc = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return orjson.dumps(doc)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_completion(
    rid: str, created: int, model: str, content: str, finish_reason: str, use: dict[str, Any]
) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": content,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "tool_calls": [],
                        "reasoning_content": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": use,
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


def text_completion(
    rid: str, created: int, model: str, text: str, finish_reason: str, use: dict[str, Any]
) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": use,
            "kv_transfer_params": None,
        }
    )


def embedding(seed: int) -> list[float]:
    """A deterministic unit vector for an input."""
    key = seed.to_bytes(8, "little")
    raw = [xxhash.xxh3_64_intdigest(key, i) / 2**63 - 1.0 for i in range(EMBEDDING_DIM)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def embeddings(model: str, seeds: list[int], prompt_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "id": request_id("embd-"),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": [
                {"index": i, "object": "embedding", "embedding": embedding(seed)}
                for i, seed in enumerate(seeds)
            ],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
        }
    )


class ChunkWriter:
    """SSE events of one streamed answer (`chat.completion.chunk` or streamed `text_completion`)."""

    __slots__ = ("chat", "head", "seed")

    def __init__(self, chat: bool, rid: str, created: int, model: str, seed: int) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.chat = chat
        self.seed = seed
        self.head = (
            b'data: {"id":'
            + orjson.dumps(rid)
            + b',"object":"'
            + obj.encode()
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
        )

    def role(self) -> bytes:
        return (
            self.head
            + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            + b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def token(self, i: int, final_reason: str | None, eos: bool) -> bytes:
        """The chunk of token i; the last one carries the finish reason (an EOS token has no text)."""
        text = "" if eos else PIECES[(self.seed + i) % len(PIECES)]
        body = orjson.dumps(text)
        if self.chat:
            head = self.head + b',"choices":[{"index":0,"delta":{"content":' + body + b'},"logprobs":null'
        else:
            head = self.head + b',"choices":[{"index":0,"text":' + body + b',"logprobs":null'
        if final_reason is None:
            if self.chat:
                return head + b',"finish_reason":null}]}\n\n'
            return head + b',"finish_reason":null,"stop_reason":null}]}\n\n'
        return head + b',"finish_reason":"' + final_reason.encode() + b'","stop_reason":null}]}\n\n'

    def usage(self, use: dict[str, Any]) -> bytes:
        return self.head + b',"choices":[],"usage":' + orjson.dumps(use) + b"}\n\n"


DONE = b"data: [DONE]\n\n"
