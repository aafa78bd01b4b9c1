"""``stratacache bench ops|store|vllm|params|serve|pd``: run a benchmark, keep its JSON, chart it.

The benchmarks are scripts in the repository's ``benchmarks/`` directory
(next to the package in a source checkout). Each prints its own progress and
table and writes JSON whose ``"summary"`` holds ratios against a baseline
measured in the same run; this command runs one, then prints the summary and
draws the ratios as a PNG bar chart (the dashed line at 1.0 is the baseline).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import stratacache
from stratacache.cli.errors import CliError
from stratacache.cli.report import format_table, write_bar_chart

NAMES = ("ops", "store", "vllm", "params", "serve", "pd")
BENCH_DIR = Path(stratacache.__file__).resolve().parent.parent / "benchmarks"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (" + ", ".join(NAMES) + ") and chart it",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=NAMES, metavar="NAME", help="one of: " + ", ".join(NAMES))
    p.add_argument("--quick", action="store_true", help="a shorter run (fewer sizes and repeats)")
    p.add_argument("--out", type=Path, default=Path("~/.cache/stratacache/bench"),
                   help="directory for NAME.json and NAME.png (default ~/.cache/stratacache/bench)")
    p.add_argument("bench_args", nargs="*", metavar="-- ARGS",
                   help="further arguments for the benchmark script, after '--'")
    p.set_defaults(run=run)


def run(args) -> int:
    script = BENCH_DIR / f"bench_{args.name}.py"
    if not script.is_file():
        raise CliError(f"benchmark script not found: {script} ('stratacache bench' runs from a "
                       f"source checkout of StrataCache)")
    if args.quick and '"--quick"' not in script.read_text():
        raise CliError(f"bench {args.name} has no --quick form; run it without --quick", status=2)
    out = args.out.expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create --out directory {out}: {exc.strerror}") from None
    json_path = out / f"{args.name}.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--json", str(json_path)]
    cmd += (["--quick"] if args.quick else []) + list(args.bench_args)
    print(f"$ {' '.join(cmd)}", flush=True)
    status = subprocess.call(cmd)
    if status != 0:
        raise CliError(f"benchmark {args.name} failed (exit {status}); its output is above")
    summary = read_summary(json_path)
    print()
    print(format_table(["summary", "value"], [[k, v] for k, v in summary.items()]))
    ratios = {k: v for k, v in summary.items() if is_ratio(k, v)}
    if ratios:
        chart = write_bar_chart(out / f"{args.name}.png",
                                f"bench {args.name}: StrataCache over its baseline (same run)",
                                list(ratios), list(ratios.values()), "ratio",
                                reference=1.0, reference_label="baseline")
        print(f"\nChart: {chart}")
    print(f"JSON: {json_path}")
    return 0


def read_summary(path: Path) -> dict:
    """The flat numeric/boolean ``summary`` of a benchmark's JSON, checked."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"the benchmark exited without writing {path}") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("summary"), dict):
        raise CliError(f"{path} has no \"summary\" object")
    if not isinstance(document.get("device"), str):
        raise CliError(f"{path} has no \"device\" string")
    flat = {}
    for key, value in document["summary"].items():
        if isinstance(value, dict) and "value" in value:   # {"value": x, "target": ...}
            value = value["value"]
        if isinstance(value, (int, float, bool, str)) or value is None:
            flat[key] = value
    return flat


def is_ratio(key: str, value) -> bool:
    """Summary entries that compare against a baseline (charted against the 1.0 line)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return "_vs_" in key or key.endswith(("speedup", "overhead", "ratio"))
