"""Artifact metadata, payload views and the binary header every tier stores.

A payload is a flat run of bytes. In memory it is a 1-D ``torch.uint8`` tensor,
which may be a view straight into tier memory (CPU arena, shared region), so a
read need not copy. ``ArtifactMeta`` remembers the logical dtype and shape so
``Artifact.tensor()`` can give the caller back what it stored.

Persistent tiers (disk, Redis, the shared region's records) store
``ArtifactMeta.pack(key)`` with the payload: a small fixed, versioned binary
header that ends with a checksum over every header field (dtype, shape, size,
the payload checksum) and the encoded key the object is stored under, so a
flipped bit in anything a reader trusts is a miss, never a wrongly typed
tensor or another key's object. No pickle is ever used for stored data.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch

from stratacache.core.errors import CorruptArtifact  # noqa: F401 - re-exported: raised by unpack

FORMAT_VERSION = 2   # 2: the header checksum (records of version 1 read as misses)
HEADER_MAGIC = b"SCA1"

# Stable on-disk codes for dtypes; never renumber, only append.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4,
    torch.float16: 5, torch.bfloat16: 6, torch.float32: 7, torch.float64: 8, torch.bool: 9,
    torch.float8_e4m3fn: 10, torch.float8_e5m2: 11,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}

# magic, format version, dtype code, ndim, payload size, checksum
_FIXED = struct.Struct("<4sHBBQQ")
_HEADER_SUM = struct.Struct("<Q")   # follows the shape: _header_sum(fields + shape, key)
MAX_NDIM = 16


class ArtifactMeta(NamedTuple):
    """What a stored object is: its size, checksum, logical dtype and shape.

    Immutable, and a ``NamedTuple`` rather than a frozen dataclass because one is built
    on every put and every header read, and a frozen dataclass's ``__init__`` measured
    2.0 us on the dev box (``timeit``) against 0.65 us for this."""

    size: int                       # payload bytes
    checksum: int                   # stratacache.ops.checksum64 of the payload bytes
    dtype: torch.dtype = torch.uint8
    shape: tuple[int, ...] = ()     # () is a 0-dim tensor's (or, with more than one
                                    # element's bytes, a flat payload)
    format_version: int = FORMAT_VERSION

    def pack(self, key: bytes) -> bytes:
        """Fixed little-endian header: magic, version, dtype, ndim, size, checksum, shape,
        then a checksum of all of those and of ``key`` (the encoded key it is stored under)."""
        if len(self.shape) > MAX_NDIM:
            raise ValueError(f"shape has {len(self.shape)} dims; at most {MAX_NDIM} are stored")
        code = _DTYPE_CODES.get(self.dtype)
        if code is None:
            raise ValueError(f"dtype {self.dtype} cannot be stored")
        head = _FIXED.pack(HEADER_MAGIC, self.format_version, code, len(self.shape),
                           self.size, self.checksum & 0xFFFFFFFFFFFFFFFF) \
            + struct.pack(f"<{len(self.shape)}Q", *self.shape)
        return head + _HEADER_SUM.pack(_header_sum(head, key))

    @staticmethod
    def header_size(ndim: int) -> int:
        return _FIXED.size + 8 * ndim + _HEADER_SUM.size

    @staticmethod
    def header_length(raw: bytes | memoryview) -> int:
        """Length of the header at the start of ``raw`` (from its ndim); CorruptArtifact
        when even that cannot be read. The header itself is checked by ``unpack``."""
        if len(raw) < _FIXED.size:
            raise CorruptArtifact("header truncated")
        ndim = raw[7]
        if ndim > MAX_NDIM:
            raise CorruptArtifact(f"ndim {ndim} exceeds {MAX_NDIM}")
        return ArtifactMeta.header_size(ndim)

    @classmethod
    def unpack(cls, raw: bytes | memoryview, key: bytes) -> tuple["ArtifactMeta", int]:
        """Parse and check a header stored under ``key``; returns (meta, header length).
        Raises CorruptArtifact for any damage, including a header of another key."""
        raw = memoryview(raw)
        end = cls.header_length(raw)
        magic, version, code, ndim, size, checksum = _FIXED.unpack_from(raw, 0)
        if magic != HEADER_MAGIC:
            raise CorruptArtifact(f"bad magic {bytes(magic)!r}")
        if version != FORMAT_VERSION:
            raise CorruptArtifact(f"unsupported format version {version}")
        if len(raw) < end:
            raise CorruptArtifact("header truncated")
        body = end - _HEADER_SUM.size
        if _HEADER_SUM.unpack_from(raw, body)[0] != _header_sum(raw[:body], key):
            raise CorruptArtifact("header checksum mismatch (damaged header, or another key's)")
        if code not in _CODE_DTYPES:
            raise CorruptArtifact(f"bad dtype code {code}")
        shape = struct.unpack_from(f"<{ndim}Q", raw, _FIXED.size)
        meta = cls(size, checksum, _CODE_DTYPES[code], shape, version)
        if shape and _numel(shape) * meta.dtype.itemsize != size:
            raise CorruptArtifact("shape does not match size")
        return meta, end


def _header_sum(fields, key: bytes) -> int:
    """64-bit BLAKE2b of the header fields and the key (a header check, not a MAC)."""
    h = hashlib.blake2b(fields, digest_size=8)
    h.update(key)
    return int.from_bytes(h.digest(), "little")


@dataclass(slots=True)
class Artifact:
    """A loaded object: its metadata and a flat uint8 view of its bytes."""

    meta: ArtifactMeta
    data: torch.Tensor  # 1-D uint8, possibly a view into tier memory

    def tensor(self) -> torch.Tensor:
        """The payload reinterpreted with its stored dtype and shape (no copy)."""
        shape = self.meta.shape
        if not shape and self.meta.size != self.meta.dtype.itemsize:
            shape = (-1,)   # a flat payload stored without a shape
        if self.meta.dtype == torch.uint8 and shape == (-1,):
            return self.data
        return self.data.view(self.meta.dtype).view(shape)


def as_bytes(payload) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor or a bytes-like object (no copy)."""
    if isinstance(payload, torch.Tensor):
        if not payload.is_contiguous():
            raise ValueError("payload tensor must be contiguous")
        if payload.device.type != "cpu":
            raise ValueError(f"payload tensor must be on the CPU, got {payload.device}")
        return payload.reshape(-1).view(torch.uint8)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        mv = memoryview(payload).cast("B")
        if len(mv) == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(mv, dtype=torch.uint8)
    raise TypeError(f"payload must be a torch.Tensor or bytes-like, got {type(payload).__name__}")


def meta_for(payload, checksum: int) -> ArtifactMeta:
    """Metadata describing ``payload``: a tensor keeps its dtype and shape (0-dim
    included); bytes-like come back as the 1-D uint8 tensor they are."""
    if isinstance(payload, torch.Tensor):
        if payload.dtype is torch.uint8 and payload.dim() == 1:   # what the connector stores
            n = payload.numel()
            return ArtifactMeta(n, checksum, torch.uint8, (n,))
        return ArtifactMeta(payload.numel() * payload.element_size(), checksum,
                            payload.dtype, tuple(payload.shape))
    size = memoryview(payload).nbytes
    return ArtifactMeta(size, checksum, torch.uint8, (size,))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

