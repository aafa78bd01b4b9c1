"""Native KV transfer ops and the StrataCache checksum.

Thin, documented wrappers over ``torch.ops.stratacache.*`` (CPU kernels in
``csrc/*.cpp``, CUDA kernels in ``csrc/cuda/*.cu``), their fake kernels for
``torch.compile`` / ``opcheck``, and pure-torch reference implementations the
tests compare the kernels against.

Block transfers move whole pages (one block of one layer) as opaque bytes, so
they work for every dtype and for vLLM's packed CPU pages. Their flat side is
``uint8 [n_blocks, n_layers, page_bytes]``: a chunk of consecutive blocks is
one contiguous byte range, stored by a tier as one object, with its checksum
computed while copying.

checksum64 (identical on CPU and CUDA; see ``csrc/checksum.h``)::

    w_i = little-endian 64-bit word i of the bytes (last word zero-padded)
    S   = sum_i mix64(w_i ^ ((i + 1) * 0x9E3779B97F4A7C15))  mod 2^64
    h   = mix64(S ^ mix64(n_bytes + 0xD6E8FEB86659FD93))

with ``mix64`` the SplitMix64 / Stafford Mix13 finalizer. Per-word terms make
it split-invariant (pieces are summed in any order) and every single-bit flip
or swap of two different words changes it.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch

from stratacache import _C  # noqa: F401  (loads the torch.ops.stratacache library)

__all__ = [
    "MASK64", "checksum64", "chunk_checksums", "gather_blocks", "scatter_blocks", "ref_checksum64",
    "ref_gather_blocks", "ref_scatter_blocks",
]

MASK64 = (1 << 64) - 1
_ops = torch.ops.stratacache

BytesLike = Union[torch.Tensor, bytes, bytearray, memoryview]


def _as_tensor(data: BytesLike, name: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        if view.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():  # read-only buffers: the ops never write to them
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=torch.uint8)
    raise TypeError(f"{name} must be a torch.Tensor or a bytes-like object, got {type(data).__name__}")


# --------------------------------------------------------------------------- checksums

def checksum64(data: BytesLike) -> int:
    """checksum64 of the bytes of a contiguous tensor (CPU or CUDA) or a bytes-like object.

    Returns an unsigned int in [0, 2**64). Runs at about memory bandwidth on all
    CPU threads; on CUDA it synchronizes to return the value.
    """
    t = _as_tensor(data, "data")
    return int(_ops.checksum64(t).item()) & MASK64


def chunk_checksums(data: BytesLike, chunk_bytes: int) -> torch.Tensor:
    """int64 ``[ceil(nbytes / chunk_bytes)]``: checksum64 of each consecutive ``chunk_bytes`` slice.

    Values are the signed int64 bit patterns; ``int(v) & MASK64`` gives ``checksum64``.
    """
    return _ops.chunk_checksums(_as_tensor(data, "data"), int(chunk_bytes))


@torch.library.register_fake("stratacache::checksum64")
def _checksum64_fake(data):
    return data.new_empty((), dtype=torch.int64)


@torch.library.register_fake("stratacache::chunk_checksums")
def _chunk_checksums_fake(data, chunk_bytes):
    torch._check(chunk_bytes > 0, lambda: f"chunk_bytes must be positive, got {chunk_bytes}")
    n = data.numel() * data.element_size()
    return data.new_empty(((n + chunk_bytes - 1) // chunk_bytes,), dtype=torch.int64)


# --------------------------------------------------------------------------- block transfers

def gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor,
                  chunk_blocks: int = 0, transfer: str = "auto") -> torch.Tensor:
    """Copy the pages of ``block_ids`` from every layer into ``out`` in one call.

    layers: L tensors ``[num_blocks, ...]`` (views of one buffer are fine), each
    block's page contiguous and of the same byte size P. block_ids: int64 ``[n]``.
    out: contiguous uint8 with at least ``n * L * P`` bytes, filled as
    ``[n, L, P]``; or, without checksums, a ``[n, L, P]`` uint8 view whose
    block rows lie further apart, such as ``payload[:, l0:l1]`` of a chunk
    with more layers (layer-wise transfers). Returns int64 checksums, one per
    chunk of ``chunk_blocks`` blocks, computed while copying (empty when
    ``chunk_blocks`` is 0).

    On CUDA the call is asynchronous on the current stream and returns device
    checksums; ``out`` may be device memory or host memory, read through UVA
    when page-locked (``transfer="uva"``) or through a device staging buffer
    and one DMA (``transfer="staging"``); ``"auto"`` picks UVA when it can.
    """
    return _ops.gather_blocks(list(layers), block_ids, out, int(chunk_blocks), transfer)


def scatter_blocks(src: torch.Tensor, block_ids: torch.Tensor, layers: Sequence[torch.Tensor],
                   chunk_blocks: int = 0, expected: Optional[torch.Tensor] = None,
                   transfer: str = "auto") -> torch.Tensor:
    """Copy ``src`` (``[n, L, P]`` bytes) back into the pages of ``block_ids`` of every layer.

    ``src`` is contiguous or, without checksums, a layer slice as for
    :func:`gather_blocks`: ``scatter_blocks(payload[:, l:l + 1], ids, [layer_l])``
    loads one layer of a stored chunk.

    With ``chunk_blocks`` and ``expected`` (int64 checksums from ``gather_blocks``
    or ``chunk_checksums``) the source is verified while copying and a bool
    tensor ``[n_chunks]`` says which chunks matched. The pages of a failed chunk
    may already hold its bytes: report those blocks as load errors.
    Returns an empty bool tensor without ``expected``. ``transfer`` as in
    :func:`gather_blocks`.
    """
    return _ops.scatter_blocks(src, block_ids, list(layers), int(chunk_blocks), expected, transfer)


def _n_chunks(n: int, chunk_blocks: int) -> int:
    return (n + chunk_blocks - 1) // chunk_blocks if chunk_blocks > 0 else 0


def _no_meta_with_memory(op: str, **tensors: torch.Tensor) -> None:
    """A call mixing meta tensors with real ones lands in the fake kernel (Meta wins the
    dispatch) and would silently move nothing: refuse it, naming the meta arguments."""
    meta = [name for name, t in tensors.items() if t.device.type == "meta"]
    if meta and len(meta) < len(tensors):
        real = [name for name in tensors if name not in meta]
        raise ValueError(f"stratacache.ops.{op}: {', '.join(meta)} on the meta device but "
                         f"{', '.join(real)} in real memory; a meta tensor holds no bytes to copy")


@torch.library.register_fake("stratacache::gather_blocks")
def _gather_blocks_fake(layers, block_ids, out, chunk_blocks=0, transfer="auto"):
    _no_meta_with_memory("gather_blocks", layers=layers[0], block_ids=block_ids, out=out)
    return layers[0].new_empty((_n_chunks(block_ids.shape[0], chunk_blocks),), dtype=torch.int64)


@torch.library.register_fake("stratacache::scatter_blocks")
def _scatter_blocks_fake(src, block_ids, layers, chunk_blocks=0, expected=None, transfer="auto"):
    _no_meta_with_memory("scatter_blocks", src=src, block_ids=block_ids, layers=layers[0],
                         **({"expected": expected} if expected is not None else {}))
    n = _n_chunks(block_ids.shape[0], chunk_blocks) if expected is not None else 0
    return layers[0].new_empty((n,), dtype=torch.bool)


# --------------------------------------------------------------------------- pure-torch references

_K_POSITION = 0x9E3779B97F4A7C15
_K_LENGTH = 0xD6E8FEB86659FD93


def _i64(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 30)
    x = x * _i64(0xBF58476D1CE4E5B9)
    x = x ^ _shr(x, 27)
    x = x * _i64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def ref_checksum64(data: BytesLike) -> int:
    """checksum64 computed with plain torch int64 arithmetic (slow; for tests)."""
    raw = _as_tensor(data, "data").contiguous().reshape(-1).view(torch.uint8).cpu()
    n = raw.numel()
    words = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8)
    words[:n] = raw
    w = words.view(torch.int64)
    pos = torch.arange(1, w.numel() + 1, dtype=torch.int64) * _i64(_K_POSITION)
    s = int(_mix64(w ^ pos).sum()) if w.numel() else 0
    length = _mix64(torch.tensor([_i64(n + _K_LENGTH)], dtype=torch.int64))
    return int(_mix64(torch.tensor([_i64(s)], dtype=torch.int64) ^ length)) & MASK64


def _pages(layer: torch.Tensor) -> torch.Tensor:
    """[num_blocks, page_bytes] uint8 view of a layer whose pages are contiguous."""
    n = layer.shape[0]
    return layer.reshape(n, -1).view(torch.uint8) if layer.numel() else layer.new_empty((n, 0), dtype=torch.uint8)


def ref_gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                      chunk_blocks: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Reference gather: ``([n, L, P] uint8, per-chunk checksum64 values)``."""
    out = torch.stack([_pages(t)[block_ids.to(t.device)] for t in layers], dim=1).contiguous()
    sums = []
    if chunk_blocks:
        for c in range(0, out.shape[0], chunk_blocks):
            sums.append(ref_checksum64(out[c:c + chunk_blocks]))
    return out, sums


def ref_scatter_blocks(src: torch.Tensor, block_ids: torch.Tensor, layers: Sequence[torch.Tensor]) -> None:
    """Reference scatter of ``[n, L, P]`` bytes into the pages of every layer."""
    P = _pages(layers[0]).shape[1]
    flat = src.reshape(-1)[: block_ids.numel() * len(layers) * P].view(block_ids.numel(), len(layers), P)
    for l, t in enumerate(layers):
        pages = _pages(t)
        pages[block_ids.to(t.device)] = flat[:, l].to(t.device)
