"""LayerwiseLoad on its own (no vLLM): per-layer readiness, chunks opened (leased and verified)
before any copy, faults, and how the compute stream is ordered after the side stream.

The CPU cases run everywhere; the CUDA cases (side stream + one event per layer,
host payloads read through UVA or staged) run on GPU machines.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from stratacache.adapters.vllm import layerwise
from stratacache.adapters.vllm.layerwise import LayerwiseLoad, OpenChunk

from .test_ops import POISON, stable_seed

L, NB, PAGE = 6, 40, 1024
ONE_PLANE_EACH = [(l, l + 1) for l in range(L)]      # each layer's page is one contiguous plane
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])


def _setup(device: str, pinned: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.full((NB, PAGE), POISON, dtype=torch.uint8, device=device) for _ in range(L)]
    chunks = []
    ids = torch.randperm(NB, generator=gen)
    for c, (n, skip) in enumerate([(4, 0), (4, 0), (4, 1), (3, 0)]):
        payload = torch.randint(0, 256, (n, L, PAGE), dtype=torch.uint8, generator=gen)
        if pinned:
            payload = payload.pin_memory()
        block_ids = ids[4 * c:4 * c + n - skip].clone()
        chunks.append(OpenChunk(req_id=f"r{c // 2}", name=f"c{c}", src=payload[skip:],
                                block_ids=block_ids))
    return layers, chunks


def _opener(chunks, failed=frozenset(), released=None):
    """open_chunks for LayerwiseLoad: hands out `chunks`, reports `failed`, and records when
    the leases close."""
    def open_chunks(leases: ExitStack):
        if released is not None:
            leases.callback(lambda: released.append(True))
        return list(chunks), set(failed)
    return open_chunks


def _every_block(chunks) -> set[int]:
    return set().union(*(set(c.block_ids.tolist()) for c in chunks))


def _layer_ok(layer: torch.Tensor, chunk: OpenChunk, l: int) -> bool:
    got = layer[chunk.block_ids.to(layer.device)]          # read on the current stream
    return torch.equal(got.cpu(), chunk.src[:, l].cpu())


@pytest.mark.parametrize("device,pinned", [("cpu", False), pytest.param(*CUDA.values, True, marks=CUDA.marks),
                                           pytest.param(*CUDA.values, False, marks=CUDA.marks)])
def test_each_layer_is_readable_once_waited(device, pinned):
    layers, chunks = _setup(device, pinned, stable_seed(("lw", device, pinned)))
    released: list[bool] = []
    step = LayerwiseLoad(layers, ONE_PLANE_EACH, _opener(chunks, released=released),
                         _every_block(chunks))
    step.start()
    for l in range(L):
        step.wait_layer(l)
        assert all(_layer_ok(layers[l], c, l) for c in chunks), l
    failed, loaded, seconds = step.finish()
    assert failed == set() and loaded == chunks and seconds > 0 and released == [True]
    written = _every_block(chunks)
    for layer in layers:                                     # nothing else was written
        rest = [b for b in range(NB) if b not in written]
        assert bool((layer[rest] == POISON).all())


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_chunks_that_fail_to_open_are_reported_and_never_written(device):
    layers, chunks = _setup(device, device == "cuda", 3)
    bad = chunks[1]
    failed_blocks = set(bad.block_ids.tolist())
    step = LayerwiseLoad(layers, ONE_PLANE_EACH, _opener([c for c in chunks if c is not bad],
                                                         failed_blocks), _every_block(chunks))
    step.start()
    failed, loaded, _ = step.finish()                        # finish without any wait_layer
    assert failed == failed_blocks
    assert [c.name for c in loaded] == ["c0", "c2", "c3"]
    assert step.error is None
    for layer in layers:
        assert bool((layer[bad.block_ids.to(layer.device)] == POISON).all())


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_copy_fault_releases_every_waiter_and_fails_the_step(device, monkeypatch):
    layers, chunks = _setup(device, False, 4)
    real, calls = layerwise.ops.scatter_blocks, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * len(chunks) + 1:               # the first copy of layer 2
            raise RuntimeError("injected")
        return real(*args, **kwargs)
    monkeypatch.setattr(layerwise.ops, "scatter_blocks", flaky)
    released: list[bool] = []
    step = LayerwiseLoad(layers, ONE_PLANE_EACH, _opener(chunks, released=released),
                         _every_block(chunks))
    step.start()
    for l in range(L):
        step.wait_layer(l)                                   # never hangs
    failed, loaded, _ = step.finish()
    assert isinstance(step.error, RuntimeError) and loaded == []
    assert failed == _every_block(chunks) and released == [True]


def test_a_failing_open_fails_the_whole_step_and_never_hangs():
    layers, chunks = _setup("cpu", False, 5)

    def broken(leases):
        raise OSError("tier gone")
    step = LayerwiseLoad(layers, ONE_PLANE_EACH, broken, _every_block(chunks))
    step.start()
    for l in range(L):
        step.wait_layer(l)
    failed, loaded, _ = step.finish()
    assert isinstance(step.error, OSError) and loaded == [] and failed == _every_block(chunks)
    assert all(bool((layer == POISON).all()) for layer in layers)


class _Stream:
    """Stands in for a CUDA stream: records what the compute stream was told to wait for."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait_event(self, event) -> None:
        self.log.append((self.name, "wait_event", event))

    def wait_stream(self, stream) -> None:
        self.log.append((self.name, "wait_stream", stream.name))


@pytest.mark.parametrize("fail", [False, True])
def test_cuda_compute_stream_always_waits_for_the_side_stream(monkeypatch, fail):
    """On CUDA a copy error must not let the forward skip ordering itself after copies already
    queued: wait_layer then makes the compute stream wait for the whole side stream (the
    per-layer events after the error were never recorded). Stub streams stand in for CUDA."""
    layers, chunks = _setup("cpu", False, 6)
    log: list = []
    compute = _Stream(log, "compute")
    step = LayerwiseLoad(layers, ONE_PLANE_EACH, _opener(chunks), _every_block(chunks))
    step._cuda, step._stream = True, _Stream(log, "side")
    step._events = [f"event{l}" for l in range(L)]
    monkeypatch.setattr(layerwise.torch.cuda, "current_stream", lambda device=None: compute)
    if fail:
        step._error = RuntimeError("copy of layer 1 failed")
    for done in step._copied:
        done.set()
    step.wait_layer(3)
    expected = ("compute", "wait_stream", "side") if fail else ("compute", "wait_event", "event3")
    assert log == [expected]
