"""Token buckets: events per second per app, posters per second per client address, each
with a burst allowance.

Counted in each gateway process for what that process sees (no Redis call on the hot
path); ``create_app`` gives each of N worker processes 1/N of the configured rate.
"""

from __future__ import annotations


class TokenBuckets:
    """Buckets by key (an app, a client address); past ``max_keys`` keys, the full ones
    are forgotten (a full bucket is what a new key gets anyway), and if that is not
    enough, the oldest half: many addresses must not grow a process without bound."""

    def __init__(self, rate_per_s: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, n: int, now: float) -> float:
        """Take n tokens; 0 when granted, else the seconds until they would be."""
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._forget(now)
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        if tokens >= n:
            self._buckets[key] = (tokens - n, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (n - tokens) / self.rate_per_s

    def _forget(self, now: float) -> None:
        refill_s = self.burst / self.rate_per_s
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill_s}
        if len(self._buckets) >= self.max_keys:
            kept = sorted(self._buckets.items(), key=lambda item: item[1][1])
            self._buckets = dict(kept[len(kept) // 2 :])
