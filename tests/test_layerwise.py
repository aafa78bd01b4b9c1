"""LayerwiseLoad on its own (no vLLM): per-layer readiness, verification after the copy, faults.

The CPU cases run everywhere; the CUDA cases (side stream + one event per layer,
host payloads read through UVA or staged) run on GPU machines.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from stratacache import ops
from stratacache.adapters.vllm.layerwise import LayerwiseChunk, LayerwiseLoad

from .test_ops import POISON, stable_seed

L, NB, PAGE = 6, 40, 1024
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])


def _setup(device: str, pinned: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.full((NB, PAGE), POISON, dtype=torch.uint8, device=device) for _ in range(L)]
    chunks, payloads = [], []
    ids = torch.randperm(NB, generator=gen)
    for c, (n, skip) in enumerate([(4, 0), (4, 0), (4, 1), (3, 0)]):
        payload = torch.randint(0, 256, (n, L, PAGE), dtype=torch.uint8, generator=gen)
        if pinned:
            payload = payload.pin_memory()
        block_ids = ids[4 * c:4 * c + n - skip].clone()
        checksum = None if skip else ops.checksum64(payload)
        chunks.append(LayerwiseChunk(req_id=f"r{c // 2}", name=f"c{c}", src=payload[skip:],
                                     block_ids=block_ids, checksum=checksum,
                                     fail_blocks=set(block_ids.tolist())))
        payloads.append(payload[skip:])
    return layers, chunks, payloads


def _layer_ok(layer: torch.Tensor, chunk: LayerwiseChunk, payload: torch.Tensor, l: int) -> bool:
    got = layer[chunk.block_ids.to(layer.device)]          # read on the current stream
    return torch.equal(got.cpu(), payload[:, l].cpu())


@pytest.mark.parametrize("device,pinned", [("cpu", False), pytest.param(*CUDA.values, True, marks=CUDA.marks),
                                           pytest.param(*CUDA.values, False, marks=CUDA.marks)])
def test_each_layer_is_readable_once_waited_and_the_step_verifies(device, pinned):
    layers, chunks, payloads = _setup(device, pinned, stable_seed(("lw", device, pinned)))
    bad: list[str] = []
    leases = ExitStack()
    released = []
    leases.callback(lambda: released.append(True))
    step = LayerwiseLoad(layers, chunks, leases, on_bad_chunk=lambda c: bad.append(c.name))
    step.start()
    for l in range(L):
        step.wait_layer(l)
        assert all(_layer_ok(layers[l], c, p, l) for c, p in zip(chunks, payloads)), l
    failed, ok, seconds = step.finish()
    assert failed == set() and ok == 4 and seconds > 0 and bad == [] and released == [True]
    written = set().union(*(set(c.block_ids.tolist()) for c in chunks))
    for layer in layers:                                     # nothing else was written
        rest = [b for b in range(NB) if b not in written]
        assert bool((layer[rest] == POISON).all())


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_chunk_whose_landed_bytes_mismatch_is_reported_after_the_copy(device):
    layers, chunks, _ = _setup(device, device == "cuda", 3)
    chunks[1].checksum ^= 1                                  # as if the stored bytes were corrupt
    chunks[1].fail_blocks |= chunks[2].fail_blocks           # ... and the request's later chunks
    bad: list[str] = []
    step = LayerwiseLoad(layers, chunks, ExitStack(), on_bad_chunk=lambda c: bad.append(c.name))
    step.start()
    failed, ok, _ = step.finish()                            # finish without any wait_layer
    assert bad == ["c1"]
    assert failed == chunks[1].fail_blocks
    assert ok == 2                                           # c0 and c3 (c2's blocks are in c1's fail set)
    assert step.error is None


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_copy_fault_releases_every_waiter_and_fails_the_step(device, monkeypatch):
    from stratacache.adapters.vllm import layerwise

    layers, chunks, _ = _setup(device, False, 4)
    real, calls = layerwise.ops.scatter_blocks, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * len(chunks) + 1:               # the first copy of layer 2
            raise RuntimeError("injected")
        return real(*args, **kwargs)
    monkeypatch.setattr(layerwise.ops, "scatter_blocks", flaky)
    step = LayerwiseLoad(layers, chunks, ExitStack(), on_bad_chunk=lambda c: None)
    step.start()
    for l in range(L):
        step.wait_layer(l)                                   # never hangs
    failed, ok, _ = step.finish()
    assert isinstance(step.error, RuntimeError) and ok == 0
    assert failed == set().union(*(c.fail_blocks for c in chunks))
