"""What commands hand back to the user: aligned text tables, PNG bar charts, JSON files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table; numbers right-aligned, everything else left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if value is None:
        return "-"
    return str(value)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def write_bar_chart(path: Path, title: str, labels: Sequence[str], values: Sequence[float],
                    ylabel: str, bar_text: Sequence[str] | None = None,
                    reference: float | None = None, reference_label: str = "") -> Path:
    """A PNG bar chart with a caption on each bar (matplotlib's Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.4))
    bars = ax.bar(range(len(values)), values, color="#3b75af")
    ax.bar_label(bars, labels=list(bar_text or [_short(v) for v in values]), padding=2, fontsize=8)
    slanted = any(len(label) > 14 and "\n" not in label for label in labels)
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20 if slanted else 0,
                  ha="right" if slanted else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if reference is not None:
        ax.axhline(reference, color="#c44e52", linestyle="--", linewidth=1, label=reference_label)
        ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def write_json(path: Path, document: dict) -> Path:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path


def device_description() -> str:
    """The machine a figure was measured on, e.g. '2-core AMD EPYC 7B13, no GPU'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()}-core {cpu}, {gpu}"
