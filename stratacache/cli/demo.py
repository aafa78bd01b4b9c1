"""``stratacache demo``: long-document QA on vLLM, without and with StrataCache.

Three runs of the same queries, each engine in its own process:

1. vLLM alone, with its own prefix caching. Its KV space is deliberately
   sized for about one document, and documents are queried round-robin, so
   by the time a document comes back its blocks have been evicted: this is
   the common production situation (many long contexts, little KV memory).
2. vLLM with StrataCacheConnectorV1 in the same engine: the first pass over
   the documents stores their KV in the tiers, later questions load it back.
3. A fresh engine (a new process, empty CPU tier) that finds the KV persisted
   by run 2 in the shared-region tier.

The model is a small random-weight Llama with a tokenizer trained locally
(``stratacache.models``), so nothing is downloaded and its answers mean
nothing; what the demo shows is that they are token-for-token identical and
how much sooner the first token arrives.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

from stratacache.cli.errors import CliError
from stratacache.cli.report import (device_description, format_table, write_bar_chart,
                                    write_json)

BLOCK_SIZE = 128            # vLLM's default on the CPU backend; set explicitly for every engine
MAX_MODEL_LEN = 2048
DOC_WORDS = 1400            # about 1,700 tokens with the demo tokenizer: 13-14 blocks
ENGINE_TIMEOUT_S = 900

RUNS = (
    ("vllm", "vLLM alone (prefix caching)"),
    ("strata", "StrataCache, same engine"),
    ("fresh", "StrataCache, fresh engine (new process)"),
)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the long-document QA demo (vLLM without/with StrataCache)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smaller workload (3 documents x 2 questions), for CI")
    p.add_argument("--docs", type=_positive_int, default=None,
                   help="number of documents (at least 3; default 4, --quick 3)")
    p.add_argument("--questions", type=_positive_int, default=None,
                   help="questions per document (at least 2; default 3, --quick 2)")
    p.add_argument("--max-tokens", type=_positive_int, default=16,
                   help="tokens generated per answer (default 16)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the model, logs and results go (default ~/.cache/stratacache/demo)")
    p.add_argument("--json", dest="json_path", type=Path, default=None,
                   help="also write the results as JSON to this file")
    p.add_argument("--keep-region", action="store_true",
                   help="keep the shared-memory region afterwards (to look at it with "
                        "'stratacache inspect')")
    p.set_defaults(run=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args) -> int:
    docs = args.docs or (3 if args.quick else 4)
    questions = args.questions or (2 if args.quick else 3)
    if docs < 3:
        raise CliError(f"--docs must be at least 3 (round-robin over fewer documents lets "
                       f"vLLM's own cache keep them), got {docs}", status=2)
    if questions < 2:
        raise CliError(f"--questions must be at least 2 (the first question of each document "
                       f"only stores), got {questions}", status=2)
    if args.max_tokens > 256:
        raise CliError(f"--max-tokens must be at most 256, got {args.max_tokens}", status=2)
    for module in ("vllm", "matplotlib", "tqdm"):
        if importlib.util.find_spec(module) is None:
            raise CliError(f"the demo needs the Python package '{module}' (run ./dev demo, which "
                           f"installs everything)")
    from stratacache.adapters.vllm import kv_transfer_config

    workdir = (args.workdir or Path("~/.cache/stratacache/demo")).expanduser()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create --workdir {workdir}: {exc.strerror}") from None

    model_dir, spec = _make_model(workdir)
    print(f"Model: a random-weight Llama ({spec.num_layers} layers, hidden {spec.hidden}, "
          f"{spec.heads} heads / {spec.kv_heads} KV heads) with a tokenizer trained here on "
          f"generated text. Nothing was downloaded; its answers are meaningless, what matters "
          f"is that they are identical in every run.\n  {model_dir}")
    queries = _workload(docs, questions)
    print(f"Workload: {docs} documents of about {DOC_WORDS * 6 // 5} tokens, {questions} questions "
          f"each, asked round-robin; vLLM's KV space holds about one document "
          f"({_kv_blocks()} blocks of {BLOCK_SIZE} tokens).\n")

    region = _region_path()
    config_path = workdir / "demo-config.yaml"
    _write_demo_config(config_path, region)
    transfer = kv_transfer_config(config_path=str(config_path))
    try:
        results = {}
        for key, label in RUNS:
            results[key] = _run_engine(key, label, model_dir, queries, args.max_tokens,
                                       None if key == "vllm" else transfer, workdir)
    finally:
        if not args.keep_region:
            _remove(region)

    report = _report(results, queries, docs, questions, spec, model_dir)
    print()
    print(format_table(["run", "queries", "mean TTFT ms", "cached tokens/query",
                        "speed-up", "outputs identical"],
                       [[r["run"], r["queries"], r["mean_ttft_ms"], r["mean_cached_tokens"],
                         r["speedup"], r["outputs_identical"]] for r in report["runs"]]))
    chart = write_bar_chart(
        workdir / "demo.png", "Long-document QA: time to first token (lower is better)",
        [r["run"].replace(", ", "\n") for r in report["runs"]],
        [r["mean_ttft_ms"] for r in report["runs"]], "mean TTFT (ms)",
        bar_text=[f"{r['mean_ttft_ms']:,.0f} ms" + ("" if i == 0 else f" ({r['speedup']:.1f}x)")
                  for i, r in enumerate(report["runs"])])
    summary = report["summary"]
    print(f"\nSpeed-up of repeat questions in the same engine: {summary['speedup_same_engine']:.2f}x; "
          f"in a fresh engine reusing the shared-region KV: {summary['speedup_fresh_engine']:.2f}x. "
          f"Outputs identical: {'yes' if summary['outputs_identical'] else 'NO'}.")
    if summary["fresh_engine_cached_fraction"] == 0:
        print(f"warning: the fresh engine found no KV in StrataCache; see "
              f"{workdir / 'strata.log'} and {workdir / 'fresh.log'}")
    print(f"Chart: {chart}")
    report["chart"] = str(chart)
    report["region"] = str(region)
    write_json(workdir / "demo.json", report)
    if args.json_path:
        write_json(args.json_path, report)
        print(f"JSON: {args.json_path}")
    if args.keep_region:
        print(f"Shared region kept: look inside with 'stratacache inspect --config {config_path}'")
    if not summary["outputs_identical"]:
        raise CliError("outputs differ between runs: StrataCache changed what vLLM generated")
    return 0


def _make_model(workdir: Path):
    from stratacache.models import LlamaSpec, make_local_llama

    spec = LlamaSpec()
    target = workdir / f"model-{spec.digest()}"
    if not (target / "stratacache_spec.json").exists():
        print("Making the demo model (once; cached for later runs) ...", flush=True)
    return make_local_llama(target, spec), spec


def _workload(docs: int, questions: int) -> list[dict]:
    """Round-robin over documents: doc 0 q0, doc 1 q0, ..., doc 0 q1, ..."""
    from stratacache.models import sample_text

    texts = [sample_text(DOC_WORDS, seed=100 + d) for d in range(docs)]
    return [{"doc": d, "question": q,
             "prompt": f"Document {d}:\n{texts[d]}\n\nQuestion: "
                       f"{sample_text(10, seed=1000 + 31 * d + q)}?\nAnswer:"}
            for q in range(questions) for d in range(docs)]


def _kv_blocks() -> int:
    """vLLM's KV space: one max-length request plus one block, i.e. about one document."""
    return -(-MAX_MODEL_LEN // BLOCK_SIZE) + 1


def _region_path() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"stratacache-demo-{os.getuid()}-{os.getpid()}.region"


def _write_demo_config(path: Path, region: Path) -> None:
    import yaml

    config = {"tiers": {"cpu": {"enabled": True, "capacity": "256MiB"},
                        "shared": {"enabled": True, "path": str(region), "capacity": "512MiB",
                                   "reset": False},
                        "disk": {"enabled": False}, "redis": {"enabled": False},
                        "mooncake": {"enabled": False}}}
    path.write_text("# Written by 'stratacache demo': the CPU tier plus a private shared region.\n"
                    + yaml.safe_dump(config, sort_keys=False))


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _run_engine(key: str, label: str, model_dir: Path, queries: list[dict], max_tokens: int,
                transfer: dict | None, workdir: Path) -> dict:
    """Run one engine in a child process with a progress bar; returns its result document."""
    from tqdm import tqdm

    from stratacache.cli.demo_engine import MARK
    from stratacache.models import sample_text

    spec = {"model": str(model_dir), "queries": queries, "max_tokens": max_tokens,
            "max_model_len": MAX_MODEL_LEN, "block_size": BLOCK_SIZE, "kv_blocks": _kv_blocks(),
            "kv_transfer_config": transfer, "warmup_prompt": "Warm up: " + sample_text(200, seed=7)}
    spec_path, result_path, log_path = (workdir / f"{key}.spec.json", workdir / f"{key}.result.json",
                                        workdir / f"{key}.log")
    spec_path.write_text(json.dumps(spec))
    _remove(result_path)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "stratacache.cli.demo_engine", str(spec_path), str(result_path)]
    tail: deque[str] = deque(maxlen=5)
    bar = tqdm(total=len(queries) + 1, desc=f"{label:<40.40}", unit="step", leave=True,
               bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]{postfix}")
    bar.set_postfix_str("starting engine")
    with open(log_path, "w") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True) as child:
        timed_out = threading.Event()

        def expire():
            timed_out.set()
            os.killpg(child.pid, signal.SIGKILL)

        watchdog = threading.Timer(ENGINE_TIMEOUT_S, expire)
        watchdog.start()
        try:
            for line in child.stdout:
                if line.startswith(MARK):
                    bar.update(1)
                    bar.set_postfix_str("queries")
                    continue
                log.write(line)
                if line.strip():
                    tail.append(line.strip())
            status = child.wait()
        except BaseException:
            os.killpg(child.pid, signal.SIGKILL)
            raise
        finally:
            watchdog.cancel()
            bar.close()
    if timed_out.is_set():
        raise CliError(f"{label}: no result after {ENGINE_TIMEOUT_S} s (log: {log_path})")
    if status != 0 or not result_path.exists():
        last = next((t for t in reversed(tail) if "Error" in t), tail[-1] if tail else "")
        raise CliError(f"{label}: the vLLM engine failed (exit {status}): {last[:300]} "
                       f"(full log: {log_path})")
    return json.loads(result_path.read_text())


def _report(outcomes: dict, queries: list[dict], docs: int, questions: int, spec, model_dir) -> dict:
    results = {key: outcome["queries"] for key, outcome in outcomes.items()}
    base = results["vllm"]

    def row(name: str, got: list[dict], indices: list[int]) -> dict:
        mine = [got[i]["ttft_s"] for i in indices]
        ref = [base[i]["ttft_s"] for i in indices]
        return {"run": name, "queries": len(indices),
                "mean_ttft_ms": 1000 * statistics.fmean(mine),
                "mean_cached_tokens": statistics.fmean(got[i]["cached_tokens"] for i in indices),
                "speedup": statistics.fmean(ref) / statistics.fmean(mine),
                "outputs_identical": all(got[i]["token_ids"] == base[i]["token_ids"]
                                         for i in indices)}

    every = list(range(len(queries)))
    first = [i for i in every if queries[i]["question"] == 0]
    repeat = [i for i in every if queries[i]["question"] > 0]
    runs = [row(RUNS[0][1], base, every),
            row("StrataCache, same engine: 1st question (stores)", results["strata"], first),
            row("StrataCache, same engine: later questions", results["strata"], repeat),
            row(RUNS[2][1], results["fresh"], every)]
    prompt_tokens = statistics.fmean(q["prompt_tokens"] for q in base)
    return {
        "device": device_description(),
        "model": {"path": str(model_dir), "random_weights": True, "tokenizer": "trained locally",
                  "layers": spec.num_layers, "hidden": spec.hidden, "heads": spec.heads,
                  "kv_heads": spec.kv_heads},
        "workload": {"documents": docs, "questions_per_document": questions,
                     "mean_prompt_tokens": prompt_tokens, "vllm_kv_blocks": _kv_blocks(),
                     "block_size": BLOCK_SIZE},
        "runs": runs,
        "queries": {key: [{k: v for k, v in r.items() if k != "text"} for r in results[key]]
                    for key, _ in RUNS},
        "connector_metrics": {key: outcomes[key]["connector_metrics"] for key, _ in RUNS},
        "summary": {
            "speedup_same_engine": runs[2]["speedup"],
            "speedup_fresh_engine": runs[3]["speedup"],
            "outputs_identical": all(r["outputs_identical"] for r in runs),
            "fresh_engine_cached_fraction": runs[3]["mean_cached_tokens"] / prompt_tokens,
            "baseline_mean_ttft_ms": runs[0]["mean_ttft_ms"],
        },
    }
