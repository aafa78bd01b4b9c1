"""KV namespaces, key stability, and the connector's stats / Prometheus plumbing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from stratacache.adapters.vllm.keys import (
    KVIdentity,
    hash_stability_problem,
    model_digest,
    parse_namespace,
)
from stratacache.adapters.vllm.stats import (
    COUNTERS,
    StatsCounter,
    StrataCacheConnectorStats,
    StrataCachePromMetrics,
    prom_name,
)

BASE = KVIdentity(model_name="LlamaForCausalLM", weights="sha256:" + "ab" * 32, model_digest="abc",
                  kv_dtype="torch.bfloat16/auto", layout="cpu_attn/amx", block_size=128,
                  num_kv_heads=2, head_size=64, tp_size=2)


def test_every_identity_field_separates_namespaces():
    seen = {BASE.namespace(0)}
    for f in dataclasses.fields(KVIdentity):
        value = getattr(BASE, f.name)
        changed = dataclasses.replace(BASE, **{f.name: value + 1 if isinstance(value, int)
                                               else value + "x"})
        ns = changed.namespace(0)
        assert ns not in seen, f.name
        seen.add(ns)
    assert BASE.namespace(1) not in seen                        # TP rank
    assert "\x1f" not in BASE.namespace(0) and BASE.namespace(0).endswith("tp0of2")


def test_namespace_is_stable_across_processes():
    code = ("from stratacache.adapters.vllm.keys import KVIdentity;"
            f"print(KVIdentity(**{dataclasses.asdict(BASE)!r}).namespace(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "random", "PATH": ""})
    assert out.stdout.strip() == BASE.namespace(1)


def test_namespace_names_model_and_weights_and_parses_back():
    ns = BASE.namespace(1)
    assert parse_namespace(ns) == {"model": "LlamaForCausalLM", "weights_tag": BASE.weights_tag,
                                   "digest": ns.split("-")[-2], "tp_rank": 1, "tp_size": 2}
    named = dataclasses.replace(BASE, model_name="registry.example/llama:v3@sha256", weights="id:x")
    assert parse_namespace(named.namespace(0))["model"] == "registry.example_llama_v3_sha256"
    # Namespaces of the old scheme (directory name + path/mtime digest) are not parsed as current.
    assert parse_namespace("vllm-llama-0123456789abcdef0123-tp0of1") is None


def test_model_digest_ignores_provenance_but_not_architecture():
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "hidden_size": 256}
    first = model_digest(config, "torch.bfloat16", None)
    moved = {**config, "_name_or_path": "/elsewhere/llama", "transformers_version": "9.9"}
    assert model_digest(moved, "torch.bfloat16", None) == first
    assert model_digest({**config, "num_hidden_layers": 5}, "torch.bfloat16", None) != first
    assert model_digest(config, "torch.float16", None) != first
    assert model_digest(config, "torch.bfloat16", "fp8") != first


def test_hash_stability_warning():
    assert hash_stability_problem("sha256", env={}) is None
    assert hash_stability_problem("sha256_cbor", env={}) is None
    problem = hash_stability_problem("xxhash", env={})
    assert problem and "PYTHONHASHSEED" in problem
    assert hash_stability_problem("xxhash", env={"PYTHONHASHSEED": "0"}) is None


def test_stats_aggregate_reduce_and_reset():
    counter = StatsCounter()
    assert counter.take() is None
    counter.add(hit_tokens=300, miss_tokens=100, load_bytes=2e9, load_seconds=1.0, lookups=4,
                lookup_seconds=0.0002)
    a = counter.take()
    assert counter.take() is None                               # interval reset
    b = StrataCacheConnectorStats(data={"hit_tokens": 100, "load_errors": 1})
    merged = a.aggregate(b)
    reduced = merged.reduce()
    assert reduced["hit_tokens"] == 400 and reduced["load_errors"] == 1
    assert reduced["hit_rate"] == pytest.approx(0.8)
    assert reduced["load_gbps"] == pytest.approx(2.0)
    assert reduced["lookup_us"] == pytest.approx(50.0)
    assert counter.totals()["hit_tokens"] == 300
    assert not merged.is_empty() and StrataCacheConnectorStats().is_empty()


def test_prometheus_counters_per_engine():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()

    def bound(cls):
        return lambda **kw: cls(registry=registry, **kw)

    metric_types = {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)}

    class Cfg:
        kv_transfer_config = None

    prom = StrataCachePromMetrics(Cfg(), metric_types, ["engine"], {0: ["0"], 1: ["1"]})
    prom.observe({"hit_tokens": 256, "load_bytes": 1024.0, "not_a_counter": 5}, engine_idx=1)
    prom.observe({"hit_tokens": 128}, engine_idx=1)
    assert registry.get_sample_value("vllm:stratacache_hit_tokens_total", {"engine": "1"}) == 384
    assert registry.get_sample_value("vllm:stratacache_hit_tokens_total", {"engine": "0"}) == 0
    assert registry.get_sample_value("vllm:stratacache_load_bytes_total", {"engine": "1"}) == 1024
    # Times are exported in microseconds (LLM.get_metrics() reads counters as integers).
    prom.observe({"load_seconds": 0.0025}, engine_idx=1)
    assert registry.get_sample_value("vllm:stratacache_load_microseconds_total",
                                     {"engine": "1"}) == pytest.approx(2500)
    for key in COUNTERS:
        name = prom_name(key)[0]
        assert registry.get_sample_value(f"{name}_total", {"engine": "0"}) == 0


def test_encoded_key_prefix_matches_artifact_key_encoding():
    from stratacache.adapters.vllm.keys import artifact_key, encoded_key_prefix
    from stratacache.core.keys import ArtifactKey

    prefix = encoded_key_prefix("vllm-ns-tp0of1")
    for name in ("ab12", "0" * 64):
        key = artifact_key("vllm-ns-tp0of1", name)
        assert prefix + name.encode() == key.encode()
        assert ArtifactKey.decode(prefix + name.encode()) == key
    with pytest.raises(ValueError):
        encoded_key_prefix("bad\x1fnamespace")
