"""Worker-side transfers with real ops and a real StorageEngine (CPU + shared region).

Paged KV is synthesized like vLLM's CPU backend hands it over: one
``[num_blocks, heads, block_size, 2*head_size]`` bf16 view per layer, all
views of one buffer (so each layer's blocks are strided), plus a layer that
shares another's tensor (deduplicated by data_ptr).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from stratacache.adapters.vllm.keys import artifact_key
from stratacache.adapters.vllm.metadata import ChunkLoad, ChunkSave, RequestLoad, StrataCacheConnectorMetadata
from stratacache.adapters.vllm.stats import StatsCounter
from stratacache.adapters.vllm.worker import PagedKV, WorkerSide
from stratacache.config import load_config
from stratacache.engine import StorageEngine

NUM_BLOCKS, LAYERS, HEADS, BS, HEAD = 24, 3, 2, 16, 32
CHUNK_BLOCKS = 4
NS = "vllm-test-worker-tp0of1"
POISON = -7.0


def paged_kv(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(NUM_BLOCKS, LAYERS, HEADS, BS, 2 * HEAD, generator=g).to(torch.bfloat16)
    layers = {f"model.layers.{i}.attn": buf[:, i] for i in range(LAYERS)}
    layers["model.layers.shared.attn"] = layers["model.layers.0.attn"]   # KV sharing
    return buf, layers


@pytest.fixture
def engine_factory(tmp_path):
    made = []

    def make():
        region = f"/dev/shm/sc-test-vllm-worker-{os.getpid()}-{len(made)}.region"
        cfg = load_config(None, {"tiers.shared.path": region, "tiers.shared.capacity": "64MiB",
                                 "tiers.cpu.capacity": "32MiB"})
        eng = StorageEngine(cfg)
        made.append((eng, region))
        return eng
    yield make
    for eng, region in made:
        eng.close()
        if os.path.exists(region):
            os.unlink(region)


def make_worker(engine, *, load_mode="sync", limit=1 << 30):
    return WorkerSide(engine=engine, namespace=NS, load_mode=load_mode, verify=True,
                      stats=StatsCounter(), max_inflight_save_bytes=limit)


def saver_and_loader(engine_factory, src_seed: int, dst_seed: int, load_mode: str = "sync"):
    """Two workers on one engine: one saving from a source KV, one loading into another."""
    src_buf, src_layers = paged_kv(src_seed)
    dst_buf, dst_layers = paged_kv(dst_seed)
    engine = engine_factory()
    saver, loader = make_worker(engine), make_worker(engine, load_mode=load_mode)
    saver.register(src_layers)
    loader.register(dst_layers)
    return src_buf, dst_buf, engine, saver, loader


def test_register_deduplicates_and_validates():
    buf, layers = paged_kv(0)
    kv = PagedKV(layers)
    assert len(kv.layers) == LAYERS
    assert kv.page_bytes == HEADS * BS * 2 * HEAD * 2
    assert kv.block_bytes == LAYERS * kv.page_bytes
    with pytest.raises(ValueError, match="no KV cache tensors"):
        PagedKV({})
    bad = dict(layers)
    bad["model.layers.odd"] = torch.zeros(NUM_BLOCKS, HEADS, 2 * HEAD, BS).transpose(2, 3)
    with pytest.raises(ValueError, match="model.layers.odd"):
        PagedKV(bad)


@pytest.mark.parametrize("mode", ["sync", "layerwise"])
def test_save_then_load_into_other_blocks_is_byte_exact(engine_factory, mode):
    src_buf, dst_buf, engine, saver, loader = saver_and_loader(engine_factory, 1, 2, mode)
    src_ids = [[3, 9, 1, 20], [5, 6, 7, 8], [0, 2]]              # two chunks + a partial
    saves = [ChunkSave(f"chunk{i}", ids) for i, ids in enumerate(src_ids)]
    saver.save(saves)
    saver.drain_saves()
    assert engine.contains_many([artifact_key(NS, s.name) for s in saves]) == [True] * 3
    # Saving again stores nothing new.
    saver.save(saves)
    assert saver.stats.totals()["save_skipped"] == 3
    dst_ids = [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    dst_buf[10:20] = POISON
    load = RequestLoad("r", [ChunkLoad(f"chunk{i}", len(ids), 0, d)
                             for i, (ids, d) in enumerate(zip(src_ids, dst_ids))], False, BS)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    assert loader.take_load_errors() == set()
    for ids, d in zip(src_ids, dst_ids):
        for s, t in zip(ids, d):
            assert torch.equal(dst_buf[t].view(torch.int16), src_buf[s].view(torch.int16))
    totals = loader.stats.totals()
    assert totals["load_chunks"] == 3 and totals["load_bytes"] == 10 * loader.kv.block_bytes
    assert 0 < totals["load_verify_seconds"] <= totals["load_seconds"]   # a part of the load
    assert (dst_buf[:10] != POISON).all()                       # nothing else written


@pytest.mark.parametrize("mode", ["sync", "layerwise"])
def test_skip_blocks_writes_only_missing_blocks(engine_factory, mode):
    src_buf, dst_buf, _, saver, loader = saver_and_loader(engine_factory, 3, 4, mode)
    saver.save([ChunkSave("c", [4, 5, 6, 7])])
    saver.drain_saves()
    dst_buf[20:24] = POISON
    load = RequestLoad("r", [ChunkLoad("c", 4, 1, [21, 22, 23])], False, BS)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    assert loader.take_load_errors() == set()
    assert (dst_buf[20] == POISON).all()
    for s, t in zip([5, 6, 7], [21, 22, 23]):
        assert torch.equal(dst_buf[t].view(torch.int16), src_buf[s].view(torch.int16))


@pytest.mark.parametrize("mode", ["sync", "layerwise"])
@pytest.mark.parametrize("skip,take", [(0, 3), (1, 2), (2, 1)])
def test_head_of_a_stored_chunk_writes_only_those_blocks(engine_factory, skip, take, mode):
    # A prompt ending exactly on a chunk boundary loads only the chunk's head.
    src_buf, dst_buf, _, saver, loader = saver_and_loader(engine_factory, 5, 6, mode)
    saver.save([ChunkSave("c", [4, 5, 6, 7])])
    saver.drain_saves()
    dst_buf[:] = POISON
    dst = [20, 21, 22, 23][skip:skip + take]
    load = RequestLoad("r", [ChunkLoad("c", 4, skip, dst)], False, BS)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    assert loader.take_load_errors() == set()
    for s, t in zip([4, 5, 6, 7][skip:skip + take], dst):
        assert torch.equal(dst_buf[t].view(torch.int16), src_buf[s].view(torch.int16))
    untouched = [b for b in range(NUM_BLOCKS) if b not in dst]
    assert (dst_buf[untouched] == POISON).all()


@pytest.mark.parametrize("mode", ["sync", "layerwise", "async"])
@pytest.mark.parametrize("fault", ["missing", "corrupt", "wrong_size"])
def test_faulty_chunk_reports_it_and_every_later_block(engine_factory, fault, mode):
    """Every load mode verifies a chunk on its source, before any byte reaches paged memory
    (vLLM may already share those blocks with another request): the faulty chunk's pages and
    the later ones keep what they held, and exactly those blocks are reported."""
    src_buf, dst_buf, engine, saver, loader = saver_and_loader(engine_factory, 5, 6, mode)
    dst_buf[:] = POISON
    saver.save([ChunkSave(f"c{i}", list(range(4 * i, 4 * i + 4))) for i in range(3)])
    saver.drain_saves()
    key = artifact_key(NS, "c1")
    if fault == "missing":
        engine.delete(key)
    else:
        art = engine.load(key)
        size, checksum = art.meta.size, art.meta.checksum
        engine.delete(key)
        n = size if fault == "corrupt" else size - loader.kv.block_bytes
        garbage = torch.randint(0, 256, (n,), dtype=torch.uint8)
        assert engine.store(key, garbage, checksum=checksum if fault == "corrupt" else None)
    dst_ids = [[12, 13, 14, 15], [16, 17, 18, 19], [20, 21, 22, 23]]
    load = RequestLoad("r", [ChunkLoad(f"c{i}", 4, 0, d) for i, d in enumerate(dst_ids)],
                       mode == "async", BS)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    if mode == "async":
        _wait_finished(loader, {"r"})
    assert loader.take_load_errors() == set(dst_ids[1] + dst_ids[2])
    assert (dst_buf[dst_ids[1] + dst_ids[2]] == POISON).all()   # no byte of it was written
    assert loader.take_load_errors() == set()                   # reported once
    for s, t in zip(range(4), dst_ids[0]):                      # chunk 0 still loaded
        assert torch.equal(dst_buf[t].view(torch.int16), src_buf[s].view(torch.int16))
    totals = loader.stats.totals()
    assert totals["load_errors"] == 1 and totals["load_error_blocks"] == 8
    assert totals["load_chunks"] == 1
    assert not engine.contains(key)                             # a bad chunk is removed
    meta = loader.worker_meta()
    assert meta.lost == ["c1"]


def _wait_finished(loader, req_ids: set) -> None:
    done: set = set()
    deadline = time.time() + 30
    while done != req_ids and time.time() < deadline:
        done |= loader.finished_loads()
        time.sleep(0.01)
    assert done == req_ids


def test_async_loads_finish_through_finished_loads(engine_factory):
    src_buf, dst_buf, _, saver, loader = saver_and_loader(engine_factory, 7, 8, load_mode="async")
    saver.save([ChunkSave("a", [0, 1, 2, 3])])
    saver.drain_saves()
    loads = [RequestLoad("ok", [ChunkLoad("a", 4, 0, [8, 9, 10, 11])], True, BS),
             RequestLoad("bad", [ChunkLoad("nope", 4, 0, [12, 13, 14, 15])], True, BS)]
    loader.start_loads(StrataCacheConnectorMetadata(loads=loads))
    done: set = set()
    deadline = time.time() + 30
    while done != {"ok", "bad"} and time.time() < deadline:
        done |= loader.finished_loads()
        time.sleep(0.01)
    assert done == {"ok", "bad"}
    assert loader.take_load_errors() == {12, 13, 14, 15}
    assert torch.equal(dst_buf[8].view(torch.int16), src_buf[0].view(torch.int16))
    assert loader.state_sizes()["inflight_loads"] == 0


def test_layerwise_layer_is_in_place_once_its_wait_returns(engine_factory):
    """Each layer's pages are loaded when wait_layer(name) returns, before the step finishes;
    a layer sharing another's KV waits for that one."""
    src_buf, dst_buf, _, saver, loader = saver_and_loader(engine_factory, 11, 12, "layerwise")
    srcs = [list(range(4 * i, 4 * i + 4)) for i in range(4)]
    saver.save([ChunkSave(f"l{i}", ids) for i, ids in enumerate(srcs)])
    saver.drain_saves()
    dsts = [[23 - 4 * i - k for k in range(4)] for i in range(4)]
    dst_buf[:] = POISON
    loads = [RequestLoad("a", [ChunkLoad("l0", 4, 0, dsts[0]), ChunkLoad("l1", 4, 0, dsts[1])], False, BS),
             RequestLoad("b", [ChunkLoad("l2", 4, 0, dsts[2]), ChunkLoad("l3", 4, 1, dsts[3][1:])],
                         False, BS)]
    loader.start_loads(StrataCacheConnectorMetadata(loads=loads))
    names = list(paged_kv(0)[1])
    for name in ["model.layers.shared.attn"] + names:
        loader.wait_layer(name)
        layer = loader.kv.index_of[name]
        for s_ids, d_ids in zip(srcs, dsts):
            for s, t in list(zip(s_ids, d_ids))[-3:]:
                assert torch.equal(dst_buf[t, layer].view(torch.int16), src_buf[s, layer].view(torch.int16))
    loader.wait_layer("not.an.attention.layer")                 # unknown names are ignored
    assert loader.take_load_errors() == set()
    assert (dst_buf[dsts[3][0]] == POISON).all()                 # the skipped block stays untouched
    totals = loader.stats.totals()
    assert totals["load_chunks"] == 4 and totals["load_bytes"] == 15 * loader.kv.block_bytes
    assert loader.kv.index_of["model.layers.shared.attn"] == 0
    loader.wait_layer(names[1])                                  # after finish: nothing to wait for


def test_layerwise_copy_failure_reports_every_block_and_never_hangs(engine_factory, monkeypatch):
    from stratacache.adapters.vllm import layerwise

    src_buf, dst_buf, _, saver, loader = saver_and_loader(engine_factory, 13, 14, "layerwise")
    saver.save([ChunkSave("x", [0, 1, 2, 3]), ChunkSave("y", [4, 5, 6, 7])])
    saver.drain_saves()
    real, calls = layerwise.ops.scatter_blocks, []

    def flaky(src, ids, layers, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                                      # layer 1 of the first chunk
            raise RuntimeError("injected copy fault")
        return real(src, ids, layers, *args, **kwargs)
    monkeypatch.setattr(layerwise.ops, "scatter_blocks", flaky)
    load = RequestLoad("r", [ChunkLoad("x", 4, 0, [8, 9, 10, 11]), ChunkLoad("y", 4, 0, [12, 13, 14, 15])],
                       False, BS)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    for name in paged_kv(0)[1]:
        loader.wait_layer(name)                                  # returns even though the copy failed
    assert loader.take_load_errors() == set(range(8, 16))
    totals = loader.stats.totals()
    assert totals["load_errors"] == 1 and totals["load_error_blocks"] == 8 and totals["load_chunks"] == 0
    assert loader.state_sizes()["inflight_loads"] == 0


def test_unknown_load_mode_is_rejected(engine_factory):
    with pytest.raises(ValueError, match="connector.load_mode must be one of"):
        make_worker(engine_factory(), load_mode="eager")


def test_full_save_queue_drops_instead_of_blocking(engine_factory):
    _, layers = paged_kv(9)
    engine = engine_factory()
    worker = make_worker(engine, limit=1)                       # no buffer fits
    worker.register(layers)
    worker.save([ChunkSave("x", [0, 1, 2, 3])])
    worker.drain_saves()
    assert worker.stats.totals()["save_dropped"] == 1
    assert not engine.contains(artifact_key(NS, "x"))


def test_shutdown_drains_pending_stores(engine_factory):
    _, layers = paged_kv(10)
    engine = engine_factory()
    worker = make_worker(engine)
    worker.register(layers)
    worker.save([ChunkSave(f"s{i}", [i]) for i in range(NUM_BLOCKS)])
    worker.shutdown()
    assert worker.stats.totals()["save_chunks"] == NUM_BLOCKS
    meta = worker.worker_meta()
    assert sorted(meta.stored) == sorted(f"s{i}" for i in range(NUM_BLOCKS))


class _HeldLeases:
    """Wraps engine.pinned to count the leases currently held."""

    def __init__(self, engine) -> None:
        self.engine, self.held, self.released = engine, 0, 0
        self._pinned = engine.pinned

    @contextmanager
    def pinned(self, key, **kwargs):
        with self._pinned(key, **kwargs) as art:
            self.held += art is not None
            try:
                yield art
            finally:
                if art is not None:
                    self.held -= 1
                    self.released += 1


class _DelayedFence:
    """A device whose copies complete only when the test says so."""

    def __init__(self) -> None:
        self.recorded = threading.Event()
        self.complete = threading.Event()
        self.waited_with_leases: list[int] = []

    def record(self):
        self.recorded.set()
        return "mark"

    def wait(self, mark) -> None:
        assert mark == "mark"
        assert self.complete.wait(30), "the test never completed the transfer"


def _delayed_loader(engine_factory, mode):
    src_buf, dst_buf, engine, saver, loader = saver_and_loader(engine_factory, 21, 22, mode)
    saver.save([ChunkSave("a", [0, 1, 2, 3]), ChunkSave("p", [4, 5])])
    saver.drain_saves()
    leases = _HeldLeases(engine)
    loader.engine.pinned = leases.pinned     # the loader's engine object is the shared one
    fence = _DelayedFence()
    loader._loads.fence = fence
    return src_buf, dst_buf, loader, leases, fence


def test_async_load_keeps_its_leases_and_is_unfinished_until_the_device_completes(engine_factory):
    """Item 1: with the transfer's completion delayed on purpose, no lease is released and the
    request is not reported finished; both happen only once the copy completed. A full chunk
    and a partial one (never synchronised before) are both covered."""
    src_buf, dst_buf, loader, leases, fence = _delayed_loader(engine_factory, "async")
    load = RequestLoad("r", [ChunkLoad("a", 4, 0, [8, 9, 10, 11]), ChunkLoad("p", 2, 1, [12])],
                       True, BS)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    assert fence.recorded.wait(30)
    for _ in range(20):                      # however often vLLM polls meanwhile
        assert loader.finished_loads() == set()
        assert leases.held == 2 and leases.released == 0
        time.sleep(0.005)
    fence.complete.set()
    _wait_finished(loader, {"r"})
    assert leases.held == 0 and leases.released == 2
    assert loader.take_load_errors() == set()
    assert torch.equal(dst_buf[12].view(torch.int16), src_buf[5].view(torch.int16))


@pytest.mark.parametrize("verify", [True, False])
def test_sync_load_releases_its_leases_only_after_the_device_completes(engine_factory, verify):
    """Item 1 for sync loads, with and without checksum verification: start_loads does not
    return, and so no lease is released, before the delayed transfer completes."""
    src_buf, dst_buf, loader, leases, fence = _delayed_loader(engine_factory, "sync")
    loader._loads.verify = verify
    load = RequestLoad("r", [ChunkLoad("a", 4, 0, [8, 9, 10, 11]), ChunkLoad("p", 2, 0, [12, 13])],
                       False, BS)
    runner = threading.Thread(target=loader.start_loads,
                              args=(StrataCacheConnectorMetadata(loads=[load]),))
    runner.start()
    assert fence.recorded.wait(30)
    time.sleep(0.05)
    assert runner.is_alive() and leases.held == 2 and leases.released == 0
    fence.complete.set()
    runner.join(30)
    assert not runner.is_alive() and leases.held == 0 and leases.released == 2
    assert loader.take_load_errors() == set()


def test_a_step_with_failed_loads_saves_nothing(engine_factory):
    """Pages computed in a step whose loads failed may rest on the failed blocks (this request's
    or another's sharing them in vLLM's prefix cache): that step's saves are dropped, and
    the next step saves again."""
    src_buf, dst_buf, engine, saver, loader = saver_and_loader(engine_factory, 23, 24)
    load = RequestLoad("r", [ChunkLoad("gone", 4, 0, [8, 9, 10, 11])], False, BS)
    loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
    loader.end_step([ChunkSave("later", [12, 13, 14, 15])])
    loader.drain_saves()
    assert not engine.contains(artifact_key(NS, "later"))
    assert loader.stats.totals()["save_dropped"] == 1
    assert loader.take_load_errors() == {8, 9, 10, 11}
    loader.end_step([ChunkSave("later", [12, 13, 14, 15])])   # the next, clean step saves
    loader.drain_saves()
    assert engine.contains(artifact_key(NS, "later"))


def test_a_failing_gather_is_counted_and_never_raises(engine_factory, monkeypatch):
    from stratacache.adapters.vllm import worker as worker_module

    _, layers = paged_kv(25)
    engine = engine_factory()
    worker = make_worker(engine)
    worker.register(layers)

    def broken(*args, **kwargs):
        raise RuntimeError("injected gather fault")
    monkeypatch.setattr(worker_module.ops, "gather_blocks", broken)
    worker.end_step([ChunkSave("x", [0, 1, 2, 3]), ChunkSave("y", [4, 5, 6, 7])])
    worker.drain_saves()
    assert worker.stats.totals()["save_dropped"] == 2
    monkeypatch.undo()
    worker.end_step([ChunkSave("x", [0, 1, 2, 3])])           # the pooled buffer came back
    worker.drain_saves()
    assert engine.contains(artifact_key(NS, "x"))


def test_save_buffers_are_page_locked_when_the_kv_cache_is_on_cuda(engine_factory):
    """Item 2: on a GPU the pool hands out pinned buffers (the gather then writes them through
    UVA in one launch, no device staging buffer); on the CPU, pageable ones."""
    _, layers = paged_kv(26)
    worker = make_worker(engine_factory())
    worker.register(layers)
    assert worker._saver._pool.pinned is False

    class _CudaKV:
        device = torch.device("cuda", 0)
    worker._saver.bind(_CudaKV(), worker._loads.fence)
    assert worker._saver._pool.pinned is True
