"""Injectable faults for chaos tests: crash, hang, HTTP 500, slow start, unhealthy.

"Requests" here are inference requests (chat, completions, embeddings), counted on arrival.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

from gateway.sim.config import SimConfig

log = logging.getLogger("gateway.sim")


class Faults:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ready_at = time.monotonic() + cfg.fault_startup_delay_s
        self.requests = 0
        self.hung = False

    def on_request(self) -> int:
        """Count an inference request; returns its number (1-based)."""
        self.requests += 1
        n = self.requests
        hang_after = self.cfg.fault_hang_after
        if hang_after and n > hang_after and not self.hung:
            self.hung = True
            log.warning("fault: hanging after %d requests", hang_after)
        return n

    def starting(self) -> bool:
        """Still "loading the model" (`--fault-startup-delay-s`)."""
        return self.cfg.fault_startup_delay_s > 0 and time.monotonic() < self.ready_at

    def unhealthy(self) -> bool:
        after = self.cfg.fault_unhealthy_after
        return self.starting() or bool(after and self.requests >= after)

    def error(self) -> bool:
        rate = self.cfg.fault_error_rate
        return rate > 0 and self.rng.random() < rate

    def is_fatal(self, n: int) -> bool:
        """The N-th request of `--fault-exit-after N` ends the process."""
        return n == self.cfg.fault_exit_after

    @staticmethod
    def crash() -> None:
        log.warning("fault: exiting as configured (--fault-exit-after)")
        os._exit(1)

    @staticmethod
    async def hang() -> None:
        """Never return; the handler keeps its socket open until the client gives up."""
        await asyncio.get_running_loop().create_future()
