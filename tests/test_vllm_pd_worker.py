"""Disaggregated prefill in the workers: a remote decode's chunks are durable before its step
returns, its blocks are released through finished_sending (also when a store fails), partial
chunks are verified like full ones, and a remote prefill always loads asynchronously.

Real ops and a real StorageEngine (shared region + CPU); bad timing is forced with events
around the engine's store, never with sleeps."""

from __future__ import annotations

import threading

import pytest
import torch

from stratacache.adapters.vllm.keys import ChunkGeometry, artifact_key
from stratacache.adapters.vllm.metadata import (ChunkLoad, ChunkSave, RequestLoad,
                                                StrataCacheConnectorMetadata)
from tests.test_vllm_scheduler import FakeRequest, tokens
from tests.test_vllm_worker import engine_factory  # noqa: F401  (a fixture, used by name)
from tests.test_vllm_worker import (BS, NS, POISON, _wait_finished, make_worker, paged_kv,
                                    saver_and_loader)

GEOMETRY = ChunkGeometry(4 * BS, BS, BS)


class HeldStore:
    """engine.store that waits for ``release`` (and says it has been entered); with
    ``refuse`` it then refuses the chunk, as a full or failing tier does."""

    def __init__(self, engine, refuse: bool = False) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self._store, self._refuse = engine.store, refuse
        engine.store = self

    def __call__(self, key, payload, **kwargs):
        self.entered.set()
        assert self.release.wait(30), "the test never released the store"
        return False if self._refuse else self._store(key, payload, **kwargs)


def remote_saves(req_id: str = "p") -> list[ChunkSave]:
    return [ChunkSave("full", [0, 1, 2, 3], req_id=req_id),
            ChunkSave("part-p2", [4, 5], req_id=req_id)]


def test_a_remote_decode_step_returns_only_once_its_chunks_are_stored(engine_factory):
    """The prefill's response leaves the engine when its step returns: by then the decode
    side must be able to find every chunk."""
    _, layers = paged_kv(31)
    engine = engine_factory()
    worker = make_worker(engine)
    worker.register(layers)
    held = HeldStore(engine)
    returned = threading.Event()
    step = threading.Thread(target=lambda: (worker.end_step(remote_saves()), returned.set()))
    step.start()
    assert held.entered.wait(30)
    assert not returned.is_set()                    # the store is held: the step is too
    held.release.set()
    step.join(30)
    assert returned.is_set()
    assert all(engine.contains(artifact_key(NS, name)) for name in ("full", "part-p2"))
    assert worker.finished_sending({"p"}) == {"p"}
    assert worker.state_sizes()["sends"] == 0 and worker.state_sizes()["sending"] == 0


def test_finished_sending_waits_for_the_stores(engine_factory):
    """A finished remote decode is reported (its blocks freed) only after its stores; a plain
    request's saves never hold anything."""
    _, layers = paged_kv(32)
    engine = engine_factory()
    worker = make_worker(engine)
    worker.register(layers)
    held = HeldStore(engine)
    worker.save(remote_saves() + [ChunkSave("plain", [6, 7, 8, 9])])
    assert held.entered.wait(30)
    assert worker.finished_sending({"p"}) == set()
    assert worker.finished_sending(set()) == set()
    held.release.set()
    worker.drain_saves()
    assert worker.finished_sending(set()) == {"p"}
    assert worker.finished_sending(set()) == set()  # reported once
    assert worker.finished_sending({"never-saved"}) == {"never-saved"}


@pytest.mark.parametrize("fault", ["refused", "gather"])
def test_a_failed_remote_save_still_frees_the_request(engine_factory, monkeypatch, fault):
    """A tier that refuses the chunks, or a gather that fails: the request is still reported
    in finished_sending (vLLM frees its blocks), and the failure is counted."""
    from stratacache.adapters.vllm import worker as worker_module

    _, layers = paged_kv(33)
    engine = engine_factory()
    worker = make_worker(engine)
    worker.register(layers)
    if fault == "refused":
        HeldStore(engine, refuse=True).release.set()
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("injected gather fault")
        monkeypatch.setattr(worker_module.ops, "gather_blocks", broken)
    worker.end_step(remote_saves())
    assert worker.finished_sending({"p"}) == {"p"}
    totals = worker.stats.totals()
    assert totals["pd_save_failed"] == 2 and totals["save_dropped"] == 2
    assert totals.get("save_chunks", 0) == 0


@pytest.mark.parametrize("harm", [None, "corrupt", "missing"])
def test_partial_chunks_are_checksummed_and_verified(engine_factory, harm):
    """A prompt's partial chunk is stored with its checksum and verified on its source at
    load time like any full chunk: byte-exact when intact, a reported load error when not."""
    src_buf, dst_buf, engine, saver, loader = saver_and_loader(engine_factory, 34, 35)
    dst_buf[:] = POISON
    req = FakeRequest("r", tokens(6 * BS + 5, 36))
    full = GEOMETRY.name_at(req.block_hashes, 4 * BS)
    part = GEOMETRY.partial_name(req.block_hashes, 6 * BS)
    saver.end_step([ChunkSave(full, [0, 1, 2, 3], req_id="p"), ChunkSave(part, [4, 5], req_id="p")])
    key = artifact_key(NS, part)
    stored = engine.load(key)
    assert stored.meta.size == 2 * loader.kv.block_bytes and stored.meta.checksum is not None
    if harm == "corrupt":
        checksum = stored.meta.checksum
        engine.delete(key)
        assert engine.store(key, torch.randint(0, 256, (stored.meta.size,), dtype=torch.uint8),
                            checksum=checksum)
    elif harm == "missing":
        engine.delete(key)
    load = RequestLoad("d", [ChunkLoad(full, 4, 0, [10, 11, 12, 13]),
                             ChunkLoad(part, 2, 0, [14, 15])], True, BS, remote=True)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    _wait_finished(loader, {"d"})
    errors = loader.take_load_errors()
    pairs = list(zip(range(4), [10, 11, 12, 13]))
    if harm is None:
        assert errors == set()
        pairs += [(4, 14), (5, 15)]
    else:
        assert errors == {14, 15}
        assert (dst_buf[[14, 15]] == POISON).all()
        assert loader.stats.totals()["pd_load_errors"] == 1
    for s, t in pairs:
        assert torch.equal(dst_buf[t].view(torch.int16), src_buf[s].view(torch.int16))


@pytest.mark.parametrize("mode", ["sync", "layerwise"])
def test_a_remote_prefill_loads_asynchronously_in_every_load_mode(engine_factory, mode):
    """The scheduler marks a remote prefill's load async (vLLM then waits for finished_recving
    before scheduling it): a worker configured for sync or layer-wise loads must still run it
    in the background and report it, or the request would wait forever."""
    src_buf, dst_buf, engine, saver, loader = saver_and_loader(engine_factory, 37, 38, mode)
    saver.end_step([ChunkSave("c", [0, 1, 2, 3], req_id="p")])
    load = RequestLoad("d", [ChunkLoad("c", 4, 0, [20, 21, 22, 23])], True, BS, remote=True)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    _wait_finished(loader, {"d"})
    assert loader.take_load_errors() == set()
    for s, t in zip(range(4), [20, 21, 22, 23]):
        assert torch.equal(dst_buf[t].view(torch.int16), src_buf[s].view(torch.int16))


def test_the_connector_reports_the_steps_finished_remote_decodes(engine_factory):
    """get_finished hands the workers the remote decodes the scheduler delayed (from the
    step's metadata) and returns them as finished_sending once, never another request:
    vLLM frees the blocks of what it receives, and asserts it delayed them."""
    from stratacache.adapters.vllm.connector_v1 import StrataCacheConnectorV1

    _, layers = paged_kv(39)
    worker = make_worker(engine_factory())
    worker.register(layers)
    worker.end_step(remote_saves("p"))
    connector = object.__new__(StrataCacheConnectorV1)   # the worker role's routing only
    connector._worker = worker
    connector._connector_metadata = StrataCacheConnectorMetadata()
    assert connector.get_finished({"p", "q"}) == (None, None)
    connector._connector_metadata = StrataCacheConnectorMetadata(sending_req_ids={"p"})
    assert connector.get_finished(set()) == ({"p"}, None)
    connector._connector_metadata = StrataCacheConnectorMetadata()
    assert connector.get_finished(set()) == (None, None)
