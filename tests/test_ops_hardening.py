"""Edge cases of the ops: chunk sizes up to INT64_MAX, meta tensors mixed with real memory,
and the CUDA kernels' segmented checksum summation emulated on the CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from stratacache import ops

from .test_ops import stable_seed

ROOT = Path(__file__).resolve().parents[1]
INT64_MAX = (1 << 63) - 1


@pytest.mark.parametrize("chunk", [INT64_MAX, INT64_MAX - 6, 1 << 62])
@pytest.mark.parametrize("n", [1, 100, 5000])
def test_chunk_checksums_with_a_huge_chunk_is_one_whole_checksum(chunk, n):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(stable_seed(chunk, n)))
    got = ops.chunk_checksums(data, chunk)
    assert got.shape == (1,)
    assert int(got[0]) & ops.MASK64 == ops.checksum64(data)
    assert ops.chunk_checksums(data[:0], chunk).shape == (0,)


def test_block_checksums_with_a_huge_chunk_blocks_cover_the_whole_transfer():
    layers = [torch.randint(0, 256, (8, 64), dtype=torch.uint8) for _ in range(2)]
    ids = torch.tensor([3, 1, 6], dtype=torch.int64)
    out = torch.empty(3 * 2 * 64, dtype=torch.uint8)
    sums = ops.gather_blocks(layers, ids, out, chunk_blocks=INT64_MAX)
    assert sums.shape == (1,) and int(sums[0]) & ops.MASK64 == ops.checksum64(out)
    fresh = [torch.zeros_like(t) for t in layers]
    ok = ops.scatter_blocks(out, ids, fresh, chunk_blocks=INT64_MAX, expected=sums)
    assert ok.tolist() == [True]
    assert all(torch.equal(f[ids], t[ids]) for f, t in zip(fresh, layers))


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


@pytest.mark.parametrize("which", ["out", "block_ids"])
def test_gather_blocks_refuses_meta_arguments_next_to_real_memory(which):
    layers = [torch.zeros(4, 64, dtype=torch.uint8)]
    args = {"block_ids": torch.tensor([0, 1]), "out": torch.empty(128, dtype=torch.uint8)}
    args[which] = _meta(args[which])
    with pytest.raises(ValueError, match=rf"gather_blocks: {which} on the meta device"):
        ops.gather_blocks(layers, args["block_ids"], args["out"], chunk_blocks=2)


@pytest.mark.parametrize("which", ["src", "block_ids", "expected"])
def test_scatter_blocks_refuses_meta_arguments_next_to_real_memory(which):
    layers = [torch.zeros(4, 64, dtype=torch.uint8)]
    src = torch.randint(0, 256, (128,), dtype=torch.uint8)
    args = {"src": src, "block_ids": torch.tensor([0, 1]),
            "expected": ops.chunk_checksums(src, 128)}
    args[which] = _meta(args[which])
    with pytest.raises(ValueError, match=rf"scatter_blocks: {which} on the meta device"):
        ops.scatter_blocks(args["src"], args["block_ids"], layers, chunk_blocks=2,
                           expected=args["expected"])
    assert bool((layers[0] == 0).all())


def test_all_meta_calls_still_give_shapes():
    layers = [torch.zeros(4, 64, dtype=torch.uint8, device="meta")]
    ids = torch.tensor([0, 1, 2], device="meta")
    sums = ops.gather_blocks(layers, ids, torch.empty(192, dtype=torch.uint8, device="meta"),
                             chunk_blocks=2)
    assert sums.shape == (2,) and sums.device.type == "meta"


# --------------------------------------------------------------------------- segmented CUDA sums

def _cuda_segment_bytes() -> int:
    """kSegmentBytes of the CUDA kernel, read from its source so the emulation follows it."""
    src = (ROOT / "csrc" / "cuda" / "kv_transfer_cuda.cu").read_text()
    m = re.search(r"constexpr int64_t kSegmentBytes = int64_t\{1\} << (\d+);", src)
    assert m, "kSegmentBytes not found in kv_transfer_cuda.cu"
    return 1 << int(m.group(1))


def _word_terms(words: torch.Tensor, first_word: int) -> int:
    """Sum (mod 2^64) of checksum64's word terms of `words` (int64), word 0 at `first_word`."""
    pos = (torch.arange(first_word + 1, first_word + 1 + words.numel(), dtype=torch.int64)
           * ops._i64(ops._K_POSITION))
    return int(ops._mix64(words ^ pos).sum()) & ops.MASK64


def _finalize(total: int, nbytes: int) -> int:
    length = ops._mix64(torch.tensor([ops._i64(nbytes + ops._K_LENGTH)], dtype=torch.int64))
    return int(ops._mix64(torch.tensor([ops._i64(total)], dtype=torch.int64) ^ length)) \
        & ops.MASK64


def _emulate_segmented_kernel(flat: torch.Tensor, n: int, L: int, P: int, chunk_blocks: int,
                              seg: int) -> list[int]:
    """What block_copy_kernel computes: one warp item per (block, layer, segment), each adding
    its segment's word-term sum (first word from the segment's offset in its chunk) to its
    chunk's accumulator, then finalize per chunk."""
    segs = max(1, -(-P // seg))
    n_chunks = -(-n // chunk_blocks)
    acc = [0] * n_chunks
    words = flat.view(torch.int64)
    items = list(range(n * L * segs))
    torch.manual_seed(0)
    for item in torch.randperm(len(items)).tolist():     # warps finish in any order
        page, off = item // segs, (item % segs) * seg
        length = min(seg, P - off)
        i = page // L
        byte = page * P + off
        first_word = (byte - (i // chunk_blocks) * chunk_blocks * L * P) // 8
        acc[i // chunk_blocks] = (acc[i // chunk_blocks]
                                  + _word_terms(words[byte // 8:(byte + length) // 8], first_word)) \
            & ops.MASK64
    sizes = [min(chunk_blocks, n - c * chunk_blocks) * L * P for c in range(n_chunks)]
    return [_finalize(a, s) for a, s in zip(acc, sizes)]


@pytest.mark.parametrize("P", [64 * 1024 + 16, 3 * 32 * 1024, 4096])
def test_segmented_summation_of_the_cuda_kernel_equals_checksum64(P):
    seg = _cuda_segment_bytes()
    assert seg % 16 == 0 and 16 * 1024 <= seg <= 32 * 1024   # the 16-32 KiB per warp of the design
    n, L, chunk_blocks = 5, 3, 2
    gen = torch.Generator().manual_seed(stable_seed("seg", P))
    flat = torch.randint(0, 256, (n * L * P,), dtype=torch.uint8, generator=gen)
    got = _emulate_segmented_kernel(flat, n, L, P, chunk_blocks, seg)
    row = L * P
    want = [ops.checksum64(flat[c * chunk_blocks * row:(c + 1) * chunk_blocks * row])
            for c in range(len(got))]
    assert got == want
    # and what the CPU gather computes for the same pages
    layers = [flat.view(n, L, P)[:, l].clone() for l in range(L)]
    sums = ops.gather_blocks(layers, torch.arange(n), torch.empty_like(flat), chunk_blocks=chunk_blocks)
    assert [int(s) & ops.MASK64 for s in sums] == want
