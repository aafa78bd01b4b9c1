"""Per-tier counters and latency histograms, a Python stats API and optional Prometheus export.

Counting is in-process and cheap (one small lock per tier); Prometheus reads
the same counters at scrape time, so no metrics server exists unless
``telemetry.prometheus`` is true, and it binds 127.0.0.1 unless told otherwise.
"""

from stratacache.telemetry.metrics import LATENCY_BUCKETS_S, LatencyHistogram, TierCounters
from stratacache.telemetry.prometheus import PrometheusExporter

__all__ = ["LATENCY_BUCKETS_S", "LatencyHistogram", "TierCounters", "PrometheusExporter"]
