"""Forward latency of a Llama whose decoder layers are offloaded: resident weights vs
StrataCache offload with prefetch vs accelerate's offload hooks, in one run, same model.

Tiers compared like for like:
* shared memory: StrataCache's shared-region tier (/dev/shm) vs accelerate ``disk_offload``
  with its offload folder on /dev/shm (the same tmpfs);
* disk: StrataCache's disk tier vs accelerate ``disk_offload`` with its folder next to it.
On CUDA (``--device cuda``) the weights stream from the host tiers into the GPU; accelerate's
``cpu_offload`` (weights in host memory, copied per module) is added.

The summary's ``offload_vs_accelerate`` is accelerate's latency over ours on the shared-memory
tier (higher is better for us); every figure is a ratio against its baseline in the same run.

    python benchmarks/bench_params.py --json /tmp/params.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def make_engine(kind: str, workdir: Path):
    from stratacache.config import load_config
    from stratacache.engine import StorageEngine

    tiers = {"cpu": {"enabled": False}, "redis": {"enabled": False},
             "shared": {"enabled": kind == "shared", "path": f"/dev/shm/stratacache-bench-params-{uuid.uuid4().hex}",
                        "capacity": "4GiB", "max_objects": 8192, "reset": True},
             "disk": {"enabled": kind == "disk", "path": str(workdir / "plane"), "capacity": "8GiB"}}
    return StorageEngine(load_config(overrides={"tiers": tiers}), tiers=[kind]), tiers["shared"]["path"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    from bench_ops import cpu_device_name          # benchmarks/ is on sys.path when run as a script
    return f"{cpu_device_name()}, no GPU"


def forward_once(model, ids, device: torch.device):
    """(latency in s, logits) of one forward pass."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(ids).logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out.float().cpu()


def run(args) -> dict:
    from accelerate import cpu_offload, disk_offload

    from stratacache.adapters.torch import offload

    device = torch.device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="stratacache-bench-params-", dir=args.workdir))
    shm_dir = Path(tempfile.mkdtemp(prefix="stratacache-bench-params-", dir="/dev/shm"))
    base = build_model(args)
    total_bytes = sum(p.nbytes for p in base.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    variants, handles, engines = {}, {}, []
    try:
        variants["resident"] = copy.deepcopy(base).to(device)
        for tier in args.tiers:
            engine, region = make_engine(tier, workdir)
            engines.append((engine, region))
            for prefetch in (args.prefetch, 0) if tier == args.tiers[0] else (args.prefetch,):
                name = f"stratacache_{tier}" + ("" if prefetch == args.prefetch else "_no_prefetch")
                variants[name] = copy.deepcopy(base)
                handles[name] = offload(variants[name], engine, prefetch=prefetch, device=device,
                                        model_id=f"bench/{name}")
        for tier in args.tiers:
            folder = (shm_dir if tier == "shared" else workdir) / "accelerate"
            model = variants[f"accelerate_disk_offload_{tier}"] = copy.deepcopy(base)
            for i, layer in enumerate(model.model.layers):    # the same units StrataCache offloads
                disk_offload(layer, str(folder / f"layer{i}"), execution_device=device)
            _move_non_layers(model, device)
        if device.type == "cuda":
            model = variants["accelerate_cpu_offload"] = copy.deepcopy(base)
            for layer in model.model.layers:
                cpu_offload(layer, execution_device=device)
            _move_non_layers(model, device)

        # Round-robin over the variants so that load from other work on the machine
        # falls on all of them alike; the first round is a warm-up.
        outputs = {name: forward_once(m, ids, device)[1] for name, m in variants.items()}
        for h in handles.values():
            h.reset_peak()
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, model in variants.items():
                times[name].append(forward_once(model, ids, device)[0])
        rows = {name: {"latency_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}
        for name, h in handles.items():
            rows[name].update(prefetch=h.prefetch, zero_copy=h.zero_copy, prefetch_hits=h.prefetch_hits,
                              peak_param_fraction=(total_bytes - h.offloaded_bytes + h.peak_resident_bytes)
                              / total_bytes,
                              peak_layer_fraction=h.peak_resident_bytes / h.offloaded_bytes)
        for name, row in rows.items():
            print(f"{name:40s} {row['latency_s'] * 1e3:9.2f} ms (min {row['min_s'] * 1e3:.2f})", flush=True)
    finally:
        for h in handles.values():
            h.close()
        for engine, region in engines:
            engine.close()
            if os.path.exists(region):
                os.unlink(region)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)

    ref = outputs["resident"]
    lat = {k: v["latency_s"] for k, v in rows.items()}
    main_tier = args.tiers[0]
    ours = rows[f"stratacache_{main_tier}"]
    summary = {
        "outputs_equal": all(torch.equal(o, ref) for o in outputs.values()),
        "tier": main_tier,
        "offload_vs_resident": ours["latency_s"] / lat["resident"],
        "offload_vs_accelerate": lat[f"accelerate_disk_offload_{main_tier}"] / ours["latency_s"],
        "peak_param_fraction": ours["peak_param_fraction"],
        "peak_layer_fraction": ours["peak_layer_fraction"],
        "bound_layer_fraction": (args.prefetch + 1) / args.layers,
        "prefetch_speedup": lat[f"stratacache_{main_tier}_no_prefetch"] / ours["latency_s"],
    }
    for tier in args.tiers[1:]:
        summary[f"offload_vs_resident_{tier}"] = lat[f"stratacache_{tier}"] / lat["resident"]
        summary[f"offload_vs_accelerate_{tier}"] = (lat[f"accelerate_disk_offload_{tier}"]
                                                    / lat[f"stratacache_{tier}"])
    if "accelerate_cpu_offload" in lat:
        summary["accelerate_cpu_offload_vs_ours"] = lat["accelerate_cpu_offload"] / ours["latency_s"]
    return {"benchmark": "params", "device": device_name(device), "args": vars(args),
            "model_param_bytes": total_bytes, "rows": rows, "summary": summary}


def _move_non_layers(model, device):
    """Put the embeddings, final norm and LM head on the compute device (layers are hooked)."""
    for name, module in model.named_children():
        if name != "model":
            module.to(device)
    for name, module in model.model.named_children():
        if name != "layers":
            module.to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1,
                   help="tokens per forward: 1 is the weight traffic of one decode step")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiers", default="shared,disk", type=lambda s: s.split(","),
                   help="plane tiers to compare, the first one gives the headline ratios (shared,disk)")
    p.add_argument("--workdir", default=None, help="directory for the disk tier and accelerate's disk folder")
    p.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run: 4 layers of hidden 512, 3 repeats, shared tier only")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 4, 512, 1024, 8, 4
        args.repeats, args.tiers = 3, ["shared"]
    for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "batch", "tokens", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not args.tiers or any(t not in ("shared", "disk") for t in args.tiers):
        p.error(f"--tiers must name shared and/or disk, got {','.join(args.tiers)}")
    if args.prefetch < 0:
        p.error("--prefetch must be >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    result = run(args)
    print(json.dumps(result["summary"], indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["summary"]["outputs_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
