"""Shared-region tier under real concurrency and crashes.

* stress: >= 4 processes for >= 30 s doing random put / get / delete /
  overwrite of varying sizes on one region; every object's bytes are derived
  from (key, version) and the version is also stored in its metadata, so any
  reader verifies any get byte-exactly against what its writer recorded.
* kill: >= 50 rounds of SIGKILLing a writer at a random moment, then the
  region is audited (index, bitmap, byte accounting), every readable object is
  verified, and the region keeps working.

Workers are forked from a forkserver that preloads torch and this module, so
a round costs milliseconds rather than an interpreter start.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
import traceback

import pytest
import torch

from stratacache.backends.shared import SharedRegionTier
from stratacache.core.artifact import ArtifactMeta
from stratacache.core.keys import ArtifactKey

pytestmark = pytest.mark.slow

CAPACITY = 24 << 20
MAX_OBJECTS = 256
N_KEYS = 96
MIX = 0x9E3779B97F4A7C15 - (1 << 64)   # as a signed int64


def region_layer(path: str) -> SharedRegionTier:
    return SharedRegionTier(path, CAPACITY, MAX_OBJECTS, lease_s=5.0)


def object_key(i: int) -> ArtifactKey:
    return ArtifactKey("kv", "stress", f"key-{i}")


def payload(key_index: int, version: int, size: int) -> torch.Tensor:
    """Bytes fully determined by (key, version); word 0 holds the version."""
    words = torch.arange(size // 8, dtype=torch.int64) * MIX + ((version * 1_000_003 + key_index) & ((1 << 63) - 1))
    words[0] = version
    return words.view(torch.uint8)


def verify(key_index: int, art) -> bool:
    """True if the object is exactly what some writer stored under this key."""
    data = art.data
    if data.numel() < 8 or data.numel() % 8:
        return False
    version = int(data[:8].view(torch.int64)[0])
    if art.meta.checksum != version:          # metadata and bytes must belong together
        return False
    return torch.equal(data, payload(key_index, version, data.numel()))


def random_size(rng: random.Random) -> int:
    return 8 * rng.choice([1, rng.randint(2, 512), rng.randint(512, 16384), rng.randint(16384, 131072)])


def store(layer: SharedRegionTier, rng: random.Random, i: int) -> bool:
    version = rng.getrandbits(62) + 1
    data = payload(i, version, random_size(rng))
    return layer.put(object_key(i), data, ArtifactMeta(size=data.numel(), checksum=version))


def stress_worker(path: str, seed: int, seconds: float, results) -> None:
    try:
        results.put(stress_loop(path, seed, seconds))
    except BaseException:
        results.put({"error": traceback.format_exc()})


def stress_loop(path: str, seed: int, seconds: float) -> dict:
    torch.set_num_threads(1)
    layer = region_layer(path)
    rng = random.Random(seed)
    counts = dict(puts=0, failed_puts=0, gets=0, hits=0, copies=0, deletes=0, mismatches=0)
    out = torch.empty(131072 * 8, dtype=torch.uint8)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        i = rng.randrange(N_KEYS)
        op = rng.random()
        if op < 0.4:
            counts["puts" if store(layer, rng, i) else "failed_puts"] += 1
        elif op < 0.9:
            counts["gets"] += 1
            if rng.random() < 0.5:   # copy into caller memory
                art = layer.get(object_key(i), out=out)
                if art is not None:
                    counts["hits"] += 1
                    counts["copies"] += 1
                    counts["mismatches"] += not verify(i, art)
            else:                      # zero-copy view, valid under its lease
                lease = layer.acquire(object_key(i))
                if lease is not None:
                    with lease as art:
                        counts["hits"] += 1
                        counts["mismatches"] += not verify(i, art)
        else:
            counts["deletes"] += layer.delete(object_key(i))
    layer.close()
    return counts


def kill_victim(path: str, seed: int, ready) -> None:
    torch.set_num_threads(1)
    layer = region_layer(path)
    rng = random.Random(seed)
    ready.set()
    while True:   # runs until SIGKILLed
        i = rng.randrange(N_KEYS)
        op = rng.random()
        if op < 0.7:
            store(layer, rng, i)
        elif op < 0.85:
            layer.delete(object_key(i))
        else:
            lease = layer.acquire(object_key(i))
            if lease is not None:
                lease.release()


def audit(layer: SharedRegionTier) -> int:
    """Region consistent, capacity accounting exact, every object intact; returns items."""
    assert layer.check() == []
    stats = layer.stats()["detail"]["region"]
    assert stats["writing"] == 0, "a dead writer's reservation was not reclaimed"
    total, items = 0, 0
    for k in layer.keys():
        art = layer.get(k)
        assert art is not None, f"{k} listed but unreadable"
        assert verify(int(k.name.split("-")[1]), art), f"torn or foreign bytes under {k}"
        total += art.meta.size
        items += 1
    stats = layer.stats()["detail"]["region"]
    assert stats["used_bytes"] == total and stats["items"] == items
    assert stats["reserved_bytes"] <= stats["capacity"]
    return items


@pytest.fixture(scope="module")
def ctx():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "stratacache.backends.shared", __name__])
    return context


def test_four_processes_thirty_seconds_zero_mismatches(region_path, ctx):
    region_layer(region_path).close()
    results = ctx.Queue()
    procs = [ctx.Process(target=stress_worker, args=(region_path, seed, 30.0, results)) for seed in range(4)]
    for p in procs:
        p.start()
    totals = {}
    for _ in procs:
        counts = results.get(timeout=120)
        assert "error" not in counts, counts.get("error")
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    print("stress totals:", totals)
    assert totals["mismatches"] == 0
    assert totals["hits"] > 1000 and totals["copies"] > 500 and totals["puts"] > 1000
    assert totals["deletes"] > 50
    layer = region_layer(region_path)
    assert layer.stats()["detail"]["region"]["evictions"] > 0    # the region filled and evicted under load
    audit(layer)
    layer.close()


def test_sigkill_writer_fifty_rounds(region_path, ctx):
    layer = region_layer(region_path)
    rng = random.Random(1234)
    for i in range(N_KEYS // 2):
        assert store(layer, rng, i)
    for round_ in range(50):
        ready = ctx.Event()
        proc = ctx.Process(target=kill_victim, args=(region_path, round_, ready))
        proc.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        if round_ % 5 == 4 or round_ == 49:
            audit(layer)
        # Still usable: a fresh write is immediately readable and exact.
        assert store(layer, rng, 0)
        art = layer.get(object_key(0))
        assert art is not None and verify(0, art)
    stats = layer.stats()["detail"]["region"]
    print("after kills:", stats)
    assert audit(layer) > 0
    layer.close()
