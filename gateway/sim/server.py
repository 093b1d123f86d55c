"""The simulator's HTTP surface: the endpoints each real engine has, on aiohttp.

Every response (errors and 404s included) carries `x-sim-replica-id`. A client that disconnects cancels
its handler, whose `finally` aborts the sequence, so the batch slot and KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.sim.config import SimConfig
from gateway.sim.engine import Cluster, Seq, SimError
from gateway.sim.faults import Faults
from gateway.sim.metrics import CONTENT_TYPE, renderer
from gateway.sim.responses import (
    DONE,
    ChunkWriter,
    chat_completion,
    embeddings,
    error_body,
    request_id,
    text_completion,
    usage,
)
from gateway.sim.tokenizer import Prompt, text, tokenize_ids, tokenize_text
from policies.text import chat_text

log = logging.getLogger("gateway.sim")

REPLICA_HEADER = "x-sim-replica-id"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
OWNERS = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llamacpp"}


class SimServer:
    """One simulated engine process: the cluster of engines, the faults and the routes of a dialect."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.cluster = Cluster(cfg)
        self.faults = Faults(cfg)
        self.render_metrics = renderer(cfg)
        self.created = int(time.time())
        self.model_path = "/models/" + cfg.model.replace("/", "--")

    # ---- plumbing -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._stamp)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/metrics", self.metrics)
        r.add_get("/sim/stats", self.stats)
        if self.cfg.dialect == "sglang":
            r.add_get("/health_generate", self.health_generate)
            for path in ("/get_server_info", "/server_info"):
                r.add_get(path, self.server_info)
            for path in ("/get_model_info", "/model_info"):
                r.add_get(path, self.model_info)
            r.add_get("/get_load", self.get_load)
        elif self.cfg.dialect == "llamacpp":
            r.add_get("/slots", self.slots)
        return app

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[REPLICA_HEADER] = self.cfg.id

    async def _on_startup(self, app: web.Application) -> None:
        self.cluster.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.cluster.stop()

    def error(self, status: int, message: str, error_type: str = "BadRequestError") -> web.Response:
        return web.Response(
            status=status,
            body=error_body(self.cfg.dialect, status, message, error_type),
            content_type="application/json",
        )

    async def _gate(self) -> None:
        """Faults that apply to every endpoint: a hung engine answers nothing."""
        if self.faults.hung:
            await self.faults.hang()

    async def _admit(self, request: web.Request) -> tuple[int, dict[str, Any] | web.Response]:
        """Count the inference request, apply faults, parse the JSON body and check the model."""
        faults = self.faults
        n = faults.on_request()
        if faults.hung:
            await faults.hang()
        if faults.starting():
            return n, self.error(503, "The model is still loading.", "ServiceUnavailableError")
        if faults.error():
            if faults.is_fatal(n):
                faults.crash()
            return n, self.error(500, "Simulated engine failure (--fault-error-rate).", "InternalServerError")
        body = await request.read()
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return n, self.error(400, f"Invalid JSON body: {exc}")
        if not isinstance(payload, dict):
            return n, self.error(400, "The request body must be a JSON object.")
        model = payload.get("model")
        if model is not None and model != self.cfg.model:
            return n, self.error(404, f"The model `{model}` does not exist.", "NotFoundError")
        return n, payload

    def _max_tokens(self, payload: dict[str, Any], prompt_len: int, chat: bool) -> tuple[int, bool]:
        """(tokens to generate, whether the answer ends with EOS) or SimError like vLLM's checks."""
        cfg = self.cfg
        value = payload.get("max_completion_tokens") if chat else None
        if value is None:
            value = payload.get("max_tokens")
        if value is None:
            room = cfg.max_model_len - prompt_len
            if room < 1:
                raise SimError(
                    400,
                    f"This model's maximum context length is {cfg.max_model_len} tokens. However, your "
                    f"request has {prompt_len} input tokens. Please reduce the length of the input messages.",
                )
            return min(cfg.default_max_tokens, room), True
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SimError(400, f"max_tokens must be an integer >= 1, got {value!r}.")
        if prompt_len + value > cfg.max_model_len:
            raise SimError(
                400,
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                f"{prompt_len + value} tokens ({prompt_len} in the messages, {value} in the completion). "
                "Please reduce the length of the messages or completion.",
            )
        return value, False

    def _prompt(self, prompt: Any) -> Prompt:
        cfg = self.cfg
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tokenize_text(prompt, cfg.chars_per_token, cfg.block_size)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return tokenize_ids(prompt, cfg.block_size)
        raise SimError(400, "prompt must be a string, a list of token ids, or a list of one of those.")

    # ---- inference ------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        n, payload = await self._admit(request)
        if isinstance(payload, web.Response):
            return payload
        cfg = self.cfg
        try:
            if chat:
                messages = payload.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise SimError(400, "messages must be a non-empty list.")
                prompt = tokenize_text(chat_text(messages), cfg.chars_per_token, cfg.block_size)
            else:
                if "prompt" not in payload:
                    raise SimError(400, "prompt is required.")
                prompt = self._prompt(payload["prompt"])
            max_tokens, eos = self._max_tokens(payload, prompt.n_tokens, chat)
            seq = Seq(prompt, max_tokens, eos, time.monotonic())
            self.cluster.submit(seq)
        except SimError as exc:
            return self.error(exc.status, exc.message, exc.error_type)
        fatal = self.faults.is_fatal(n)
        delivered = False
        try:
            if payload.get("stream") is True:
                options = payload.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                response = await self._stream(request, seq, chat, include_usage, fatal)
            else:
                while not seq.complete:
                    await self._wait(seq)
                eos = seq.finish_reason == "stop" and seq.ends_with_eos
                visible = seq.generated - 1 if eos else seq.generated
                content = text(prompt.seed, 0, visible)
                use = usage(seq.prompt_len, seq.generated, seq.cached_tokens)
                created = int(time.time())
                if chat:
                    body = chat_completion(
                        request_id("chatcmpl-"), created, cfg.model, content, seq.finish_reason, use
                    )
                else:
                    body = text_completion(
                        request_id("cmpl-"), created, cfg.model, content, seq.finish_reason, use
                    )
                response = web.Response(body=body, content_type="application/json")
                if fatal:
                    await response.prepare(request)
                    await response.write_eof()
                    self.faults.crash()
            delivered = True
            return response
        finally:
            assert seq.engine is not None
            seq.engine.release(seq, delivered)

    async def _wait(self, seq: Seq) -> None:
        if self.faults.hung:
            await self.faults.hang()
        await seq.progress()
        if self.faults.hung:
            await self.faults.hang()

    async def _stream(
        self, request: web.Request, seq: Seq, chat: bool, include_usage: bool, fatal: bool
    ) -> web.StreamResponse:
        while seq.generated == 0 and not seq.complete:
            await self._wait(seq)
        rid = request_id("chatcmpl-" if chat else "cmpl-")
        writer = ChunkWriter(chat, rid, int(time.time()), self.cfg.model, seq.prompt.seed)
        response = web.StreamResponse(headers=SSE_HEADERS)
        crash_at = max(1, seq.max_tokens // 2) if fatal else -1
        parts: list[bytes] = [writer.role()] if chat else []
        sent = 0
        try:
            await response.prepare(request)
            while True:
                generated = seq.generated
                complete = seq.complete
                if crash_at > 0:
                    generated = min(generated, crash_at)
                    complete = False
                while sent < generated:
                    last = complete and sent == generated - 1
                    eos = last and seq.ends_with_eos and seq.finish_reason == "stop"
                    parts.append(writer.token(sent, seq.finish_reason if last else None, eos))
                    sent += 1
                if parts:
                    await response.write(b"".join(parts))
                    parts = []
                if 0 < crash_at <= sent:
                    self.faults.crash()
                if complete:
                    break
                await self._wait(seq)
            tail = DONE
            if include_usage:
                tail = writer.usage(usage(seq.prompt_len, seq.generated, seq.cached_tokens)) + DONE
            await response.write(tail)
            await response.write_eof()
        except ConnectionError:
            # The client is gone: end quietly; the caller's `finally` aborts the sequence.
            raise asyncio.CancelledError from None
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        _, payload = await self._admit(request)
        if isinstance(payload, web.Response):
            return payload
        raw = payload.get("input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list) and raw:
            inputs = raw
        else:
            return self.error(400, "input must be a string, a list of strings or a list of token ids.")
        seqs: list[Seq] = []
        delivered = False
        try:
            arrival = time.monotonic()
            for item in inputs:
                prompt = self._prompt(item)
                if prompt.n_tokens > self.cfg.max_model_len:
                    raise SimError(
                        400, f"An input has {prompt.n_tokens} tokens, over {self.cfg.max_model_len}."
                    )
                seq = Seq(prompt, 0, True, arrival)
                self.cluster.submit(seq)
                seqs.append(seq)
            for seq in seqs:
                while not seq.complete:
                    await self._wait(seq)
            body = embeddings(self.cfg.model, [s.prompt.seed for s in seqs], sum(s.prompt_len for s in seqs))
            delivered = True
            return web.Response(body=body, content_type="application/json")
        except SimError as exc:
            return self.error(exc.status, exc.message, exc.error_type)
        finally:
            for seq in seqs:
                assert seq.engine is not None
                seq.engine.release(seq, delivered)

    # ---- health, models, metrics ----------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        await self._gate()
        if self.faults.unhealthy():
            if self.cfg.dialect == "llamacpp":
                return self.error(503, "Loading model", "unavailable_error")
            return web.Response(status=503)
        if self.cfg.dialect == "llamacpp":
            return web.Response(body=b'{"status":"ok"}', content_type="application/json")
        return web.Response()

    async def health_generate(self, request: web.Request) -> web.Response:
        await self._gate()
        if self.faults.unhealthy():
            return web.Response(status=503)
        cfg = self.cfg
        seq = Seq(tokenize_text("health", cfg.chars_per_token, cfg.block_size), 1, False, 0.0)
        seq.arrival = time.monotonic()
        self.cluster.submit(seq)
        delivered = False
        try:
            while not seq.complete:
                await self._wait(seq)
            delivered = True
        finally:
            assert seq.engine is not None
            seq.engine.release(seq, delivered)
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        await self._gate()
        cfg = self.cfg
        entry: dict[str, Any] = {
            "id": cfg.model,
            "object": "model",
            "created": self.created,
            "owned_by": OWNERS[cfg.dialect],
            "root": cfg.model,
            "parent": None,
            "max_model_len": cfg.max_model_len,
        }
        body = orjson.dumps({"object": "list", "data": [entry]})
        return web.Response(body=body, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        await self._gate()
        body = self.render_metrics(self.cluster).encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def stats(self, request: web.Request) -> web.Response:
        """Simulator-only test hook: counters summed over the engines."""
        await self._gate()
        doc: dict[str, Any] = {"id": self.cfg.id, "requests_total": self.faults.requests}
        doc.update(self.cluster.snapshot())
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    # ---- SGLang ---------------------------------------------------------------------------------

    async def server_info(self, request: web.Request) -> web.Response:
        await self._gate()
        cfg = self.cfg
        doc = {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "served_model_name": cfg.model,
            "host": cfg.host,
            "port": cfg.port,
            "dp_size": cfg.data_parallel,
            "tp_size": 1,
            "max_running_requests": cfg.max_num_seqs,
            "max_total_num_tokens": cfg.kv_blocks * cfg.block_size,
            "page_size": cfg.block_size,
            "chunked_prefill_size": cfg.max_num_batched_tokens,
            "context_length": cfg.max_model_len,
            "disable_radix_cache": False,
            "schedule_policy": "fcfs",
            "version": "simulated",
            "internal_states": [
                {"dp_rank": e.index, "last_gen_throughput": e.stats.gen_throughput()}
                for e in self.cluster.engines
            ],
        }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def model_info(self, request: web.Request) -> web.Response:
        await self._gate()
        doc = {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def get_load(self, request: web.Request) -> web.Response:
        await self._gate()
        doc = [
            {
                "dp_rank": e.index,
                "num_reqs": len(e.running) + len(e.waiting),
                "num_waiting_reqs": len(e.waiting),
                "num_tokens": e.kv_tokens_used(),
            }
            for e in self.cluster.engines
        ]
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    # ---- llama.cpp ------------------------------------------------------------------------------

    async def slots(self, request: web.Request) -> web.Response:
        """llama-server's `/slots`: one entry per slot (`--max-num-seqs`), busy ones first."""
        await self._gate()
        cfg = self.cfg
        busy = [seq for e in self.cluster.engines for seq in e.running]
        out = []
        for i in range(cfg.max_num_seqs * cfg.data_parallel):
            seq = busy[i] if i < len(busy) else None
            out.append(
                {
                    "id": i,
                    "id_task": i if seq is not None else -1,
                    "n_ctx": cfg.max_model_len,
                    "speculative": False,
                    "is_processing": seq is not None,
                    "params": {"n_predict": seq.max_tokens if seq is not None else -1},
                    "next_token": {
                        "has_next_token": seq is not None and not seq.complete,
                        "has_new_line": False,
                        "n_remain": seq.max_tokens - seq.generated if seq is not None else -1,
                        "n_decoded": seq.generated if seq is not None else 0,
                        "stopping_word": "",
                    },
                }
            )
        return web.Response(body=orjson.dumps(out), content_type="application/json")


async def serve(cfg: SimConfig, stop: asyncio.Event) -> None:
    """Listen until `stop` is set."""
    server = SimServer(cfg)
    runner = web.AppRunner(
        server.app(), access_log=None, handler_cancellation=True, handle_signals=False, shutdown_timeout=2.0
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=4096, reuse_address=True)
    await site.start()
    log.info(
        "sim %s (%s, model %s) listening on http://%s:%d%s",
        cfg.id,
        cfg.dialect,
        cfg.model,
        cfg.host,
        cfg.port,
        " [instant]" if cfg.instant else "",
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
