"""Parameter offload on the storage plane: bit-exact outputs, bounded residency, persistence,
cross-process sharing, protection from KV eviction and clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from stratacache.adapters.torch import (InferenceOnlyError, ParameterStoreClient, ParamMissing, ParamRecord,
                                        ParamStoreError, load_from_plane, offload, save_to_plane)
from stratacache.config import load_config
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine

NUM_LAYERS = 6


def make_engine(tmp_path, *, cpu="64MiB", shared=None, disk=None, tiers=None,
                shared_capacity="64MiB", lease_s=30.0) -> StorageEngine:
    """An engine over real tiers; ``shared`` is a region path, ``disk`` a directory."""
    spec = {"cpu": {"enabled": cpu is not None, "capacity": cpu or "1MiB"},
            "shared": {"enabled": shared is not None, "capacity": shared_capacity, "max_objects": 4096,
                       "path": shared or str(tmp_path / "unused.region")},
            "disk": {"enabled": disk is not None, "capacity": "256MiB", "path": disk or str(tmp_path / "unused")},
            "redis": {"enabled": False}}
    return StorageEngine(load_config(overrides={"tiers": spec, "lease_s": lease_s}), tiers=tiers)


def tiny_llama(seed: int = 0, layers: int = NUM_LAYERS, hidden: int = 64, intermediate: int = 160):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def prompt(seed: int, batch: int = 2, tokens: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.clone()


# --- ParameterStoreClient ---------------------------------------------------------------------

def test_client_round_trips_sharded_tensors_byte_exact(tmp_path):
    engine = make_engine(tmp_path)
    client = ParameterStoreClient(engine, "org/model", "rev-1", shard_bytes=1000)
    gen = torch.Generator().manual_seed(7)
    for i, (dtype, shape) in enumerate([(torch.bfloat16, (33, 17)), (torch.float32, (5, 3, 41)),
                                        (torch.int8, (999,)), (torch.float16, (1,)), (torch.int64, (130,))]):
        raw = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        tensor = raw.view(dtype).view(shape)
        record = client.put(f"model.layers.{i}.mlp", "weight", tensor)
        assert record.num_shards == max(1, -(-tensor.nbytes // 1000))
        keys = client.keys(record)
        assert all(k.kind == "params" and k.namespace == "org/model@rev-1" for k in keys)
        assert keys[-1].name == (f"model.layers.{i}.mlp/weight/{record.num_shards - 1}of{record.num_shards}/"
                                 f"{str(dtype).removeprefix('torch.')}")
        poisoned = torch.full(shape, 3, dtype=dtype) if dtype.is_floating_point else torch.full(shape, 3, dtype=dtype)
        back = client.get(record, out=poisoned)
        assert back.view(torch.uint8).reshape(-1).tolist() == raw.tolist()
        with client.view(record) as view:
            assert view.dtype == dtype and tuple(view.shape) == shape
            assert torch.equal(view.reshape(-1).view(torch.uint8), raw)
    engine.close()


def test_client_reports_missing_and_mismatched_tensors(tmp_path):
    engine = make_engine(tmp_path)
    client = ParameterStoreClient(engine, "m", "r")
    record = client.put("layer", "w", torch.arange(12, dtype=torch.float32))
    with pytest.raises(ParamMissing, match="not in the storage plane"):
        client.get(ParamRecord("layer", "other", torch.float32, (12,)))
    wrong = ParamRecord("layer", "w", torch.float32, (24,))        # same key, different size
    engine.store(client.keys(wrong)[0], torch.arange(12, dtype=torch.float32))
    with pytest.raises(ParamStoreError, match="different tensor"):
        client.get(wrong)
    assert client.contains([record, ParamRecord("x", "y", torch.int8, (1,))]) == [True, False]
    for bad in ({"model_id": ""}, {"model_id": "a\x1fb"}, {"revision": "a@b"}, {"shard_bytes": 0}):
        kwargs = {"model_id": "m", "revision": "r", **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            ParameterStoreClient(engine, kwargs.pop("model_id"), **kwargs)
    engine.close()


# --- offload(): outputs, residency, hooks ------------------------------------------------------

@pytest.mark.parametrize("zero_copy,prefetch", [(True, 0), (True, 2), (False, 1), (False, 3)])
def test_offloaded_outputs_bit_identical_to_resident(tmp_path, zero_copy, prefetch):
    engine = make_engine(tmp_path)
    model = tiny_llama(seed=prefetch)
    ids = [prompt(s) for s in range(3)]
    want = [logits(model, x) for x in ids]
    resident = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = offload(model, engine, prefetch=prefetch, zero_copy=zero_copy, shard_bytes=4096)
    layer_params = [n for n, p in model.named_parameters() if n.startswith("model.layers.")]
    assert layer_params and all(p.device.type == "meta" for n, p in model.named_parameters()
                                if n.startswith("model.layers."))
    assert model.model.embed_tokens.weight.device.type == "cpu"
    for _ in range(2):                                     # repeated passes reuse the prefetch window
        for x, w in zip(ids, want):
            assert torch.equal(logits(model, x), w)
    assert handle.prefetch_hits > 0 if prefetch else handle.prefetch_hits == 0
    handle.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, resident[n]), n
    assert torch.equal(logits(model, ids[0]), want[0])
    assert all(s["items"] == 0 for s in engine.stats()["tiers"].values())   # private keys deleted
    engine.close()


def test_greedy_generation_identical_offloaded(tmp_path):
    engine = make_engine(tmp_path)
    model = tiny_llama(seed=8)
    ids = prompt(9, batch=1)
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=10, do_sample=False)
    handle = offload(model, engine, prefetch=2, zero_copy=False)
    with torch.inference_mode():
        got = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    assert handle.loads >= 10 * NUM_LAYERS and handle.prefetch_hits >= handle.loads - 2 * 2
    handle.close()
    engine.close()


@pytest.mark.parametrize("prefetch,zero_copy", [(1, True), (2, False), (3, True)])
def test_peak_resident_parameter_bytes_bounded_by_prefetch_window(tmp_path, prefetch, zero_copy):
    engine = make_engine(tmp_path)
    model = tiny_llama(layers=8)
    handle = offload(model, engine, prefetch=prefetch, zero_copy=zero_copy)
    layers = list(model.model.layers)
    full = handle.offloaded_bytes
    layer_bytes = max(handle.unit_bytes)
    bound = (prefetch + 1) * full / len(layers) + layer_bytes

    # Independent tensor accounting: at every submodule call inside the layers, sum the bytes of
    # layer parameters that are materialized (not meta placeholders).
    seen = []

    def measure(*_):
        seen.append(sum(p.nbytes for layer in layers for p in layer.parameters() if p.device.type != "meta"))

    hooks = [m.register_forward_pre_hook(measure) for layer in layers for m in layer.modules()]
    handle.reset_peak()
    for seed in range(2):
        logits(model, prompt(seed))
    for h in hooks:
        h.remove()
    assert len(seen) > len(layers) and min(seen) >= min(handle.unit_bytes)   # a real measurement
    assert max(seen) <= bound
    assert handle.peak_resident_bytes >= max(seen)        # its accounting also counts prefetched layers
    assert handle.peak_resident_bytes <= bound
    assert handle.peak_resident_bytes >= (prefetch + 1) * min(handle.unit_bytes) * 0.99
    handle.close()
    assert handle.resident_bytes == 0
    engine.close()


def test_gradients_requested_is_a_clear_error(tmp_path):
    engine = make_engine(tmp_path)
    model = tiny_llama()
    ids = prompt(1)
    want = logits(model, ids)
    handle = offload(model, engine, prefetch=2)
    with pytest.raises(InferenceOnlyError, match=r"torch\.no_grad\(\) or torch\.inference_mode\(\)"):
        model(ids)
    assert handle.resident_bytes == 0                    # the failed call left nothing bound
    with torch.no_grad(), pytest.raises(RuntimeError, match="called outside its offload unit model.layers.2"):
        model.model.layers[2].mlp(torch.ones(1, 64, dtype=torch.bfloat16))   # meta weights would run silently
    assert torch.equal(logits(model, ids), want)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    handle.close()
    with pytest.raises(RuntimeError, match="offload handle was closed"):   # placeholders refuse to run
        logits(model, ids)
    engine.close()


def test_offload_rejects_bad_arguments(tmp_path):
    engine = make_engine(tmp_path)
    model = tiny_llama()
    with pytest.raises(ValueError, match="prefetch"):
        offload(model, engine, prefetch=-1)
    with pytest.raises(ValueError, match="model.nope"):
        offload(model, engine, submodules=["model.nope"])
    with pytest.raises(ValueError, match="overlap"):
        offload(model, engine, submodules=["model.layers", "model.layers.0"])
    with pytest.raises(ValueError, match="zero_copy"):
        offload(model, engine, device="meta", zero_copy=True)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared"):
        offload(tied, engine, submodules=[tied[0]])
    with pytest.raises(ValueError, match="ModuleList"):
        offload(nn.Linear(3, 3), engine)
    assert all(p.device.type == "cpu" for p in model.parameters())   # nothing was released
    with pytest.raises(ParamMissing, match="no model absent@main"):
        load_from_plane(engine, "absent")
    engine.close()


def test_offload_explicit_submodules_of_a_plain_module(tmp_path):
    engine = make_engine(tmp_path)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = model(x)
    handle = offload(model, engine, prefetch=1, submodules=[model[0], "2", model[4]], zero_copy=False)
    assert model[3].weight.device.type == "cpu" and model[2].weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert handle.stats()["units"] == 3
    handle.close()
    engine.close()


def test_save_and_load_plain_module_with_builder_and_tied_weights(tmp_path):
    engine = make_engine(tmp_path)

    def build():
        m = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 64))
        m[4].weight = m[2].weight                       # tied outside the units: stored once
        m.register_buffer("scale", torch.tensor([0.5, 2.0]))
        return m

    torch.manual_seed(4)
    model = build()
    with torch.no_grad():
        model[3].weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = model(x) * model.scale[1]
    manifest = save_to_plane(model, engine, "plain", "r0", submodules=[model[0], model[3]])
    assert manifest["architecture"] is None and manifest["units"] == ["0", "3"]
    assert sum("alias" in e for e in manifest["tensors"]) == 1
    handle = load_from_plane(engine, "plain", "r0", prefetch=1, builder=build)
    loaded = handle.model
    assert loaded[4].weight is loaded[2].weight and loaded[2].weight.device.type == "cpu"
    assert loaded[0].weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(loaded(x) * loaded.scale[1], want)
    with pytest.raises(ValueError, match="builder="):
        load_from_plane(engine, "plain", "r0")
    handle.close()
    engine.close()


# --- persistence and sharing ---------------------------------------------------------------------

def test_restart_loads_model_from_disk_tier_without_checkpoint(tmp_path):
    disk = str(tmp_path / "plane")
    model = tiny_llama(seed=5)
    ids = prompt(2)
    want = logits(model, ids)
    engine = make_engine(tmp_path, cpu=None, disk=disk)
    manifest = save_to_plane(model, engine, "local/tiny-llama", "v1")
    assert manifest["units"] == [f"model.layers.{i}" for i in range(NUM_LAYERS)]
    engine.close()
    del model

    engine = make_engine(tmp_path, cpu=None, disk=disk)           # a "restarted" process
    handle = load_from_plane(engine, "local/tiny-llama", "v1", prefetch=2)
    assert torch.equal(logits(handle.model, ids), want)
    with pytest.raises(ParamMissing):
        load_from_plane(engine, "local/tiny-llama", "v2")
    record = ParamRecord("model.layers.3.mlp.up_proj", "weight", torch.bfloat16, (160, 64))
    ParameterStoreClient(engine, "local/tiny-llama", "v1").delete([record])
    with pytest.raises(ParamMissing, match="1 of .* tensors are not in the plane"):
        load_from_plane(engine, "local/tiny-llama", "v1")
    handle.close()
    engine.close()


def test_corrupted_shared_weights_are_refused_never_used(tmp_path, region_path):
    model = tiny_llama(seed=12)
    ids = prompt(5)
    want = logits(model, ids)
    engine = make_engine(tmp_path, cpu=None, shared=region_path)
    record = ParamRecord("model.layers.4.mlp.down_proj", "weight", torch.bfloat16, (64, 160))

    def wild_write(revision):                          # flip bits in the region behind the tier's back
        with ParameterStoreClient(engine, "local/tiny-llama", revision).view(record) as weight:
            weight.view(torch.uint8).view(-1)[77] ^= 0x5A

    save_to_plane(model, engine, "local/tiny-llama", "a")
    wild_write("a")
    handle = load_from_plane(engine, "local/tiny-llama", "a", prefetch=1)      # verify="once"
    with pytest.raises(ParamMissing, match="model.layers.4.mlp.down_proj/weight"):
        logits(handle.model, ids)                      # first read here is verified: refused
    assert handle.resident_bytes == 0
    with pytest.raises(ParamMissing, match="1 of"):    # the corrupt object was dropped from the tier
        load_from_plane(engine, "local/tiny-llama", "a")
    handle.close()

    save_to_plane(model, engine, "local/tiny-llama", "b")
    watchful = load_from_plane(engine, "local/tiny-llama", "b", prefetch=1, verify="always")
    assert torch.equal(logits(watchful.model, ids), want)
    wild_write("b")                                    # after the weights were read and verified
    with pytest.raises(ParamMissing, match="model.layers.4.mlp.down_proj/weight"):
        logits(watchful.model, ids)                    # verified on every read: caught
    watchful.close()
    engine.close()


_CHILD = textwrap.dedent("""
    import sys, torch
    from stratacache.adapters.torch import load_from_plane
    from stratacache.config import load_config
    from stratacache.engine import StorageEngine
    region, out, prompt_path = sys.argv[1:4]
    cfg = load_config(overrides={"tiers": {"cpu": {"enabled": False}, "disk": {"enabled": False},
                                           "redis": {"enabled": False},
                                           "shared": {"enabled": True, "path": region, "capacity": "64MiB",
                                                      "max_objects": 4096}}})
    engine = StorageEngine(cfg, tiers=["shared"])
    handle = load_from_plane(engine, "local/tiny-llama", "shared-test", prefetch=2)
    ids = torch.from_numpy(__import__("numpy").fromfile(prompt_path, dtype="int64")).view(2, -1)
    with torch.inference_mode():
        handle.model(ids).logits.float().numpy().tofile(out)
    handle.close()
    engine.close()
""")


def test_second_process_loads_model_from_shared_region(tmp_path, region_path):
    model = tiny_llama(seed=11)
    ids = prompt(4)
    want = logits(model, ids)
    engine = make_engine(tmp_path, cpu=None, shared=region_path)
    save_to_plane(model, engine, "local/tiny-llama", "shared-test")
    engine.close()                                     # the writer is gone; the region persists
    del model
    ids.numpy().tofile(tmp_path / "prompt.bin")
    out = tmp_path / "child.bin"
    proc = subprocess.run([sys.executable, "-c", _CHILD, region_path, str(out), str(tmp_path / "prompt.bin")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.fromfile(out, dtype=np.float32).reshape(want.shape)
    assert np.array_equal(got, want.float().numpy())


# --- mixed workload -------------------------------------------------------------------------------

def test_kv_traffic_at_ten_times_capacity_never_evicts_params_in_use(tmp_path, region_path):
    cpu_capacity, shared_capacity = 2 << 20, 4 << 20
    # Leases of 0.6 s: the model's leases must be renewed many times while the KV flood runs.
    engine = make_engine(tmp_path, cpu=cpu_capacity, shared=region_path, shared_capacity=shared_capacity,
                         lease_s=0.6)
    model = tiny_llama(seed=9)
    ids = prompt(6)
    want = logits(model, ids)
    handle = offload(model, engine, prefetch=2, model_id="local/tiny-llama", revision="mixed")
    param_keys = [k for u in handle.units for s in u.slots for k in handle.client.keys(s.record)]
    assert 0 < handle.offloaded_bytes < cpu_capacity // 2

    def params_in_every_tier():
        return all(engine.contains(k, mode="exact", tier=t) for k in param_keys for t in ("cpu", "shared"))

    assert params_in_every_tier()
    gen = torch.Generator().manual_seed(1)
    chunk = 256 << 10
    total = 10 * (cpu_capacity + shared_capacity) // chunk
    stored = []
    for step in range(total):
        key = ArtifactKey("kv", "tiny@bf16", f"chunk-{step}")
        if engine.store(key, torch.randint(0, 256, (chunk,), dtype=torch.uint8, generator=gen)):
            stored.append(key)
        if step % 32 == 0:
            assert params_in_every_tier()
            assert torch.equal(logits(model, ids), want)
            time.sleep(0.7)                            # past any lease that was not renewed
    assert len(stored) == total                       # KV was admitted (by evicting older KV) ...
    assert sum(engine.contains_many(stored)) < total // 5   # ... so most of it is gone again
    assert params_in_every_tier()
    assert torch.equal(logits(model, ids), want)
    handle.close()
    engine.close()


# --- GPU ------------------------------------------------------------------------------------------

class _MlpStack(nn.Module):
    """A plain torch model (the GPU machine may lack transformers): embedding, blocks, head."""

    def __init__(self, layers: int = 8, width: int = 512):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                                  nn.Linear(2 * width, width), nn.LayerNorm(width))
                                    for _ in range(layers))
        self.head = nn.Linear(width, 256)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.mark.gpu
def test_gpu_offload_bit_identical_and_bounded(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    engine = make_engine(tmp_path)
    torch.manual_seed(2)
    model = _MlpStack().to(torch.bfloat16).eval()        # 8 blocks of 2 MiB: weights dominate activations
    ids = prompt(3).cuda()
    with torch.inference_mode():
        want = model.to("cuda")(ids).clone()
    model.to("cpu")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    handle = offload(model, engine, prefetch=2, device="cuda")
    assert handle.device.type == "cuda" and not handle.zero_copy and len(handle.units) == 8
    rest = torch.cuda.memory_allocated() - base          # embedding and head moved to the GPU
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        with torch.inference_mode():
            assert torch.equal(model(ids), want)
    assert handle.prefetch_hits > 0
    bound = 3 * handle.offloaded_bytes / 8 + max(handle.unit_bytes)
    assert handle.peak_resident_bytes <= bound
    measured = torch.cuda.max_memory_allocated() - base - rest     # the CUDA allocator's own peak
    assert max(handle.unit_bytes) <= measured <= bound + (1 << 20)  # 1 MiB for activations
    handle.restore()
    assert all(p.device.type == "cuda" for p in model.parameters())
    with torch.inference_mode():
        assert torch.equal(model(ids), want)
    engine.close()
