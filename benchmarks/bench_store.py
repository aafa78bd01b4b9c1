"""Storage-plane throughput against plain baselines, measured in the same run.

* ``cpu_put_vs_copy`` / ``cpu_get_vs_copy``: ``StorageEngine.store`` (checksum
  precomputed, CPU tier) and ``load(out=...)`` of 1-32 MiB objects, over
  ``dst.copy_(src)`` of the same bytes into a same-sized rotating set of
  preallocated buffers (both warm: pages already committed). Target >= 0.8.
* ``disk_write_vs_file`` / ``disk_read_vs_file``: the disk tier's put (temp
  file + rename, header, accounting, eviction) and get (read + checksum
  verification into ``out``) over plain sequential ``write``/``readinto`` of
  the same bytes to files in the same directory. Target >= 0.8.
* ``lookups_per_s``: ``prefix_lookup`` over 32-key lists of freshly built
  (equal, not identical) keys, all resident. Target >= 1,000,000 keys/s.
* ``mooncake_put_vs_raw`` / ``mooncake_get_vs_raw``: the Mooncake tier's
  ``put_many`` / ``get_many(outs)`` of 1-16 MiB objects over raw
  ``MooncakeDistributedStore.batch_put_from`` / ``batch_get_into`` of the same
  bytes, into a segment held by another process. Target >= 0.9.

Baseline and measured functions are timed in interleaved rounds (the machine
is shared, so load drifts); each ratio is the median over rounds, and each
summary field is the median over object sizes, with ``*_worst_size`` beside it.

It also runs ``benchmarks/bench_store_shared.py`` and
``benchmarks/bench_store_redis.py`` (their ``run(quick) -> (summary, rows)``)
and merges their summaries; a missing or failing one is recorded, not fatal.

    python benchmarks/bench_store.py [--quick] [--json PATH] [--mooncake yes|no|only]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stratacache.backends.disk import DiskTier  # noqa: E402
from stratacache.config import load_config  # noqa: E402
from stratacache.core.keys import ArtifactKey  # noqa: E402
from stratacache.engine import StorageEngine  # noqa: E402
from stratacache.ops import checksum64  # noqa: E402
from stratacache.tiering import TierChain, TierSettings  # noqa: E402

MIB = 1 << 20
U64 = 0xFFFFFFFFFFFFFFFF


def device_string() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()}-core {cpu}{gpu}, torch {torch.__version__}"


def paired(nbytes: int, fns: dict, repeats: int) -> dict:
    """GB/s of each function, timed in interleaved rounds (baseline and measured side by side).

    The machine is shared, so load changes between rounds; interleaving keeps a
    ratio's two sides under the same load, and every other round runs them in reverse
    order, so that no function always runs right after the same neighbour (a cache or
    thread-pool state it leaves behind). Returns {name: median GB/s} plus
    {name + "_ratio": median over rounds of rate / rate of the first function}.
    """
    for fn in fns.values():
        fn()   # warm-up
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in (fns.items() if r % 2 == 0 else reversed(fns.items())):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = next(iter(fns))
    out = {name: nbytes / statistics.median(ts) / 1e9 for name, ts in times.items()}
    for name in fns:
        out[name + "_ratio"] = statistics.median(b / t for b, t in zip(times[base], times[name]))
    return out


def summarise(name: str, ratios: list[float]) -> dict:
    """The headline ratio is the median over object sizes; the worst size is kept beside it."""
    return {name: round(statistics.median(ratios), 3), name + "_worst_size": round(min(ratios), 3)}


def payloads(size: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(size)
    return [torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8) for _ in range(count)]


def bench_cpu(sizes, total_bytes: int, repeats: int) -> tuple[dict, list[dict]]:
    rows, put_ratios, get_ratios = [], [], []
    for size in sizes:
        count = max(2, total_bytes // size)
        srcs = payloads(size, count)
        sums = [checksum64(s) & U64 for s in srcs]
        keys = [ArtifactKey("kv", "bench-cpu", f"{size}-{i}") for i in range(count)]
        cfg = load_config(overrides={"tiers.cpu.capacity": count * size, "tiers.cpu.pin_memory": False,
                                     "tiers.shared.enabled": False})
        engine = StorageEngine(cfg)
        dsts = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]
        for d in dsts:
            d.fill_(1)

        def copy_all():
            for d, s in zip(dsts, srcs):
                d.copy_(s)

        def store_all():
            for k, s, c in zip(keys, srcs, sums):
                engine.store(k, s, checksum=c)

        def load_all():
            for k, d in zip(keys, dsts):
                engine.load(k, out=d)

        r = paired(count * size, {"copy": copy_all, "put": store_all, "get": load_all}, repeats)
        base, put, get = r["copy"], r["put"], r["get"]
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs)), "cpu tier returned wrong bytes"
        engine.close()
        put_ratios.append(r["put_ratio"])
        get_ratios.append(r["get_ratio"])
        rows.append({"bench": "cpu", "object_MiB": size / MIB, "objects": count, "copy_GBps": round(base, 2),
                     "put_GBps": round(put, 2), "get_GBps": round(get, 2),
                     "put_vs_copy": round(r["put_ratio"], 3), "get_vs_copy": round(r["get_ratio"], 3)})
    return summarise("cpu_put_vs_copy", put_ratios) | summarise("cpu_get_vs_copy", get_ratios), rows


def bench_disk(sizes, total_bytes: int, repeats: int, where: str) -> tuple[dict, list[dict]]:
    rows, w_ratios, r_ratios = [], [], []
    for size in sizes:
        count = max(2, total_bytes // size)
        srcs = payloads(size, count)
        sums = [checksum64(s) & U64 for s in srcs]
        keys = [ArtifactKey("kv", "bench-disk", f"{size}-{i}") for i in range(count)]
        root = tempfile.mkdtemp(prefix="stratacache-bench-store-", dir=where)
        plain = os.path.join(root, "plain")
        os.makedirs(plain)
        tier = DiskTier(os.path.join(root, "tier"), 2 * count * (size + 4096), io_threads=2)
        engine = StorageEngine(None, chain=TierChain([tier], [TierSettings()]))
        outs = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]

        generation = [0]

        def file_write():
            # New files each round, the previous round's removed: what the tier does on overwrite.
            generation[0] += 1
            for i, s in enumerate(srcs):
                with open(os.path.join(plain, f"{generation[0]}-{i}.bin"), "wb", buffering=0) as f:
                    f.write(memoryview(s.numpy()))
                old = os.path.join(plain, f"{generation[0] - 1}-{i}.bin")
                if os.path.exists(old):
                    os.unlink(old)

        def file_read():
            for i, o in enumerate(outs):
                with open(os.path.join(plain, f"{generation[0]}-{i}.bin"), "rb", buffering=0) as f:
                    f.readinto(memoryview(o.numpy()))

        def tier_write():
            for k, s, c in zip(keys, srcs, sums):
                engine.store(k, s, checksum=c)

        def tier_read():
            for k, o in zip(keys, outs):
                engine.load(k, out=o)

        w = paired(count * size, {"file": file_write, "tier": tier_write}, repeats)
        r = paired(count * size, {"file": file_read, "tier": tier_read}, repeats)
        fw, tw, fr, tr = w["file"], w["tier"], r["file"], r["tier"]
        assert all(torch.equal(o, s) for o, s in zip(outs, srcs)), "disk tier returned wrong bytes"
        engine.close()
        shutil.rmtree(root, ignore_errors=True)
        w_ratios.append(w["tier_ratio"])
        r_ratios.append(r["tier_ratio"])
        rows.append({"bench": "disk", "object_MiB": size / MIB, "objects": count,
                     "file_write_GBps": round(fw, 2), "tier_write_GBps": round(tw, 2),
                     "file_read_GBps": round(fr, 2), "tier_read_GBps": round(tr, 2),
                     "write_vs_file": round(w["tier_ratio"], 3), "read_vs_file": round(r["tier_ratio"], 3)})
    return summarise("disk_write_vs_file", w_ratios) | summarise("disk_read_vs_file", r_ratios), rows


def bench_lookups(n_keys: int, rounds: int) -> tuple[dict, list[dict]]:
    cfg = load_config(overrides={"tiers.cpu.capacity": "64MiB", "tiers.cpu.pin_memory": False,
                                 "tiers.shared.enabled": False})
    engine = StorageEngine(cfg)
    ns = "llama|bf16|LBHNC|h8x64|b16|tp0of1"
    names = [f"{i:064x}" for i in range(n_keys)]
    for name in names:
        engine.store(ArtifactKey("kv", ns, name), b"\0" * 64, checksum=0)
    lists = [[ArtifactKey("kv", ns, n) for n in names[i:i + 32]] for i in range(0, n_keys, 32)]
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        found = sum(engine.prefix_lookup(lst) for lst in lists)
        dt = time.perf_counter() - t0
        assert found == n_keys
        best = max(best, found / dt)
    engine.close()
    return {"lookups_per_s": int(best)}, [{"bench": "prefix_lookup", "keys_per_list": 32,
                                          "lists": len(lists), "keys_per_s": int(best)}]


def bench_mooncake(sizes, total_bytes: int, repeats: int) -> tuple[dict, list[dict]]:
    """The Mooncake tier's put_many / get_many(outs) against raw ``batch_put_from`` /
    ``batch_get_into`` of the same bytes, both from clients with no segment of their own into
    a ``mooncake_client`` segment holder (so every byte crosses processes, as between hosts).
    Everything runs in a loopback-only network namespace (Mooncake binds every address).
    A third variant, raw calls through a staging buffer plus a copy, is measured beside them
    (the tier moves payloads directly: TCP needs no registered memory)."""
    from stratacache.backends.mooncake import MooncakeTier
    from stratacache.core.artifact import meta_for
    from tests.mooncake_server import MooncakeMaster, SegmentHolder, loopback_namespace, raw_store

    rows, put_ratios, get_ratios = [], [], []
    with loopback_namespace(), MooncakeMaster(lease_ttl_ms=5000) as master, \
            SegmentHolder(master, 4 * total_bytes + 64 * MIB):
        tier = MooncakeTier(master_address=master.address, metrics_address=master.metrics_address)
        raw = raw_store(master, buffer_bytes=max(sizes) + MIB)
        try:
            for size in sizes:
                count = max(1, total_bytes // size)
                src = payloads(size, count)
                items = [(ArtifactKey("kv", "bench", f"t{size}-{i}"), p, meta_for(p, checksum64(p)))
                         for i, p in enumerate(src)]
                raw_keys = [f"raw{size}-{i}" for i in range(count)]
                dst = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]
                stage = torch.empty(size, dtype=torch.uint8)
                for t in (*src, *dst, stage):
                    raw.register_buffer(t.data_ptr(), size)
                src_ptrs, dst_ptrs = [t.data_ptr() for t in src], [t.data_ptr() for t in dst]
                sizes_n = [size] * count

                def raw_put():
                    assert raw.batch_put_from(raw_keys, src_ptrs, sizes_n) == [0] * count

                def tier_put():
                    assert tier.put_many(items) == [True] * count

                def raw_get():
                    assert list(raw.batch_get_into(raw_keys, dst_ptrs, sizes_n)) == sizes_n

                def tier_get():
                    assert all(a is not None for a in tier.get_many([k for k, _, _ in items], dst))

                def staged_put():
                    for k, t in zip(raw_keys, src):
                        stage.copy_(t)
                        assert raw.batch_upsert_from([k], [stage.data_ptr()], [size]) == [0]

                def staged_get():
                    for k, t in zip(raw_keys, dst):
                        assert list(raw.batch_get_into([k], [stage.data_ptr()], [size])) == [size]
                        t.copy_(stage)

                tier_keys = [tier.key_prefix + k.encode().decode() for k, _, _ in items]
                # Mooncake's put keeps an existing value: each put starts from absent keys
                forget = {"raw_put": raw_keys, "staged_put": raw_keys, "tier_put": tier_keys}

                times: dict[str, list[float]] = {}
                ops = (("raw_put", raw_put), ("tier_put", tier_put), ("raw_get", raw_get),
                       ("tier_get", tier_get), ("staged_get", staged_get), ("staged_put", staged_put))
                for r in range(repeats + 1):     # the first round warms up and is dropped
                    for name, fn in (ops if r % 2 == 0 else ops[::-1]):   # see paired()
                        if name in forget:
                            raw.batch_remove(forget[name], True)
                        t0 = time.perf_counter()
                        fn()
                        times.setdefault(name, []).append(time.perf_counter() - t0)
                times = {name: ts[1:] for name, ts in times.items()}
                gbps = {name: count * size / statistics.median(ts) / 1e9 for name, ts in times.items()}
                put_r = statistics.median(r / t for r, t in zip(times["raw_put"], times["tier_put"]))
                get_r = statistics.median(r / t for r, t in zip(times["raw_get"], times["tier_get"]))
                put_ratios.append(put_r)
                get_ratios.append(get_r)
                for t in (*src, *dst, stage):
                    raw.unregister_buffer(t.data_ptr())
                raw.batch_remove(raw_keys + tier_keys, True)
                rows.append({"bench": "mooncake", "size_mib": size / MIB, "objects": count,
                             **{f"{k}_gbps": round(v, 2) for k, v in gbps.items()},
                             "put_vs_raw": round(put_r, 3), "get_vs_raw": round(get_r, 3)})
        finally:
            raw.close()
            tier.close()
    return summarise("mooncake_put_vs_raw", put_ratios) | summarise("mooncake_get_vs_raw", get_ratios), rows


def run_external(name: str, quick: bool) -> tuple[dict, list[dict]]:
    """Run benchmarks/<name>.py's run(quick); errors are recorded as a row and a summary field."""
    path = ROOT / "benchmarks" / f"{name}.py"
    try:
        if not path.exists():
            raise FileNotFoundError(f"{path.name} is missing")
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        summary, rows = module.run(quick)
        return dict(summary), [dict(r, bench=r.get("bench", name)) for r in rows]
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        return {f"{name}_error": err}, [{"bench": name, "error": err}]


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke run)")
    ap.add_argument("--json", metavar="PATH", help="write {device, summary, rows} JSON here")
    ap.add_argument("--disk-dir", default=tempfile.gettempdir(), help="directory for the disk benchmarks")
    ap.add_argument("--skip-external", action="store_true", help="do not run the shared/redis benchmarks")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved rounds per size, the median kept (default 11; quick 3)")
    ap.add_argument("--mooncake", choices=("yes", "no", "only"), default="yes",
                    help="the Mooncake section (needs CAP_SYS_ADMIN for its network namespace); "
                         "only: nothing else")
    args = ap.parse_args(argv)

    sizes = [1 * MIB, 32 * MIB] if args.quick else [1 * MIB, 4 * MIB, 16 * MIB, 32 * MIB]
    total = (64 if args.quick else 256) * MIB
    # 11 rounds, not 5: on this 2-core box one size's ratio swung by +-0.15 between runs of
    # five rounds (RESULTS.md, Mooncake Store); a round costs well under a second per size.
    repeats = args.repeats or (3 if args.quick else 11)
    summary, rows = {}, []
    mooncake_sizes = [1 * MIB, 16 * MIB] if args.quick else [1 * MIB, 4 * MIB, 16 * MIB]
    mooncake = [lambda: bench_mooncake(mooncake_sizes, total // 2, repeats)]
    parts = [lambda: bench_cpu(sizes, total, repeats),
             lambda: bench_disk(sizes, total, repeats, args.disk_dir),
             lambda: bench_lookups(4096 if args.quick else 32768, 3 if args.quick else 7)]
    parts = mooncake if args.mooncake == "only" else parts + mooncake * (args.mooncake == "yes")
    for part in parts:
        s, r = part()
        summary.update(s)
        rows.extend(r)
        print_rows(r)
    if not args.skip_external and args.mooncake != "only":
        for name in ("bench_store_shared", "bench_store_redis"):
            s, r = run_external(name, args.quick)
            summary.update(s)
            rows.extend(r)
            print_rows(r)
    print("summary:")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_string(), "quick": args.quick, "summary": summary, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
