"""Prometheus export of the engine's stats, read at scrape time.

Uses its own ``CollectorRegistry`` (never the process-global one) so several
engines in one process cannot clash, and starts an HTTP server only when asked.
"""

from __future__ import annotations

from typing import Callable, Optional

from stratacache.telemetry.metrics import COUNTER_NAMES, LATENCY_BUCKETS_S


class PrometheusExporter:
    """Serves ``stats_fn()`` (StorageEngine.stats() shape) as Prometheus metrics."""

    def __init__(self, stats_fn: Callable[[], dict]):
        from prometheus_client import CollectorRegistry

        self._stats_fn = stats_fn
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server = None
        self.port: Optional[int] = None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        stats = self._stats_fn()
        counters = {n: CounterMetricFamily(f"stratacache_{n}", f"StrataCache tier {n}", labels=["tier"])
                    for n in COUNTER_NAMES}
        used = GaugeMetricFamily("stratacache_used_bytes", "payload bytes held", labels=["tier"])
        cap = GaugeMetricFamily("stratacache_capacity_bytes", "tier capacity", labels=["tier"])
        items = GaugeMetricFamily("stratacache_items", "objects held", labels=["tier"])
        lat = {op: HistogramMetricFamily(f"stratacache_{op}_seconds", f"tier {op} latency", labels=["tier"])
               for op in ("get", "put")}
        for tier, s in stats.get("tiers", {}).items():
            for n in COUNTER_NAMES:
                counters[n].add_metric([tier], s.get(n, 0))
            used.add_metric([tier], s.get("used_bytes", 0))
            cap.add_metric([tier], s.get("capacity_bytes", 0))
            items.add_metric([tier], s.get("items", 0))
            for op, fam in lat.items():
                h = s.get("latency", {}).get(op)
                if not h:
                    continue
                cumulative, buckets = 0, []
                for bound, c in zip(list(LATENCY_BUCKETS_S) + [float("inf")], h["buckets"]):
                    cumulative += c
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                fam.add_metric([tier], buckets, h["sum_s"])
        yield from counters.values()
        yield from (used, cap, items)
        yield from lat.values()
        wb = stats.get("writeback", {})
        for n in ("dirty_bytes", "dirty_items", "flushed", "flush_failures"):
            g = GaugeMetricFamily(f"stratacache_writeback_{n}", f"write-back {n}")
            g.add_metric([], wb.get(n, 0))
            yield g

    def start(self, host: str = "127.0.0.1", port: int = 9464) -> int:
        """Start the HTTP server (port 0 picks a free one); returns the bound port."""
        from prometheus_client import start_http_server

        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
