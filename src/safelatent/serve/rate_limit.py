"""Per-key request rate limits: one token bucket per key (in memory, per server process)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """A token bucket per key: ``rate`` requests per minute on average, bursts of up to ``burst``
    (default: one minute's worth, at least 1). :meth:`acquire` returns 0 when a request may go ahead,
    else the seconds until it may (for ``Retry-After``). Buckets idle for ten minutes are dropped, so
    memory stays bounded by the keys active recently."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # key id → (tokens, last refill time)
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def acquire(self, key_id: int, rate_per_minute: float, burst: float | None = None) -> float:
        capacity = max(1.0, burst if burst is not None else rate_per_minute)
        per_second = rate_per_minute / 60.0
        now = self._clock()
        with self._lock:
            self._sweep(now)
            tokens, last = self._buckets.get(key_id, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * per_second)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / per_second

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        for key_id in [k for k, (_, last) in self._buckets.items() if now - last > 600]:
            del self._buckets[key_id]


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` wants whole seconds; never 0 (that would invite an immediate retry)."""
    return str(max(1, math.ceil(seconds)))
