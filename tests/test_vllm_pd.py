"""Disaggregated prefill at the scheduler: roles, kv_transfer_params, partial-chunk keys,
delay_free. No engine: requests are stand-ins with vLLM's fields (chained block hashes,
kv_transfer_params); the store is a real StorageEngine shared by a producer and a consumer
side, as the shared region is between two vLLM instances on one host."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from stratacache.adapters.vllm.keys import ChunkGeometry, artifact_key
from stratacache.adapters.vllm.scheduler import PD_PARAMS_KEY, SchedulerSide
from stratacache.adapters.vllm.stats import StatsCounter
from stratacache.adapters.vllm.settings import kv_transfer_config
from stratacache.config import ConfigError, load_config
from stratacache.engine import StorageEngine
from tests.test_vllm_scheduler import (BS, CHUNK, NS, FakeBlockState, FakeOutput, FakeRequest,
                                       store_ends, tokens)

GEOMETRY = ChunkGeometry(CHUNK, BS, BS)


@pytest.fixture
def engine():
    eng = StorageEngine(load_config(None, {"tiers.shared.enabled": False,
                                           "tiers.cpu.capacity": "64MiB"}), tiers=["cpu"])
    yield eng
    eng.close()


@dataclass
class PDRequest(FakeRequest):
    kv_transfer_params: dict = None


def side_for(engine, role: str, *, partial: bool = False, load_async: bool = False,
             geometry: ChunkGeometry = GEOMETRY, namespace: str = NS) -> SchedulerSide:
    return SchedulerSide(geometry=geometry, namespaces=[namespace], lookup_engine=engine,
                         save_partial_chunks=partial, load_async=load_async,
                         stats=StatsCounter(), role=role)


def prefill(side: SchedulerSide, req: PDRequest) -> list:
    """Run a producer's prefill of the whole prompt in one step: the step's saves."""
    block_ids = list(range(1000, 1000 + -(-req.num_tokens // BS)))
    side.on_alloc(req, block_ids, 0)
    meta = side.build_meta(FakeOutput({req.request_id: req.num_tokens},
                                      FakeBlockState({req.request_id: block_ids})))
    req.num_computed_tokens = req.num_tokens
    return meta.saves


def store_saves(engine, saves) -> None:
    """What the producer's workers do with the saves: one stored payload per name."""
    for save in saves:
        payload = torch.full((len(save.block_ids) * 8,), 3, dtype=torch.uint8)
        assert engine.store(artifact_key(NS, save.name), payload, checksum=None)


def expected_load(prompt_len: int) -> int:
    """What a decode instance loads: the prompt less its last token, rounded down to a block."""
    return (prompt_len - 1) // BS * BS


def test_unknown_role_is_rejected(engine):
    with pytest.raises(ValueError, match="kv_role.*kv_sender"):
        side_for(engine, "kv_sender")
    with pytest.raises(ConfigError, match="kv_role: 'kv_sender'"):
        kv_transfer_config(kv_role="kv_sender")
    assert kv_transfer_config(kv_role="kv_consumer")["kv_role"] == "kv_consumer"


def test_producer_never_loads_and_consumer_never_stores(engine):
    req = PDRequest("r1", tokens(3 * CHUNK + 5, 1))
    store_ends(engine, req, [CHUNK, 2 * CHUNK, 3 * CHUNK])
    producer = side_for(engine, "kv_producer", load_async=True)
    assert producer.matched_tokens(req, 0) == (0, False)
    assert len(prefill(producer, PDRequest("r2", tokens(3 * CHUNK + 5, 1)))) == 3
    consumer = side_for(engine, "kv_consumer")
    assert consumer.matched_tokens(req, 0) == (3 * CHUNK, False)
    assert prefill(consumer, PDRequest("r3", tokens(2 * CHUNK, 2))) == []
    both = side_for(engine, "kv_both")
    assert both.matched_tokens(req, 0) == (3 * CHUNK, False)


@pytest.mark.parametrize("role", ["kv_producer", "kv_both"])
def test_remote_decode_stores_every_range_and_frees_late(engine, role):
    """do_remote_decode: the partial chunk is saved even with save_partial_chunks off, every
    save names its request, request_finished delays the free and returns the parameters,
    and the next step tells the workers to report the request in finished_sending."""
    side = side_for(engine, role, partial=False)
    n = 2 * CHUNK + 3 * BS + 5
    req = PDRequest("p1", tokens(n, 3), kv_transfer_params={"do_remote_decode": True,
                                                            "do_remote_prefill": False})
    saves = prefill(side, req)
    partial_end = 2 * CHUNK + 3 * BS
    assert [s.name for s in saves] == [GEOMETRY.name_at(req.block_hashes, CHUNK),
                                       GEOMETRY.name_at(req.block_hashes, 2 * CHUNK),
                                       GEOMETRY.partial_name(req.block_hashes, partial_end)]
    assert [len(s.block_ids) for s in saves] == [4, 4, 3]
    assert {s.req_id for s in saves} == {"p1"}
    delay, params = side.request_finished(req)
    assert delay is True
    assert params == {"do_remote_prefill": True, "do_remote_decode": False,
                      PD_PARAMS_KEY: {"version": 1, "namespace": NS, "num_tokens": partial_end,
                                      "chunks": [s.name for s in saves]}}
    meta = side.build_meta(FakeOutput({}, FakeBlockState({})))
    assert meta.sending_req_ids == {"p1"} and not meta.is_empty()
    assert side.build_meta(FakeOutput({}, FakeBlockState({}))).sending_req_ids == set()
    assert all(v == 0 for v in side.state_sizes().values())
    assert side.stats.totals()["pd_sent_requests"] == 1


def test_plain_requests_and_consumers_free_at_once(engine):
    producer = side_for(engine, "kv_producer")
    plain = PDRequest("a", tokens(CHUNK + 5, 4))
    assert all(s.req_id is None for s in prefill(producer, plain))
    assert producer.request_finished(plain) == (False, None)
    consumer = side_for(engine, "kv_consumer")
    asked = PDRequest("b", tokens(CHUNK + 5, 4), kv_transfer_params={"do_remote_decode": True})
    prefill(consumer, asked)
    assert consumer.request_finished(asked) == (False, None)   # a consumer stores nothing
    assert producer.build_meta(FakeOutput({}, FakeBlockState({}))).sending_req_ids == set()


@pytest.mark.parametrize("seed", range(6))
def test_consumer_loads_what_the_producer_stored(engine, seed):
    """Random prompt lengths (1-4 chunks, with and without a partial chunk, exact multiples):
    the consumer's remote prefill finds everything but the last token, rounded down to a
    block, loads it asynchronously (load_mode sync notwithstanding), through names that are
    exactly the parameters' chunks."""
    rng = random.Random(seed)
    lengths = [rng.randrange(1, 4 * CHUNK + CHUNK) for _ in range(4)] + [2 * CHUNK, 3 * CHUNK + 1]
    producer = side_for(engine, "kv_producer")
    consumer = side_for(engine, "kv_consumer", load_async=False)
    for i, n in enumerate(lengths):
        prompt = tokens(n, 100 * seed + i)
        p = PDRequest(f"p{i}", prompt, kv_transfer_params={"do_remote_decode": True})
        store_saves(engine, prefill(producer, p))
        _, params = producer.request_finished(p)
        d = PDRequest(f"d{i}", list(prompt), kv_transfer_params=dict(params))
        matched, is_async = consumer.matched_tokens(d, 0)
        assert matched == expected_load(n), n
        assert is_async is (matched > 0)
        block_ids = list(range(-(-n // BS)))
        consumer.on_alloc(d, block_ids, matched)
        meta = consumer.build_meta(FakeOutput({}, FakeBlockState({d.request_id: block_ids})))
        assert meta.saves == []
        if matched:
            (load,) = meta.loads
            assert load.is_async and load.remote
            assert [c.name for c in load.chunks] == params[PD_PARAMS_KEY]["chunks"]
            assert load.block_ids == block_ids[:matched // BS]
        consumer.request_finished(d)
    totals = consumer.stats.totals()
    assert totals["pd_requests"] == len(lengths)
    assert totals["pd_hit_tokens"] == sum(expected_load(n) for n in lengths)
    assert totals.get("pd_missing_tokens", 0) == 0 and totals.get("pd_rejected_params", 0) == 0
    assert all(v == 0 for v in consumer.state_sizes().values())


def _remote_pair(engine, n: int, seed: int):
    producer = side_for(engine, "kv_producer")
    prompt = tokens(n, seed)
    p = PDRequest("p", prompt, kv_transfer_params={"do_remote_decode": True})
    saves = prefill(producer, p)
    store_saves(engine, saves)
    _, params = producer.request_finished(p)
    return prompt, saves, params


def test_missing_chunks_are_counted_and_computed(engine):
    """The producer's middle chunk is gone: the consumer loads the chunk before it, counts
    the missing tokens and leaves the rest to vLLM."""
    n = 3 * CHUNK + 2 * BS + 1
    prompt, saves, params = _remote_pair(engine, n, 7)
    engine.delete(artifact_key(NS, saves[1].name))
    consumer = side_for(engine, "kv_consumer")
    d = PDRequest("d", list(prompt), kv_transfer_params=params)
    matched, is_async = consumer.matched_tokens(d, 0)
    assert (matched, is_async) == (CHUNK, True)
    consumer.on_alloc(d, list(range(20)), matched)
    totals = consumer.stats.totals()
    assert totals["pd_hit_tokens"] == CHUNK
    assert totals["pd_missing_tokens"] == expected_load(n) - CHUNK


@pytest.mark.parametrize("damage", ["namespace", "chunks", "num_tokens", "version", "absent"])
def test_parameters_that_do_not_check_out_are_refused(engine, damage):
    """Parameters from another model, another prompt or another format are not trusted: the
    request gets what a plain lookup finds (full chunks only with save_partial_chunks off,
    loaded the engine's own way), counted as a rejection."""
    n = 2 * CHUNK + 2 * BS + 3
    prompt, saves, params = _remote_pair(engine, n, 8)
    ours = dict(params[PD_PARAMS_KEY])
    if damage == "namespace":
        ours["namespace"] = NS.replace("tp0of1", "tp0of2")
    elif damage == "chunks":
        ours["chunks"] = list(reversed(ours["chunks"]))
    elif damage == "num_tokens":
        ours["num_tokens"] += BS
    elif damage == "version":
        ours["version"] = 2
    bad = dict(params, **{PD_PARAMS_KEY: ours})
    if damage == "absent":
        del bad[PD_PARAMS_KEY]
    consumer = side_for(engine, "kv_consumer")
    d = PDRequest("d", list(prompt), kv_transfer_params=bad)
    assert consumer.matched_tokens(d, 0) == (2 * CHUNK, False)
    assert consumer.stats.totals()["pd_rejected_params"] == 1
    assert consumer.stats.totals().get("pd_requests", 0) == 0


def test_a_remote_prefill_is_loaded_once(engine):
    """After its load (then, say, a preemption) the request looks up like any other."""
    n = 2 * CHUNK + BS + 2
    prompt, _, params = _remote_pair(engine, n, 9)
    consumer = side_for(engine, "kv_consumer")
    d = PDRequest("d", list(prompt), kv_transfer_params=params)
    assert consumer.matched_tokens(d, 0) == (expected_load(n), True)
    consumer.on_alloc(d, list(range(20)), expected_load(n))
    # Looked up again: the plain path, which without save_partial_chunks skips the partial.
    assert consumer.matched_tokens(d, 0) == (2 * CHUNK, False)
    assert consumer.stats.totals()["pd_requests"] == 1


def test_partial_and_full_chunk_keys_never_match():
    """Geometries whose boundaries coincide: a partial chunk of 64-token chunks ending at
    token 96 (2 blocks) and a full chunk of 32-token chunks ending there (2 blocks), or of
    128-token chunks' partial (6 blocks). The hash at token 96 is the same; the names must
    not be, or one engine would take the other's payload for its own."""
    req = FakeRequest("r", tokens(200, 10))
    g64, g32, g128 = (ChunkGeometry(c, BS, BS) for c in (64, 32, 128))
    names = {g64.partial_name(req.block_hashes, 96), g32.range_name(req.block_hashes, 96),
             g128.partial_name(req.block_hashes, 96)}
    assert len(names) == 3
    assert g64.range_name(req.block_hashes, 128) == g64.name_at(req.block_hashes, 128)
    with pytest.raises(ValueError, match="chunk boundary"):
        g64.partial_name(req.block_hashes, 128)


def test_full_chunk_lookup_never_finds_a_partial_payload(engine):
    """Two engines on one store, with 32- and 64-token chunks: the 64-token engine must not
    take the 32-token engine's full chunk ending at token 96 for its partial chunk [64, 96),
    and the 32-token engine must not take that partial chunk for its full chunk."""
    g32 = ChunkGeometry(32, BS, BS)
    small = side_for(engine, "kv_both", partial=True, geometry=g32)
    large = side_for(engine, "kv_both", partial=True)
    prompt = tokens(3 * 32 + 5, 11)
    store_saves(engine, prefill(small, FakeRequest("a", prompt)))    # full chunks at 32, 64, 96
    assert large.matched_tokens(FakeRequest("b", list(prompt)), 0) == (64, False)

    other = tokens(3 * 32 + 5, 12)
    saves = prefill(large, FakeRequest("c", other))                   # full 64, partial to 96
    assert [len(s.block_ids) for s in saves] == [4, 2]
    store_saves(engine, saves[1:])
    hashes = FakeRequest("h", other).block_hashes
    for end in (32, 64):
        engine.store(artifact_key(NS, g32.name_at(hashes, end)),
                     torch.zeros(16, dtype=torch.uint8), checksum=None)
    assert small.matched_tokens(FakeRequest("d", list(other)), 0) == (64, False)
