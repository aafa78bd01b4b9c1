"""Every KV cache layout vLLM 0.32 can hand the connector (issue 23, item 8).

vLLM's model runner allocates one flat byte buffer and views it, per layer, as
``[B, H, N, C]`` with strides given by the resolved ``KVCacheLayout`` (a
permutation of ``[L, B, H, N, C]``: layers, blocks, heads, tokens, content
bytes), then ``.view(dtype)``. ``vllm_like_caches`` builds exactly those views
without importing vLLM, so the save/load round trips also run on the GPU
machine (torch + CUDA, no vLLM); ``test_synthetic_caches_are_vllms`` checks it
against vLLM's own ``create_kv_cache_views``, and the vLLM-built round trip
uses vLLM's function directly (including kernel-block splitting).
"""

from __future__ import annotations

from contextlib import ExitStack
from types import SimpleNamespace

import pytest
import torch

from stratacache.adapters.vllm.keys import KVIdentity, artifact_key
from stratacache.adapters.vllm.metadata import ChunkLoad, ChunkSave, RequestLoad, \
    StrataCacheConnectorMetadata
from stratacache.adapters.vllm.stats import StatsCounter
from stratacache.adapters.vllm.worker import PagedKV, WorkerSide

from .test_ops import stable_seed
from .test_vllm_worker import engine_factory  # noqa: F401  (fixture)

# Logical [L, B, H, N, C] -> memory order, as vllm.v1.kv_cache_layout.KVCacheLayout.
LAYOUTS = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4),
           "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4)}
BLOCK_COMPACT = ["LBHNC", "LBNHC", "BLHNC", "BLNHC"]   # a page is one run of bytes
LAYERS, NUM_BLOCKS, BLOCK = 3, 12, 16
# kind -> (heads, content bytes per token and head, dtype): K and V of 64 dims in bf16; fp8;
# MLA's single latent plane (one "head" of 576 bf16 values).
KINDS = {"bf16": (4, 2 * 64 * 2, torch.bfloat16), "fp8": (2, 2 * 64, torch.float8_e4m3fn),
         "mla": (1, 576 * 2, torch.bfloat16)}
CHUNK = 4
NS = "vllm-test-layouts-tp0of1"
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])


def layout_strides(order: tuple[int, ...], shape: tuple[int, ...]) -> list[int]:
    """Byte strides in logical [L, B, H, N, C] order for a dense buffer in `order`."""
    strides, current = [0] * 5, 1
    for dim in reversed(order):
        strides[dim] = current
        current *= shape[dim]
    return strides


def vllm_like_caches(layout: str, kind: str, device: str, seed: int,
                     raw: torch.Tensor = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(backing int8 buffer, {layer name: [B, H, N, C/itemsize] view}) as vLLM builds them."""
    heads, content, dtype = KINDS[kind]
    shape = (LAYERS, NUM_BLOCKS, heads, BLOCK, content)
    strides = layout_strides(LAYOUTS[layout], shape)
    total = LAYERS * NUM_BLOCKS * heads * BLOCK * content
    if raw is None:
        gen = torch.Generator().manual_seed(seed)
        raw = torch.randint(-128, 128, (total,), dtype=torch.int8, generator=gen).to(device)
    view_5d = torch.as_strided(raw, shape, strides)
    return raw, {f"model.layers.{l}.attn": view_5d[l].view(dtype) for l in range(LAYERS)}


def page_bytes(layer: torch.Tensor, block: int) -> torch.Tensor:
    return layer[block].contiguous().view(torch.uint8).cpu()


def round_trip(engine, src_layers, dst_layers, mode: str, num_blocks=None, layout="test"):
    """Save chunks from src's blocks, load them into other blocks of dst; returns the maps."""
    saver = WorkerSide(engine=engine, namespace=NS, load_mode="sync", verify=True,
                       stats=StatsCounter())
    loader = WorkerSide(engine=engine, namespace=NS, load_mode=mode, verify=True,
                        stats=StatsCounter())
    with ExitStack() as stack:
        stack.callback(saver._saver.close)
        stack.callback(loader._saver.close)
        saver.register(src_layers, num_blocks=num_blocks, layout=layout)
        loader.register(dst_layers, num_blocks=num_blocks, layout=layout)
        src_ids = [[7, 2, 9, 4], [0, 11], [5, 6, 1, 3]]
        dst_ids = [[1, 3, 5, 0], [10, 8], [2, 4, 6, 11]]
        saver.end_step([ChunkSave(f"c{i}", ids) for i, ids in enumerate(src_ids)])
        saver.drain_saves()
        assert engine.contains_many([artifact_key(NS, f"c{i}") for i in range(3)]) == [True] * 3
        load = RequestLoad("r", [ChunkLoad(f"c{i}", len(s), 0, d)
                                 for i, (s, d) in enumerate(zip(src_ids, dst_ids))],
                           mode == "async", BLOCK)
        loader.start_loads(StrataCacheConnectorMetadata(loads=[load]))
        if mode == "async":
            import time
            deadline = time.time() + 30
            while not loader.finished_loads() and time.time() < deadline:
                time.sleep(0.01)
        assert loader.take_load_errors() == set()
        assert loader.stats.totals()["load_chunks"] == 3
    return [b for ids in src_ids for b in ids], [b for ids in dst_ids for b in ids]


def assert_moved(src_layers, dst_layers, before, src_ids, dst_ids):
    for name in src_layers:
        for s, d in zip(src_ids, dst_ids):
            assert torch.equal(page_bytes(dst_layers[name], d), page_bytes(src_layers[name], s)), \
                (name, s, d)
        for b in range(NUM_BLOCKS):                   # blocks not loaded keep their bytes
            if b not in dst_ids:
                assert torch.equal(page_bytes(dst_layers[name], b), before[name][b])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_round_trips_byte_exact(engine_factory, device, layout, kind):
    """Save from one cache, load into a fresh one: every loaded page equals the original, and
    no other byte of the fresh cache changes. Pages that are one run are one plane; LHBNC and
    BHLNC pages are one run per head."""
    _, src = vllm_like_caches(layout, kind, device, stable_seed(layout, kind, "src"))
    _, dst = vllm_like_caches(layout, kind, device, stable_seed(layout, kind, "dst"))
    kv = PagedKV(src, layout=layout)
    heads = KINDS[kind][0]
    assert len(kv.planes) == LAYERS * (1 if layout in BLOCK_COMPACT else heads)
    assert kv.block_bytes == LAYERS * heads * BLOCK * KINDS[kind][1]
    before = {n: [page_bytes(t, b) for b in range(NUM_BLOCKS)] for n, t in dst.items()}
    src_ids, dst_ids = round_trip(engine_factory(), src, dst, "sync", layout=layout)
    assert_moved(src, dst, before, src_ids, dst_ids)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("mode", ["async", "layerwise"])
@pytest.mark.parametrize("layout", ["LHBNC", "BLNHC"])
def test_strided_and_permuted_layouts_load_in_every_mode(engine_factory, device, mode, layout):
    _, src = vllm_like_caches(layout, "bf16", device, stable_seed(layout, mode, "src"))
    _, dst = vllm_like_caches(layout, "bf16", device, stable_seed(layout, mode, "dst"))
    before = {n: [page_bytes(t, b) for b in range(NUM_BLOCKS)] for n, t in dst.items()}
    src_ids, dst_ids = round_trip(engine_factory(), src, dst, mode, layout=layout)
    assert_moved(src, dst, before, src_ids, dst_ids)


def test_a_page_that_is_no_set_of_runs_is_a_clear_error():
    """A layout whose innermost content is not contiguous (or far too fragmented) is refused
    with the layer, its shape and strides, and the layout named."""
    buf = torch.zeros(NUM_BLOCKS, 8, BLOCK, 64, dtype=torch.bfloat16)
    assert len(PagedKV({"permuted": buf.transpose(2, 3)}).planes) == 1   # dense: one run
    assert len(PagedKV({"half": buf[..., :32]}).planes) == 8 * BLOCK     # runs of 32 values
    for bad in (buf[..., ::2], torch.zeros(NUM_BLOCKS, 64, 32, 64)[..., :32]):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.attn.*LBHNC/FLASH_ATTN.*cannot "
                                             r"be copied by pages"):
            PagedKV({"model.layers.0.attn": bad}, layout="LBHNC/FLASH_ATTN")
    mixed = {"a": torch.zeros(NUM_BLOCKS, 2, 64), "b": torch.zeros(NUM_BLOCKS, 4, 64)}
    with pytest.raises(ValueError, match="layer b"):
        PagedKV(mixed)


def test_the_layout_is_part_of_the_kv_namespace(monkeypatch):
    """Two engines whose KV layouts differ never exchange bytes: the page layout names the
    resolved KVCacheLayout and the spec kind, and the namespace hashes it."""
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends import cpu_attn

    from stratacache.adapters.vllm.keys import page_layout

    monkeypatch.setattr(cpu_attn, "_get_attn_isa", lambda *args: "vec")
    spec = SimpleNamespace(block_size=BLOCK, head_size=64)
    names = set()
    for layout in LAYOUTS:
        cfg = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16),
                              cache_config=SimpleNamespace(cache_dtype="auto",
                                                           kv_cache_layout=layout))
        names.add(page_layout(cfg, spec))
    assert len(names) == len(LAYOUTS)
    spaces = {KVIdentity(model_name="m", weights="sha256:00", model_digest="d", kv_dtype="bf16",
                         layout=n, block_size=BLOCK, num_kv_heads=4, head_size=64,
                         tp_size=1).namespace(0)
              for n in names}
    assert len(spaces) == len(LAYOUTS)


# --------------------------------------------------------------------------- with vLLM itself

def _vllm_spec(kind: str):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    if kind == "mla":
        return MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=576,
                                dtype=torch.bfloat16)
    heads, _, dtype = KINDS[kind]
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=heads, head_size=64, dtype=dtype)


def _vllm_caches(layout: str, kind: str, seed: int, kernel_block_size=None):
    """The views vLLM's GPU model runner registers (vllm.v1.worker.utils.allocate_kv_cache)."""
    from vllm.v1.kv_cache_interface import KVCacheTensor, compute_layout_strides, \
        create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec, vl = _vllm_spec(kind), KVCacheLayout[layout]
    names = [f"model.layers.{l}.attn" for l in range(LAYERS)]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, LAYERS, vl)
    size = LAYERS * NUM_BLOCKS * spec.page_size_bytes
    tensor = KVCacheTensor(size=size, layers=names, layer_stride=layer_stride,
                           block_stride=block_stride)
    raw = torch.randint(-128, 128, (size,), dtype=torch.int8,
                        generator=torch.Generator().manual_seed(seed))
    views = create_kv_cache_views(raw, spec, NUM_BLOCKS, vl, tensor,
                                  kernel_block_size=kernel_block_size)
    return raw, dict(zip(names, views))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_synthetic_caches_are_vllms(layout, kind):
    pytest.importorskip("vllm")
    raw, theirs = _vllm_caches(layout, kind, 1)
    _, ours = vllm_like_caches(layout, kind, "cpu", 0, raw=raw)
    for name in theirs:
        assert theirs[name].shape == ours[name].shape and theirs[name].dtype == ours[name].dtype
        assert theirs[name].stride() == ours[name].stride(), (name, layout)
        assert theirs[name].data_ptr() == ours[name].data_ptr()


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vllm_built_caches_round_trip_byte_exact(engine_factory, layout, kind):
    pytest.importorskip("vllm")
    _, src = _vllm_caches(layout, kind, stable_seed("vllm", layout, kind, 0))
    _, dst = _vllm_caches(layout, kind, stable_seed("vllm", layout, kind, 1))
    before = {n: [page_bytes(t, b) for b in range(NUM_BLOCKS)] for n, t in dst.items()}
    src_ids, dst_ids = round_trip(engine_factory(), src, dst, "sync", layout=layout)
    assert_moved(src, dst, before, src_ids, dst_ids)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_kernel_block_split_caches_load_whole_manager_blocks(engine_factory, layout):
    """vLLM may split each manager block into kernel blocks (views with num_blocks * ratio
    rows): the worker copies whole manager blocks, addressed by the scheduler's block ids."""
    pytest.importorskip("vllm")
    _, src = _vllm_caches(layout, "bf16", 5, kernel_block_size=BLOCK // 2)
    _, dst = _vllm_caches(layout, "bf16", 6, kernel_block_size=BLOCK // 2)
    assert next(iter(src.values())).shape[0] == 2 * NUM_BLOCKS
    src_ids, dst_ids = round_trip(engine_factory(), src, dst, "sync", num_blocks=NUM_BLOCKS,
                                  layout=layout)
    for name in src:
        for s, d in zip(src_ids, dst_ids):
            for k in range(2):
                assert torch.equal(page_bytes(dst[name], 2 * d + k), page_bytes(src[name], 2 * s + k))
