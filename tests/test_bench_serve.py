"""benchmarks/bench_serve.py: its arithmetic, its streaming client, and the CI smoke run.

The smoke run (``stratacache bench serve --quick``) starts real OpenAI servers
(vLLM alone and ``stratacache serve``) for every workload and checks what the
issue asks of it: greedy outputs identical to vLLM alone, StrataCache hits
where there is reuse (and none in vLLM alone), a gain above 1, and exactly the
acceptance fields in the summary. No timing targets.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_serve  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ reusable tokens
def _reusable_reference(prompts, block):
    """Pairwise: the longest common prefix with any earlier prompt, in whole blocks,
    short of the prompt's last token."""
    total = 0
    for i, p in enumerate(prompts):
        best = 0
        for q in prompts[:i]:
            n = 0
            while n < min(len(p), len(q)) and p[n] == q[n]:
                n += 1
            best = max(best, n)
        total += min(best // block * block, (len(p) - 1) // block * block)
    return total


@pytest.mark.parametrize("seed", range(20))
def test_reusable_tokens_matches_pairwise_reference(seed):
    rng = random.Random(seed)
    block = rng.choice([2, 4, 8])
    roots = [[rng.randrange(5) for _ in range(rng.randrange(0, 30))] for _ in range(4)]
    prompts = []
    for _ in range(rng.randrange(1, 12)):
        base = rng.choice(roots + prompts) if prompts else rng.choice(roots)
        cut = rng.randrange(0, len(base) + 1)
        prompts.append(base[:cut] + [rng.randrange(5) for _ in range(rng.randrange(1, 20))])
    assert bench_serve.reusable_tokens(prompts, block) == _reusable_reference(prompts, block)


def test_reusable_tokens_counts_whole_blocks_short_of_the_last_token():
    a = list(range(16))
    assert bench_serve.reusable_tokens([a, a], 4) == 12            # the last token is recomputed
    assert bench_serve.reusable_tokens([a, a[:9] + [99] * 7], 4) == 8
    assert bench_serve.reusable_tokens([a, [99] + a[1:]], 4) == 0
    assert bench_serve.reusable_tokens([a], 4) == 0


def test_mismatches_names_every_differing_request_and_missing_ones():
    rng = random.Random(3)
    expected = [[rng.randrange(50) for _ in range(4)] for _ in range(10)]
    got = [list(x) for x in expected]
    assert bench_serve.mismatches(expected, got) == []
    got[2][3] += 1
    got[7] = "text"
    assert bench_serve.mismatches(expected, got) == [2, 7]
    assert bench_serve.mismatches(expected, got[:8]) == [2, 7, 8, 9]


# ------------------------------------------------------------------ Prometheus text
def test_parse_counters_sums_labelled_samples_and_ignores_other_lines():
    text = "\n".join([
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        'vllm:prefix_cache_hits_total{engine="0",model_name="/m"} 1024.0',
        'vllm:prefix_cache_hits_total{engine="1",model_name="/m"} 256.0',
        'vllm:prefix_cache_hits_created{engine="0",model_name="/m"} 1.7e+09',
        "vllm:stratacache_hit_tokens_total 3.5e+03",
        "vllm:num_requests_running 2.0",
    ])
    got = bench_serve.parse_counters(text)
    assert got["vllm:prefix_cache_hits_total"] == 1280.0
    assert got["vllm:stratacache_hit_tokens_total"] == 3500.0
    assert got["vllm:prefix_cache_hits_created"] == 1.7e9
    assert "# HELP" not in " ".join(got)


# ------------------------------------------------------------------ the reuse bound and the summary
def test_reuse_bound_removes_the_prefill_time_of_reusable_tokens_the_prefix_cache_missed():
    # 20 requests in 10 s; 6000 reusable tokens, 2000 hit by vLLM's prefix cache, cold rate 1000 tok/s:
    # 4 s of prefill could have been saved -> 20 / 6 s.
    assert bench_serve.reuse_bound(20, 10.0, 6000, 2000, 1000.0) == pytest.approx(20 / 6)
    # The prefix cache hit more than the count of reusable tokens: nothing to save.
    assert bench_serve.reuse_bound(20, 10.0, 1000, 2000, 1000.0) == pytest.approx(2.0)
    # A cold rate that would save more than the whole run: no bound, not a negative one.
    assert bench_serve.reuse_bound(20, 10.0, 50_000, 0, 1000.0) is None


def _figures(rng):
    return {"requests": 10, "duration_s": rng.uniform(1, 9), "ttft_mean_s": rng.uniform(0.1, 2),
            "ttft_median_s": 1.0, "ttft_p99_s": rng.uniform(0.5, 3), "itl_mean_s": 0.01,
            "itl_p99_s": rng.uniform(0.01, 0.1), "request_throughput": rng.uniform(1, 5),
            "token_throughput": 100.0}


def test_summary_has_exactly_the_acceptance_fields_and_their_ratios():
    rng = random.Random(5)
    runs = {w: {k: {"figures": _figures(rng)} for k in bench_serve.SERVERS} for w in "abcd"}
    runs["a"]["reuse_bound_request_throughput"] = 7.0
    runs["c"]["vllm"]["ttft_mean_from_turn2_s"] = 0.9
    runs["c"]["stratacache"]["ttft_mean_from_turn2_s"] = 0.3
    s = bench_serve.summarize(runs)
    assert list(s) == list(bench_serve.TARGETS)

    def f(w, k, key):
        return runs[w][k]["figures"][key]

    assert s["prefix_rep_throughput_gain"] == pytest.approx(
        f("a", "stratacache", "request_throughput") / f("a", "vllm", "request_throughput"))
    assert s["prefix_rep_vs_bound"] == pytest.approx(f("a", "stratacache", "request_throughput") / 7.0)
    assert s["docqa_ttft_gain"] == pytest.approx(f("b", "vllm", "ttft_mean_s") / f("b", "stratacache", "ttft_mean_s"))
    assert s["docqa_round_gain"] == pytest.approx(f("b", "vllm", "duration_s") / f("b", "stratacache", "duration_s"))
    assert s["multiturn_ttft_gain"] == pytest.approx(3.0)
    assert s["p99_ttft_ratio"] == pytest.approx(max(
        f(w, "stratacache", "ttft_p99_s") / f(w, "vllm", "ttft_p99_s") for w in "ab"))
    assert s["p99_itl_ratio"] == pytest.approx(max(
        f(w, "stratacache", "itl_p99_s") / f(w, "vllm", "itl_p99_s") for w in "abc"))
    assert s["no_reuse_throughput_ratio"] == pytest.approx(
        f("d", "stratacache", "request_throughput") / f("d", "vllm", "request_throughput"))
    # A subset of workloads: the others' fields are there, as None.
    partial = bench_serve.summarize({"d": runs["d"]})
    assert list(partial) == list(bench_serve.TARGETS)
    assert partial["no_reuse_throughput_ratio"] == s["no_reuse_throughput_ratio"]
    assert partial["docqa_ttft_gain"] is None and partial["p99_ttft_ratio"] is None


# ------------------------------------------------------------------ the streaming client
class _Sse:
    """A real HTTP server on 127.0.0.1 that streams completion chunks like vLLM's."""

    def __init__(self, chunks, gaps, status=200):
        self.chunks, self.gaps, self.status, self.bodies = chunks, gaps, status, []

    async def handler(self, request):
        from aiohttp import web

        self.bodies.append(await request.json())
        if self.status != 200:
            return web.Response(status=self.status, text="bad prompt: too long")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk, gap in zip(self.chunks, self.gaps):
            await asyncio.sleep(gap)
            await resp.write(b"data: " + json.dumps({"choices": [chunk]}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _stream_once(sse, prompt, max_tokens):
    import aiohttp
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/completions", sse.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            return await bench_serve.stream_completion(
                session, f"http://127.0.0.1:{port}/v1/completions", "m", prompt, max_tokens)
    finally:
        await runner.cleanup()


def test_stream_completion_times_first_token_and_gaps_and_collects_token_ids():
    rng = random.Random(11)
    tokens = [[rng.randrange(1000)] for _ in range(5)]
    chunks = [{"text": "", "token_ids": []}]          # a role/empty chunk is not a token
    chunks += [{"text": "x", "token_ids": t} for t in tokens]
    gaps = [0.0, 0.2, 0.05, 0.05, 0.05, 0.05]
    sse = _Sse(chunks, gaps)
    prompt = [rng.randrange(1000) for _ in range(7)]
    out = asyncio.run(_stream_once(sse, prompt, 5))
    assert out["token_ids"] == [t[0] for t in tokens]
    assert out["prompt_len"] == 7
    assert out["ttft_s"] >= 0.2
    assert len(out["itls"]) == 4 and all(x >= 0.04 for x in out["itls"])
    body = sse.bodies[0]
    assert body["prompt"] == prompt and body["temperature"] == 0.0 and body["stream"] is True
    assert body["return_token_ids"] is True and body["max_tokens"] == 5


def test_stream_completion_reports_the_server_error_and_an_empty_stream():
    with pytest.raises(RuntimeError, match="returned 400: bad prompt"):
        asyncio.run(_stream_once(_Sse([], [], status=400), [1, 2], 1))
    with pytest.raises(RuntimeError, match="without a token"):
        asyncio.run(_stream_once(_Sse([{"text": "", "token_ids": []}], [0.0]), [1, 2], 1))


def test_unknown_workload_is_a_clear_error():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--workloads", "a,x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--workloads" in r.stderr and "x" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ the CI smoke run
@pytest.mark.slow
def test_bench_serve_quick_outputs_identical_and_a_gain(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-m", "stratacache.cli", "bench", "serve", "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=3000, env=env)
    document = json.loads((tmp_path / "serve.json").read_text())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert list(document["summary"]) == list(bench_serve.TARGETS)
    runs = document["runs"]
    assert set(runs) == set("abcd")
    for w, run in runs.items():
        assert len(run["vllm"]["outputs"]) == len(run["stratacache"]["outputs"]) > 0, w
        assert run["outputs_identical"] is (run["mismatched_requests"] == []), w
        if w in bench_serve.STRICT_IDENTITY:
            assert run["outputs_identical"] is True, (w, run["mismatched_requests"])
            assert run["vllm"]["outputs"] == run["stratacache"]["outputs"], w
        for kind in bench_serve.SERVERS:
            figures = run[kind]["figures"]
            assert all(math.isfinite(v) and v > 0 for v in figures.values()), (w, kind, figures)
        assert run["vllm"]["hits"]["stratacache_hit_tokens"] == 0, w
        assert run["stratacache"]["hits"]["stratacache_load_errors"] == 0, w
    for w in "abc":   # where there is reuse beyond vLLM's KV space, StrataCache serves some of it
        assert runs[w]["stratacache"]["hits"]["stratacache_hit_tokens"] > 0, w
    assert runs["a"]["reusable_tokens"] > 0 and runs["a"]["reuse_bound_request_throughput"] > 0
    assert document["summary"]["docqa_ttft_gain"] > 1, document["summary"]
    assert document["summary"]["prefix_rep_throughput_gain"] > 1, document["summary"]
    assert (tmp_path / "serve_workloads.png").read_bytes()[:8] == PNG
    assert (tmp_path / "serve.png").read_bytes()[:8] == PNG
