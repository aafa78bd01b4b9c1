"""Weights fingerprint cost: first start (hash every byte) and warm start (stat + cache read).

Writes a model directory of random safetensors shards (``--gib``, default 2),
then times ``weights_fingerprint`` with an empty fingerprint cache (first
start) and again with the cache filled (warm start; each warm run is a fresh
process, as an engine start is). ``--sparse-gib`` adds a sparse model of that
size (holes, so no disk space: it shows that the warm cost does not grow with
the model; its first start is dominated by the kernel zero-filling holes). It
reports wall and CPU time (the box may be shared). The files are in the page cache
when hashed, as they are right after vLLM has loaded them.

    python benchmarks/bench_fingerprint.py --dir /tmp/fp-bench --gib 2 --sparse-gib 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64 << 20

WARM = """
import sys, time
t0 = time.perf_counter()
from stratacache.adapters.vllm.model_identity import weights_fingerprint
t1 = time.perf_counter()
fp = weights_fingerprint(sys.argv[1], None)
t2 = time.perf_counter()
print(fp, t1 - t0, t2 - t1)
"""


def write_shard(path: Path, size: int, sparse: bool) -> None:
    """A valid safetensors file holding one uint8 tensor of ``size`` bytes."""
    header = json.dumps({"weight": {"dtype": "U8", "shape": [size],
                                    "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        if sparse:
            fh.truncate(fh.tell() + size)
            return
        left = size
        while left:
            n = min(BLOCK, left)
            fh.write(os.urandom(n))
            left -= n


def make_model(directory: Path, gib: float, shards: int, sparse: bool) -> int:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    per = int(gib * 2**30) // shards
    for i in range(shards):
        write_shard(directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", per, sparse)
    return per * shards


def measure(model: Path, cache: Path, warm_runs: int) -> dict:
    env = dict(os.environ, STRATACACHE_FINGERPRINT_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    shutil.rmtree(cache, ignore_errors=True)
    # Entries are only cached for files older than the racy-ctime margin.
    time.sleep(1.2)
    runs = []
    for _ in range(1 + warm_runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, "-c", WARM, str(model)], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        runs.append({"fingerprint": out[0], "import_s": float(out[1]), "call_s": float(out[2]),
                     "process_cpu_s": cpu})
    assert len({r["fingerprint"] for r in runs}) == 1
    warm = sorted(r["call_s"] for r in runs[1:])
    return {"first_start_s": runs[0]["call_s"], "first_start_process_cpu_s": runs[0]["process_cpu_s"],
            "warm_start_median_s": warm[len(warm) // 2],
            "warm_start_max_s": warm[-1], "import_s": runs[0]["import_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/stratacache-fp-bench"))
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--sparse-gib", type=float, default=0.0)
    ap.add_argument("--warm-runs", type=int, default=5)
    args = ap.parse_args()
    results = []
    cases = [("random", args.gib, False)] + ([("sparse", args.sparse_gib, True)]
                                             if args.sparse_gib else [])
    for kind, gib, sparse in cases:
        model = args.dir / f"model-{kind}"
        size = make_model(model, gib, args.shards, sparse)
        row = {"model": kind, "bytes": size, "shards": args.shards,
               **measure(model, args.dir / f"cache-{kind}", args.warm_runs)}
        row["first_start_gbps"] = size / row["first_start_s"] / 1e9
        row["gb_per_cpu_second"] = size / row["first_start_process_cpu_s"] / 1e9
        row["load_average"] = os.getloadavg()[0]
        results.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
