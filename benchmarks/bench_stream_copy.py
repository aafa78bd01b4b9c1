"""Streaming (non-temporal) stores against regular ones, for what a tier put does.

Copies 256 MiB as N objects into one arena, as the CPU tier's put does, with
``torch.Tensor.copy_`` (separate destinations), ``_C.copy_bytes`` with regular
stores and ``_C.copy_bytes(stream=True)``, on all threads and on one, in
interleaved rounds (median of 15). Prints each variant's time per object and its
ratio to ``copy_`` on all threads. Usage: ``bench_stream_copy.py [OBJECT_BYTES]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_store import paired  # noqa: E402  (interleaved rounds, alternating order)
from stratacache._C import copy_bytes  # noqa: E402


def main(size: int = 1 << 20, rounds: int = 15) -> None:
    count = (256 << 20) // size
    srcs = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(count)]
    arena = torch.empty(count * size, dtype=torch.uint8).fill_(1)
    dsts = [torch.empty(size, dtype=torch.uint8).fill_(1) for _ in range(count)]

    def copy_all():
        for d, s in zip(dsts, srcs):
            d.copy_(s)

    def into_arena(stream: bool):
        def run():
            for i, s in enumerate(srcs):
                copy_bytes(arena, i * size, s, 0, size, stream)
        return run

    fns = {"copy_": copy_all, "copy_bytes": into_arena(False), "copy_bytes stream": into_arena(True)}
    all_threads = torch.get_num_threads()
    per_object = {}
    for threads in (all_threads, 1):
        torch.set_num_threads(threads)
        gbps = paired(count * size, fns, rounds)
        for name in fns:
            per_object[(name, threads)] = size / (gbps[name] * 1e9)
    torch.set_num_threads(all_threads)
    base = per_object[("copy_", all_threads)]
    print(f"{count} objects of {size} bytes")
    for (name, threads), sec in per_object.items():
        print(f"{name:18s} threads={threads}  {sec * 1e6:8.1f} us/object  vs copy_ on {all_threads}: {base / sec:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20)
