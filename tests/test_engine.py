"""StorageEngine: config-built chains, batched forms, fault isolation, integrity, quotas and priorities."""

import random
import threading

import pytest
import torch

from stratacache.backends.base import Tier
from stratacache.backends.cpu import CpuTier
from stratacache.config import load_config
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from stratacache.ops import checksum64
from stratacache.tiering import TierChain, TierSettings


def K(i, kind="kv"):
    return ArtifactKey(kind, "engine-test", f"e{i}")


def body(i, n=4096):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)


def cfg_for(tmp_path, **extra):
    base = {"tiers.cpu.capacity": "1MiB", "tiers.cpu.pin_memory": False, "tiers.shared.enabled": False,
            "tiers.disk.enabled": True, "tiers.disk.path": str(tmp_path / "disk"),
            "tiers.disk.capacity": "8MiB", "tiers.disk.io_threads": 2}
    base.update(extra)
    return load_config(overrides=base)


def test_from_config_round_trip_batched(tmp_path):
    e = StorageEngine(cfg_for(tmp_path))
    assert e.tier_names == ("cpu", "disk")
    xs = [torch.randn(8, 16), torch.arange(100, dtype=torch.int64), b"raw bytes payload"]
    keys = [K(i) for i in range(3)]
    cs = [None, checksum64(xs[1]), None]
    assert e.store_many(list(zip(keys, xs)), checksums=cs) == [True] * 3
    outs = [torch.full((1024,), 0x5A, dtype=torch.uint8) for _ in keys]
    arts = e.load_many(keys, outs=outs)
    assert torch.equal(arts[0].tensor(), xs[0]) and torch.equal(arts[1].tensor(), xs[1])
    assert bytes(arts[2].data.numpy()) == b"raw bytes payload"
    assert (outs[2][len(b"raw bytes payload"):] == 0x5A).all()
    for k, x in zip(keys, xs):                                          # reached the disk tier too
        assert e.load(k, mode="exact", tier="disk") is not None
    with pytest.raises(ValueError, match="checksums has 1 entries for 3 items"):
        e.store_many(list(zip(keys, xs)), checksums=[1])
    with pytest.raises(ValueError, match="contiguous"):
        e.store(K(9), torch.randn(4, 4).t())
    with pytest.raises(TypeError, match="key must be an ArtifactKey"):
        e.store("k", b"x")
    e.close()
    e.close()                                                           # idempotent


def test_tier_subset_and_bad_names(tmp_path):
    cfg = cfg_for(tmp_path)
    with StorageEngine(cfg, tiers=["disk"]) as e:
        assert e.tier_names == ("disk",)
        assert e.store(K(1), body(1)) and e.load(K(1)) is not None
    with pytest.raises(ValueError, match="tier 'shared' is not enabled"):
        StorageEngine(cfg, tiers=["shared"])
    with pytest.raises(ValueError, match="unknown tier 'tape'"):
        StorageEngine(cfg, tiers=["tape"])


class BrokenTier(Tier):
    """Every operation raises, like a tier whose server vanished."""

    persistent = True

    def __init__(self):
        super().__init__("broken", 1 << 20)

    @classmethod
    def from_config(cls, section, cfg):
        return cls()

    def _fail(self, *args, **kwargs):
        raise OSError("device gone")

    _put = _get = contains = delete = keys = _stats = close = _fail


def test_tier_faults_never_reach_the_caller():
    good = CpuTier(1 << 20, pin_memory=False, name="good")
    chain = TierChain([BrokenTier(), good], [TierSettings(), TierSettings()])
    e = StorageEngine(None, chain=chain)
    assert e.store(K(1), body(1))                       # the broken tier fails, the next one acknowledges
    assert torch.equal(e.load(K(1)).data, body(1))
    assert e.contains(K(1)) and e.prefix_lookup([K(1), K(2)]) == 1
    assert e.delete(K(1)) and e.load(K(1)) is None
    with e.pinned(K(1)) as art:
        assert art is None
    s = e.stats()
    assert s["tiers"]["broken"]["errors"] >= 5
    e.close()


class UntrustedTier(CpuTier):
    """A persistent tier that does not verify on read (the engine must)."""

    persistent = True


def test_corrupt_object_in_untrusted_tier_is_a_counted_miss():
    top = UntrustedTier(1 << 20, pin_memory=False, name="shm")
    below = CpuTier(1 << 20, pin_memory=False, name="below")
    e = StorageEngine(None, chain=TierChain([top, below], [TierSettings(promote=False), TierSettings()]))
    e.store(K(1), body(1))
    top.get(K(1)).data[100] ^= 0xFF                                     # bit rot in the shared tier
    art = e.load(K(1))
    assert art is not None and torch.equal(art.data, body(1))          # served from the good copy
    assert top.contains([K(1).encode()]) == [False]                     # the bad one was removed
    assert e.stats()["engine"]["corrupt"] == 1
    e.store(K(2), body(2), mode="exact", tier="shm")
    top.get(K(2)).data[0] ^= 1
    with e.pinned(K(2)) as art:
        assert art is None
    e.close()


def test_params_protected_from_kv_traffic_and_quota(tmp_path):
    cfg = cfg_for(tmp_path, **{"tiers.disk.enabled": False, "tiers.cpu.capacity": "256KiB",
                               "namespaces.kv.quota": "128KiB"})
    e = StorageEngine(cfg)
    for i in range(4):
        assert e.store(K(i, "params"), body(i, 16 << 10))
    for i in range(100):
        assert e.store(K(i), body(i, 16 << 10))
    s = e.stats()["tiers"]["cpu"]
    assert s["detail"]["used_by_kind"]["kv"] <= 128 << 10 and s["used_bytes"] <= 256 << 10
    assert all(e.contains(K(i, "params")) for i in range(4))
    e.close()


def test_engine_thread_stress_with_disk(tmp_path):
    e = StorageEngine(cfg_for(tmp_path, **{"tiers.cpu.capacity": "64KiB", "tiers.cpu.write_policy": "write_back"}))
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        out = torch.empty(8192, dtype=torch.uint8)
        for _ in range(200):
            i = rng.randrange(60)
            r = rng.random()
            try:
                if r < 0.4:
                    e.store(K(i), body(i, 2048 + i))
                elif r < 0.8:
                    art = e.load(K(i), out=out)
                    if art is not None and not torch.equal(art.data, body(i, 2048 + i)):
                        errors.append(f"bad bytes {i}")
                elif r < 0.9:
                    e.prefix_lookup([K(j) for j in range(i, i + 8)])
                else:
                    e.delete(K(i))
            except Exception as exc:
                errors.append(repr(exc))
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert e.flush(timeout=20)
    s = e.stats()
    assert s["tiers"]["cpu"]["used_bytes"] <= 64 << 10 and s["tiers"]["disk"]["used_bytes"] <= 8 << 20
    assert s["writeback"]["dirty_items"] == 0
    e.close()
