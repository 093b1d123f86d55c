"""The access log: one line per request, written in batches off the request path.

A `logging` call per request (record, formatter, one write) costs more than the gateway's own routing
work; here a request only appends a tuple, and `flush()` (every second from the serve loop's
housekeeping, and whenever `BATCH` lines wait) formats them and writes them with one `write`. Lines
look like the rest of the log (`--log-format text|json`) and obey the `gateway.access` logger's level.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import Final, TextIO

import orjson

from gateway.config import AccessLogConfig
from gateway.logs import current_format

logger = logging.getLogger("gateway.access")

BATCH: Final = 256
"""Lines buffered before a flush is forced regardless of the timer."""

_Entry = tuple[float, bytes, str, str, int, "float | None", float, int, "str | None"]


class AccessLog:
    def __init__(self, cfg: AccessLogConfig, *, fmt: str | None = None, stream: TextIO | None = None) -> None:
        self.enabled = cfg.enabled
        self.sample_rate = cfg.sample_rate
        self.fmt = fmt or current_format()
        self.stream = stream
        """None: standard error at flush time (so test runners' capture and redirection apply)."""
        self._buffer: list[_Entry] = []

    def record(
        self,
        request_id: bytes,
        model: str,
        replica_id: str,
        status: int,
        ttfb_s: float | None,
        duration_s: float,
        bytes_out: int,
        strategy: str | None,
    ) -> None:
        if not self.enabled or not logger.isEnabledFor(logging.INFO):
            return
        if status < 400 and self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return
        buffer = self._buffer
        buffer.append(
            (time.time(), request_id, model, replica_id, status, ttfb_s, duration_s, bytes_out, strategy)
        )
        if len(buffer) >= BATCH:
            self.flush()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        if not buffer:
            return
        render = self._json if self.fmt == "json" else self._text
        stream = self.stream or sys.stderr
        try:
            stream.write("".join(map(render, buffer)))
            stream.flush()
        except (OSError, ValueError):
            # A closed or broken stream must never take requests down with it.
            pass

    @staticmethod
    def _timestamp(ts: float) -> str:
        """As `gateway.logs.JsonFormatter` writes it."""
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"

    @staticmethod
    def _asctime(ts: float) -> str:
        """As the text log format's `%(asctime)s` writes it."""
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f",{int(ts % 1 * 1000):03d}"

    def _text(self, e: _Entry) -> str:
        ts, rid, model, replica, status, ttfb, duration, size, strategy = e
        request_id = rid.decode("latin-1")
        ttfb_text = f"{ttfb:.4f}" if ttfb is not None else "-"
        return (
            f"{self._asctime(ts)} INFO gateway.access: {request_id} model={model} "
            f"replica={replica or '-'} status={status} ttfb={ttfb_text} duration={duration:.4f} "
            f"bytes={size} strategy={strategy or '-'}\n"
        )

    def _json(self, e: _Entry) -> str:
        ts, rid, model, replica, status, ttfb, duration, size, strategy = e
        doc = {
            "ts": self._timestamp(ts),
            "level": "info",
            "logger": "gateway.access",
            "msg": "request",
            "request_id": rid.decode("latin-1"),
            "model": model,
            "replica": replica,
            "status": status,
            "ttfb_s": ttfb,
            "duration_s": duration,
            "bytes": size,
            "strategy": strategy,
        }
        return orjson.dumps(doc).decode() + "\n"
