"""Redis tier vs raw redis-py: batched 1-8 MiB chunks, same server, same bytes, same run.

Baseline: a redis-py pipeline of plain SET / GET of the payload bytes (what a
hand-written client would do). Measured: ``RedisTier.put_many`` /
``get_many`` of the same payloads, which add the versioned header, the
checksum check on every load and the copy into a preallocated destination
(``outs``). Each figure is tier throughput over raw throughput (>= 1.0 means
the tier is as fast as raw redis-py); target >= 0.9.

The benchmark starts its own redis-server (127.0.0.1, free port, no
persistence) and stops it by PID.

    python benchmarks/bench_store_redis.py --json /tmp/redis.json [--quick]

``benchmarks/bench_store.py`` imports ``run(quick)`` and merges its summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stratacache.ops as ops  # noqa: E402
from stratacache.backends.redis import RedisTier  # noqa: E402
from stratacache.core.artifact import meta_for  # noqa: E402
from stratacache.core.keys import ArtifactKey  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

MIB = 2**20


def _median_gbps(nbytes: int, fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _measure_size(srv: RedisServer, size: int, batch: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(size)
    payloads = [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g) for _ in range(batch)]
    raw_values = [p.numpy().tobytes() for p in payloads]
    keys = [ArtifactKey("kv", "bench-redis", f"{size}-{i}") for i in range(batch)]
    items = [(k, p, meta_for(p, ops.checksum64(p))) for k, p in zip(keys, payloads)]
    outs = [torch.empty(size, dtype=torch.uint8) for _ in range(batch)]
    raw_keys = [b"raw:" + k.encode() for k in keys]

    raw = srv.admin_client(socket_timeout=30)
    tier = RedisTier(srv.url, op_timeout_s=30, key_prefix="tier:")

    def raw_put():
        pipe = raw.pipeline(transaction=False)
        for k, v in zip(raw_keys, raw_values):
            pipe.set(k, v)
        assert all(pipe.execute())

    def raw_get():
        pipe = raw.pipeline(transaction=False)
        for k in raw_keys:
            pipe.get(k)
        assert all(v is not None for v in pipe.execute())

    def tier_put():
        assert all(tier.put_many(items))

    def tier_get():
        assert all(a is not None for a in tier.get_many(keys, outs))

    total = size * batch
    # Interleave baseline and tier so drift on a shared machine hits both alike.
    res = {"raw_put": [], "tier_put": [], "raw_get": [], "tier_get": []}
    raw_put(), tier_put(), raw_get(), tier_get()          # warm-up: connections, pages
    for _ in range(repeats):
        res["raw_put"].append(_median_gbps(total, raw_put, 1))
        res["tier_put"].append(_median_gbps(total, tier_put, 1))
        res["raw_get"].append(_median_gbps(total, raw_get, 1))
        res["tier_get"].append(_median_gbps(total, tier_get, 1))
    for o, p in zip(outs, payloads):                     # the tier delivered the real bytes
        assert torch.equal(o, p)
    assert tier.stats()["corrupt"] == 0
    tier.close()
    raw.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"chunk_mib": size / MIB, "batch": batch,
            "raw_put_gbps": round(med["raw_put"], 3), "tier_put_gbps": round(med["tier_put"], 3),
            "raw_get_gbps": round(med["raw_get"], 3), "tier_get_gbps": round(med["tier_get"], 3),
            "put_vs_raw": round(med["tier_put"] / med["raw_put"], 3),
            "get_vs_raw": round(med["tier_get"] / med["raw_get"], 3)}


def device_string() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"redis-server on loopback, torch {torch.__version__}")


def run(quick: bool = False) -> tuple[dict, list[dict]]:
    """(summary, rows): tier/raw throughput ratios for batched 1-8 MiB chunks."""
    sizes = [1 * MIB, 8 * MIB] if quick else [1 * MIB, 2 * MIB, 4 * MIB, 8 * MIB]
    repeats = 5 if quick else 11
    rows = []
    with RedisServer() as srv:
        for size in sizes:
            rows.append(_measure_size(srv, size, batch=8, repeats=repeats))
            srv.admin_client().flushall()
    summary = {
        # geometric means over sizes: one figure per direction
        "redis_put_vs_raw": round(statistics.geometric_mean(r["put_vs_raw"] for r in rows), 3),
        "redis_get_vs_raw": round(statistics.geometric_mean(r["get_vs_raw"] for r in rows), 3),
    }
    return summary, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write {device, summary, rows} here")
    ap.add_argument("--quick", action="store_true", help="2 sizes, 5 repeats")
    args = ap.parse_args()
    summary, rows = run(args.quick)
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"device": device_string(), "summary": summary,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
