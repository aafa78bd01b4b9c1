"""ArtifactMeta header: byte-exact pack/unpack for every dtype, corrupt headers rejected (every
single-bit flip, another key's header, the previous format); payload views."""

import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stratacache.core.artifact import (_DTYPE_CODES, Artifact, ArtifactMeta, CorruptArtifact, as_bytes,
                                       meta_for)


@settings(max_examples=80, deadline=None)
@given(dtype=st.sampled_from(sorted(_DTYPE_CODES, key=str)),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
       checksum=st.integers(0, 2**64 - 1))
def test_pack_unpack_round_trip(dtype, shape, checksum):
    t = torch.zeros(shape, dtype=dtype)
    meta = meta_for(t, checksum)
    raw = meta.pack(b"the-key") + b"payload-follows"
    back, n = ArtifactMeta.unpack(raw, b"the-key")
    assert back == meta and n == ArtifactMeta.header_size(len(shape))
    assert raw[n:] == b"payload-follows"


def test_corrupt_headers_are_rejected():
    key = b"kv\x00model\x00chunk-1"
    good = ArtifactMeta(size=24, checksum=7, dtype=torch.float32, shape=(2, 3)).pack(key)
    with pytest.raises(CorruptArtifact, match="truncated"):
        ArtifactMeta.unpack(good[:10], key)
    with pytest.raises(CorruptArtifact, match="truncated"):
        ArtifactMeta.unpack(good[:-1], key)
    with pytest.raises(CorruptArtifact, match="magic"):
        ArtifactMeta.unpack(b"XXXX" + good[4:], key)
    with pytest.raises(CorruptArtifact, match="version"):
        ArtifactMeta.unpack(good[:4] + struct.pack("<H", 99) + good[6:], key)
    with pytest.raises(CorruptArtifact, match="checksum"):
        ArtifactMeta.unpack(good[:6] + bytes([200]) + good[7:], key)
    bad_size = ArtifactMeta(size=25, checksum=7, dtype=torch.float32, shape=(2, 3)).pack(key)
    with pytest.raises(CorruptArtifact, match="shape does not match size"):
        ArtifactMeta.unpack(bad_size, key)


@pytest.mark.parametrize("dtype", sorted(_DTYPE_CODES, key=str))
def test_every_single_bit_flip_of_a_header_is_rejected(dtype):
    """The header checksum covers dtype, ndim, shape, size, the payload checksum and the
    key: no flipped bit may give back a header that parses as something else (a dtype
    flip would otherwise turn float32 data into int32 with the payload checksum passing)."""
    rng = random.Random(str(dtype))
    shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(0, 4)))
    size = torch.zeros(shape, dtype=dtype).numel() * torch.zeros((), dtype=dtype).element_size()
    key = bytes(rng.randrange(256) for _ in range(rng.randint(1, 80)))
    good = ArtifactMeta(size=size, checksum=rng.getrandbits(64), dtype=dtype, shape=shape).pack(key)
    assert ArtifactMeta.unpack(good, key)[0].dtype == dtype
    for bit in range(len(good) * 8):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptArtifact):
            ArtifactMeta.unpack(bytes(bad), key)
    for bit in range(len(key) * 8):   # the same header read under another key
        other = bytearray(key)
        other[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptArtifact, match="checksum"):
            ArtifactMeta.unpack(good, bytes(other))


def test_a_header_of_the_previous_format_is_rejected():
    """Records written before the header checksum (format 1) read as corrupt (a miss)."""
    old = struct.pack("<4sHBBQQ", b"SCA1", 1, 7, 1, 16, 99) + struct.pack("<Q", 4)
    with pytest.raises(CorruptArtifact, match="version 1"):
        ArtifactMeta.unpack(old + b"\0" * 16, b"k")


def test_as_bytes_views_without_copy_and_tensor_restores():
    x = torch.randn(3, 4)
    b = as_bytes(x)
    assert b.dtype == torch.uint8 and b.numel() == 48 and b.data_ptr() == x.data_ptr()
    art = Artifact(meta_for(x, 0), b)
    assert torch.equal(art.tensor(), x) and art.tensor().data_ptr() == x.data_ptr()
    assert bytes(as_bytes(bytearray(b"abc")).numpy()) == b"abc"
    assert as_bytes(b"").numel() == 0
    with pytest.raises(ValueError, match="contiguous"):
        as_bytes(x.t())
    with pytest.raises(TypeError, match="bytes-like"):
        as_bytes([1, 2, 3])
