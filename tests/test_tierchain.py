"""TierChain: write-through reaches every tier, read-through + promotion, demotion on eviction, modes."""

import pytest
import torch

from stratacache.backends.cpu import CpuMemoryLayer
from stratacache.backends.disk import DiskMemoryLayer
from stratacache.core.artifact import meta_for
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from stratacache.ops import checksum64
from stratacache.tiering import TierChain, TierSettings, tier_class


def K(i):
    return ArtifactKey("kv", "chain-test", f"c{i}")


def body(i, n=3000):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)


def engine(tmp_path, *, top_cap=64 << 10, policy="write_through", promote=True, demote=False):
    top = CpuMemoryLayer(top_cap, pin_memory=False, eviction="lru", name="cpu")
    mid = CpuMemoryLayer(1 << 20, pin_memory=False, eviction="lru", name="mid")
    disk = DiskMemoryLayer(str(tmp_path / "disk"), 4 << 20)
    chain = TierChain([top, mid, disk], [TierSettings(policy, promote, demote),
                                         TierSettings("write_through", promote, demote), TierSettings()])
    return StorageEngine(None, chain=chain)


def test_tier_classes_resolve_lazily():
    assert tier_class("cpu") is CpuMemoryLayer and tier_class("disk") is DiskMemoryLayer
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
    assert [t.contains_encoded(encoded) for t in e.tiers] == [upper, upper, [True] * 5 + [False]]
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
