"""One rule set for keys and payloads, checked once at the engine API: caller mistakes
raise (naming the argument) instead of being counted as tier faults, and whatever the
engine accepts, every tier (cpu, shared region, disk, real Redis) stores and returns
byte-exact with its dtype and shape, 0-dim tensors included."""

from __future__ import annotations

import os
import random
import uuid

import pytest
import torch

from stratacache.config import load_config
from stratacache.core.keys import ArtifactKey
from stratacache.engine import StorageEngine
from stratacache.engine.engine import MAX_KEY_BYTES, STORABLE_DTYPES
from tests.redis_server import RedisServer

TIERS = ("cpu", "shared", "disk", "redis")


@pytest.fixture(scope="module")
def redis_url():
    with RedisServer() as srv:
        yield srv.url


@pytest.fixture
def engine(tmp_path, redis_url):
    region = f"/dev/shm/sc-rules-{os.getpid()}-{uuid.uuid4().hex[:8]}.region"
    cfg = load_config(overrides={"tiers": {
        "cpu": {"enabled": True, "capacity": "64MiB", "pin_memory": False},
        "shared": {"enabled": True, "path": region, "capacity": "64MiB", "max_objects": 4096,
                   "reset": True, "prefault": 0},
        "disk": {"enabled": True, "path": str(tmp_path / "disk"), "capacity": "64MiB"},
        "redis": {"enabled": True, "url": redis_url, "key_prefix": f"rules{uuid.uuid4().hex[:6]}:"}}})
    eng = StorageEngine(cfg)
    assert eng.tier_names == tuple(TIERS)
    yield eng
    eng.close()
    if os.path.exists(region):
        os.unlink(region)


def K(name: str) -> ArtifactKey:
    return ArtifactKey("custom", "rules", name)


def tier_faults(eng) -> dict:
    return {name: s["errors"] for name, s in eng.stats()["tiers"].items()}


@pytest.mark.parametrize("bad", [None, "kv/rules/x", b"kv\x1frules\x1fx", 7])
def test_a_key_that_is_not_an_artifact_key_raises_and_counts_no_fault(engine, bad):
    before = tier_faults(engine)
    payload = torch.arange(16, dtype=torch.uint8)
    calls = {
        "load": lambda: engine.load(bad),
        "load out": lambda: engine.load(bad, out=torch.empty(64, dtype=torch.uint8)),
        "delete": lambda: engine.delete(bad),
        "contains": lambda: engine.contains(bad),
        "store": lambda: engine.store(bad, payload),
        "store exact": lambda: engine.store(bad, payload, tier="disk", mode="exact"),
    }
    for what, call in calls.items():
        with pytest.raises(TypeError, match=r"^key must be an ArtifactKey"):
            call()
    with pytest.raises(TypeError, match=r"^key must be an ArtifactKey"):
        with engine.pinned(bad):
            pass
    with pytest.raises(TypeError, match=r"^keys\[1\] must be an ArtifactKey"):
        engine.load_many([K("a"), bad])
    with pytest.raises(TypeError, match=r"^items\[1\]\.key must be an ArtifactKey"):
        engine.store_many([(K("a"), payload), (bad, payload)])
    assert tier_faults(engine) == before
    assert engine.stats()["engine"]["loads"] == 0


def test_mixed_key_types_in_lookups_are_a_clear_type_error(engine):
    keys = [K(f"m{i}") for i in range(4)]
    assert engine.store_many([(k, torch.full((8,), i, dtype=torch.uint8))
                              for i, k in enumerate(keys)]) == [True] * 4
    assert engine.prefix_lookup(keys) == 4
    assert engine.prefix_lookup([k.encode() for k in keys]) == 4
    for mixed, bad in (([keys[0], keys[1].encode()], 1), ([keys[0].encode(), keys[1]], 1),
                       ([keys[0], "custom/rules/m1", keys[2]], 1), ([keys[0].encode(), None], 1)):
        for call in (engine.prefix_lookup, engine.contains_many):
            with pytest.raises(TypeError, match=rf"^keys\[{bad}\]"):
                call(mixed)


def test_payloads_no_tier_can_store_are_refused_at_the_api(engine):
    before = tier_faults(engine)
    with pytest.raises(TypeError, match="payload dtype torch.complex64 cannot be stored"):
        engine.store(K("c"), torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="payload has 17 dims; at most 16"):
        engine.store(K("d"), torch.zeros([1] * 17))
    long_key = ArtifactKey("custom", "rules", "x" * MAX_KEY_BYTES)
    with pytest.raises(ValueError, match=rf"encodes to \d+ bytes; keys are at most {MAX_KEY_BYTES}"):
        engine.store(long_key, torch.zeros(4))
    with pytest.raises(TypeError, match=r"^items\[0\]\.payload dtype"):
        engine.store_many([(K("e"), torch.zeros(2, dtype=torch.complex128))])
    assert tier_faults(engine) == before
    assert not any(engine.contains(K(n)) for n in "cde")


def _random_tensor(rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    ndim = rng.choice([0, 0, 1, 2, 3, rng.randint(4, 16)])
    shape = [rng.randint(1, 3) if ndim > 6 else rng.randint(0 if rng.random() < 0.1 else 1, 9)
             for _ in range(ndim)]
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * dtype.itemsize,),
                        generator=torch.Generator().manual_seed(rng.randrange(1 << 30)),
                        dtype=torch.uint8)
    return raw.view(dtype).view(shape) if shape else raw.view(dtype).reshape(())


def test_what_the_engine_accepts_every_tier_returns_with_dtype_and_shape(engine):
    rng = random.Random(2024)
    cases = []
    for dtype in sorted(STORABLE_DTYPES, key=str):
        for j in range(3):
            cases.append((K(f"{dtype}-{j}"), _random_tensor(rng, dtype)))
    cases.append((K("zero-dim-uint8"), torch.tensor(200, dtype=torch.uint8)))
    cases.append((K("zero-dim-f32"), torch.tensor(1.5)))
    name_len = MAX_KEY_BYTES - len("custom\x1frules\x1f".encode())
    cases.append((ArtifactKey("custom", "rules", "L" * name_len), torch.arange(5.0)))
    cases.append((K("bytes"), bytes(range(7))))
    for name in TIERS:
        for key, payload in cases:
            assert engine.store(key, payload, tier=name, mode="exact"), (name, key)
        for key, payload in cases:
            art = engine.load(key, tier=name, mode="exact")
            assert art is not None, (name, key)
            got = art.tensor()
            want = payload if isinstance(payload, torch.Tensor) else \
                torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            assert got.dtype == want.dtype and got.shape == want.shape, (name, key, got.shape)
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
            engine.delete(key)
    assert all(v == 0 for v in tier_faults(engine).values()), tier_faults(engine)
