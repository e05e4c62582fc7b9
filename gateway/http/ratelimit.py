"""Per-app token buckets: events per second, with a burst allowance.

Counted in each gateway process for what that process sees (no Redis call on the hot
path); ``create_app`` gives each of N worker processes 1/N of the configured rate.
"""

from __future__ import annotations


class TokenBuckets:
    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # app -> (tokens, at)

    def take(self, key: str, n: int, now: float) -> float:
        """Take n tokens; 0 when granted, else the seconds until they would be."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        if tokens >= n:
            self._buckets[key] = (tokens - n, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (n - tokens) / self.rate_per_s
