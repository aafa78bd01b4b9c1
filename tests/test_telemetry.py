"""Telemetry: counters, histograms, the stats API, and Prometheus only when enabled (127.0.0.1)."""

import socket
import urllib.request

import torch

from stratacache.config import load_config
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from stratacache.telemetry import LatencyHistogram, TierCounters


def test_histogram_quantiles_and_counters():
    h = LatencyHistogram()
    for s in [1e-6] * 90 + [1e-3] * 10:
        h.observe(s)
    assert h.count == 100 and h.quantile(0.5) <= 2e-6 and 1e-3 <= h.quantile(0.99) < 3e-3
    c = TierCounters("t")
    c.add("hits")
    c.add_many(misses=2, bytes_out=10)
    with c.timed("get"):
        pass
    snap = c.snapshot()
    assert (snap["hits"], snap["misses"], snap["bytes_out"], snap["latency"]["get"]["count"]) == (1, 2, 10, 1)


def engine(**extra):
    over = {"tiers.cpu.capacity": "1MiB", "tiers.cpu.pin_memory": False, "tiers.shared.enabled": False}
    over.update(extra)
    return StorageEngine(load_config(overrides=over))


def test_stats_api_counts_hits_misses_bytes_evictions():
    e = engine(**{"tiers.cpu.capacity": "64KiB"})
    k = [ArtifactKey("kv", "tel", str(i)) for i in range(10)]
    for key in k:
        e.store(key, torch.zeros(10000, dtype=torch.uint8))
    e.load(k[-1])
    e.load(ArtifactKey("kv", "tel", "missing"))
    s = e.stats()
    cpu = s["tiers"]["cpu"]
    assert cpu["hits"] == 1 and cpu["misses"] == 1 and cpu["bytes_in"] == 100000 and cpu["bytes_out"] == 10000
    assert cpu["evictions"] == 4 and cpu["items"] == 6 and cpu["latency"]["put"]["count"] == 10
    assert s["engine"]["hits"] == 1 and s["engine"]["misses"] == 1 and s["prometheus_port"] is None
    e.close()


def test_prometheus_serves_on_localhost_only_when_enabled():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    e = engine(**{"telemetry.prometheus": True, "telemetry.port": port})
    try:
        assert e.stats()["prometheus_port"] == port
        e.store(ArtifactKey("kv", "tel", "a"), b"12345")
        e.load(ArtifactKey("kv", "tel", "a"))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'stratacache_hits_total{tier="cpu"} 1.0' in text
        assert 'stratacache_bytes_in_total{tier="cpu"} 5.0' in text
        assert 'stratacache_get_seconds_count{tier="cpu"} 1.0' in text
        server = e._exporter._server
        assert server.server_address[0] == "127.0.0.1"
    finally:
        e.close()
    with socket.socket() as probe:                                     # stopped with the engine
        assert probe.connect_ex(("127.0.0.1", port)) != 0
