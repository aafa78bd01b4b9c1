"""benchmarks/bench_pd.py: its arithmetic, and the CI smoke run.

The smoke run (``stratacache bench pd --quick``) starts four real vLLM OpenAI
servers (two colocated ``kv_both``, then a producer and a consumer) and the
proxy, and checks what the issue asks of it: greedy outputs identical in both
modes, the consumer loading every prompt it decodes and storing nothing, and
the summary fields, ``pd_itl_ratio`` first. No timing targets.
"""

from __future__ import annotations

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
import bench_pd  # noqa: E402

SUMMARY_KEYS = {"pd_itl_ratio", "pd_itl_p99_ratio", "pd_ttft_ratio", "colocated_ttft_s",
                "disaggregated_ttft_s", "colocated_itl_s", "disaggregated_itl_s",
                "colocated_itl_p99_s", "disaggregated_itl_p99_s", "consumer_loaded_fraction",
                "consumer_save_chunks", "outputs_identical"}


@pytest.mark.parametrize("seed", range(5))
def test_loadable_tokens_is_every_whole_block_short_of_the_last_token(seed):
    rng = random.Random(seed)
    block = rng.choice([16, 64, 128])
    for _ in range(200):
        n = rng.randrange(1, 20 * block)
        got = bench_pd.loadable_tokens(n, block)
        assert got % block == 0 and got <= n - 1 < got + block
    assert [bench_pd.loadable_tokens(n, 128) for n in (1, 128, 129, 256, 257)] == [0, 0, 128, 128, 256]


def _mode(ttfts, itls, loaded=0.0, saved=0.0, loadable=0):
    streams = [{"ttft_s": t, "itls": i} for t, i in zip(ttfts, itls)]
    counters = {"vllm_external_hit_tokens": loaded, "stratacache_save_chunks": saved}
    return {"figures": bench_pd.stream_figures(streams), "counters": [dict(counters), dict(counters)],
            "loadable_tokens": loadable}


def test_summary_divides_disaggregated_by_colocated():
    rng = random.Random(3)
    colo_itls = [[rng.uniform(0.01, 0.5) for _ in range(20)] for _ in range(3)]
    pd_itls = [[rng.uniform(0.01, 0.05) for _ in range(20)] for _ in range(3)]
    modes = {"colocated": _mode([1.0, 2.0, 3.0], colo_itls),
             "disaggregated": _mode([2.0, 3.0, 4.0], pd_itls, loaded=900, loadable=1000),
             "outputs_identical": True}
    s = bench_pd.summarize(modes)
    assert set(s) == SUMMARY_KEYS
    flat_colo = [x for i in colo_itls for x in i]
    flat_pd = [x for i in pd_itls for x in i]
    assert math.isclose(s["pd_itl_ratio"], (sum(flat_pd) / len(flat_pd)) / (sum(flat_colo) / len(flat_colo)))
    assert math.isclose(s["pd_ttft_ratio"], 3.0 / 2.0)
    assert s["colocated_ttft_s"] == 2.0 and s["disaggregated_ttft_s"] == 3.0
    assert s["consumer_loaded_fraction"] == 0.9 and s["outputs_identical"] is True


@pytest.mark.slow
def test_bench_pd_quick_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    # Options before NAME: after it, argparse has already closed the '--' list.
    result = subprocess.run([sys.executable, "-m", "stratacache.cli", "bench", "--quick", "--out", str(tmp_path),
                             "pd", "--", "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=1500, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "Two-core caveat" in result.stdout and "pd_itl_ratio" in result.stdout
    doc = json.loads((tmp_path / "pd.json").read_text())
    assert (tmp_path / "pd.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert doc["caveat"].startswith("Two-core caveat") and isinstance(doc["device"], str)
    summary = doc["summary"]
    assert set(summary) == SUMMARY_KEYS
    assert summary["outputs_identical"] is True and doc["outputs_identical"] is True
    for key in SUMMARY_KEYS - {"outputs_identical", "consumer_save_chunks"}:
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary[key])
    modes = doc["modes"]
    rounds = doc["sizes"]["rounds"]
    for mode in bench_pd.MODES:
        assert modes[mode]["figures"]["requests"] == rounds
        assert len(modes[mode]["outputs"]) == rounds
        outputs = modes[mode]["outputs"]
        assert all(len(r) == 5 and len(r[2]) == doc["sizes"]["stream_output"] for r in outputs)
    # Every decode was loaded, not computed, and the consumer stored nothing; the
    # producer stored, the colocated instances loaded nothing of each other's.
    assert summary["consumer_loaded_fraction"] == 1.0
    producer, consumer = modes["disaggregated"]["counters"]
    assert consumer["stratacache_save_chunks"] == 0 and producer["stratacache_save_chunks"] > 0
    assert producer["vllm_external_hit_tokens"] == 0
    assert all(c["vllm_external_hit_tokens"] == 0 for c in modes["colocated"]["counters"])
