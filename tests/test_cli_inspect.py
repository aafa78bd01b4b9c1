"""``stratacache inspect`` on persistent tiers written by another process.

A writer process stores random objects of several kinds and namespaces
through the public StorageEngine and reports what it wrote and what its tier
accounts; ``stratacache inspect --json`` (a third process, no vLLM) must
report exactly that, and must not change the tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import yaml

from tests.test_cli import assert_one_line_error, cli

WRITER = textwrap.dedent("""
    import json, random, sys
    import torch
    from stratacache.core.keys import ArtifactKey
    from stratacache.engine import StorageEngine

    config, tier, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    namespaces = json.loads(sys.argv[4]) if len(sys.argv) > 4 else ["llama-a", "llama-b",
                                                                     "tenant-x"]
    rng = random.Random(seed)
    written = {}
    with StorageEngine.from_config(path=config) as engine:
        for i in range(rng.randrange(12, 30)):
            kind = rng.choice(["kv", "kv", "params", "custom"])
            namespace = rng.choice(namespaces)
            size = rng.randrange(1, 300_000)
            payload = torch.randint(0, 256, (size,), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(seed * 1000 + i))
            assert engine.store(ArtifactKey(kind, namespace, f"obj-{i}"), payload)
            use = written.setdefault(kind, {}).setdefault(namespace, {"items": 0, "payload": 0})
            use["items"] += 1
            use["payload"] += size
        engine.flush()
        used = engine.stats()["tiers"][tier]["used_bytes"]
    print(json.dumps({"written": written, "used_bytes": used}))
""")


def write_and_inspect(tmp_path: Path, tier: str, tier_section: dict, seed: int,
                      namespaces: Optional[list] = None):
    tiers = {"cpu": {"enabled": False}, "shared": {"enabled": False},
             "disk": {"enabled": False}, "redis": {"enabled": False}}
    tiers[tier] = {"enabled": True, **tier_section}
    config = tmp_path / f"{tier}.yaml"
    config.write_text(yaml.safe_dump({"tiers": tiers}))
    argv = [sys.executable, "-c", WRITER, str(config), tier, str(seed)]
    writer = subprocess.run(argv + ([json.dumps(namespaces)] if namespaces else []),
                            capture_output=True, text=True, timeout=120)
    assert writer.returncode == 0, writer.stderr[-3000:]
    wrote = json.loads(writer.stdout.strip().splitlines()[-1])
    result = cli("inspect", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert str(config) in report["config"]
    by_tier = {r["tier"]: r for r in report["tiers"]}
    assert all(r["state"] == "disabled" for name, r in by_tier.items() if name != tier)
    return config, wrote, by_tier[tier]


def assert_reports_what_was_written(wrote: dict, got: dict, capacity: int) -> None:
    written = wrote["written"]
    assert got["state"] == "ok", got
    assert got["persistent"] is True
    assert got["items"] == sum(u["items"] for ns in written.values() for u in ns.values())
    assert got["used_bytes"] == wrote["used_bytes"]
    assert got["capacity_bytes"] == capacity
    assert set(got["kinds"]) == set(written)
    payload = 0
    for kind, namespaces in written.items():
        assert set(got["kinds"][kind]) == set(namespaces), kind
        for namespace, use in namespaces.items():
            seen = got["kinds"][kind][namespace]
            assert seen["items"] == use["items"], (kind, namespace)
            # Stored bytes are the payload plus a small per-object header/key record
            # (the disk tier charges whole 4 KiB filesystem blocks: up to 4095 more).
            assert use["payload"] <= seen["bytes"] <= use["payload"] + (512 + 4096) * use["items"]
            payload += use["payload"]
    assert sum(s["bytes"] for ns in got["kinds"].values() for s in ns.values()) == got["used_bytes"]


def test_inspect_disk_tier_written_by_another_process(tmp_path):
    capacity = 64 << 20
    directory = tmp_path / "disk-tier"
    config, wrote, got = write_and_inspect(
        tmp_path, "disk", {"path": str(directory), "capacity": capacity}, seed=11)
    before = sorted((p, p.stat().st_mtime_ns) for p in directory.rglob("*"))
    assert_reports_what_was_written(wrote, got, capacity)
    assert got["location"] == str(directory)
    # Inspecting is read-only: running it again changes nothing on disk.
    assert cli("inspect", "--config", config, "--json").returncode == 0
    assert sorted((p, p.stat().st_mtime_ns) for p in directory.rglob("*")) == before
    # The text form names every namespace.
    text = cli("inspect", "--config", config, "--tier", "disk")
    assert text.returncode == 0, text.stderr
    for namespaces in wrote["written"].values():
        for namespace in namespaces:
            assert namespace in text.stdout


def test_inspect_reports_a_tier_that_does_not_exist_yet(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"tiers": {
        "disk": {"enabled": True, "path": str(tmp_path / "never-written")},
        "shared": {"path": str(tmp_path / "no-region")}}}))
    result = cli("inspect", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    by_tier = {r["tier"]: r for r in json.loads(result.stdout)["tiers"]}
    assert by_tier["disk"]["state"] == by_tier["shared"]["state"] == "absent"
    # Nothing was created by looking.
    assert not (tmp_path / "never-written").exists() and not (tmp_path / "no-region").exists()


def test_inspect_unreachable_redis_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"tiers": {"redis": {
        "enabled": True, "url": f"redis://127.0.0.1:{port}/0", "connect_timeout_s": 0.2}}}))
    result = cli("inspect", "--config", config, "--tier", "redis", "--json")
    assert_one_line_error(result, "tier redis")
    report = json.loads(result.stdout)
    assert report["tiers"][0]["state"] == "error"


def test_inspect_redis_tier_written_by_another_process(tmp_path):
    from tests.redis_server import RedisServer

    with RedisServer() as server:
        _, wrote, got = write_and_inspect(
            tmp_path, "redis", {"url": server.url, "key_prefix": "cli-test:"}, seed=12)
        written = wrote["written"]
        assert got["state"] == "ok", got
        assert got["items"] == sum(u["items"] for ns in written.values() for u in ns.values())
        assert set(got["kinds"]) == set(written)
        for kind, namespaces in written.items():
            assert set(got["kinds"][kind]) == set(namespaces)
            for namespace, use in namespaces.items():
                seen = got["kinds"][kind][namespace]
                assert seen["items"] == use["items"]
                assert use["payload"] <= seen["bytes"] <= use["payload"] + 512 * use["items"]
        assert got["location"].startswith("redis://127.0.0.1:")


def test_inspect_shared_region_written_by_another_process(tmp_path):
    capacity = 32 << 20
    region = Path(f"/dev/shm/stratacache-cli-inspect-{os.getpid()}.region")
    try:
        config, wrote, got = write_and_inspect(
            tmp_path, "shared", {"path": str(region), "capacity": capacity, "max_objects": 1024},
            seed=13)
        assert_reports_what_was_written(wrote, got, capacity)
        assert got["location"] == str(region)
        # The region keeps its own hit/miss counters; the writer made no reads.
        assert got["counters"]["hits"] == 0
        image = region.read_bytes()
        assert cli("inspect", "--config", config, "--tier", "shared").returncode == 0
        assert region.read_bytes() == image, "inspect modified the region"
    finally:
        region.unlink(missing_ok=True)


def test_inspect_lists_kv_namespaces_with_model_and_fingerprint(tmp_path):
    """Model name, weights fingerprint prefix, TP rank, objects and bytes per KV namespace."""
    from stratacache.adapters.vllm.keys import KVIdentity

    identity = KVIdentity(model_name="LlamaForCausalLM", weights="sha256:" + "5e" * 32,
                          model_digest="d", kv_dtype="torch.bfloat16/auto", layout="cpu_attn/vec",
                          block_size=128, num_kv_heads=2, head_size=64, tp_size=2)
    old_scheme = "vllm-llama-0123456789abcdef0123-tp0of1"
    current = [identity.namespace(0), identity.namespace(1)]
    config, wrote, got = write_and_inspect(
        tmp_path, "disk", {"path": str(tmp_path / "disk-tier"), "capacity": 64 << 20}, seed=14,
        namespaces=current + [old_scheme])
    kv_written = wrote["written"]["kv"]
    listed = {n["namespace"]: n for n in got["kv_namespaces"]}
    assert set(listed) == set(kv_written)
    for namespace, row in listed.items():
        assert row["items"] == kv_written[namespace]["items"]
        assert row["bytes"] == got["kinds"]["kv"][namespace]["bytes"]
        if namespace == old_scheme:
            assert row["model"] is None and "never matched" in row["note"]
        else:
            assert row["model"] == "LlamaForCausalLM" and row["note"] is None
            assert row["weights_tag"] == identity.weights_tag
            assert row["tp"] == f"{current.index(namespace)}/2"
    text = cli("inspect", "--config", config, "--tier", "disk")
    assert text.returncode == 0, text.stderr
    for namespace in kv_written:
        line = next(l for l in text.stdout.splitlines() if l.startswith(namespace))
        if namespace != old_scheme:
            assert "LlamaForCausalLM" in line and identity.weights_tag in line
        else:
            assert "never matched" in line
