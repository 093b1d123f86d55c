"""OpenAI-style load for any OpenAI-compatible endpoint (the gateway, an engine, a peer router).

Three kinds of users:
- ShortChatUser: short chats, whole answer at once (`stream: false`).
- SharedPrefixUser: long chats whose system prompt is shared by a group of users (what prefix-aware
  routing should keep on one replica), streamed.
- StreamingUser: short prompt, longer streamed answer.

Streamed requests also report, as their own rows of locust's statistics (request type `SSE`):
`TTFT` (time to the first content token), `ITL` (mean time between content chunks of one answer)
and `stream total` (time to `data: [DONE]`). A stream that ends without `[DONE]`, an error status or
an OpenAI error body counts as a failure.

    locust -f loadtests/locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8000

Environment: OPENAI_API_KEY (sent as a bearer token), LOCUST_MODEL (default: the first model of
GET /v1/models), LOCUST_MAX_TOKENS (default 64), LOCUST_PREFIX_GROUPS (default 8),
LOCUST_PREFIX_CHARS (shared system prompt length, default 8000), LOCUST_WAIT_MAX (seconds between
a user's requests, uniform from 0, default 0.5).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import orjson
from locust import HttpUser, between, events, task

MAX_TOKENS = int(os.environ.get("LOCUST_MAX_TOKENS", "64"))
PREFIX_GROUPS = int(os.environ.get("LOCUST_PREFIX_GROUPS", "8"))
PREFIX_CHARS = int(os.environ.get("LOCUST_PREFIX_CHARS", "8000"))
WAIT_MAX = float(os.environ.get("LOCUST_WAIT_MAX", "0.5"))
ENDPOINT = "/v1/chat/completions"

TOPICS = [
    "how a KV cache works",
    "why batching raises throughput",
    "what prefix caching saves",
    "how to read a latency histogram",
    "when to add another replica",
    "what a token is",
    "why streaming lowers perceived latency",
    "how a load balancer picks a backend",
]
WORDS = [
    "replica",
    "gateway",
    "token",
    "cache",
    "prefix",
    "stream",
    "latency",
    "throughput",
    "engine",
    "batch",
    "queue",
    "slot",
    "scheduler",
    "prompt",
    "answer",
    "model",
    "request",
    "response",
    "decode",
    "prefill",
    "block",
    "memory",
]


def shared_prefix(group: int) -> str:
    """A long system prompt, the same for every user of `group` and different between groups."""
    rng = random.Random(group)
    words: list[str] = [f"You are assistant number {group} of the benchmark fleet."]
    size = len(words[0])
    while size < PREFIX_CHARS:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


PREFIXES = [shared_prefix(g) for g in range(PREFIX_GROUPS)]


def fire(name: str, started: float, seconds: float, exc: Exception | None = None) -> None:
    events.request.fire(
        request_type="SSE",
        name=name,
        response_time=seconds * 1000.0,
        response_length=0,
        exception=exc,
        context={},
        start_time=started,
        url=ENDPOINT,
    )


class OpenAIUser(HttpUser):
    """Shared plumbing: model discovery, auth, one plain and one streamed chat request."""

    abstract = True
    wait_time = between(0.0, WAIT_MAX)
    model: str | None = os.environ.get("LOCUST_MODEL") or None

    def on_start(self) -> None:
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        if OpenAIUser.model is None:
            with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
                try:
                    OpenAIUser.model = resp.json()["data"][0]["id"]
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    resp.failure(f"cannot read a model from /v1/models: {exc}")

    def body(self, messages: list[dict[str, str]], stream: bool) -> bytes:
        payload: dict[str, Any] = {
            "model": OpenAIUser.model or "unknown",
            "messages": messages,
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        }
        return orjson.dumps(payload)

    def chat(self, messages: list[dict[str, str]], name: str) -> None:
        headers = {"Content-Type": "application/json"}
        body = self.body(messages, stream=False)
        with self.client.post(ENDPOINT, data=body, headers=headers, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                choice = resp.json()["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                resp.failure(f"not a chat completion: {exc}")
                return
            if not isinstance(choice.get("message", {}).get("content"), str):
                resp.failure("answer without message content")

    def stream(self, messages: list[dict[str, str]], name: str) -> None:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        body = self.body(messages, stream=True)
        started_wall = time.time()
        started = time.perf_counter()
        first: float | None = None
        last: float | None = None
        chunks = 0
        done = False
        with self.client.post(
            ENDPOINT, data=body, headers=headers, name=name, stream=True, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for line in resp.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        done = True
                        break
                    event = orjson.loads(data)
                    if "error" in event:
                        resp.failure(f"error event: {str(event['error'])[:200]}")
                        return
                    choices = event.get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        last = now
                        chunks += 1
            except (
                OSError,
                ValueError,
            ) as exc:  # requests' stream errors are OSErrors; bad JSON a ValueError
                resp.failure(f"stream broken after {chunks} chunks: {exc}")
                return
            if not done:
                resp.failure(f"stream ended without [DONE] after {chunks} chunks")
                return
        end = time.perf_counter()
        if first is not None:
            fire("TTFT", started_wall, first - started)
            if last is not None and chunks > 1:
                fire("ITL", started_wall, (last - first) / (chunks - 1))
        fire("stream total", started_wall, end - started)


class ShortChatUser(OpenAIUser):
    weight = 5

    @task
    def short_chat(self) -> None:
        topic = random.choice(TOPICS)
        self.chat([{"role": "user", "content": f"In one sentence: {topic}?"}], "chat short")


class SharedPrefixUser(OpenAIUser):
    weight = 2

    def on_start(self) -> None:
        super().on_start()
        self.prefix_group = random.randrange(PREFIX_GROUPS)

    @task
    def long_chat(self) -> None:
        question = f"Question {random.randrange(10_000)}: explain {random.choice(TOPICS)}."
        messages = [
            {"role": "system", "content": PREFIXES[self.prefix_group]},
            {"role": "user", "content": question},
        ]
        self.stream(messages, "chat shared-prefix (stream)")


class StreamingUser(OpenAIUser):
    weight = 3

    @task
    def streaming_chat(self) -> None:
        topic = random.choice(TOPICS)
        self.stream([{"role": "user", "content": f"Write a short paragraph on {topic}."}], "chat (stream)")
