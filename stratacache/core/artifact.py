"""Artifact metadata, payload views and the binary header every tier stores.

A payload is a flat run of bytes. In memory it is a 1-D ``torch.uint8`` tensor,
which may be a view straight into tier memory (CPU arena, shared region), so a
read need not copy. ``ArtifactMeta`` remembers the logical dtype and shape so
``Artifact.tensor()`` can give the caller back what it stored.

Persistent tiers (disk, Redis, the shared region's records) store
``ArtifactMeta.pack()`` in front of the payload: a small fixed, versioned binary
header. No pickle is ever used for stored data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

FORMAT_VERSION = 1
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
MAX_NDIM = 16


class CorruptArtifact(ValueError):
    """A stored header or payload failed validation; callers treat it as a miss."""


@dataclass(frozen=True, slots=True)
class ArtifactMeta:
    size: int                       # payload bytes
    checksum: int                   # stratacache.ops.checksum64 of the payload bytes
    dtype: torch.dtype = torch.uint8
    shape: tuple[int, ...] = field(default=())   # () is a 0-dim tensor's (or, with more
                                                 # than one element's bytes, a flat payload)
    format_version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        """Fixed little-endian header: magic, version, dtype, ndim, size, checksum, shape."""
        if len(self.shape) > MAX_NDIM:
            raise ValueError(f"shape has {len(self.shape)} dims; at most {MAX_NDIM} are stored")
        code = _DTYPE_CODES.get(self.dtype)
        if code is None:
            raise ValueError(f"dtype {self.dtype} cannot be stored")
        head = _FIXED.pack(HEADER_MAGIC, self.format_version, code, len(self.shape),
                           self.size, self.checksum & 0xFFFFFFFFFFFFFFFF)
        return head + struct.pack(f"<{len(self.shape)}Q", *self.shape)

    @staticmethod
    def header_size(ndim: int) -> int:
        return _FIXED.size + 8 * ndim

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> tuple["ArtifactMeta", int]:
        """Parse a header; returns (meta, header length). Raises CorruptArtifact."""
        raw = memoryview(raw)
        if len(raw) < _FIXED.size:
            raise CorruptArtifact("header truncated")
        magic, version, code, ndim, size, checksum = _FIXED.unpack_from(raw, 0)
        if magic != HEADER_MAGIC:
            raise CorruptArtifact(f"bad magic {bytes(magic)!r}")
        if version != FORMAT_VERSION:
            raise CorruptArtifact(f"unsupported format version {version}")
        if code not in _CODE_DTYPES or ndim > MAX_NDIM:
            raise CorruptArtifact("bad dtype code or ndim")
        end = _FIXED.size + 8 * ndim
        if len(raw) < end:
            raise CorruptArtifact("header truncated")
        shape = struct.unpack_from(f"<{ndim}Q", raw, _FIXED.size)
        meta = cls(size=size, checksum=checksum, dtype=_CODE_DTYPES[code], shape=tuple(shape),
                   format_version=version)
        if shape and _numel(shape) * _itemsize(meta.dtype) != size:
            raise CorruptArtifact("shape does not match size")
        return meta, end


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
    """Metadata describing ``payload`` (a tensor keeps its dtype and shape)."""
    if isinstance(payload, torch.Tensor):
        data = as_bytes(payload)
        return ArtifactMeta(size=data.numel(), checksum=checksum, dtype=payload.dtype,
                            shape=tuple(payload.shape))
    return ArtifactMeta(size=len(memoryview(payload).cast("B")), checksum=checksum)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
