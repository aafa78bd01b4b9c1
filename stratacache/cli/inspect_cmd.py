"""``stratacache inspect [--config FILE] [--json]``: what the tiers hold, without vLLM running.

For each enabled tier: items, bytes used and capacity, hit/miss counters
where the tier persists them, and which kinds and namespaces (models)
occupy the space. KV namespaces are listed with the model name, weights
fingerprint prefix and TP rank read from the namespace; namespaces of the
scheme before content fingerprints are marked as never matched again.
Persistent tiers (shared region, disk, Redis) are read through their read-only
``inspect`` class methods (``stratacache.tiering.inspect_tier``; one report
shape, ``backends.base.INSPECT_KEYS``), so inspecting never creates, resets,
evicts or repairs anything. The CPU tier lives inside each process that uses
it, so there is nothing to read from outside.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from stratacache.adapters.vllm.keys import parse_namespace
from stratacache.cli.config_cmd import load_checked
from stratacache.cli.errors import CliError
from stratacache.cli.report import format_table, human_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show what each tier holds (read-only; vLLM need not run)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="StrataCache YAML config (default: $STRATACACHE_CONFIG, else the packaged "
                        "defaults)")
    p.add_argument("--tier", action="append", metavar="NAME",
                   help="only this tier (repeatable): cpu, shared, disk, redis or mooncake")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from stratacache.tiering import TIER_ORDER   # imports torch: only when the command runs

    unknown = [n for n in args.tier or () if n not in TIER_ORDER]
    if unknown:
        raise CliError(f"--tier: unknown tier {unknown[0]!r}; tiers are {', '.join(TIER_ORDER)}", 2)
    cfg = load_checked(args.config)[0]
    names = args.tier or list(TIER_ORDER)
    reports = [tier_report(name, cfg) for name in names]
    if args.json:
        print(json.dumps({"config": list(cfg.source), "tiers": reports}, indent=2))
    else:
        _print_text(reports)
    failed = [r for r in reports if r["state"] == "error"]
    if failed:
        raise CliError("; ".join(f"tier {r['tier']}: {r['error']}" for r in failed))
    return 0


def tier_report(name: str, cfg) -> dict:
    """One tier's report for the command: state, items, used_bytes, capacity_bytes,
    location, kinds, kv_namespaces, counters, details."""
    tier_cfg = cfg.tiers[name]
    base = {"tier": name, "enabled": bool(tier_cfg.enabled),
            "capacity_bytes": tier_cfg.get("capacity")}
    if not tier_cfg.enabled:
        return {**base, "state": "disabled"}
    path = tier_cfg.get("path")
    if path is not None and not os.path.exists(os.path.expanduser(path)):
        return {**base, "state": "absent", "persistent": True, "location": path,
                "details": {}, "note": "nothing stored yet (does not exist)"}
    from stratacache.tiering import inspect_tier

    try:
        raw = inspect_tier(name, cfg)
    except Exception as exc:  # noqa: BLE001 - one tier's fault must not hide the others
        return {**base, "state": "error", "persistent": True,
                "error": f"{type(exc).__name__}: {exc}"}
    if raw is None:
        return {**base, "state": "per-process", "persistent": False,
                "note": "lives inside each process that uses it; nothing to inspect from outside"}
    return {**base, "persistent": True, **_from_inspect(raw, base)}


def _from_inspect(raw: dict, base: dict) -> dict:
    """The command's fields from an ``inspect()`` report (``base.INSPECT_KEYS`` shape); a
    tier that reached its store but found it unhealthy says so in ``detail``."""
    detail = dict(raw.get("detail") or {})
    out = {"state": "ok" if detail.pop("healthy", True) else "error"}
    if out["state"] == "error":
        out["error"] = detail.get("error", "unhealthy")
    out["location"] = raw["location"]
    out["items"] = raw["items"]
    out["used_bytes"] = raw["used_bytes"]
    out["capacity_bytes"] = raw["capacity_bytes"] or base["capacity_bytes"]
    out["kinds"] = _nest(raw["by_namespace"])
    out["kv_namespaces"] = kv_namespaces(out["kinds"].get("kv") or {})
    out["counters"] = detail.pop("counters", None) or {}
    out["details"] = {"unreadable": raw["unreadable"], **detail}
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
        where = r.get("location")
        auth = (r.get("details") or {}).get("auth")
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
