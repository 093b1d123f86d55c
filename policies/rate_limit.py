"""`requestsPerSecond` of a profile: a token bucket per profile and pool, on the caller's clock.

Burst = one second's worth (at least 1 request), so `requestsPerSecond: 1` admits one request and refuses
a second in the same second. Each gateway replica enforces its own bucket.
"""

from __future__ import annotations

import math


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after_s(self) -> int:
        """Whole seconds until a token is back (for the Retry-After header)."""
        return max(1, math.ceil((1.0 - self.tokens) / self.rate))
