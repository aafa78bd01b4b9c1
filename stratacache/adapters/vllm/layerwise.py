"""Layer-wise loads: one step's chunks move layer by layer, overlapping the forward pass.

vLLM calls ``wait_for_layer_load(layer)`` as each attention layer starts, so
layer ``l`` only has to be in paged memory by then; the loads of layers
``l+1, ...`` can still be running. ``LayerwiseLoad`` runs on its own thread:

1. it leases and verifies every chunk of the step ON ITS SOURCE (the worker's
   one load routine, ``open_chunks``): a corrupt chunk never reaches paged
   memory, which vLLM may already share with other requests;
2. it copies layer ``l`` of every verified chunk (``scatter_blocks`` on the
   slice of the payload holding that layer's planes, ``payload[:, first:end]``,
   no extra copy) before layer ``l+1``:

   * on CUDA it issues the copies on a side stream (after the work already
     queued on the compute stream) and records one event per layer;
     ``wait_layer`` makes the compute stream wait on that event, so the host
     never blocks. After a copy error the compute stream waits for the whole
     side stream instead, so the forward never reads a page while a copy
     queued before the error still runs;
   * on CPU the thread runs the copies and ``wait_layer`` blocks until that
     layer is done.

Leases are released in ``finish`` (end of the forward), after the side stream
has completed every copy. A failed chunk is reported through ``finish`` like
any load error, and vLLM recomputes its blocks.
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
class OpenChunk:
    """One leased, verified chunk: which payload blocks go to which paged blocks."""

    req_id: str
    name: str
    src: torch.Tensor          # [blocks to write, L, P] view of the leased payload
    block_ids: torch.Tensor    # destinations, int64 on the host


OpenChunks = Callable[[ExitStack], tuple[list[OpenChunk], set[int]]]


class LayerwiseLoad:
    """The layer-wise loads of one step, from ``start`` to ``finish``.

    ``open_chunks(leases)`` leases and verifies the step's chunks (leases held by
    ``leases``) and returns the good ones and the block ids of the bad ones;
    ``all_blocks`` are reported when the copies themselves fail. ``layers`` are the
    planes the ops copy; ``layer_planes[l]`` is the [first, end) range of layer l's planes."""

    def __init__(self, layers: list[torch.Tensor], layer_planes: list[tuple[int, int]],
                 open_chunks: OpenChunks, all_blocks: set[int]) -> None:
        self.layers = layers
        self._layer_planes = layer_planes
        self.chunks: list[OpenChunk] = []
        self._open_chunks = open_chunks
        self._all_blocks = all_blocks
        self._failed: set[int] = set()
        self._leases = ExitStack()
        self._copied = [threading.Event() for _ in layer_planes]   # issued (CUDA) / done (CPU)
        self._cuda = layers[0].is_cuda
        self._stream = torch.cuda.Stream(layers[0].device) if self._cuda else None
        self._events = [torch.cuda.Event() for _ in layer_planes] if self._cuda else []
        self._timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if self._cuda else None
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
            self.chunks, self._failed = self._open_chunks(self._leases)
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    self._timing[0].record(self._stream)
                    self._copy_layers()
                    self._timing[1].record(self._stream)
            else:
                self._copy_layers()
        except BaseException as exc:   # reported by finish(); the forward must never hang on it
            self._error = exc
        finally:
            for done in self._copied:
                done.set()
            self._seconds = time.perf_counter() - t0

    def _copy_layers(self) -> None:
        for l, (first, end) in enumerate(self._layer_planes):
            for chunk in self.chunks:
                ops.scatter_blocks(chunk.src[:, first:end], chunk.block_ids,
                                   self.layers[first:end])
            if self._cuda:
                self._events[l].record(self._stream)
            self._copied[l].set()

    @property
    def error(self) -> Optional[BaseException]:
        """What stopped the step (then every block of it is reported), or None."""
        return self._error

    def wait_layer(self, index: int) -> None:
        """Block until layer ``index`` can be read by the forward pass (on CUDA: order the
        compute stream after its copies, without blocking the host)."""
        self._copied[index].wait()
        if self._cuda:
            compute = torch.cuda.current_stream(self.layers[0].device)
            if self._error is None:
                compute.wait_event(self._events[index])
            else:   # later events were never recorded: wait for everything already queued
                compute.wait_stream(self._stream)

    def finish(self) -> tuple[set[int], list[OpenChunk], float]:
        """Wait for every copy, then release the leases. Returns (blocks vLLM must recompute,
        chunks loaded intact, seconds the loads took)."""
        self._thread.join()
        try:
            if self._cuda:
                self._stream.synchronize()
                torch.cuda.current_stream(self.layers[0].device).wait_stream(self._stream)
        finally:
            self._leases.close()
        if self._error is not None:
            return set(self._all_blocks), [], self._seconds
        seconds = self._timing[0].elapsed_time(self._timing[1]) / 1e3 if self._cuda else self._seconds
        return self._failed, self.chunks, seconds
