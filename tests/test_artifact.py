"""ArtifactMeta header: byte-exact pack/unpack for every dtype, corrupt headers rejected; payload views."""

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
    raw = meta.pack() + b"payload-follows"
    back, n = ArtifactMeta.unpack(raw)
    assert back == meta and n == ArtifactMeta.header_size(len(shape))
    assert raw[n:] == b"payload-follows"


def test_corrupt_headers_are_rejected():
    good = ArtifactMeta(size=24, checksum=7, dtype=torch.float32, shape=(2, 3)).pack()
    with pytest.raises(CorruptArtifact, match="truncated"):
        ArtifactMeta.unpack(good[:10])
    with pytest.raises(CorruptArtifact, match="truncated"):
        ArtifactMeta.unpack(good[:-1])
    with pytest.raises(CorruptArtifact, match="magic"):
        ArtifactMeta.unpack(b"XXXX" + good[4:])
    with pytest.raises(CorruptArtifact, match="version"):
        ArtifactMeta.unpack(good[:4] + struct.pack("<H", 99) + good[6:])
    with pytest.raises(CorruptArtifact, match="dtype"):
        ArtifactMeta.unpack(good[:6] + bytes([200]) + good[7:])
    bad_size = ArtifactMeta(size=25, checksum=7, dtype=torch.float32, shape=(2, 3)).pack()
    with pytest.raises(CorruptArtifact, match="shape does not match size"):
        ArtifactMeta.unpack(bad_size)


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
