"""Counters and fixed-bucket latency histograms for one tier."""

from __future__ import annotations

import bisect
import threading
import time
from contextlib import contextmanager

# Upper bounds in seconds: 1 us .. ~8.4 s, doubling (Prometheus-style cumulative on export).
LATENCY_BUCKETS_S = tuple(1e-6 * 2 ** i for i in range(24))

COUNTER_NAMES = ("hits", "misses", "puts", "put_failures", "bytes_in", "bytes_out",
                 "evictions", "evicted_bytes", "errors", "corrupt", "deletes")


class LatencyHistogram:
    """Counts of observations per bucket, plus sum and count."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)   # last bucket: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (0 when empty)."""
        if not self.count:
            return 0.0
        rank, seen = q * self.count, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return LATENCY_BUCKETS_S[i] if i < len(LATENCY_BUCKETS_S) else float("inf")
        return float("inf")

    def snapshot(self) -> dict:
        return {"count": self.count, "sum_s": self.sum, "p50_s": self.quantile(0.5),
                "p99_s": self.quantile(0.99), "buckets": list(self.counts)}


class TierCounters:
    """Thread-safe counters and get/put latency histograms of one tier."""

    def __init__(self, tier: str):
        self.tier = tier
        self._lock = threading.Lock()
        self._c = dict.fromkeys(COUNTER_NAMES, 0)
        self._lat = {"get": LatencyHistogram(), "put": LatencyHistogram()}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def add_many(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self._c[name] += n

    def record_transfer(self, op: str, seconds: float, count: str, bytes_counter: str, nbytes: int) -> None:
        """One finished put or get: its latency, ``count`` + 1 and ``bytes_counter`` + ``nbytes``,
        under one lock (on every tier call, so no kwargs dict and no loop)."""
        with self._lock:
            self._lat[op].observe(seconds)
            c = self._c
            c[count] += 1
            c[bytes_counter] += nbytes

    def observe(self, op: str, seconds: float) -> None:
        with self._lock:
            self._lat[op].observe(seconds)

    @contextmanager
    def timed(self, op: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe(op, time.perf_counter() - t0)

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self._c)
            out["latency"] = {op: h.snapshot() for op, h in self._lat.items()}
        return out
