"""TierChain over the real tiers: write-through reaches every tier, read-through + promotion,
demotion on eviction, modes, one probe per tier per read, leases and holds."""

import pytest
import torch

from stratacache.backends.cpu import CpuTier
from stratacache.backends.disk import DiskTier
from stratacache.backends.shared import SharedRegionTier
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from stratacache.ops import checksum64
from stratacache.tiering import TierChain, TierSettings, tier_class
from tests.test_chain_reads import probe_counts


def K(i):
    return ArtifactKey("kv", "chain-test", f"c{i}")


def body(i, n=3000):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)


def engine(tmp_path, *, top_cap=64 << 10, policy="write_through", promote=True, demote=False):
    top = CpuTier(top_cap, pin_memory=False, eviction="lru", name="cpu")
    mid = CpuTier(1 << 20, pin_memory=False, eviction="lru", name="mid")
    disk = DiskTier(str(tmp_path / "disk"), 4 << 20)
    chain = TierChain([top, mid, disk], [TierSettings(policy, promote, demote),
                                         TierSettings("write_through", promote, demote), TierSettings()])
    return StorageEngine(None, chain=chain)


def test_tier_classes_resolve_lazily():
    assert tier_class("cpu") is CpuTier and tier_class("disk") is DiskTier
    with pytest.raises(ValueError, match="unknown tier 'tape'"):
        tier_class("tape")


def test_write_through_reaches_every_tier(tmp_path):
    e = engine(tmp_path)
    assert e.store(K(1), body(1))
    for name in ("cpu", "mid", "disk"):
        assert e.contains(K(1), mode="exact", tier=name)
        assert torch.equal(e.load(K(1), mode="exact", tier=name).data, body(1))
    e.close()


def test_read_through_promotes_only_where_enabled(tmp_path):
    e = engine(tmp_path, promote=False)
    assert e.store(K(2), body(2), mode="exact", tier="disk")
    assert not e.contains(K(2), mode="exact", tier="cpu")
    out = torch.full((4000,), 7, dtype=torch.uint8)
    art = e.load(K(2), out=out)
    assert torch.equal(out[:3000], body(2)) and art.data.data_ptr() == out.data_ptr()
    assert not e.contains(K(2), mode="exact", tier="cpu")
    e.close()
    e = engine(tmp_path / "b", promote=True)
    e.store(K(2), body(2), mode="exact", tier="disk")
    assert torch.equal(e.load(K(2)).data, body(2))
    assert e.contains(K(2), mode="exact", tier="cpu") and e.contains(K(2), mode="exact", tier="mid")
    e.close()


def test_modes_exact_and_prefer(tmp_path):
    e = engine(tmp_path)
    e.store(K(3), body(3), mode="exact", tier="mid")
    assert e.load(K(3), mode="exact", tier="cpu") is None
    assert e.load(K(3), mode="prefer", tier="disk") is not None       # falls back to the chain
    with pytest.raises(ValueError, match="mode must be one of"):
        e.load(K(3), mode="fastest")
    with pytest.raises(ValueError, match="tier 'tape' is not in this engine"):
        e.load(K(3), mode="exact", tier="tape")
    e.close()


def test_demote_on_evict_writes_evicted_objects_down(tmp_path):
    e = engine(tmp_path, top_cap=8 << 10, demote=True)
    for i in range(10):
        assert e.store(K(i), body(i), mode="exact", tier="cpu")      # only in the top tier
    for i in range(10):                                                # evicted ones were demoted
        assert torch.equal(e.load(K(i), mode="prefer", tier="cpu").data, body(i))
    assert e.stats()["tiers"]["cpu"]["evictions"] > 0
    e.close()
    e = engine(tmp_path / "b", top_cap=8 << 10, demote=False)
    for i in range(10):
        e.store(K(i), body(i), mode="exact", tier="cpu")
    assert sum(e.load(K(i)) is not None for i in range(10)) < 10       # without demotion they are gone
    e.close()


def test_prefix_lookup_and_contains_many(tmp_path):
    e = engine(tmp_path)
    for i in (0, 1, 2, 4):
        e.store(K(i), body(i, 100))
    e.store(K(3), body(3, 100), mode="exact", tier="disk")             # only in the lowest tier
    keys = [K(i) for i in range(6)]
    assert e.prefix_lookup(keys) == 5
    assert e.prefix_lookup(keys[5:]) == 0
    assert e.prefix_lookup([]) == 0
    assert e.contains_many(keys) == [True] * 5 + [False]
    encoded = [k.encode() for k in keys]                                # the scheduler's key form
    assert e.prefix_lookup(encoded) == 5 and e.contains_many(encoded) == [True] * 5 + [False]
    upper = [i != 3 for i in range(5)] + [False]                        # K(3) is only on disk
    assert [[e.contains(k, mode="exact", tier=n) for k in keys] for n in e.tier_names] == \
        [upper, upper, [True] * 5 + [False]]
    e.delete(K(2))
    assert e.prefix_lookup(keys) == 2 and e.prefix_lookup(encoded) == 2
    e.close()


def test_checksum_of_stored_payload_is_kept(tmp_path):
    e = engine(tmp_path)
    x = torch.randn(10, 10)
    e.store(K(9), x)
    assert e.load(K(9), tier="disk", mode="exact").meta.checksum == checksum64(x) & 0xFFFFFFFFFFFFFFFF
    e.close()


def test_batched_forms_mix_tiers_misses_and_write_back(tmp_path):
    e = engine(tmp_path, policy="write_back")
    items = [(K(i), body(i, 500 + i)) for i in range(6)]
    assert e.store_many(items[:3]) == [True] * 3                        # cpu now, mid + disk after flush
    assert e.store_many(items[3:5], mode="exact", tier="disk") == [True] * 2
    assert e.flush(timeout=10)
    assert all(e.contains(K(i), mode="exact", tier="disk") for i in range(5))
    keys = [K(i) for i in range(6)]
    outs = [torch.full((1000,), 0xCC, dtype=torch.uint8) for _ in keys]
    arts = e.load_many(keys, outs=outs)
    assert arts[5] is None and (outs[5] == 0xCC).all()
    for i in range(5):
        assert torch.equal(outs[i][:500 + i], body(i, 500 + i)) and arts[i].data.data_ptr() == outs[i].data_ptr()
    assert e.contains(K(4), mode="exact", tier="cpu")                    # promoted by the batched read
    with pytest.raises(ValueError, match="outs has 1 entries for 6 keys"):
        e.load_many(keys, outs=outs[:1])
    s = e.stats()["engine"]
    assert s["hits"] >= 5 and s["misses"] >= 1
    e.close()


def real_tiers(tmp_path, region_path, *, cap=1 << 20):
    return [CpuTier(cap, pin_memory=False, eviction="lru", name="cpu"),
            SharedRegionTier(region_path, cap, 256, reset=True, register_cuda=False),
            DiskTier(str(tmp_path / "disk"), 4 << 20)]


@pytest.mark.parametrize("read", ["load", "load_many", "lease", "pinned"])
def test_real_tiers_a_miss_probes_each_tier_once_and_is_counted_once(tmp_path, region_path, read):
    tiers = real_tiers(tmp_path, region_path)
    counts = [probe_counts(t) for t in tiers]
    e = StorageEngine(None, chain=TierChain(tiers, [TierSettings()] * 3))
    assert e.store(K(1), body(1), mode="exact", tier="disk")
    missing = [K(100 + i) for i in range(3)]
    if read == "load":
        assert [e.load(k) for k in missing] == [None] * 3
    elif read == "load_many":
        assert e.load_many(missing) == [None] * 3
    elif read == "lease":
        assert [e.lease(k) for k in missing] == [None] * 3
    else:
        for k in missing:
            with e.pinned(k) as art:
                assert art is None
    stats = e.stats()
    for tier, count in zip(tiers, counts):
        assert count["_get:keys"] + count["_acquire:keys"] + count["_get_many:keys"] == 3, (tier.name, count)
        assert count["contains"] == 0, (tier.name, count)
        assert stats["tiers"][tier.name]["misses"] == 3 and stats["tiers"][tier.name]["hits"] == 0
    assert stats["engine"]["misses"] == 3 and stats["engine"]["hits"] == 0
    # A hit on disk: one probe per tier on the way down; a lease is read in place, not promoted.
    counts = [probe_counts(t) for t in tiers]
    with e.lease(K(1)) as art:
        assert torch.equal(art.data, body(1))
    assert [c["_acquire:keys"] for c in counts] == [1, 1, 1]
    assert not e.contains(K(1), mode="exact", tier="cpu")
    assert not e.contains(K(1), mode="exact", tier="shared")
    e.close()


@pytest.mark.parametrize("tier", ["cpu", "shared"])
def test_real_tiers_a_lease_outlives_eviction_pressure_for_its_holder_only(tmp_path, region_path, tier):
    cap, size = 256 << 10, 32 << 10
    tiers = real_tiers(tmp_path, region_path, cap=cap)
    e = StorageEngine(None, chain=TierChain(tiers, [TierSettings()] * 3))
    x = body(7, size)
    assert e.store(K(0), x, mode="exact", tier=tier)
    first = e.lease(K(0), mode="exact", tier=tier)
    second = e.lease(K(0), mode="exact", tier=tier)
    assert first.held and second.held and torch.equal(first.artifact.data, x)
    first.release()
    first.release()                                           # idempotent, ends only its own hold
    for i in range(1, 4 * cap // size):                       # four times the tier's capacity
        e.store(K(i), body(i, size), mode="exact", tier=tier)
    assert e.contains(K(0), mode="exact", tier=tier)          # the second holder keeps it
    assert torch.equal(second.artifact.data, x)
    second.release()
    for i in range(4 * cap // size, 8 * cap // size):
        e.store(K(i), body(i, size), mode="exact", tier=tier)
    assert not e.contains(K(0), mode="exact", tier=tier)      # no holder left: evicted
    e.close()


def test_real_tiers_hold_keeps_weights_resident_until_released(tmp_path, region_path):
    cap, size = 256 << 10, 32 << 10
    tiers = real_tiers(tmp_path, region_path, cap=cap)
    e = StorageEngine(None, chain=TierChain(tiers, [TierSettings()] * 3))
    weights = [ArtifactKey("params", "chain-test@main", f"w{i}") for i in range(2)]
    assert e.store_many([(k, body(50 + i, size)) for i, k in enumerate(weights)]) == [True, True]
    held = e.hold(weights, lease_s=30.0)
    assert sorted(lease.tier for lease in held) == ["cpu", "cpu", "shared", "shared"]   # not disk
    for i in range(16):
        e.store(K(i), body(i, size))
    for name in ("cpu", "shared"):
        assert all(e.contains(k, mode="exact", tier=name) for k in weights)
    for lease in held:
        lease.release()
    e.close()
