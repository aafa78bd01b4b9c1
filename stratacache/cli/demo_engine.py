"""One engine of ``stratacache demo``, run in its own process.

The demo runs each configuration in a fresh interpreter so that the "fresh
engine" case really is a new process that can only see what the first one
persisted (the shared-region tier), and so vLLM's spawned engine core starts
under a ``__main__`` guard. The parent passes a JSON spec file and reads
progress events from lines of stdout that start with ``MARK``; everything
else on stdout/stderr is vLLM's log, which the parent keeps in a file.

TTFT comes from vLLM's own per-request metrics (first-token latency since
arrival); each query is submitted alone so nothing else competes with it.
"""

from __future__ import annotations

import json
import sys
import time

MARK = "@@stratacache-demo "


def emit(event: str, **fields) -> None:
    print(MARK + json.dumps({"event": event, **fields}), flush=True)


def _connector_metrics(llm) -> dict:
    """The connector's counters (vllm:stratacache_*) and vLLM's count of tokens it supplied."""
    found = {}
    for metric in llm.get_metrics():
        name = getattr(metric, "name", "")
        value = getattr(metric, "value", None)
        if (name.startswith("vllm:stratacache_") or name == "vllm:external_prefix_cache_hits") \
                and isinstance(value, (int, float)):
            found[name] = found.get(name, 0) + value
    return found


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    engine_args = dict(model=spec["model"], dtype="bfloat16", enforce_eager=True, seed=0,
                       max_model_len=spec["max_model_len"], block_size=spec["block_size"],
                       num_gpu_blocks_override=spec["kv_blocks"], disable_log_stats=False)
    if spec.get("kv_transfer_config"):
        engine_args["kv_transfer_config"] = spec["kv_transfer_config"]
    llm = LLM(**engine_args)
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0)
    # The first request of an engine pays one-off initialisation; keep it out of the figures.
    llm.generate([spec["warmup_prompt"]], params, use_tqdm=False)
    emit("ready", seconds=time.perf_counter() - started)

    results = []
    for i, query in enumerate(spec["queries"]):
        t0 = time.perf_counter()
        out = llm.generate([query["prompt"]], params, use_tqdm=False)[0]
        wall = time.perf_counter() - t0
        if out.metrics is None or not out.metrics.first_token_latency:
            raise RuntimeError("vLLM reported no first-token latency (are its stats disabled?)")
        results.append({
            "doc": query["doc"], "question": query["question"],
            "prompt_tokens": len(out.prompt_token_ids),
            "cached_tokens": int(out.num_cached_tokens or 0),
            "ttft_s": out.metrics.first_token_latency, "request_s": wall,
            "token_ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text,
        })
        emit("query", index=i)
    result = {"queries": results, "connector_metrics": _connector_metrics(llm)}
    # Shut the engine down explicitly so the connector drains its stores before exit.
    llm.llm_engine.engine_core.shutdown()
    return result


if __name__ == "__main__":
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        outcome = run(json.load(f))
    with open(result_path, "w") as f:
        json.dump(outcome, f)
