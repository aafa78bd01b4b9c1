"""CpuTier: byte-exact round trips, exact capacity, zero-copy views, leases, concurrency."""

import random
import warnings

import pytest
import torch

from stratacache.backends.cpu import CpuTier
from stratacache.core.errors import InvalidArgument
from stratacache.core.artifact import ArtifactMeta, as_bytes, meta_for
from stratacache.core.keys import ArtifactKey
from tests.test_tier_conformance import run_in_threads


def K(i, kind="kv"):
    return ArtifactKey(kind, "model-a", f"chunk-{i}")


def put(tier, key, payload):
    data = as_bytes(payload)
    return tier.put(key, data, meta_for(payload, 0))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.int64])
def test_round_trip_byte_exact_with_dtype_and_shape(dtype):
    tier = CpuTier(1 << 20, pin_memory=False)
    g = torch.Generator().manual_seed(hash(str(dtype)) & 0xFFFF)
    x = torch.randint(0, 255, (3, 5, 7), generator=g, dtype=torch.uint8)
    x = x.to(dtype) if dtype != torch.bfloat16 else torch.randn(3, 5, 7, generator=g).to(dtype)
    assert put(tier, K(1), x)
    art = tier.get(K(1))
    assert art.meta.dtype == dtype and art.meta.shape == (3, 5, 7)
    assert torch.equal(art.tensor(), x)
    out = torch.full((art.meta.size + 13,), 0xAB, dtype=torch.uint8)   # poisoned, larger than needed
    art2 = tier.get(K(1), out=out)
    assert torch.equal(out[:art.meta.size], as_bytes(x))
    assert (out[art.meta.size:] == 0xAB).all()                         # nothing written past the object
    assert art2.data.data_ptr() == out.data_ptr()


def test_zero_copy_view_points_into_arena():
    tier = CpuTier(1 << 16, pin_memory=False)
    put(tier, K(1), bytes(range(256)))
    a, b = tier.get(K(1)), tier.get(K(1))
    assert a.data.data_ptr() == b.data.data_ptr()
    assert bytes(a.data.numpy()) == bytes(range(256))


def test_exact_capacity_and_rejects_too_large():
    tier = CpuTier(1000, pin_memory=False, eviction="lru")
    assert not put(tier, K(0), b"x" * 1001)
    assert put(tier, K(1), b"a" * 600)
    assert put(tier, K(2), b"b" * 400)
    assert tier.stats()["used_bytes"] == 1000
    assert put(tier, K(3), b"c" * 1)                                   # evicts K(1) (LRU)
    assert tier.contains([K(1).encode(), K(2).encode()]) == [False, True]
    assert tier.stats()["used_bytes"] == 401
    s = tier.stats()
    assert s["evictions"] == 1 and s["items"] == 2 and s["put_failures"] == 1
    assert s["detail"]["allocator"]["arena_bytes"] >= 1000


def test_leased_view_survives_pressure_until_lease_released():
    tier = CpuTier(4096, pin_memory=False, eviction="lru", lease_s=30)
    payload = bytes(random.Random(1).randbytes(2048))
    put(tier, K(1), payload)
    lease = tier.acquire(K(1))
    view = lease.artifact.data
    for i in range(2, 20):
        put(tier, K(i), b"z" * 2048)                                   # heavy pressure
    assert bytes(view.numpy()) == payload                              # still intact
    lease.release()
    put(tier, K(50), b"y" * 2048)
    put(tier, K(51), b"y" * 2048)
    assert tier.contains([K(1).encode()]) == [False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_arena_is_page_locked_as_it_grows_with_cuda():
    tier = CpuTier(1 << 30, pin_memory="auto")
    x = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8)
    assert put(tier, K(1), x)
    s = tier.stats()["detail"]
    assert s["pin_memory"] and s["pin_failures"] == 0 and 0 < s["pinned_bytes"] < 1 << 30
    view = tier.get(K(1)).data
    assert view.is_pinned()
    on_gpu = view.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), x)
    tier.close()


def test_pin_memory_true_without_cuda_warns_clearly():
    if torch.cuda.is_available():   # nothing to warn about; the gpu test covers pinning
        return
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tier = CpuTier(1 << 20, pin_memory=True)
    assert any("not page-locked" in str(x.message) and issubclass(x.category, RuntimeWarning) for x in w)
    detail = tier.stats()["detail"]
    assert detail["pin_failures"] == 1 and detail["pin_memory"] is False


def test_bad_out_is_a_clear_error():
    tier = CpuTier(1 << 16, pin_memory=False)
    put(tier, K(1), b"q" * 100)
    with pytest.raises(InvalidArgument, match="out has 10 bytes but the stored object has 100"):
        tier.get(K(1), out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match="out must be a contiguous 1-D torch.uint8 CPU tensor"):
        tier.get(K(1), out=torch.empty(200, dtype=torch.float32))


def test_thread_concurrency_stress():
    """8 threads put/get/delete/acquire overlapping keys; every read is byte-exact for its key."""
    tier = CpuTier(256 << 10, pin_memory=False, eviction="s3fifo", lease_s=5)
    errors = []

    def body(key_id):
        n = 512 + (key_id * 977) % 8000
        return torch.full((n,), key_id % 251, dtype=torch.uint8)

    def worker(seed):
        rng = random.Random(seed)
        out = torch.empty(16 << 10, dtype=torch.uint8)
        try:
            for _ in range(1500):
                i = rng.randrange(120)
                op = rng.random()
                if op < 0.4:
                    b = body(i)
                    tier.put(K(i), b, ArtifactMeta(size=b.numel(), checksum=0))
                elif op < 0.7:
                    art = tier.get(K(i), out=out)
                    if art is not None and not torch.equal(art.data, body(i)):
                        errors.append(f"bad bytes for {i}")
                elif op < 0.8:
                    tier.delete(K(i))
                else:
                    lease = tier.acquire(K(i))
                    if lease is not None:
                        with lease as art:
                            if not torch.equal(art.data, body(i)):
                                errors.append(f"bad leased bytes for {i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    run_in_threads(worker, 8)
    assert not errors, errors[:5]
    s = tier.stats()
    assert 0 <= s["used_bytes"] <= tier.capacity_bytes
    assert s["used_bytes"] == sum(tier.get(k).meta.size for k in list(tier.keys()))
    runs = tier._alloc.runs()
    assert len(runs) == s["items"]                 # no leaked arena runs


def test_copy_bytes_is_exact_and_bounds_checked():
    from stratacache._C import copy_bytes

    rng = random.Random(5)
    src = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8)
    for i in range(40):   # regular and streaming stores (the tier's put), at random alignments
        n = rng.choice([0, 1, 4095, 4096 + 77, 1 << 20, (1 << 20) + 3])
        so, do = rng.randrange(0, src.numel() - n + 1), rng.randrange(0, 64)
        dst = torch.full((n + 128,), 0xA5, dtype=torch.uint8)
        copy_bytes(dst, do, src, so, n, stream=bool(i % 2))
        assert torch.equal(dst[do:do + n], src[so:so + n])
        assert (dst[:do] == 0xA5).all() and (dst[do + n:] == 0xA5).all()
    dst = torch.zeros(100, dtype=torch.uint8)
    for args in [(dst, 1, src, 0, 100), (dst, 0, src, src.numel() - 10, 11), (dst, -1, src, 0, 1),
                 (dst, 0, src, 0, -1)]:
        with pytest.raises(ValueError, match="do not fit"):
            copy_bytes(*args)
    assert (dst == 0).all()
    with pytest.raises(ValueError, match="contiguous"):
        copy_bytes(torch.zeros(10, 2, dtype=torch.uint8).t(), 0, src, 0, 4)
