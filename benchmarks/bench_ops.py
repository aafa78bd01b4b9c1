"""Throughput of the native KV transfer ops against their baselines, measured in one run.

Reference case (the summary): 32 layers, 64 KiB pages, 32 blocks per call
= 64 MiB moved per call, block ids a random subset of 128 blocks.

Baselines:
  copy  -- torch.Tensor.copy_ of one contiguous buffer of the same bytes (the
           memory-bandwidth ceiling);
  loop  -- the best per-layer loop in plain torch: index_select of each
           layer's pages into a layer-major buffer (no temporary) for a gather,
           index_copy_ for a scatter.
Each figure is the median of --repeat timed calls after warm-up; ratios are
throughputs, ours over the baseline.

  python benchmarks/bench_ops.py [--json PATH] [--device cpu|cuda] [--quick]

On CUDA (see benchmarks/gpu_check.sh) the layers live on the GPU and the flat
buffer in pinned host memory; it compares the UVA kernel, the staging+DMA
path, a per-page cudaMemcpyAsync loop and the contiguous pinned copy ceiling
over page sizes and layer counts, plus the slowdown of a concurrent matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from stratacache import ops

MiB = 1 << 20


def timed(fn, repeat: int, sync=lambda: None) -> float:
    """Median seconds of fn() over `repeat` calls, after two warm-up calls."""
    return timed_all({"fn": fn}, repeat, sync)["fn"]


def timed_all(fns: dict, repeat: int, sync=lambda: None) -> dict:
    """Median seconds of each fn, timed round-robin (one call of each per round)
    so that load from elsewhere on a shared machine hits every variant alike."""
    for fn in fns.values():
        fn()
        fn()
    sync()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def make_case(layers: int, page_bytes: int, pool_blocks: int, blocks: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # One buffer [L, B, P] viewed per layer, as the vLLM CPU backend hands it over.
    buf = torch.randint(0, 256, (layers, pool_blocks, page_bytes), dtype=torch.uint8, generator=gen).to(device)
    kv = list(buf.unbind(0))
    ids = torch.randperm(pool_blocks, generator=gen)[:blocks].sort().values
    return kv, ids


def cpu_device_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def bench_cpu(args) -> dict:
    L, P, n, pool = args.layers, args.page_kib * 1024, args.blocks, args.pool_blocks
    kv, ids = make_case(L, P, pool, n, "cpu")
    total = n * L * P
    cb = args.chunk_blocks
    out = torch.empty(total, dtype=torch.uint8)
    src = torch.randint(0, 256, (total,), dtype=torch.uint8)
    contiguous_dst = torch.empty(total, dtype=torch.uint8)
    layer_major = torch.empty(L, n, P, dtype=torch.uint8)
    layer_src = src.view(L, n, P)
    sums = ops.gather_blocks(kv, ids, out, cb)
    good = ops.chunk_checksums(src, cb * L * P)

    def gather_loop():
        for l in range(L):
            torch.index_select(kv[l], 0, ids, out=layer_major[l])

    def scatter_loop():
        for l in range(L):
            kv[l].index_copy_(0, ids, layer_src[l])

    t = timed_all({
        "copy": lambda: contiguous_dst.copy_(src),
        "gather": lambda: ops.gather_blocks(kv, ids, out),
        "gather_checksum": lambda: ops.gather_blocks(kv, ids, out, cb),
        "gather_then_checksum": lambda: (ops.gather_blocks(kv, ids, out), ops.chunk_checksums(out, cb * L * P)),
        "gather_loop": gather_loop,
        "scatter": lambda: ops.scatter_blocks(src, ids, kv),
        "scatter_verify": lambda: ops.scatter_blocks(src, ids, kv, cb, good),
        "scatter_loop": scatter_loop,
        "checksum64": lambda: ops.checksum64(src),
    }, args.repeat)
    assert bool(ops.scatter_blocks(src, ids, kv, cb, good).all())
    assert sums.numel() == (n + cb - 1) // cb
    gbps = {k: total / v / 1e9 for k, v in t.items()}
    rows = [
        ("copy_ (contiguous, ceiling)", "copy", "copy"),
        ("gather_blocks", "gather", "copy"),
        ("gather_blocks + fused checksums", "gather_checksum", "copy"),
        ("gather_blocks, then chunk_checksums", "gather_then_checksum", "copy"),
        ("per-layer index_select loop", "gather_loop", "copy"),
        ("scatter_blocks", "scatter", "copy"),
        ("scatter_blocks + fused verify", "scatter_verify", "copy"),
        ("per-layer index_copy_ loop", "scatter_loop", "copy"),
        ("checksum64 (read only)", "checksum64", "copy"),
    ]
    table = [{"op": label, "ms": t[key] * 1e3, "GB/s": gbps[key], "vs_copy": t[base] / t[key]}
             for label, key, base in rows]
    summary = {
        "gather_vs_copy": t["copy"] / t["gather"],
        "scatter_vs_copy": t["copy"] / t["scatter"],
        "gather_vs_loop": t["gather_loop"] / t["gather"],
        "scatter_vs_loop": t["scatter_loop"] / t["scatter"],
        "gather_checksum_vs_copy": t["copy"] / t["gather_checksum"],
        "scatter_verify_vs_copy": t["copy"] / t["scatter_verify"],
        "gather_checksum_vs_loop": t["gather_loop"] / t["gather_checksum"],
        "scatter_verify_vs_loop": t["scatter_loop"] / t["scatter_verify"],
        "checksum64_vs_copy": t["copy"] / t["checksum64"],
    }
    return {"table": table, "summary": summary,
            "case": {"layers": L, "page_bytes": P, "blocks_per_call": n, "pool_blocks": pool,
                     "bytes_per_call": total, "chunk_blocks": cb, "repeat": args.repeat}}


# ----------------------------------------------------------------------------- CUDA

def bench_cuda(args) -> dict:
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    r = args.repeat
    rows, summary = [], {}
    for L in args.cuda_layers:
        for kib in args.cuda_page_kib:
            P = kib * 1024
            n = max(1, min(args.cuda_bytes // (L * P), 4096))
            pool = max(2 * n, 64)
            kv, ids = make_case(L, P, pool, n, dev)
            ids_dev = ids.to(dev)
            total = n * L * P
            host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            dev_src = torch.empty(total, dtype=torch.uint8, device=dev)
            pages = host.view(n, L, P)
            id_list = ids.tolist()

            def page_loop():
                for i, b in enumerate(id_list):
                    for l in range(L):
                        pages[i, l].copy_(kv[l][b], non_blocking=True)

            t = {
                "ceiling": timed(lambda: host.copy_(dev_src, non_blocking=True), r, sync),
                "uva": timed(lambda: ops.gather_blocks(kv, ids, host, transfer="uva"), r, sync),
                "uva_checksum": timed(lambda: ops.gather_blocks(kv, ids, host, 2, transfer="uva"), r, sync),
                "staging": timed(lambda: ops.gather_blocks(kv, ids, host, transfer="staging"), r, sync),
                "scatter_uva": timed(lambda: ops.scatter_blocks(host, ids, kv, transfer="uva"), r, sync),
                "scatter_staging": timed(lambda: ops.scatter_blocks(host, ids, kv, transfer="staging"), r, sync),
                "page_loop": timed(page_loop, max(3, r // 3), sync),
            }
            # Reference check of this case while we have it.
            ops.gather_blocks(kv, ids_dev, host, transfer="uva")
            sync()
            want, _ = ops.ref_gather_blocks([k.cpu() for k in kv], ids)
            assert torch.equal(host, want.reshape(-1)), f"UVA gather mismatch at L={L} page={kib} KiB"
            slow = matmul_slowdown(lambda: ops.gather_blocks(kv, ids, host, transfer="uva"), dev)
            slow_staging = matmul_slowdown(lambda: ops.gather_blocks(kv, ids, host, transfer="staging"), dev)
            row = {"layers": L, "page_kib": kib, "MiB": total / MiB,
                   **{f"{k}_GBps": total / v / 1e9 for k, v in t.items()},
                   "uva_vs_ceiling": t["ceiling"] / t["uva"], "staging_vs_ceiling": t["ceiling"] / t["staging"],
                   "uva_vs_page_loop": t["page_loop"] / t["uva"],
                   "matmul_slowdown_uva": slow, "matmul_slowdown_staging": slow_staging,
                   "cuMemcpyBatchAsync": "not measured (no Python binding in torch)"}
            rows.append(row)
            del kv, host, dev_src
            torch.cuda.empty_cache()
    ref = [x for x in rows if x["page_kib"] == 16] or rows
    summary = {
        "gather_vs_copy": min(x["uva_vs_ceiling"] for x in rows),
        "gather_vs_loop_16KiB": min(x["uva_vs_page_loop"] for x in ref),
        "best_path": "uva" if statistics.median(x["uva_vs_ceiling"] for x in rows) >=
        statistics.median(x["staging_vs_ceiling"] for x in rows) else "staging",
    }
    return {"table": rows, "summary": summary,
            "case": {"layers": args.cuda_layers, "page_kib": args.cuda_page_kib, "bytes_per_call": args.cuda_bytes}}


def matmul_slowdown(transfer, dev, size: int = 4096, iters: int = 20) -> float:
    """Time of `iters` matmuls while `transfer` runs on a side stream, over the time alone."""
    a = torch.randn(size, size, device=dev, dtype=torch.float16)
    side = torch.cuda.Stream()

    def run(with_transfer: bool) -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if with_transfer:
            with torch.cuda.stream(side):
                for _ in range(4):
                    transfer()
        start.record()
        for _ in range(iters):
            a @ a
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    run(False)
    alone = statistics.median(run(False) for _ in range(3))
    shared = statistics.median(run(True) for _ in range(3))
    return shared / alone


# ----------------------------------------------------------------------------- output

def print_table(result: dict) -> None:
    rows = result["table"]
    if not rows:
        return
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(fmt(r[k]).ljust(widths[k]) for k in keys))
    print()
    for k, v in result["summary"].items():
        print(f"{k:28s} {fmt(v)}")


def fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--page-kib", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=32, help="blocks per call")
    ap.add_argument("--pool-blocks", type=int, default=128, help="blocks in the paged KV memory")
    ap.add_argument("--chunk-blocks", type=int, default=2, help="blocks per checksummed chunk")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--cuda-layers", type=int, nargs="+", default=[32, 80])
    ap.add_argument("--cuda-page-kib", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--cuda-bytes", type=int, default=256 * MiB, help="bytes per call on CUDA")
    ap.add_argument("--quick", action="store_true", help="small case and few repeats (smoke test)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.page_kib, args.blocks, args.pool_blocks, args.repeat = 4, 16, 8, 16, 3
        args.cuda_layers, args.cuda_page_kib, args.cuda_bytes = [4], [16], 4 * MiB
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda needs a CUDA device")
        device = f"cuda: {torch.cuda.get_device_name()}, torch {torch.__version__}"
        result = bench_cuda(args)
    else:
        device = cpu_device_name()
        result = bench_cpu(args)
    result["device"] = device
    print(f"device: {device}")
    print(f"case: {json.dumps(result['case'])}")
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
