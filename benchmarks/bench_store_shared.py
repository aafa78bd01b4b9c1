"""Shared-region tier against plain ``copy_``, measured in the same run.

* ``shared_put_vs_copy`` / ``shared_get_vs_copy``: one process,
  ``SharedRegionTier.put`` (reserve, copy into the region, commit) and
  ``get(out=...)`` (lease, copy out, version re-check) of 1-32 MiB objects
  over ``dst.copy_(src)`` of the same bytes between warm private buffers,
  timed in interleaved rounds. Median over sizes (worst size beside it).
  Target >= 0.8.
* ``shared_xproc_get_vs_copy``: a second process attaches to the region and
  fetches what this process wrote straight into its own destination tensors,
  against ``copy_`` of the same bytes inside that process. Target >= 0.8.
* ``shared_lookups_per_s``: ``contains`` of many ArtifactKeys (their encoding
  included) in one native call, all resident. Target >= 1,000,000.

    python benchmarks/bench_store_shared.py [--quick] [--json PATH]

``benchmarks/bench_store.py`` imports ``run(quick)`` and merges its summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_store import device_string, paired, summarise  # noqa: E402
from stratacache.backends.shared import SharedRegionTier  # noqa: E402
from stratacache.core.artifact import meta_for  # noqa: E402
from stratacache.core.keys import ArtifactKey  # noqa: E402

MIB = 1 << 20
NS = "bench-shared"


def object_keys(size: int, count: int) -> list[ArtifactKey]:
    return [ArtifactKey("kv", NS, f"{size}-{i}") for i in range(count)]


def xproc_reader(path: str, capacity: int, max_objects: int, size: int, count: int, repeats: int) -> dict:
    """Run in another process: get(out=...) of the parent's objects vs copy_ of private bytes."""
    layer = SharedRegionTier(path, capacity, max_objects)
    keys = object_keys(size, count)
    dsts = [torch.empty(size, dtype=torch.uint8).fill_(1) for _ in range(count)]
    srcs = [torch.full((size,), 7, dtype=torch.uint8) for _ in range(count)]

    def copy_all():
        for d, s in zip(dsts, srcs):
            d.copy_(s)

    def get_all():
        for k, d in zip(keys, dsts):
            assert layer.get(k, out=d) is not None, f"{k} missing in the reader process"

    far = paired(count * size, {"copy": copy_all, "get": get_all}, repeats)
    checks = [int(d[:4096].sum()) for d in dsts]
    layer.close()
    return {"copy": far["copy"], "get": far["get"], "ratio": far["get_ratio"], "checks": checks}


def bench_size(path: str, size: int, total: int, repeats: int) -> dict:
    count = max(2, total // size)
    capacity = 2 * count * size + 64 * MIB    # an overwrite holds old and new until commit
    max_objects = 4 * count + 64
    layer = SharedRegionTier(path, capacity, max_objects, reset=True)
    g = torch.Generator().manual_seed(size)
    srcs = [torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8) for _ in range(count)]
    metas = [meta_for(s, checksum=i) for i, s in enumerate(srcs)]
    keys = object_keys(size, count)
    dsts = [torch.empty(size, dtype=torch.uint8).fill_(1) for _ in range(count)]

    def copy_all():
        for d, s in zip(dsts, srcs):
            d.copy_(s)

    def put_all():
        for k, s, m in zip(keys, srcs, metas):
            assert layer.put(k, s, m)

    def get_all():
        for k, d in zip(keys, dsts):
            assert layer.get(k, out=d) is not None

    put_all()   # with paired's warm-up pass, every region page is touched before timing
    near = paired(count * size, {"copy": copy_all, "put": put_all, "get": get_all}, repeats)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs)), "shared tier returned wrong bytes"

    reader = subprocess.run([sys.executable, __file__, "--reader", json.dumps(
        [path, capacity, max_objects, size, count, repeats])], capture_output=True, text=True, timeout=600)
    if reader.returncode != 0:
        raise RuntimeError(f"reader process failed: {reader.stderr[-2000:]}")
    far = json.loads(reader.stdout.strip().splitlines()[-1])
    assert far["checks"] == [int(s[:4096].sum()) for s in srcs], "reader process got wrong bytes"
    layer.close()
    return {"bench": "shared", "object_MiB": size / MIB, "objects": count,
            "copy_GBps": round(near["copy"], 2), "put_GBps": round(near["put"], 2),
            "get_GBps": round(near["get"], 2), "xproc_copy_GBps": round(far["copy"], 2),
            "xproc_get_GBps": round(far["get"], 2), "put_vs_copy": round(near["put_ratio"], 3),
            "get_vs_copy": round(near["get_ratio"], 3), "xproc_get_vs_copy": round(far["ratio"], 3)}


def bench_lookups(path: str, n_keys: int, rounds: int) -> dict:
    layer = SharedRegionTier(path, (n_keys + 64) * 256, n_keys + 64, block_bytes=256, reset=True)
    ns = "llama|bf16|LBHNC|h8x64|b16|tp0of1"
    names = [f"{i:064x}" for i in range(n_keys)]
    one = torch.zeros(64, dtype=torch.uint8)
    meta = meta_for(one, checksum=0)
    for name in names:
        assert layer.put(ArtifactKey("kv", ns, name), one, meta)
    best = best_encoded = 0.0
    for _ in range(rounds):
        keys = [ArtifactKey("kv", ns, n) for n in names]   # fresh (equal, not identical) keys
        t0 = time.perf_counter()
        found = layer.contains([k.encode() for k in keys])
        dt = time.perf_counter() - t0
        assert all(found)
        best = max(best, n_keys / dt)
        encoded = [k.encode() for k in keys]
        t0 = time.perf_counter()
        found = layer.contains(encoded)
        dt = time.perf_counter() - t0
        assert all(found)
        best_encoded = max(best_encoded, n_keys / dt)
    layer.close()
    return {"bench": "shared_lookups", "keys": n_keys, "keys_per_s": int(best),
            "pre_encoded_keys_per_s": int(best_encoded)}


def run(quick: bool) -> tuple[dict, list[dict]]:
    sizes = [1 * MIB, 32 * MIB] if quick else [1 * MIB, 4 * MIB, 16 * MIB, 32 * MIB]
    total = (64 if quick else 256) * MIB
    repeats = 3 if quick else 5
    path = f"/dev/shm/sc-bench-shared-{os.getpid()}-{uuid.uuid4().hex[:6]}.region"
    rows = []
    try:
        for size in sizes:
            rows.append(bench_size(path, size, total, repeats))
        lookups = bench_lookups(path, 20_000 if quick else 100_000, 3 if quick else 7)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    rows.append(lookups)
    sized = [r for r in rows if r["bench"] == "shared"]
    summary = {}
    for field in ("put_vs_copy", "get_vs_copy", "xproc_get_vs_copy"):
        summary.update(summarise(f"shared_{field}", [r[field] for r in sized]))
    summary["shared_lookups_per_s"] = lookups["keys_per_s"]
    return summary, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke run)")
    ap.add_argument("--json", metavar="PATH", help="write {device, summary, rows} JSON here")
    ap.add_argument("--reader", help=argparse.SUPPRESS)   # internal: the cross-process reader
    args = ap.parse_args(argv)
    if args.reader:
        print(json.dumps(xproc_reader(*json.loads(args.reader))))
        return 0
    summary, rows = run(args.quick)
    for row in rows:
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
    print("summary:")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_string(), "quick": args.quick, "summary": summary, "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
