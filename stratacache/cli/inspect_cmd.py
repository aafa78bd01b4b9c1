"""``stratacache inspect [--config FILE] [--json]``: what the tiers hold, without vLLM running.

For each enabled tier: items, bytes used and capacity, hit/miss counters
where the tier persists them, and which kinds and namespaces (models)
occupy the space. KV namespaces are listed with the model name, weights
fingerprint prefix and TP rank read from the namespace; namespaces of the
scheme before content fingerprints are marked as never matched again. Persistent tiers (shared region, disk, Redis) are read
through their own read-only ``inspect`` class methods, so inspecting never
creates, resets, evicts or repairs anything. The CPU tier lives inside each
process that uses it, so there is nothing to read from outside.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from stratacache.adapters.vllm.keys import parse_namespace
from stratacache.cli.config_cmd import load_checked
from stratacache.cli.errors import CliError
from stratacache.cli.report import format_table, human_bytes

TIER_CLASSES = {
    "cpu": "stratacache.backends.cpu:CpuMemoryLayer",
    "shared": "stratacache.backends.shared:SharedRegionLayer",
    "disk": "stratacache.backends.disk:DiskMemoryLayer",
    "redis": "stratacache.backends.redis:RedisMemoryLayer",
}


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show what each tier holds (read-only; vLLM need not run)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="StrataCache YAML config (default: $STRATACACHE_CONFIG, else the packaged "
                        "defaults)")
    p.add_argument("--tier", action="append", choices=list(TIER_CLASSES), metavar="NAME",
                   help="only this tier (repeatable): " + ", ".join(TIER_CLASSES))
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    cfg = load_checked(args.config)[0]
    names = args.tier or list(TIER_CLASSES)
    reports = [inspect_tier(name, cfg) for name in names]
    if args.json:
        print(json.dumps({"config": list(cfg.source), "tiers": reports}, indent=2))
    else:
        _print_text(reports)
    failed = [r for r in reports if r["state"] == "error"]
    if failed:
        raise CliError("; ".join(f"tier {r['tier']}: {r['error']}" for r in failed))
    return 0


def inspect_tier(name: str, cfg) -> dict:
    """One tier's report in the common shape (see the module docstring)."""
    tier_cfg = cfg.tiers[name]
    base = {"tier": name, "enabled": bool(tier_cfg.enabled),
            "capacity_bytes": tier_cfg.get("capacity")}
    if not tier_cfg.enabled:
        return {**base, "state": "disabled"}
    if name == "cpu":
        return {**base, "state": "per-process", "persistent": False,
                "note": "lives inside each process that uses it; nothing to inspect from outside"}
    if name in ("shared", "disk") and not os.path.exists(os.path.expanduser(tier_cfg.path)):
        return {**base, "state": "absent", "persistent": True,
                "details": {"path": tier_cfg.path}, "note": "nothing stored yet (does not exist)"}
    module_name, class_name = TIER_CLASSES[name].split(":")
    layer_cls = getattr(importlib.import_module(module_name), class_name)
    try:
        # File tiers are read by path; Redis by its section (URL, credentials, TLS).
        raw = layer_cls.inspect(tier_cfg if name == "redis" else tier_cfg.path)
    except Exception as exc:  # noqa: BLE001 - one tier's fault must not hide the others
        return {**base, "state": "error", "persistent": True,
                "error": f"{type(exc).__name__}: {exc}"}
    return {**base, "persistent": True, **_normalise(raw, base)}


def _normalise(raw: dict, base: dict) -> dict:
    """Map a tier's own inspect() dict onto: state, items, used_bytes, capacity, kinds, counters."""
    out = {"state": "ok" if raw.get("healthy", True) else "error"}
    if out["state"] == "error":
        out["error"] = raw.get("error", "unhealthy")
    out["items"] = raw.get("items")
    out["used_bytes"] = raw.get("bytes", raw.get("used_bytes"))
    capacity = raw.get("capacity_bytes", raw.get("capacity", raw.get("maxmemory")))
    out["capacity_bytes"] = capacity if capacity else base["capacity_bytes"]
    out["kinds"] = raw.get("kinds") or _nest(raw.get("by_namespace") or {})
    out["kv_namespaces"] = kv_namespaces(out["kinds"].get("kv") or {})
    counters = raw.get("counters") or {k: raw[k] for k in ("hits", "misses") if k in raw}
    out["counters"] = counters
    out["details"] = {k: v for k, v in raw.items()
                      if k not in ("items", "bytes", "used_bytes", "capacity_bytes", "capacity",
                                   "kinds", "by_namespace", "by_kind", "counters", "hits",
                                   "misses", "healthy", "tier")}
    return out


def _nest(by_namespace: dict) -> dict:
    """{"kind/namespace": use} -> {kind: {namespace: use}}."""
    nested: dict = {}
    for joined, use in by_namespace.items():
        kind, _, namespace = joined.partition("/")
        nested.setdefault(kind, {})[namespace] = use
    return nested


def kv_namespaces(usage: dict) -> list[dict]:
    """One row per KV namespace: what ``parse_namespace`` reads from it, plus its use."""
    rows = []
    for namespace, use in sorted(usage.items()):
        parsed = parse_namespace(namespace)
        row = {"namespace": namespace, "items": use["items"], "bytes": use["bytes"]}
        if parsed is None:
            row.update(model=None, weights_tag=None, tp=None,
                       note="not a current KV namespace: never matched")
        else:
            row.update(model=parsed["model"], weights_tag=parsed["weights_tag"],
                       tp=f"{parsed['tp_rank']}/{parsed['tp_size']}", note=None)
        rows.append(row)
    return rows


def _print_text(reports: list[dict]) -> None:
    rows = []
    for r in reports:
        counters = r.get("counters") or {}
        rows.append([r["tier"], r["state"], r.get("items"), human_bytes(r.get("used_bytes")),
                     human_bytes(r.get("capacity_bytes")), counters.get("hits"),
                     counters.get("misses")])
    print(format_table(["tier", "state", "items", "used", "capacity", "hits", "misses"], rows))
    for r in reports:
        where = r.get("details", {}).get("path") or r.get("details", {}).get("url")
        auth = r.get("details", {}).get("auth")
        auth = f"authentication: {auth}" if auth else None
        if r.get("note") or where or auth:
            print(f"\n{r['tier']}: " + "; ".join(x for x in (where, auth, r.get("note")) if x))
        for kind, namespaces in sorted((r.get("kinds") or {}).items()):
            if kind == "kv":
                continue
            for namespace, use in sorted(namespaces.items()):
                print(f"  {kind:<7} {namespace}: {use['items']} items, {human_bytes(use['bytes'])}")
        if r.get("kv_namespaces"):
            print(format_table(
                ["kv namespace", "model", "weights", "tp", "items", "bytes", "note"],
                [[n["namespace"], n["model"] or "-", n["weights_tag"] or "-", n["tp"] or "-",
                  n["items"], human_bytes(n["bytes"]), n["note"] or ""]
                 for n in r["kv_namespaces"]]))
    sys.stdout.flush()
