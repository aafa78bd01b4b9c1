"""Serving under load: vLLM's OpenAI server alone vs. with StrataCache, four workloads.

    python benchmarks/bench_serve.py [--quick] [--json PATH] [--chart PATH] [--workloads a,b,c,d]

Every run of a workload starts two fresh server processes, one after the
other, on 127.0.0.1 with a free port: ``python -m vllm.entrypoints.openai.api_server``
(vLLM alone, its own prefix caching on) and ``stratacache serve`` (the same
server with the connector, a private shared-memory region). Both get the same
``VLLM_CPU_NUM_OF_RESERVED_CPU``, model, KV-block budget and requests, on a
locally made KV-heavy model (random weights, local tokenizer). Workloads:

* a. ``prefix_repetition`` driven by vLLM's own load generator
  (``vllm.benchmarks.serve``, in-process: the ``vllm`` console script is broken
  in ``vllm-cpu``), with a prefix working set about twice vLLM's KV space;
* b. long-document QA in LMCache's style: each document sent once, then
  questions over them in a shuffled order, several requests in flight;
* c. multi-turn chat: each turn's prompt is the whole conversation so far,
  the model's previous answers included (token ids, so nothing is re-tokenized);
* d. vLLM's ``random`` dataset: no reuse at all.

b and c use a small streaming client of our own against ``/v1/completions``
(TTFT at the first streamed token, ITL between tokens). Per run: mean, median
and p99 TTFT; mean and p99 ITL; request and token throughput; prompt tokens
hit in vLLM's prefix cache and in StrataCache (the servers' Prometheus
counters). Greedy outputs (temperature 0) of the two servers are compared
token for token; a difference fails the run in workloads a and d and is
reported in b and c (see ``STRICT_IDENTITY``).

The reuse bound of workload a: the request throughput vLLM alone would reach
if every reusable prompt token (block-aligned prefix of an earlier prompt)
that its prefix cache did not hit were loaded at no cost, i.e. its duration
less those tokens' prefill time at the cold-prefill rate measured in the same
run (a ``random`` run with one output token, on the same server, just before).

The JSON ``summary`` holds the issue's acceptance ratios; ``runs`` every
figure. The chart (``--chart``, default ``<json stem>_workloads.png``) shows
the per-workload figures of both servers side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
BLOCK = 128                     # vLLM's CPU block size
START_TIMEOUT_S = 600
RESERVED_CPUS = "1"             # VLLM_CPU_NUM_OF_RESERVED_CPU, the same for every server
SERVERS = ("vllm", "stratacache")
# Workloads whose greedy outputs must match vLLM alone token for token. In b and c a
# reused prefix's KV was computed in a shorter pass (the document alone, an earlier
# turn) than vLLM alone's recompute of the whole prompt, and vLLM's CPU kernels give
# bits that depend on the pass: vLLM alone serving the same prompt from its own prefix
# cache gives the same differing tokens (measured, see RESULTS.md). Their mismatches
# are reported, not failed on. In a every prompt is a prefix plus a suffix of one
# length, so both servers compute every prefix in passes of the same shape.
STRICT_IDENTITY = ("a", "d")
TARGETS = {
    "prefix_rep_throughput_gain": (">=", 1.8),
    "prefix_rep_vs_bound": (">=", 0.9),
    "docqa_ttft_gain": (">=", 2.3),
    "docqa_round_gain": (">=", 3.5),
    "multiturn_ttft_gain": (">=", 2.0),
    "p99_ttft_ratio": ("<=", 1.0),
    "p99_itl_ratio": ("<=", 1.1),
    "no_reuse_throughput_ratio": (">=", 0.98),
}
COUNTERS = {"vllm_prefix_cache_hit_tokens": "vllm:prefix_cache_hits_total",
            "vllm_prefix_cache_query_tokens": "vllm:prefix_cache_queries_total",
            "vllm_external_hit_tokens": "vllm:external_prefix_cache_hits_total",
            "stratacache_hit_tokens": "vllm:stratacache_hit_tokens_total",
            "stratacache_load_errors": "vllm:stratacache_load_errors_total",
            "stratacache_save_chunks": "vllm:stratacache_save_chunks_total"}


# ------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    """Every size of one benchmark run (``QUICK`` is the CI smoke size)."""
    layers: int
    concurrency: int
    # a: prefix_repetition
    a_prefix_len: int
    a_suffix_len: int
    a_prefixes: int
    a_prompts: int
    a_output_len: int
    # b: document QA
    b_docs: int
    b_doc_len: int
    b_questions: int            # per document
    b_question_len: int
    b_output_len: int
    b_docs_in_kv: int           # vLLM's KV space holds about this many documents
    # c: multi-turn chat
    c_sessions: int
    c_turns: int
    c_first_len: int
    c_user_len: int
    c_output_len: int
    # d: random
    d_input_len: int
    d_prompts: int
    d_output_len: int
    kv_space_gib: int = 1
    cold_prompts: int = field(default=0)   # cold-prefill calibration requests (0: 2x concurrency)


QUICK = Sizes(layers=4, concurrency=3,
              a_prefix_len=1024, a_suffix_len=64, a_prefixes=8, a_prompts=32, a_output_len=8,
              b_docs=8, b_doc_len=1024, b_questions=2, b_question_len=32, b_output_len=8, b_docs_in_kv=3,
              c_sessions=6, c_turns=4, c_first_len=512, c_user_len=32, c_output_len=16,
              d_input_len=1024, d_prompts=16, d_output_len=8)
FULL = Sizes(layers=24, concurrency=4,
             a_prefix_len=2048, a_suffix_len=128, a_prefixes=16, a_prompts=96, a_output_len=32,
             b_docs=8, b_doc_len=4096, b_questions=3, b_question_len=64, b_output_len=32, b_docs_in_kv=3,
             c_sessions=12, c_turns=6, c_first_len=1024, c_user_len=64, c_output_len=64,
             d_input_len=2048, d_prompts=48, d_output_len=32, kv_space_gib=4)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


# ------------------------------------------------------------------ pure helpers (unit-tested)
def reusable_tokens(prompts: list[list[int]], block: int = BLOCK) -> int:
    """Prompt tokens that a perfect cache could serve: for each prompt, the longest
    block-aligned prefix it shares with an earlier prompt, short of its last token
    (which vLLM always computes)."""
    seen: set[tuple[int, ...]] = set()
    total = 0
    for prompt in prompts:
        usable = (len(prompt) - 1) // block * block
        hit = 0
        while hit < usable and tuple(prompt[:hit + block]) in seen:
            hit += block
        total += hit
        for end in range(block, len(prompt) + 1, block):
            seen.add(tuple(prompt[:end]))
    return total


def mismatches(expected: list, got: list) -> list[int]:
    """Indices of the requests whose greedy outputs differ (all of them past the shorter list)."""
    return [i for i in range(max(len(expected), len(got)))
            if i >= len(expected) or i >= len(got) or expected[i] != got[i]]


def parse_counters(text: str) -> dict[str, float]:
    """Sum of every sample of each Prometheus metric (labels summed over)."""
    out: dict[str, float] = {}
    for m in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})? ([-+0-9.eE]+|NaN|[+-]Inf)$", text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, numpy's default (what vLLM's load generator reports)."""
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def latency_figures(ttfts: list[float], itls: list[float], duration: float, requests: int,
                    tokens: int) -> dict:
    """The per-run figures of our own client, in the units of ``vllm_figures``."""
    import statistics

    return {"requests": requests, "duration_s": duration,
            "ttft_mean_s": statistics.fmean(ttfts), "ttft_median_s": statistics.median(ttfts),
            "ttft_p99_s": percentile(ttfts, 99),
            "itl_mean_s": statistics.fmean(itls) if itls else float("nan"),
            "itl_p99_s": percentile(itls, 99),
            "request_throughput": requests / duration, "token_throughput": tokens / duration}


def vllm_figures(result: dict) -> dict:
    """The same figures from a ``vllm.benchmarks.serve`` result."""
    return {"requests": result["completed"], "duration_s": result["duration"],
            "ttft_mean_s": result["mean_ttft_ms"] / 1e3, "ttft_median_s": result["median_ttft_ms"] / 1e3,
            "ttft_p99_s": result["p99_ttft_ms"] / 1e3,
            "itl_mean_s": result["mean_itl_ms"] / 1e3, "itl_p99_s": result["p99_itl_ms"] / 1e3,
            "request_throughput": result["request_throughput"],
            "token_throughput": result["total_token_throughput"]}


def reuse_bound(requests: int, duration_s: float, reusable: int, prefix_cache_hits: float,
                cold_prefill_tokens_per_s: float) -> Optional[float]:
    """Request throughput if every reusable token the prefix cache missed cost nothing.

    None when the saved prefill time would exceed the run itself (the cold rate
    measured does not describe this run)."""
    saved_s = max(0.0, reusable - prefix_cache_hits) / cold_prefill_tokens_per_s
    left_s = duration_s - saved_s
    return requests / left_s if left_s > 0 else None


def summarize(runs: dict) -> dict:
    """The acceptance ratios from the per-run figures (``runs[workload][server]``)."""
    def ratio(num, den):
        return num / den if num is not None and den else None

    def fig(w, s, key):
        return runs[w][s]["figures"][key] if w in runs else None

    out = {
        "prefix_rep_throughput_gain": ratio(fig("a", "stratacache", "request_throughput"),
                                            fig("a", "vllm", "request_throughput")),
        "prefix_rep_vs_bound": ratio(fig("a", "stratacache", "request_throughput"),
                                     runs.get("a", {}).get("reuse_bound_request_throughput")),
        "docqa_ttft_gain": ratio(fig("b", "vllm", "ttft_mean_s"), fig("b", "stratacache", "ttft_mean_s")),
        "docqa_round_gain": ratio(fig("b", "vllm", "duration_s"), fig("b", "stratacache", "duration_s")),
        "multiturn_ttft_gain": ratio(runs["c"]["vllm"]["ttft_mean_from_turn2_s"],
                                     runs["c"]["stratacache"]["ttft_mean_from_turn2_s"]) if "c" in runs else None,
    }
    ttft = [ratio(fig(w, "stratacache", "ttft_p99_s"), fig(w, "vllm", "ttft_p99_s")) for w in "ab" if w in runs]
    itl = [ratio(fig(w, "stratacache", "itl_p99_s"), fig(w, "vllm", "itl_p99_s")) for w in "abc" if w in runs]
    out["p99_ttft_ratio"] = max((x for x in ttft if x is not None), default=None)
    out["p99_itl_ratio"] = max((x for x in itl if x is not None), default=None)
    out["no_reuse_throughput_ratio"] = ratio(fig("d", "stratacache", "request_throughput"),
                                             fig("d", "vllm", "request_throughput"))
    return out


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One fresh OpenAI server process on 127.0.0.1, stopped by its PID (process group)."""

    def __init__(self, kind: str, model: str, workdir: Path, tag: str, max_model_len: int,
                 kv_blocks: int, kv_space_gib: int, *, config_text: Optional[str] = None,
                 kv_role: Optional[str] = None, env: Optional[dict] = None):
        """``config_text``: the connector's YAML instead of a private region's (the caller
        then owns what it names); ``kv_role`` for ``stratacache serve --kv-role``; ``env``
        on top of the environment every server gets."""
        self.kind, self.model, self.port = kind, model, free_port()
        self.log = workdir / f"{tag}-{kind}.log"
        vllm_args = ["--port", str(self.port), "--dtype", "bfloat16", "--enforce-eager", "--seed", "0",
                     "--max-model-len", str(max_model_len), "--num-gpu-blocks-override", str(kv_blocks),
                     "--enable-prefix-caching"]
        self.region: Optional[Path] = None
        if kind == "vllm":
            cmd = [sys.executable, "-m", SERVER_MODULE, "--model", model, "--host", "127.0.0.1", *vllm_args]
        else:
            if config_text is None:
                self.region = Path("/dev/shm") / f"sc-bench-serve-{os.getpid()}-{tag}.region"
                config_text = stratacache_config(self.region)
            config = workdir / f"{tag}-stratacache.yaml"
            config.write_text(config_text)
            role = ["--kv-role", kv_role] if kv_role else []
            cmd = [sys.executable, "-m", "stratacache.cli", "serve", "--config", str(config), *role, model,
                   *vllm_args]
        env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU=RESERVED_CPUS,
                   VLLM_CPU_KVCACHE_SPACE=str(kv_space_gib),
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                   **(env or {}))
        t0 = time.time()
        self._launch(cmd, env)
        print(f"  [{tag} {kind}: server up in {time.time() - t0:.0f}s, port {self.port}]", flush=True)

    def _launch(self, cmd: list[str], env: dict) -> None:
        """Start ``cmd`` in its own process group, logging to ``self.log``; return once healthy."""
        self._log_fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_healthy(self) -> None:
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with status {self.proc.returncode}; "
                                   f"last lines of {self.log}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"{self.kind} server not healthy within {START_TIMEOUT_S}s; see {self.log}")

    def counters(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=30) as r:
            found = parse_counters(r.read().decode())
        return {key: found.get(name, 0.0) for key, name in COUNTERS.items()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log_fh.close()
        if self.region is not None:
            self.region.unlink(missing_ok=True)


def stratacache_config(region: Path) -> str:
    """The connector's YAML for one server: a private region; everything else the defaults."""
    return (f"tiers:\n  cpu:\n    capacity: 1GiB\n  shared:\n    path: {region}\n"
            f"    capacity: 4GiB\n    reset: true\n")


# ------------------------------------------------------------------ our streaming client (b, c)
async def stream_completion(session, url: str, model: str, prompt: list[int], max_tokens: int,
                            first_token: Optional[asyncio.Event] = None) -> dict:
    """One greedy streamed completion of a token-id prompt: TTFT, ITLs and the output token ids
    (``first_token`` is set when the first token arrives)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    t0 = time.perf_counter()
    first = last = None
    itls: list[float] = []
    tokens: list[int] = []
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"POST {url} returned {resp.status}: {(await resp.text())[:500]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            new = json.loads(data)["choices"][0].get("token_ids") or []
            if not new:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
                if first_token is not None:
                    first_token.set()
            else:
                itls.append(now - last)
            last = now
            tokens += new
    if first is None:
        raise RuntimeError(f"POST {url}: the stream ended without a token")
    return {"ttft_s": first - t0, "itls": itls, "prompt_len": len(prompt), "token_ids": tokens}


def _session(concurrency: int):
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=3600))


async def _run_prompts(server: Server, prompts: list[list[int]], max_tokens: int, concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    url = server.base_url + "/v1/completions"
    async with _session(concurrency) as session:
        async def one(p):
            async with gate:
                return await stream_completion(session, url, server.model, p, max_tokens)
        return await asyncio.gather(*(one(p) for p in prompts))


def client_figures(results: list[dict], duration: float) -> dict:
    tokens = sum(r["prompt_len"] + len(r["token_ids"]) for r in results)
    return latency_figures([r["ttft_s"] for r in results], [x for r in results for x in r["itls"]],
                           duration, len(results), tokens)


def run_prompts(server: Server, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    t0 = time.perf_counter()
    results = asyncio.run(_run_prompts(server, prompts, max_tokens, concurrency))
    return {"results": results, "figures": client_figures(results, time.perf_counter() - t0)}


async def _run_chat(server: Server, firsts: list[list[int]], user_turns: list[list[list[int]]],
                    max_tokens: int, concurrency: int) -> list[list[dict]]:
    gate = asyncio.Semaphore(concurrency)
    url = server.base_url + "/v1/completions"
    async with _session(concurrency) as session:
        async def conversation(first, users):
            history, turns = list(first), []
            for user in users:
                prompt = history + user
                async with gate:
                    out = await stream_completion(session, url, server.model, prompt, max_tokens)
                turns.append(out)
                history = prompt + out["token_ids"]
            return turns
        return await asyncio.gather(*(conversation(f, u) for f, u in zip(firsts, user_turns)))


# ------------------------------------------------------------------ vLLM's load generator (a, d)
def vllm_load(server: Server, dataset: list[str], num_prompts: int, concurrency: int, seed: int,
              result_dir: Path, name: str) -> dict:
    """``vllm bench serve`` in-process against ``server``; its full result (texts included)."""
    from vllm.benchmarks import serve as vllm_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_serve.add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", server.base_url, "--model", server.model,
        "--tokenizer", server.model, *dataset, "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--seed", str(seed), "--temperature", "0",
        "--ignore-eos", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--save-result", "--save-detailed",
        "--result-dir", str(result_dir), "--result-filename", f"{name}-{server.kind}.json"])
    return vllm_serve.main(args)


def dataset_prompts(model: str, dataset: list[str], num_prompts: int, seed: int) -> list[list[int]]:
    """The token ids of the prompts vLLM's load generator sends for these arguments, in order."""
    from transformers import AutoTokenizer
    from vllm.benchmarks import serve as vllm_serve
    from vllm.benchmarks.datasets import get_samples
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_serve.add_cli_args(parser)
    args = parser.parse_args(["--model", model, *dataset, "--num-prompts", str(num_prompts),
                              "--seed", str(seed)])
    tokenizer = AutoTokenizer.from_pretrained(model)
    random.seed(seed)
    return [tokenizer(s.prompt, add_special_tokens=True).input_ids for s in get_samples(args, tokenizer)]


# ------------------------------------------------------------------ the workloads
class Bench:
    def __init__(self, sizes: Sizes, model: str, vocab: int, workdir: Path):
        self.sizes, self.model, self.vocab, self.workdir = sizes, model, vocab, workdir

    def tokens(self, n: int, seed: int) -> list[int]:
        rng = random.Random(seed)
        return [rng.randrange(10, self.vocab - 5) for _ in range(n)]

    def with_server(self, kind: str, tag: str, max_model_len: int, kv_blocks: int, work) -> dict:
        """Start a fresh server, warm it up, run ``work(server)``, count its cache hits; always stop it."""
        server = Server(kind, self.model, self.workdir, tag, max_model_len, kv_blocks, self.sizes.kv_space_gib)
        try:
            run_prompts(server, [self.tokens(n, 900_000 + n) for n in (64, 300)], 2, 1)   # kernel set-up
            before = server.counters()
            out = work(server)
            # One tiny request makes the engine publish the counters of the last steps.
            run_prompts(server, [self.tokens(8, 999_999)], 1, 1)
            time.sleep(1.0)
            after = server.counters()
        finally:
            server.stop()
        out["hits"] = {k: after[k] - before[k] for k in COUNTERS}
        return out

    # a -------------------------------------------------------------------------------------
    def prefix_repetition(self) -> dict:
        z = self.sizes
        prompt_len = z.a_prefix_len + z.a_suffix_len
        dataset = ["--dataset-name", "prefix_repetition",
                   "--prefix-repetition-prefix-len", str(z.a_prefix_len),
                   "--prefix-repetition-suffix-len", str(z.a_suffix_len),
                   "--prefix-repetition-num-prefixes", str(z.a_prefixes),
                   "--prefix-repetition-output-len", str(z.a_output_len)]
        cold = ["--dataset-name", "random", "--random-input-len", str(prompt_len),
                "--random-output-len", "1", "--random-range-ratio", "0"]
        cold_n = z.cold_prompts or 2 * z.concurrency
        kv_blocks = max(z.a_prefixes * (z.a_prefix_len // BLOCK) // 2,
                        z.concurrency * blocks_for(prompt_len + z.a_output_len))
        max_len = blocks_for(prompt_len + z.a_output_len + 64) * BLOCK
        prompts = dataset_prompts(self.model, dataset, z.a_prompts, seed=1)
        reusable = reusable_tokens(prompts)
        run: dict = {"kv_blocks": kv_blocks, "working_set_blocks": z.a_prefixes * blocks_for(z.a_prefix_len),
                     "prompt_tokens": sum(map(len, prompts)), "reusable_tokens": reusable}

        def work(server):
            c = vllm_load(server, cold, cold_n, z.concurrency, 1000, self.workdir, "a-cold")
            r = vllm_load(server, dataset, z.a_prompts, z.concurrency, 1, self.workdir, "a")
            return {"figures": vllm_figures(r), "outputs": r["generated_texts"],
                    "cold_prefill_tokens_per_s": c["total_input_tokens"] / c["duration"]}

        for kind in SERVERS:
            run[kind] = self.with_server(kind, "a", max_len, kv_blocks, work)
        base = run["vllm"]
        run["cold_prefill_tokens_per_s"] = base["cold_prefill_tokens_per_s"]
        run["reuse_bound_request_throughput"] = reuse_bound(
            base["figures"]["requests"], base["figures"]["duration_s"], reusable,
            base["hits"]["vllm_prefix_cache_hit_tokens"], base["cold_prefill_tokens_per_s"])
        return run

    # b -------------------------------------------------------------------------------------
    def doc_qa(self) -> dict:
        z = self.sizes
        docs = [self.tokens(z.b_doc_len, 2000 + d) for d in range(z.b_docs)]
        queries = [(d, q) for d in range(z.b_docs) for q in range(z.b_questions)]
        random.Random(7).shuffle(queries)
        questions = [docs[d] + self.tokens(z.b_question_len, 3000 + 100 * d + q) for d, q in queries]
        prompt_len = z.b_doc_len + z.b_question_len
        kv_blocks = max(z.b_docs_in_kv * blocks_for(prompt_len), z.concurrency * blocks_for(prompt_len + z.b_output_len))
        max_len = blocks_for(prompt_len + z.b_output_len + 64) * BLOCK
        run: dict = {"kv_blocks": kv_blocks, "queries": [list(q) for q in queries],
                     "reusable_tokens": reusable_tokens(docs + questions)}

        def work(server):
            warm = run_prompts(server, docs, z.b_output_len, z.concurrency)
            query = run_prompts(server, questions, z.b_output_len, z.concurrency)
            return {"figures": query["figures"], "document_round": warm["figures"],
                    "outputs": [r["token_ids"] for r in warm["results"] + query["results"]]}

        for kind in SERVERS:
            run[kind] = self.with_server(kind, "b", max_len, kv_blocks, work)
        return run

    # c -------------------------------------------------------------------------------------
    def multi_turn(self) -> dict:
        z = self.sizes
        firsts = [self.tokens(z.c_first_len, 4000 + s) for s in range(z.c_sessions)]
        users = [[self.tokens(z.c_user_len, 5000 + 100 * s + t) for t in range(z.c_turns)]
                 for s in range(z.c_sessions)]
        longest = z.c_first_len + z.c_turns * z.c_user_len + z.c_turns * z.c_output_len
        context_blocks = z.c_sessions * blocks_for(longest)
        kv_blocks = max(context_blocks // 3, z.concurrency * blocks_for(longest))
        max_len = blocks_for(longest + 64) * BLOCK
        run: dict = {"kv_blocks": kv_blocks, "all_contexts_blocks": context_blocks}

        def work(server):
            t0 = time.perf_counter()
            sessions = asyncio.run(_run_chat(server, firsts, users, z.c_output_len, z.concurrency))
            duration = time.perf_counter() - t0
            flat = [turn for s in sessions for turn in s]
            later = [turn["ttft_s"] for s in sessions for turn in s[1:]]
            return {"figures": client_figures(flat, duration),
                    "ttft_mean_from_turn2_s": sum(later) / len(later),
                    "outputs": [t["token_ids"] for s in sessions for t in s]}

        for kind in SERVERS:
            run[kind] = self.with_server(kind, "c", max_len, kv_blocks, work)
        return run

    # d -------------------------------------------------------------------------------------
    def no_reuse(self) -> dict:
        z = self.sizes
        dataset = ["--dataset-name", "random", "--random-input-len", str(z.d_input_len),
                   "--random-output-len", str(z.d_output_len), "--random-range-ratio", "0"]
        kv_blocks = z.concurrency * blocks_for(z.d_input_len + z.d_output_len) * 2
        max_len = blocks_for(z.d_input_len + z.d_output_len + 64) * BLOCK
        run: dict = {"kv_blocks": kv_blocks}

        def work(server):
            r = vllm_load(server, dataset, z.d_prompts, z.concurrency, 2, self.workdir, "d")
            return {"figures": vllm_figures(r), "outputs": r["generated_texts"]}

        for kind in SERVERS:
            run[kind] = self.with_server(kind, "d", max_len, kv_blocks, work)
        return run


WORKLOADS = {"a": ("prefix_repetition", Bench.prefix_repetition), "b": ("doc_qa", Bench.doc_qa),
             "c": ("multi_turn", Bench.multi_turn), "d": ("random_no_reuse", Bench.no_reuse)}


# ------------------------------------------------------------------ report
def write_chart(path: Path, runs: dict) -> Path:
    """Per workload: TTFT (mean, p99), ITL p99 and request throughput of both servers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ttft_mean_s", "mean TTFT (s)"), ("ttft_p99_s", "p99 TTFT (s)"),
              ("itl_p99_s", "p99 ITL (s)"), ("request_throughput", "requests/s")]
    names = [w for w in WORKLOADS if w in runs]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for ax, (key, label) in zip(axes, panels):
        for i, kind in enumerate(SERVERS):
            values = [runs[w][kind]["figures"][key] for w in names]
            bars = ax.bar([x + 0.4 * i for x in range(len(names))], values, width=0.4,
                          label="vLLM alone" if kind == "vllm" else "StrataCache")
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7, padding=1)
        ax.set_xticks([x + 0.2 for x in range(len(names))], [f"{w}. {WORKLOADS[w][0]}" for w in names],
                      fontsize=7, rotation=15)
        ax.set_title(label, fontsize=9)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=7)
    fig.suptitle("bench serve: vLLM's OpenAI server alone vs. with StrataCache (same run)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(runs: dict, summary: dict) -> None:
    print("\nworkload        server        TTFT mean  median     p99   ITL mean     p99   req/s  tok/s"
          "   pc-hit  sc-hit")
    for w, (name, _) in WORKLOADS.items():
        if w not in runs:
            continue
        for kind in SERVERS:
            f, h = runs[w][kind]["figures"], runs[w][kind]["hits"]
            print(f"{w}. {name:12s} {kind:12s} {f['ttft_mean_s']:8.3f} {f['ttft_median_s']:7.3f} "
                  f"{f['ttft_p99_s']:7.3f} {f['itl_mean_s']:9.4f} {f['itl_p99_s']:7.4f} "
                  f"{f['request_throughput']:7.3f} {f['token_throughput']:6.0f} "
                  f"{h['vllm_prefix_cache_hit_tokens']:8.0f} {h['stratacache_hit_tokens']:7.0f}")
        print(f"   outputs identical: {runs[w]['outputs_identical']}"
              + (f" (requests differing: {runs[w]['mismatched_requests']})" if runs[w]["mismatched_requests"] else ""))
    if "a" in runs:
        a = runs["a"]
        print(f"a. reusable tokens {a['reusable_tokens']}, cold prefill {a['cold_prefill_tokens_per_s']:.0f} "
              f"tok/s, reuse bound {a['reuse_bound_request_throughput']} req/s")
    print("\nsummary                        value   target")
    for k, v in summary.items():
        op, t = TARGETS[k]
        met = v is not None and (v <= t if op == "<=" else v >= t)
        shown = f"{v:8.3f}" if v is not None else "     n/a"
        print(f"{k:30s}{shown}   {op} {t}  {'ok' if met else 'MISSED'}")


def bench_model(layers: int):
    """The KV-heavy bench model (random weights, local tokenizer), made once and cached:
    its spec, directory and vocabulary size."""
    from stratacache.models.local_llama import LlamaSpec, make_local_llama

    spec = LlamaSpec(num_layers=layers, hidden=512, heads=8, kv_heads=8, intermediate=1024,
                     max_positions=16384, seed=3)
    models_dir = Path(os.environ.get("STRATACACHE_BENCH_MODELS", Path.home() / ".cache" / "stratacache"))
    model = str(make_local_llama(models_dir / f"bench-serve-{spec.digest()}", spec))
    return spec, model, json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write device, summary, targets and every run to this file")
    ap.add_argument("--chart", type=Path, help="PNG of the per-workload figures "
                                               "(default: next to --json, <stem>_workloads.png)")
    ap.add_argument("--quick", action="store_true", help="the CI smoke size: a 4-layer model, short prompts")
    ap.add_argument("--workloads", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--concurrency", type=int, help="requests in flight (default: the size's, 3 quick)")
    ap.add_argument("--workdir", type=Path, help="logs and load-generator results (default: a new temp dir)")
    args = ap.parse_args()
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in chosen if w not in WORKLOADS]
    if bad or not chosen:
        ap.error(f"--workloads: unknown workload(s) {','.join(bad) or '(none given)'}; choose from a,b,c,d")

    sizes = QUICK if args.quick else FULL
    if args.concurrency is not None:
        if args.concurrency < 1:
            ap.error(f"--concurrency must be at least 1, not {args.concurrency}")
        sizes = replace(sizes, concurrency=args.concurrency)
    spec, model, vocab = bench_model(sizes.layers)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sc-bench-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    kv_per_token = 2 * spec.num_layers * spec.kv_heads * (spec.hidden // spec.heads) * 2
    print(f"model: {spec.num_layers} layers, {kv_per_token // 1024} KiB of KV per token; "
          f"logs in {workdir}", flush=True)

    bench = Bench(sizes, model, vocab, workdir)
    runs: dict = {}
    for w in chosen:
        name, method = WORKLOADS[w]
        t0 = time.time()
        print(f"workload {w}: {name}", flush=True)
        run = method(bench)
        run["mismatched_requests"] = mismatches(run["vllm"]["outputs"], run["stratacache"]["outputs"])
        run["outputs_identical"] = not run["mismatched_requests"]
        runs[w] = run
        print(f"  [{w}: {time.time() - t0:.0f}s]", flush=True)
    summary = summarize(runs)
    print_report(runs, summary)
    device = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU "
              f"(vllm-cpu, VLLM_CPU_NUM_OF_RESERVED_CPU={RESERVED_CPUS} for every server)")
    chart = args.chart or (args.json.with_name(args.json.stem + "_workloads.png") if args.json else None)
    if chart:
        print(f"chart: {write_chart(chart, runs)}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": device, "quick": args.quick, "sizes": asdict(sizes), "model_layers": spec.num_layers,
            "outputs_identical": all(r["outputs_identical"] for r in runs.values()),
            "summary": summary, "targets": {k: f"{o} {t}" for k, (o, t) in TARGETS.items()},
            "runs": runs}, indent=2))
    return 0 if all(runs[w]["outputs_identical"] for w in STRICT_IDENTITY if w in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
