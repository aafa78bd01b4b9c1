"""The stored header (dtype, shape, size, payload checksum) and the key are covered by
a checksum on the shared, disk and Redis tiers: every single-bit flip of a stored
header is a counted miss, never a tensor of another dtype or shape. Records of the
previous format (no header checksum) are misses, never crashes.

Before the fix one flipped bit of the dtype code returned float32 data as int32
(bfloat16 as int16, uint8 as int8) with the payload checksum passing.
"""

from __future__ import annotations

import os
import struct
import uuid

import pytest
import torch

from stratacache.backends.disk import DiskTier
from stratacache.backends.redis import RedisTier
from stratacache.backends.shared import SharedRegionTier
from stratacache.core.artifact import HEADER_MAGIC, ArtifactMeta, meta_for
from stratacache.core.keys import ArtifactKey
from stratacache.ops import checksum64
from tests.redis_server import RedisServer

U64 = 0xFFFFFFFFFFFFFFFF
HEADER_BITS = ArtifactMeta.header_size(2) * 8


def tensor(seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, generator=g).to(dtype)


def store(layer, key: ArtifactKey, t: torch.Tensor) -> None:
    assert layer.put(key, t.reshape(-1).view(torch.uint8), meta_for(t, checksum64(t) & U64))


def flip(buf: bytearray, bit: int) -> bytes:
    buf = bytearray(buf)
    buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as srv:
        yield srv


def test_shared_tier_every_header_bit(tmp_path):
    path = f"/dev/shm/sc-meta-{os.getpid()}-{uuid.uuid4().hex[:8]}.region"
    layer = SharedRegionTier(path, 4 << 20, 1024)
    try:
        with open(path, "r+b") as f:
            f.seek(104)
            (data_off,) = struct.unpack("<Q", f.read(8))
            for bit in range(HEADER_BITS):
                key = ArtifactKey("kv", "meta", f"bit-{bit}")
                t = tensor(bit)
                store(layer, key, t)
                f.seek(0)
                index = f.read(data_off)
                at = index.rfind(HEADER_MAGIC, 0, index.find(key.encode()))   # this entry's header
                assert at > 0
                f.seek(at + bit // 8)
                byte = f.read(1)[0]
                f.seek(at + bit // 8)
                f.write(bytes([byte ^ (1 << (bit % 8))]))
                f.flush()
                before = layer.stats()["corrupt"]
                for out in (None, torch.empty(t.numel() * 4, dtype=torch.uint8)):
                    got = layer.get(key, out=out)
                    assert got is None, (bit, got.meta)
                assert layer.stats()["corrupt"] > before
                assert layer.contains([key.encode()]) == [False], "a header that failed its check stays stored"
    finally:
        layer.close()
        os.unlink(path)


def _disk_file(d: str) -> str:
    [f] = [os.path.join(r, n) for r, _, ns in os.walk(d) for n in ns if n.endswith(".sca")]
    return f


def test_disk_tier_every_header_bit_across_a_restart(tmp_path):
    """A header damaged while the tier was down is dropped (and counted) when the index
    is rebuilt; one damaged while it runs no longer matches the index (a miss)."""
    d = str(tmp_path / "tier")
    key = ArtifactKey("kv", "meta", "disk")
    t = tensor(1)
    for bit in range(HEADER_BITS):
        tier = DiskTier(d, 1 << 20)
        store(tier, key, t)
        tier.close()
        f = _disk_file(d)
        raw = open(f, "rb").read()
        open(f, "wb").write(flip(raw, bit))
        again = DiskTier(d, 1 << 20)
        s = again.stats()["detail"]
        assert (s["recovered_at_start"], s["dropped_at_start"]) == (0, 1), bit
        assert again.get(key) is None
        store(again, key, t)                       # damaged while running
        f = _disk_file(d)
        raw = open(f, "rb").read()
        open(f, "wb").write(flip(raw, bit))
        assert again.get(key) is None and again.stats()["corrupt"] == 1
        again.close()


def test_redis_tier_every_header_bit(redis_server):
    layer = RedisTier(redis_server.url, key_prefix=f"meta{uuid.uuid4().hex[:6]}:")
    admin = redis_server.admin_client()
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.uint8):
            key = ArtifactKey("kv", "meta", f"redis-{dtype}")
            t = tensor(3, dtype)
            store(layer, key, t)
            rk = layer.key_prefix + key.encode()
            good = admin.get(rk)
            for bit in range(HEADER_BITS):
                admin.set(rk, flip(good, bit))
                before = layer.stats()["corrupt"]
                assert layer.get(key) is None, (dtype, bit)
                assert layer.stats()["corrupt"] == before + 1
            admin.set(rk, good)
            got = layer.get(key)
            assert got.meta.dtype == dtype and torch.equal(got.tensor(), t)
            other = ArtifactKey("kv", "meta", f"moved-{dtype}")   # a value copied to another key
            admin.set(layer.key_prefix + other.encode(), good)
            assert layer.get(other) is None
    finally:
        layer.close()


def _old_format(t: torch.Tensor) -> bytes:
    """A record header as format 1 wrote it (no header checksum), then the payload."""
    return struct.pack("<4sHBBQQ", b"SCA1", 1, 7, 2, t.numel() * 4, checksum64(t) & U64) \
        + struct.pack("<2Q", *t.shape) + t.numpy().tobytes()


def test_records_of_the_previous_format_are_misses(tmp_path, redis_server):
    t = tensor(5)
    key = ArtifactKey("kv", "meta", "old")
    layer = RedisTier(redis_server.url, key_prefix=f"old{uuid.uuid4().hex[:6]}:")
    try:
        redis_server.admin_client().set(layer.key_prefix + key.encode(), _old_format(t))
        assert layer.get(key) is None and layer.stats()["corrupt"] == 1
    finally:
        layer.close()
    d = str(tmp_path / "tier")
    tier = DiskTier(d, 1 << 20)
    store(tier, key, t)
    tier.close()
    f = _disk_file(d)
    k = key.encode()
    old = _old_format(t)
    open(f, "wb").write(old[:40] + struct.pack("<I", len(k)) + k + old[40:])
    again = DiskTier(d, 1 << 20)
    assert again.stats()["detail"]["dropped_at_start"] == 1 and again.get(key) is None
    again.close()
