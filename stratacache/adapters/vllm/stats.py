"""Connector statistics in vLLM's KVConnectorStats form (logged by vLLM and sent to Prometheus).

Both roles count into one flat dict of numbers; vLLM ships the worker's dict
to the scheduler, sums it with the scheduler's (``aggregate``), logs the
``reduce``d view every log interval and feeds the dicts to
``StrataCachePromMetrics`` as ``vllm:stratacache_*`` counters.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
except ImportError:  # the worker's data path runs without vLLM (GPU checks): only the
    KVConnectorPromMetrics = KVConnectorStats = object   # counters are used then

COUNTERS: dict[str, str] = {
    # scheduler side
    "lookups": "Prefix lookups made by the scheduler",
    "lookup_seconds": "Time spent in scheduler prefix lookups",
    "hit_tokens": "Prompt tokens whose KV was found in StrataCache",
    "miss_tokens": "Prompt tokens looked up but not found (and not in vLLM's own cache)",
    # worker side: loads
    "load_chunks": "Chunks loaded into paged KV memory",
    "load_bytes": "Bytes loaded into paged KV memory",
    "load_seconds": "Time spent loading chunks",
    "load_verify_seconds": "Part of load_seconds spent leasing chunks and verifying them on their "
                           "source, before any byte is copied",
    "load_errors": "Chunks missing, evicted or corrupt at load time (recomputed by vLLM)",
    "load_error_blocks": "KV blocks reported to vLLM for recompute",
    # worker side: saves
    "save_chunks": "Chunks stored",
    "save_bytes": "Bytes stored",
    "save_gather_seconds": "Step-loop time copying chunks out of paged KV memory",
    "store_seconds": "Background time storing gathered chunks into the tiers",
    "save_skipped": "Chunks not saved because they were already stored",
    "save_dropped": "Chunks not saved because the store queue was full or a tier refused them",
    # disaggregated prefill: producer (do_remote_decode) and consumer (do_remote_prefill)
    "pd_sent_requests": "Remote-decode prefills finished with kv_transfer_params for a consumer",
    "pd_save_failed": "Chunks of remote-decode prefills that could not be stored",
    "pd_requests": "Remote-prefill requests whose parameters checked out (loaded from the tiers)",
    "pd_hit_tokens": "Prompt tokens of remote-prefill requests loaded instead of computed",
    "pd_missing_tokens": "Prompt tokens of remote-prefill requests missing from the tiers "
                         "(computed instead)",
    "pd_rejected_params": "Remote-prefill requests whose kv_transfer_params did not match "
                          "this engine's keys (computed what a plain lookup did not find)",
    "pd_load_errors": "Remote-prefill loads that met a missing or corrupt chunk (recomputed)",
}


class StrataCacheConnectorStats(KVConnectorStats):
    """Counters of one interval; sums across workers and the scheduler."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in (other.data or {}).items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: (round(v, 6) if isinstance(v, float) else v)
                                       for k, v in sorted(d.items())}
        looked = d.get("hit_tokens", 0) + d.get("miss_tokens", 0)
        if looked:
            out["hit_rate"] = round(d.get("hit_tokens", 0) / looked, 4)
        if d.get("load_seconds"):
            out["load_gbps"] = round(d.get("load_bytes", 0) / d["load_seconds"] / 1e9, 3)
        if d.get("lookups"):
            out["lookup_us"] = round(d.get("lookup_seconds", 0.0) / d["lookups"] * 1e6, 2)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class StatsCounter:
    """Thread-safe interval counters (background load/store threads count too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval: dict[str, float] = {}
        self._total: dict[str, float] = {}

    def add(self, **values: float) -> None:
        with self._lock:
            for key, value in values.items():
                self._interval[key] = self._interval.get(key, 0) + value
                self._total[key] = self._total.get(key, 0) + value

    def take(self) -> StrataCacheConnectorStats | None:
        """The interval's counters, reset for the next interval (None when nothing happened)."""
        with self._lock:
            data, self._interval = self._interval, {}
        stats = StrataCacheConnectorStats(data=data)
        return None if stats.is_empty() else stats

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self._total)


class PeriodicLogger:
    """Logs cumulative counters every ``every`` steps, at most once per ``min_interval_s``."""

    def __init__(self, logger: logging.Logger, label: str, enabled: bool, every: int,
                 min_interval_s: float) -> None:
        self._logger, self._label = logger, label
        self._enabled, self._every, self._min_interval = enabled, max(1, every), min_interval_s
        self._steps = 0
        self._last = 0.0

    def step(self, counter: StatsCounter) -> None:
        if not self._enabled:
            return
        self._steps += 1
        now = time.monotonic()
        if self._steps % self._every or now - self._last < self._min_interval:
            return
        self._last = now
        totals = StrataCacheConnectorStats(data=counter.totals())
        if not totals.is_empty():
            self._logger.info("StrataCache %s: %s", self._label,
                              ", ".join(f"{k}={v}" for k, v in totals.reduce().items()))


def prom_name(key: str) -> tuple[str, float]:
    """Prometheus name of a counter, and the factor its values are scaled by.

    Times are exported in microseconds: ``LLM.get_metrics()`` reads counters
    back as integers, which would round a total of seconds spent to 0.
    """
    if key.endswith("_seconds"):
        return f"vllm:stratacache_{key[:-len('_seconds')]}_microseconds", 1e6
    return f"vllm:stratacache_{key}", 1.0


class StrataCachePromMetrics(KVConnectorPromMetrics):
    """One ``vllm:stratacache_<counter>`` Prometheus counter per statistic, per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        from vllm.v1.metrics.utils import create_metric_per_engine

        self._counters = {}
        for key, doc in COUNTERS.items():
            name, scale = prom_name(key)
            if scale != 1.0:
                doc += " (microseconds)"
            metric = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            self._counters[key] = (create_metric_per_engine(metric, per_engine_labelvalues), scale)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            per_engine, scale = self._counters.get(key, (None, 1.0))
            if per_engine is not None and value > 0 and engine_idx in per_engine:
                per_engine[engine_idx].inc(value * scale)
