"""metrics.jsonl (append-only, trimmed on resume) and the one plot every trainer draws from it."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the resumed step are dropped first, and
    so are evals at it: the resumed loop evaluates that step again (a train line at it stays)."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [
                r
                for r in read_metrics(self.path)
                if r.get("step", 0) < resume_step or (r.get("step", 0) == resume_step and "loss" in r)
            ]
            tmp = self.path.with_name(f".{self.path.name}.tmp")  # atomic: a kill here keeps the old log
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def log(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return rows


def plot_metrics(metrics_path: Path, png_path: Path, panels: list[tuple[str, list[str]]], title: str) -> Path:
    """One subplot per (y label, [metric keys]) panel, each key drawn against step; written atomically.
    Evaluation keys (val_*) are drawn with markers: they are few points, training keys many."""
    import matplotlib  # matplotlib is slow to import: only a finished run pays for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                style = "o-" if key.startswith("val_") else "-"
                ax.plot(*zip(*pts, strict=True), style, label=key, lw=1, ms=3)
        ax.set(xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
