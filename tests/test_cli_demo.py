"""``stratacache demo --quick`` end to end: real vLLM engines in subprocesses, real connector.

The demo must report identical outputs in all three runs and a speed-up above
1 both for repeat questions in the same engine and for a fresh engine that
only has the shared-region tier to go on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import cli


@pytest.mark.slow
def test_demo_quick_reports_identical_outputs_and_a_speedup(tmp_path):
    out = tmp_path / "demo.json"
    result = cli("demo", "--quick", "--workdir", tmp_path / "work", "--json", out, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Honest about the model, and shows the table.
    assert "random-weight" in result.stdout and "Nothing was downloaded" in result.stdout
    assert "mean TTFT ms" in result.stdout and "outputs identical" in result.stdout

    report = json.loads(out.read_text())
    assert isinstance(report["device"], str) and report["device"]
    assert report["model"]["random_weights"] is True
    summary = report["summary"]
    assert summary["outputs_identical"] is True
    assert summary["speedup_same_engine"] > 1.0, summary
    assert summary["speedup_fresh_engine"] > 1.0, summary

    queries = report["queries"]
    assert len(queries["vllm"]) == len(queries["strata"]) == len(queries["fresh"]) == 6
    for base, strata, fresh in zip(queries["vllm"], queries["strata"], queries["fresh"]):
        assert base["token_ids"] == strata["token_ids"] == fresh["token_ids"]
        assert len(base["token_ids"]) > 0
        if base["question"] > 0:
            # A later question of the same document reuses at least 80% of its prompt.
            assert strata["cached_tokens"] >= 0.8 * strata["prompt_tokens"], strata
        # The fresh engine (new process) gets every document from the shared region.
        assert fresh["cached_tokens"] >= 0.8 * fresh["prompt_tokens"], fresh
    # vLLM alone cannot keep the documents: its KV space is one document.
    assert all(q["cached_tokens"] < 0.5 * q["prompt_tokens"] for q in queries["vllm"][3:])

    chart = Path(report["chart"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The private shared-memory region is cleaned up.
    assert not Path(report["region"]).exists()
