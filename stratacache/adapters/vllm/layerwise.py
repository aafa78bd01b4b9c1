"""Layer-wise loads: one step's chunks move layer by layer, overlapping the forward pass.

vLLM calls ``wait_for_layer_load(layer)`` as each attention layer starts, so
layer ``l`` only has to be in paged memory by then; the loads of layers
``l+1, ...`` can still be running. ``LayerwiseLoad`` copies layer ``l`` of
every chunk of the step (``scatter_blocks`` on the layer slice
``payload[:, l:l+1]``, no extra copy) before layer ``l+1``:

* on CUDA it issues the copies on a side stream (after the work already
  queued on the compute stream) and records one event per layer;
  ``wait_layer`` makes the compute stream wait on that event, so the host
  never blocks;
* on CPU a loader thread runs the copies and ``wait_layer`` blocks until
  that layer is done.

A layer slice carries no checksum of its own, so a whole chunk is verified
after its last layer: its pages are gathered back out of paged memory
(``gather_blocks`` computes the checksum while copying; on a GPU this is a
device-to-device pass) and compared with the stored checksum. That checks
the bytes that actually landed. Partly loaded chunks are checked on the
source before their copy, as sync loads do. A failed chunk is reported
through ``finish`` like any load error, and vLLM recomputes its blocks.

Chunk leases are held until ``finish``, when every copy is complete.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from stratacache import ops


@dataclass
class LayerwiseChunk:
    """One leased chunk of the step: which payload blocks go to which paged blocks."""

    req_id: str
    name: str
    src: torch.Tensor          # [blocks to write, L, P] view of the leased payload
    block_ids: torch.Tensor    # destinations, int64 on the host
    checksum: Optional[int]    # verify the whole chunk after its copy (None: already checked)
    fail_blocks: set[int]      # reported when this chunk is bad: its blocks and its request's later ones


class LayerwiseLoad:
    """The layer-wise loads of one step, from ``start`` to ``finish``."""

    def __init__(self, layers: list[torch.Tensor], chunks: list[LayerwiseChunk], leases: ExitStack,
                 on_bad_chunk: Callable[[LayerwiseChunk], None]) -> None:
        self.layers = layers
        self.chunks = chunks
        self._leases = leases
        self._on_bad_chunk = on_bad_chunk
        self._copied = [threading.Event() for _ in layers]   # layer l issued (CUDA) / done (CPU)
        self._cuda = layers[0].is_cuda
        self._stream = torch.cuda.Stream(layers[0].device) if self._cuda else None
        self._events = [torch.cuda.Event() for _ in layers] if self._cuda else []
        self._timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if self._cuda else None
        self._sums: list[tuple[LayerwiseChunk, torch.Tensor]] = []
        self._error: Optional[BaseException] = None
        self._seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="stratacache-layerwise", daemon=True)

    def start(self) -> None:
        if self._cuda:
            # Paged blocks may still be in use by work queued on the compute stream (e.g. the
            # zeroing of freshly allocated blocks): the side stream starts after it.
            self._stream.wait_stream(torch.cuda.current_stream(self.layers[0].device))
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    self._timing[0].record(self._stream)
                    self._copy_and_verify()
                    self._timing[1].record(self._stream)
            else:
                self._copy_and_verify()
        except BaseException as exc:   # reported by finish(); the forward must never hang on it
            self._error = exc
        finally:
            for done in self._copied:
                done.set()
            self._seconds = time.perf_counter() - t0

    def _copy_and_verify(self) -> None:
        for l, layer in enumerate(self.layers):
            for chunk in self.chunks:
                ops.scatter_blocks(chunk.src[:, l:l + 1], chunk.block_ids, [layer])
            if self._cuda:
                self._events[l].record(self._stream)
            self._copied[l].set()
        scratch = None
        for chunk in self.chunks:
            if chunk.checksum is None:
                continue
            n = chunk.src.shape[0]
            if scratch is None or scratch.shape[0] < n:
                scratch = torch.empty((n, *chunk.src.shape[1:]), dtype=torch.uint8,
                                      device=self.layers[0].device)
            sums = ops.gather_blocks(self.layers, chunk.block_ids, scratch[:n], chunk_blocks=n)
            self._sums.append((chunk, sums))

    @property
    def error(self) -> Optional[BaseException]:
        """What stopped the copies (then every chunk of the step is reported), or None."""
        return self._error

    def wait_layer(self, index: int) -> None:
        """Block until layer ``index`` can be read by the forward pass (on CUDA: order the
        compute stream after its copies, without blocking the host)."""
        self._copied[index].wait()
        if self._cuda and self._error is None:
            torch.cuda.current_stream(self.layers[0].device).wait_event(self._events[index])

    def finish(self) -> tuple[set[int], int, float]:
        """Wait for every copy; release the leases. Returns (blocks vLLM must recompute,
        chunks loaded intact, seconds the loads took)."""
        self._thread.join()
        failed: set[int] = set()
        ok = 0
        try:
            if self._cuda:
                self._stream.synchronize()
                torch.cuda.current_stream(self.layers[0].device).wait_stream(self._stream)
            if self._error is not None:
                for chunk in self.chunks:
                    failed |= chunk.fail_blocks
                return failed, 0, self._seconds
            for chunk, sums in self._sums:
                if int(sums[0]) & ops.MASK64 != chunk.checksum & ops.MASK64:
                    failed |= chunk.fail_blocks
                    self._on_bad_chunk(chunk)
            ok = sum(1 for c in self.chunks if int(c.block_ids[0]) not in failed)
            seconds = self._timing[0].elapsed_time(self._timing[1]) / 1e3 if self._cuda else self._seconds
            return failed, ok, seconds
        finally:
            self._leases.close()
