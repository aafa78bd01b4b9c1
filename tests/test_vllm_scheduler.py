"""Scheduler-side planning: lookups, load plans, save plans, events and state clean-up.

Requests are small stand-ins carrying the fields vLLM's Request gives the
connector (ids, token counts, chained block hashes); the store is a real
StorageEngine.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from stratacache.adapters.vllm.keys import ChunkGeometry, artifact_key
from stratacache.adapters.vllm.metadata import StrataCacheWorkerMetadata
from stratacache.adapters.vllm.scheduler import SchedulerSide
from stratacache.adapters.vllm.stats import StatsCounter
from stratacache.config import load_config
from stratacache.engine import StorageEngine

BS = 16          # block size
CHUNK = 64       # 4 blocks
NS = "vllm-test-ns-tp0of1"


def chained_hashes(tokens: list[int], block: int = BS) -> list[bytes]:
    out, prev = [], b"seed"
    for i in range(len(tokens) // block):
        prev = hashlib.sha256(prev + repr(tokens[i * block:(i + 1) * block]).encode()).digest()
        out.append(prev)
    return out


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    block_hashes: list = field(default_factory=list)
    prompt_len: Optional[int] = None      # None: every token is a prompt token

    def __post_init__(self):
        self.block_hashes = chained_hashes(self.all_token_ids)

    def append_output(self, token: int) -> None:
        """A sampled token, as vLLM appends it (its block hashes extended)."""
        self.all_token_ids.append(token)
        self.block_hashes = chained_hashes(self.all_token_ids)

    @property
    def num_tokens(self):
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self):
        return len(self.all_token_ids) if self.prompt_len is None else self.prompt_len


class FakeBlockState:
    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def get_block_ids(self, req_id):
        return (self.table[req_id],) if req_id in self.table else None


@dataclass
class FakeOutput:
    num_scheduled_tokens: dict
    kv_connector_block_state: FakeBlockState
    preempted_req_ids: set = field(default_factory=set)


@pytest.fixture
def engine():
    cfg = load_config(None, {"tiers.shared.enabled": False, "tiers.cpu.capacity": "64MiB"})
    eng = StorageEngine(cfg, tiers=["cpu"])
    yield eng
    eng.close()


def make_side(engine, *, partial=False, load_async=False, events=None, save_decode=True):
    return SchedulerSide(geometry=ChunkGeometry(CHUNK, BS, BS), namespaces=[NS],
                         lookup_engine=engine, save_partial_chunks=partial, load_async=load_async,
                         save_decode_chunks=save_decode,
                         stats=StatsCounter(), events_enabled=events is not None,
                         make_events=events)


def store_ends(engine, req: FakeRequest, ends: list[int]) -> None:
    geometry = ChunkGeometry(CHUNK, BS, BS)
    for end in ends:
        key = artifact_key(NS, geometry.range_name(req.block_hashes, end))
        assert engine.store(key, torch.zeros(8, dtype=torch.uint8), checksum=0)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_lookup_counts_leading_chunks_only(engine):
    side = make_side(engine)
    req = FakeRequest("r1", tokens(5 * CHUNK + 10, 1))
    assert side.matched_tokens(req, 0) == (0, False)
    store_ends(engine, req, [CHUNK, 2 * CHUNK, 4 * CHUNK])      # chunk 2 missing
    assert side.matched_tokens(req, 0) == (2 * CHUNK, False)
    store_ends(engine, req, [3 * CHUNK])
    assert side.matched_tokens(req, 0) == (4 * CHUNK, False)
    # Beyond what vLLM computed locally only; nothing when local covers it all.
    assert side.matched_tokens(req, 3 * BS) == (4 * CHUNK - 3 * BS, False)
    assert side.matched_tokens(req, 4 * CHUNK) == (0, False)


def test_lookup_caps_at_num_tokens_minus_one(engine):
    side = make_side(engine)
    req = FakeRequest("r1", tokens(2 * CHUNK, 2))               # exactly two chunks
    store_ends(engine, req, [CHUNK])
    assert side.matched_tokens(req, 0) == (CHUNK, False)
    # The second chunk covers the last token, which vLLM must compute: only its head
    # (every whole block before that token) is loadable, as with vLLM's prefix cache.
    store_ends(engine, req, [2 * CHUNK])
    matched, _ = side.matched_tokens(req, 0)
    assert matched == 2 * CHUNK - BS
    block_ids = list(range(40, 48))
    side.on_alloc(req, block_ids, matched)
    meta = side.build_meta(FakeOutput({"r1": BS}, FakeBlockState({"r1": block_ids})))
    (load,) = meta.loads
    geometry = ChunkGeometry(CHUNK, BS, BS)
    assert [(c.name, c.num_blocks, c.skip_blocks, c.block_ids) for c in load.chunks] == [
        (geometry.name_at(req.block_hashes, CHUNK), 4, 0, block_ids[0:4]),
        (geometry.name_at(req.block_hashes, 2 * CHUNK), 4, 0, block_ids[4:7])]
    # Starting inside the last chunk: skip the local blocks, take the head's remainder.
    matched, _ = side.matched_tokens(req, CHUNK + BS)
    assert matched == CHUNK - 2 * BS
    side.on_alloc(req, block_ids, matched)
    (load,) = side.build_meta(FakeOutput({"r1": BS}, FakeBlockState({"r1": block_ids}))).loads
    assert [(c.num_blocks, c.skip_blocks, c.block_ids) for c in load.chunks] == [
        (4, 1, block_ids[5:7])]
    # Nothing left to load once vLLM holds every block before the last token.
    assert side.matched_tokens(req, 2 * CHUNK - BS) == (0, False)


def test_lookup_partial_chunk_and_async_flag(engine):
    side = make_side(engine, partial=True, load_async=True)
    req = FakeRequest("r1", tokens(2 * CHUNK + 3 * BS + 5, 3))  # partial tail of 3 blocks
    store_ends(engine, req, [CHUNK, 2 * CHUNK])
    assert side.matched_tokens(req, 0) == (2 * CHUNK, True)
    store_ends(engine, req, [2 * CHUNK + 3 * BS])
    assert side.matched_tokens(req, 0) == (2 * CHUNK + 3 * BS, True)


def test_lookup_needs_every_tp_rank(engine):
    side = SchedulerSide(geometry=ChunkGeometry(CHUNK, BS, BS), namespaces=[NS, NS + "-r1"],
                         lookup_engine=engine, save_partial_chunks=False, load_async=False,
                         stats=StatsCounter())
    req = FakeRequest("r1", tokens(3 * CHUNK, 4))
    store_ends(engine, req, [CHUNK, 2 * CHUNK])
    assert side.matched_tokens(req, 0) == (0, False)             # rank 1 has nothing
    geometry = ChunkGeometry(CHUNK, BS, BS)
    engine.store(artifact_key(NS + "-r1", geometry.name_at(req.block_hashes, CHUNK)),
                 torch.zeros(8, dtype=torch.uint8), checksum=0)
    assert side.matched_tokens(req, 0) == (CHUNK, False)


def test_load_plan_skips_local_blocks_and_state_drains(engine):
    side = make_side(engine)
    req = FakeRequest("r1", tokens(4 * CHUNK + 7, 5))
    store_ends(engine, req, [CHUNK, 2 * CHUNK, 3 * CHUNK])
    local = 5 * BS                                              # inside chunk 1
    matched, _ = side.matched_tokens(req, local)
    assert matched == 3 * CHUNK - local
    block_ids = list(range(100, 100 + 17))
    side.on_alloc(req, block_ids, matched)
    meta = side.build_meta(FakeOutput({"r1": 4 * CHUNK + 7 - 3 * CHUNK},
                                      FakeBlockState({"r1": block_ids})))
    (load,) = meta.loads
    assert [(c.num_blocks, c.skip_blocks, c.block_ids) for c in load.chunks] == [
        (4, 1, block_ids[5:8]), (4, 0, block_ids[8:12])]
    assert load.block_ids == block_ids[5:12]
    stats = side.stats.take().data
    assert stats["hit_tokens"] == matched and stats["lookups"] == 1
    side.request_finished(req)
    assert side.state_sizes() == {"tracked": 0, "lookup_start": 0, "pending_loads": 0,
                                  "remote_seen": 0, "sending": 0, "pending_events": 0,
                                  "events": 0}


def test_saves_follow_computed_chunks(engine):
    """Every chunk a step completes is handed to the workers, stored or not: whether it is
    stored already is checked once, by the workers' saver, when they save."""
    side = make_side(engine, partial=True)
    req = FakeRequest("r1", tokens(3 * CHUNK + 2 * BS + 3, 6))
    side.matched_tokens(req, 0)
    block_ids = list(range(50, 50 + 15))                        # 227 tokens -> 15 blocks
    side.on_alloc(req, block_ids, 0)
    state = FakeBlockState({"r1": block_ids})
    store_ends(engine, req, [CHUNK])                            # chunk 0 already stored
    # Step 1: 100 tokens computed -> chunk 0 is complete (the saver will skip it).
    meta = side.build_meta(FakeOutput({"r1": 100}, state))
    assert [s.block_ids for s in meta.saves] == [block_ids[0:4]] and not meta.loads
    req.num_computed_tokens = 100
    # Step 2: 200 computed -> chunks 1 and 2 complete.
    meta = side.build_meta(FakeOutput({"r1": 100}, state))
    assert [s.block_ids for s in meta.saves] == [block_ids[4:8], block_ids[8:12]]
    req.num_computed_tokens = 200
    # Step 3: the rest of the prompt -> the partial tail (2 blocks, up to num_tokens - 1).
    meta = side.build_meta(FakeOutput({"r1": req.num_tokens - 200}, state))
    assert [s.block_ids for s in meta.saves] == [block_ids[12:14]]
    geometry = ChunkGeometry(CHUNK, BS, BS)
    assert meta.saves[0].name == geometry.partial_name(req.block_hashes, 3 * CHUNK + 2 * BS)
    req.num_computed_tokens = req.num_tokens
    # Decode steps save nothing more.
    assert side.build_meta(FakeOutput({"r1": 1}, state)).saves == []
    side.request_finished(req)
    assert side.state_sizes()["tracked"] == 0


@pytest.mark.parametrize("save_decode", [True, False])
def test_chunks_that_generated_tokens_complete_are_saved(engine, save_decode):
    """A chat's next turn resends the answer. With save_decode_chunks, a chunk that decode
    steps complete is saved once, from the blocks holding the generated tokens' KV, in the
    step that computes its last token (the token just sampled has no KV yet); and the next
    turn's prompt finds it under its own block hashes."""
    side = make_side(engine, save_decode=save_decode)
    geometry = ChunkGeometry(CHUNK, BS, BS)
    prompt = tokens(CHUNK + 2 * BS, 21)                   # chunk 0 full, chunk 1 half
    req = FakeRequest("r1", list(prompt), prompt_len=len(prompt))
    side.matched_tokens(req, 0)
    block_ids = list(range(30, 40))                        # room for 160 tokens
    side.on_alloc(req, block_ids, 0)
    state = FakeBlockState({"r1": block_ids})
    meta = side.build_meta(FakeOutput({"r1": len(prompt)}, state))      # the prefill
    assert [s.block_ids for s in meta.saves] == [block_ids[0:4]]
    req.num_computed_tokens = len(prompt)
    answer = iter(tokens(64, 77))
    req.append_output(next(answer))
    saved = []                                             # (tokens computed, name, blocks)
    while req.num_computed_tokens < 2 * CHUNK + 3:         # decode steps: one token each
        meta = side.build_meta(FakeOutput({"r1": 1}, state))
        saved += [(req.num_computed_tokens + 1, s.name, s.block_ids) for s in meta.saves]
        req.num_computed_tokens += 1
        req.append_output(next(answer))
    if not save_decode:
        assert saved == []
        return
    assert saved == [(2 * CHUNK, geometry.name_at(req.block_hashes, 2 * CHUNK), block_ids[4:8])]
    store_ends(engine, req, [CHUNK, 2 * CHUNK])
    turn2 = FakeRequest("r2", req.all_token_ids[:-1] + tokens(40, 5))
    assert side.matched_tokens(turn2, 0)[0] == 2 * CHUNK
    side.request_finished(req)


def test_chunks_vllm_recomputes_after_a_failed_load_are_saved_again(engine):
    """A load fails in the worker (the chunk was corrupt and is deleted; that step saves
    nothing) and vLLM rolls num_computed_tokens back to the failed block: the scheduler asks
    for the recomputed chunks again, so the next engine gets the full hit."""
    side = make_side(engine, partial=True)
    geometry = ChunkGeometry(CHUNK, BS, BS)
    req = FakeRequest("r1", tokens(3 * CHUNK + BS + 3, 16))
    store_ends(engine, req, [CHUNK, 2 * CHUNK])
    matched, _ = side.matched_tokens(req, 0)
    assert matched == 2 * CHUNK
    block_ids = list(range(10, 10 + 14))
    side.on_alloc(req, block_ids, matched)
    state = FakeBlockState({"r1": block_ids})
    req.num_computed_tokens = matched                           # vLLM counts the hit as computed
    first = side.build_meta(FakeOutput({"r1": req.num_tokens - matched}, state))
    assert len(first.loads) == 1
    # The worker found chunk 1 corrupt: vLLM truncates at its first block and recomputes.
    engine.delete(artifact_key(NS, geometry.name_at(req.block_hashes, 2 * CHUNK)))
    req.num_computed_tokens = CHUNK
    again = side.build_meta(FakeOutput({"r1": req.num_tokens - CHUNK}, state))
    names = [s.name for s in again.saves]
    assert geometry.name_at(req.block_hashes, 2 * CHUNK) in names
    assert geometry.name_at(req.block_hashes, 3 * CHUNK) in names
    assert geometry.partial_name(req.block_hashes, 3 * CHUNK + BS) in names   # the partial tail
    assert [s.block_ids for s in again.saves][0] == block_ids[4:8]
    assert geometry.name_at(req.block_hashes, CHUNK) not in names        # not recomputed
    req.num_computed_tokens = req.num_tokens
    assert side.build_meta(FakeOutput({"r1": 1}, state)).saves == []     # once only


def test_events_on_worker_confirmation(engine):
    made = []

    def make_events(info, lost):
        made.append((info, list(lost)))
        return [("stored", info.token_ids) if info is not None else ("removed", list(lost))]

    side = make_side(engine, events=make_events)
    req = FakeRequest("r1", tokens(CHUNK + 5, 7))
    side.matched_tokens(req, 0)
    side.on_alloc(req, list(range(5)), 0)
    meta = side.build_meta(FakeOutput({"r1": CHUNK + 5}, FakeBlockState({"r1": list(range(5))})))
    (save,) = meta.saves
    assert side.take_events() == []                             # not stored yet
    side.on_worker_output(StrataCacheWorkerMetadata(stored=[save.name], lost=["ab" * 32]))
    events = side.take_events()
    assert events == [("stored", req.all_token_ids[:CHUNK]), ("removed", ["ab" * 32])]
    assert made[0][0].parent is None and len(made[0][0].block_hashes) == CHUNK // BS
    assert side.take_events() == []
    assert side.state_sizes()["pending_events"] == 0


def test_no_cross_process_tier_means_no_hits():
    side = make_side(None)
    req = FakeRequest("r1", tokens(3 * CHUNK, 8))
    assert side.matched_tokens(req, 0) == (0, False)
    side.on_alloc(req, [1, 2, 3], 0)
    assert side.build_meta(FakeOutput({"r1": 10}, FakeBlockState({}))).saves == []


def test_worker_metadata_aggregates_without_duplicates():
    a = StrataCacheWorkerMetadata(stored=["x", "y"], lost=["z"])
    b = StrataCacheWorkerMetadata(stored=["y", "w"], lost=["z"])
    merged = a.aggregate(b)
    assert merged.stored == ["x", "y", "w"] and merged.lost == ["z"]


def test_chunk_geometry_rejects_bad_sizes():
    with pytest.raises(ValueError, match="connector.chunk_size"):
        ChunkGeometry(100, 16, 16)
    with pytest.raises(ValueError, match="hash block size"):
        ChunkGeometry(64, 16, 12)
