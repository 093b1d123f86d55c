"""Engine `/metrics` dialects: a targeted line scan into `EngineSignals`, and the periodic scraper.

The scan looks up only the few families the scorers read (`bytes.find` on `\\n<name>`), never parses
the whole exposition: a vLLM page is mostly histogram buckets nobody routes on.

Data-parallel engines: vLLM's per-engine series (label `engine`) and SGLang's per-DP-rank series
(label `dp_rank`) are summed for counts (running, waiting, prefix queries/hits, block and batch
limits) and averaged for KV usage. DP ranks of one server share one model and one memory setting, so
they have the same KV capacity and the plain mean equals the token-weighted usage. SGLang repeats
each gauge on every tensor/pipeline-parallel rank of a DP rank (`tp_rank`, `pp_rank`); those copies
are one value, so they are collapsed (max) before summing over `dp_rank`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import aiohttp
import orjson
from yarl import URL

from gateway.config import ScrapeConfig
from gateway.fetch import Fetcher, FetchError
from gateway.pool import Registry, Replica
from gateway.telemetry import Telemetry
from policies.base import EngineSignals

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_METRICS_BYTES = 4 * 1024 * 1024
"""Longest `/metrics` (or `/slots`) body read; a larger one is an error, not a memory spike."""
INFO_EVERY_S = 60.0
"""Static configuration metrics (block size, KV blocks, batch limit) are re-read this often."""
SLOTS_RETRY_S = 60.0
"""After a llama.cpp server answered 404/501 on `/slots`, ask again only after this long."""


class DiscoveryError(Exception):
    """`discover` could not learn the model of an upstream (message phrased for the operator)."""


# --- the line scan ---------------------------------------------------------------------------


def _samples(data: bytes, name: bytes) -> Iterable[tuple[bytes, float]]:
    """(label block, value) of every sample line of metric `name`. `data` starts with a newline.

    Finds the family's first line, then reads on only while lines belong to it, so a family near
    the top of a large page costs a short scan instead of a pass over the whole text.
    """
    needle = b"\n" + name
    skip = len(needle)
    find = data.find
    pos = find(needle)
    while pos >= 0:
        start = pos + skip
        eol = find(b"\n", start)
        if eol < 0:
            eol = len(data)
        head = data[start : start + 1]
        if head == b"{":
            close = data.rfind(b"}", start, eol)
            if close > start:
                labels = data[start + 1 : close]
                rest = data[close + 1 : eol]
            else:
                labels, rest = b"", b""
        elif head == b" ":
            labels, rest = b"", data[start:eol]
        else:  # a longer name with this prefix: the family may still come later
            pos = find(needle, eol)
            continue
        fields = rest.split()
        if fields:
            try:
                value = float(fields[0])
            except ValueError:
                value = math.nan
            if not math.isnan(value):
                yield labels, value
        # The text format keeps a family's samples together: stop at the first line of another one.
        pos = eol if data.startswith(needle, eol) else -1


def _label(labels: bytes, key: bytes) -> bytes | None:
    """Value of label `key` in a `k="v",...` block (escapes inside values are not needed here)."""
    probe = key + b'="'
    at = labels.find(probe)
    while at > 0 and labels[at - 1 : at] != b",":
        at = labels.find(probe, at + 1)
    if at < 0:
        return None
    start = at + len(probe)
    end = labels.find(b'"', start)
    return labels[start:end] if end >= 0 else None


def _by_group(data: bytes, name: bytes, group: bytes | None) -> dict[bytes, float] | None:
    """One value per `group` label value (max over other labels, e.g. tp_rank), None if absent."""
    out: dict[bytes, float] | None = None
    for labels, value in _samples(data, name):
        key = (_label(labels, group) or b"") if group is not None else b""
        if out is None:
            out = {key: value}
        else:
            prev = out.get(key)
            out[key] = value if prev is None or value > prev else prev
    return out


def _sum(data: bytes, names: tuple[bytes, ...], group: bytes | None) -> float | None:
    """Sum over groups of the first family in `names` that is present (current name, then legacy)."""
    for name in names:
        groups = _by_group(data, name, group)
        if groups is not None:
            return sum(groups.values())
    return None


def _mean(data: bytes, names: tuple[bytes, ...], group: bytes | None) -> float | None:
    for name in names:
        groups = _by_group(data, name, group)
        if groups is not None:
            return sum(groups.values()) / len(groups)
    return None


def _int_label(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:  # "None" on engines that have not sized the cache
        return None


def _vllm_info(data: bytes) -> tuple[int | None, int | None, int | None]:
    """(block_size, num_gpu_blocks summed over engines, max_num_seqs summed) from info metrics."""
    block_size: int | None = None
    blocks: dict[bytes, int] = {}
    for labels, _ in _samples(data, b"vllm:cache_config_info"):
        if block_size is None:
            block_size = _int_label(_label(labels, b"block_size"))
        n = _int_label(_label(labels, b"num_gpu_blocks"))
        if n is not None:
            blocks[_label(labels, b"engine") or b""] = n
    # max_num_seqs is a label of a scheduler/config info family in some versions, absent in others.
    seqs: dict[bytes, int] = {}
    probe = b'max_num_seqs="'
    at = data.find(probe)
    while at >= 0:
        line_start = data.rfind(b"\n", 0, at) + 1
        if data.startswith(b"vllm:", line_start):
            brace = data.find(b"{", line_start, at)
            close = data.find(b"}", at)
            if brace >= 0 and close >= 0:
                labels = data[brace + 1 : close]
                n = _int_label(_label(labels, b"max_num_seqs"))
                if n is not None:
                    seqs[_label(labels, b"engine") or b""] = n
        at = data.find(probe, at + len(probe))
    return (
        block_size,
        sum(blocks.values()) if blocks else None,
        sum(seqs.values()) if seqs else None,
    )


def _parse_vllm(data: bytes, now: float, info: bool) -> EngineSignals:
    engine = b"engine"
    block_size, num_gpu_blocks, max_num_seqs = _vllm_info(data) if info else (None, None, None)
    return EngineSignals(
        scraped_at=now,
        running=_sum(data, (b"vllm:num_requests_running",), engine),
        waiting=_sum(data, (b"vllm:num_requests_waiting",), engine),
        kv_usage=_mean(data, (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc"), engine),
        max_num_seqs=max_num_seqs,
        prefix_queries=_sum(
            data, (b"vllm:prefix_cache_queries_total", b"vllm:gpu_prefix_cache_queries_total"), engine
        ),
        prefix_hits=_sum(
            data, (b"vllm:prefix_cache_hits_total", b"vllm:gpu_prefix_cache_hits_total"), engine
        ),
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
    )


def _parse_sglang(data: bytes, now: float, info: bool) -> EngineSignals:
    dp = b"dp_rank"
    queries = _sum(data, (b"sglang:prompt_tokens_total",), dp)
    hits = _sum(data, (b"sglang:cached_tokens_total",), dp)
    return EngineSignals(
        scraped_at=now,
        running=_sum(data, (b"sglang:num_running_reqs",), dp),
        waiting=_sum(data, (b"sglang:num_queue_reqs",), dp),
        kv_usage=_mean(data, (b"sglang:token_usage",), dp),
        max_num_seqs=_sum(data, (b"sglang:max_running_requests",), dp) if info else None,
        # Cumulative prompt/cached token counters exist only in newer SGLang; without the hits
        # counter the pair is meaningless, so both stay unknown.
        prefix_queries=queries if hits is not None else None,
        prefix_hits=hits if queries is not None else None,
    )


def _parse_llamacpp(data: bytes, now: float, info: bool) -> EngineSignals:
    return EngineSignals(
        scraped_at=now,
        running=_sum(data, (b"llamacpp:requests_processing",), None),
        waiting=_sum(data, (b"llamacpp:requests_deferred",), None),
        # Removed from llama.cpp by PR #13660; older servers still report it. Newer ones: /slots.
        kv_usage=_mean(data, (b"llamacpp:kv_cache_usage_ratio",), None),
    )


_PARSERS = {"vllm": _parse_vllm, "sglang": _parse_sglang, "llamacpp": _parse_llamacpp}


def parse_metrics(engine: str, text: bytes | str, now: float, *, info: bool = True) -> EngineSignals:
    """The scorer-relevant numbers of one `/metrics` page; families the page lacks stay None.

    `info=False` skips the static configuration (block size, KV blocks, batch limit), which sits at
    the end of a vLLM page and costs half the scan; the scraper reads it once a minute.
    """
    data = text.encode() if isinstance(text, str) else text
    parser = _PARSERS.get(engine)
    if parser is None:
        return EngineSignals(scraped_at=now)
    return parser(b"\n" + data, now, info)


def detect_engine(text: bytes | str) -> str:
    """Which engine wrote this `/metrics` page: vllm, sglang, llamacpp, or openai (none known)."""
    data = b"\n" + (text.encode() if isinstance(text, str) else text)
    for engine in ("vllm", "sglang", "llamacpp"):
        if f"\n{engine}:".encode() in data or f"\n# TYPE {engine}:".encode() in data:
            return engine
    return "openai"


def parse_slots(slots: object) -> tuple[float | None, int | None]:
    """(KV usage estimate, slot count) from llama.cpp's `GET /slots` JSON.

    With per-slot token counts (`n_ctx`, `n_prompt_tokens`, `next_token.n_decoded`): tokens held by
    busy slots over the total context. Otherwise: busy slots over all slots.
    """
    if not isinstance(slots, list) or not slots:
        return None, None
    busy = 0
    used = 0
    ctx = 0
    token_based = True
    for slot in slots:
        if not isinstance(slot, dict):
            return None, None
        processing = bool(slot.get("is_processing"))
        busy += processing
        n_ctx = slot.get("n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            ctx += n_ctx
        else:
            token_based = False
        if processing and token_based:
            prompt = slot.get("n_prompt_tokens")
            nxt = slot.get("next_token")
            if isinstance(nxt, list):
                nxt = nxt[0] if nxt else None
            decoded = nxt.get("n_decoded") if isinstance(nxt, dict) else None
            if isinstance(prompt, int) and isinstance(decoded, int):
                used += prompt + decoded
            else:
                token_based = False
    if token_based and ctx:
        return min(1.0, used / ctx), len(slots)
    return busy / len(slots), len(slots)


# --- pacing ----------------------------------------------------------------------------------

SPREAD_FRACTION = 0.8
"""A periodic round starts its requests evenly over this fraction of the interval."""
_SPREAD_TICK_S = 0.02


async def spread(items: Sequence[T], run: Callable[[T], Awaitable[None]], over_s: float) -> None:
    """Run `run(item)` for every item, starting them evenly over `over_s` seconds; wait for all.

    A fleet-wide burst (512 requests at once) would hold the event loop for a few hundred
    milliseconds and delay every proxied request by as much; spread out, each tick costs a few.
    """
    if not items:
        return
    if over_s <= 0 or len(items) == 1:
        await asyncio.gather(*(run(item) for item in items))
        return
    loop = asyncio.get_running_loop()
    per_tick = max(1, math.ceil(len(items) * _SPREAD_TICK_S / over_s))
    step = over_s * per_tick / len(items)
    start = loop.time()
    tasks: list[asyncio.Future[None]] = []
    try:
        for n in range(0, len(items), per_tick):
            delay = start + (n // per_tick) * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.extend(asyncio.ensure_future(run(item)) for item in items[n : n + per_tick])
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        raise


def report_crash(task: asyncio.Task[None]) -> None:
    """Done-callback of a background loop: a loop that died of a bug says so at once, loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s died", task.get_name(), exc_info=task.exception())


# --- HTTP ------------------------------------------------------------------------------------


async def read_bounded(resp: aiohttp.ClientResponse, limit: int = MAX_METRICS_BYTES) -> bytes:
    """The whole body, or ValueError once it passes `limit` bytes (checked while reading)."""
    length = resp.content_length
    if length is not None:
        if length > limit:
            raise ValueError(f"body of {length} bytes exceeds the {limit}-byte limit")
        if "Content-Encoding" not in resp.headers:
            return await resp.read()  # the common case, in one piece
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


_IDENTITY = {"Accept-Encoding": "identity"}
"""Engines would gzip /metrics for every scrape (prometheus_client does when asked): not asked."""


async def _get(
    session: aiohttp.ClientSession,
    url: str | URL,
    timeout: float | aiohttp.ClientTimeout,
    limit: int = MAX_METRICS_BYTES,
) -> tuple[int, bytes]:
    if not isinstance(timeout, aiohttp.ClientTimeout):
        timeout = aiohttp.ClientTimeout(total=timeout)
    async with session.get(url, timeout=timeout, allow_redirects=False, headers=_IDENTITY) as resp:
        return resp.status, await read_bounded(resp, limit)


def describe_error(exc: BaseException) -> str:
    """A short operator-facing reason ("timeout", "connect: ...")."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connect: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


async def discover(session: aiohttp.ClientSession, url: str, timeout_s: float = 5.0) -> tuple[str, str]:
    """(model id, engine) of the OpenAI server at `url`, for `serve --upstream URL`.

    The model is the first id of `GET /v1/models`; the engine comes from `GET /metrics` by its metric
    names (`openai` when the page is missing or names no known engine). Raises DiscoveryError.
    """
    base = url.rstrip("/")
    try:
        status, body = await _get(session, base + "/v1/models", timeout_s)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise DiscoveryError(f"{base}/v1/models: {describe_error(exc)}") from exc
    if status != 200:
        raise DiscoveryError(f"{base}/v1/models answered HTTP {status}")
    try:
        doc = orjson.loads(body)
        model = doc["data"][0]["id"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise DiscoveryError(f"{base}/v1/models: no model id in the answer ({exc!r})") from exc
    if not isinstance(model, str) or not model:
        raise DiscoveryError(f"{base}/v1/models: model id is not a non-empty string")
    engine = "openai"
    try:
        status, body = await _get(session, base + "/metrics", timeout_s)
        if status == 200:
            engine = detect_engine(body)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        log.info("%s/metrics unavailable (%s); treating %s as a plain OpenAI server", base, exc, base)
    return model, engine


# --- the scraper -----------------------------------------------------------------------------


class Scraper:
    """Scrapes every replica's engine `/metrics` each `interval_s` (llama.cpp also `/slots`).

    Sets `replica.signals` (with its `scraped_at`) and `replica.signals_error`. A failed scrape
    keeps the last snapshot until it is `stale_after_s` old, then drops it: unknown, never zero.
    The replica list is read from the registry every round, so added replicas are scraped at once.
    """

    def __init__(
        self,
        registry: Registry,
        cfg: ScrapeConfig,
        telemetry: Telemetry,
        *,
        concurrency: int = 64,
        max_bytes: int = MAX_METRICS_BYTES,
        spread_s: float | None = None,
    ) -> None:
        self.registry = registry
        self.cfg = cfg
        self.telemetry = telemetry
        self.max_bytes = max_bytes
        self.spread_s = cfg.interval_s * SPREAD_FRACTION if spread_s is None else spread_s
        """A round's requests start evenly over this many seconds (0: all at once)."""
        self._sem = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self.fetcher = Fetcher(max_bytes=max_bytes, user_agent="llm-gateway-scraper")
        """Polls go through raw keep-alive connections: aiohttp's per-request cost would dominate."""
        self._info_at: dict[str, float] = {}
        """When the static configuration metrics of a replica were last read."""
        self._slots_off_until: dict[str, float] = {}
        """llama.cpp replicas whose /slots is disabled: not asked again before this time."""

    async def start(self) -> None:
        if self.cfg.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="scraper")
            self._task.add_done_callback(report_crash)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # A crash was already logged by report_crash; shutdown goes on.
            await asyncio.gather(task, return_exceptions=True)
        self.fetcher.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.scrape_all()
            await asyncio.sleep(max(0.0, self.cfg.interval_s - (loop.time() - started)))

    async def scrape_all(self) -> None:
        """One round over every current replica that has engine metrics, started over `spread_s`."""
        replicas = [r for r in self.registry.replicas() if r.engine in _PARSERS]
        live = {r.id for r in replicas}
        for table in (self._slots_off_until, self._info_at):
            for rid in [rid for rid in table if rid not in live]:
                del table[rid]

        await spread(replicas, self._bounded, self.spread_s)

    async def _bounded(self, replica: Replica) -> None:
        async with self._sem:
            await self.scrape_one(replica)

    async def scrape_one(self, replica: Replica) -> None:
        try:
            status, body = await self._get(replica, "/metrics")
            if status != 200:
                raise ValueError(f"HTTP {status}")
        except (TimeoutError, OSError, FetchError, ValueError) as exc:
            self._failed(replica, describe_error(exc))
            return
        now = time.monotonic()
        previous = replica.signals
        info = previous is None or now - self._info_at.get(replica.id, -INFO_EVERY_S) >= INFO_EVERY_S
        signals = parse_metrics(replica.engine, body, now, info=info)
        if info:
            self._info_at[replica.id] = now
        elif previous is not None:
            signals.block_size = previous.block_size
            signals.num_gpu_blocks = previous.num_gpu_blocks
            signals.max_num_seqs = previous.max_num_seqs
        if replica.engine == "llamacpp":
            await self._add_slots(replica, signals)
        replica.signals = signals
        replica.signals_error = None
        self.telemetry.scrape_ok(replica.id, now)

    def _get(self, replica: Replica, path: str) -> Awaitable[tuple[int, bytes]]:
        return self.fetcher.get(
            replica.host, replica.port, replica.base_path + path, self.cfg.timeout_s, tls=replica.tls
        )

    async def _add_slots(self, replica: Replica, signals: EngineSignals) -> None:
        """KV usage and slot count from `/slots`; its absence leaves them unknown, not an error."""
        now = time.monotonic()
        if self._slots_off_until.get(replica.id, 0.0) > now:
            return
        try:
            status, body = await self._get(replica, "/slots")
        except (TimeoutError, OSError, FetchError) as exc:
            log.debug("replica %s: /slots failed: %s", replica.id, describe_error(exc))
            return
        if status in (404, 501):
            self._slots_off_until[replica.id] = now + SLOTS_RETRY_S
            return
        if status != 200:
            return
        try:
            kv_usage, n_slots = parse_slots(orjson.loads(body))
        except orjson.JSONDecodeError:
            return
        if kv_usage is not None:
            signals.kv_usage = kv_usage
        if n_slots is not None:
            signals.max_num_seqs = n_slots

    def _failed(self, replica: Replica, reason: str) -> None:
        if replica.signals_error is None:
            log.warning("replica %s: scraping %s/metrics failed: %s", replica.id, replica.url, reason)
        replica.signals_error = reason
        signals = replica.signals
        if signals is not None and time.monotonic() - signals.scraped_at > self.cfg.stale_after_s:
            replica.signals = None
        self.telemetry.scrape_failed(replica.id)
