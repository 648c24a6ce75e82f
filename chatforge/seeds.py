"""Figures over several world seeds: mean and spread of every number a speedrun reports.

`speedrun_figures(run)` reads one speedrun folder (finished or stopped with --until) into
{figure: value}; `tabulate` puts several seeds' figures side by side with mean, min, max and
standard deviation (seeds.json); `seeds_markdown` writes that as the table docs/benchmarks.md
shows (seeds.md). `bench/speedrun_seeds.py` runs the speedrun once per seed and calls these.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from chatforge.fileio import atomic_write_json, atomic_write_text
from chatforge.report import machine_words, shown_tools

# units: "%" (a share, stored 0-1, shown x100), "points" (a difference of shares, stored 0-1),
# "s", "min", and "" (a plain number such as bits per byte)
PLAIN_METRICS = {"bpb", "loss", "perplexity"}


@dataclass(frozen=True)
class Spread:
    """Mean and spread of one figure over seeds (std: the sample standard deviation, n - 1)."""

    n: int
    mean: float
    std: float
    min: float
    max: float


def spread(values: list[float]) -> Spread:
    if not values:
        raise ValueError("spread of no values")
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return Spread(n=n, mean=mean, std=math.sqrt(var), min=min(values), max=max(values))


def spread_dict(values: list[float], digits: int = 4) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in asdict(spread(values)).items()}


def code_commit(root: Path | None = None) -> str:
    """The git commit the code runs at ("+changes" when the tree differs from it), so a figure names
    the commit it was measured at; "unknown" outside a git checkout."""
    root = Path(root) if root else Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _unit(metric: str) -> str:
    return "" if metric in PLAIN_METRICS else "%"


def eval_figures(results: list[dict], prefix: str) -> dict[str, tuple[float, str]]:
    """Each task's value; its rates (extra keys ending in _rate or _accuracy); and, for the calculator
    tasks (whose groups carry a call rate), each kind of problem, as the report's tool table shows."""
    out: dict[str, tuple[float, str]] = {}
    for r in results:
        name = f"{prefix}{r['task']}"
        out[name] = (float(r["value"]), _unit(r["metric"]))
        groups = r.get("groups") or {}
        if any("call_rate" in g for g in groups.values()):
            for kind, g in groups.items():
                out[f"{name} [{kind}]"] = (float(g["value"]), "%")
        for key, value in (r.get("extra") or {}).items():
            if key.endswith(("_rate", "_accuracy")) and isinstance(value, int | float):
                out[f"{name} {key}"] = (float(value), "%")
    return out


def _rl_figures(summary: dict) -> dict[str, tuple[float, str]]:
    """Pass@1 before and after RL and the lift: on the held-out problems (heldout_pass1_*), and on the
    validation split that picks the checkpoint (val_pass1_*). Runs that have no heldout_pass1_* asked
    their held-out problems as val_pass1_*."""
    pairs = {
        "held-out": ("heldout_pass1_start", "heldout_pass1_end"),
        "validation": ("val_pass1_start", "val_pass1_end"),
    }
    if "heldout_pass1_start" not in summary:
        pairs = {"held-out": pairs["validation"]}
    out: dict[str, tuple[float, str]] = {}
    for name, (start_key, end_key) in pairs.items():
        start, end = summary.get(start_key), summary.get(end_key)
        if start is not None and end is not None:
            out |= {f"rl {name} pass@1 before": (float(start), "%"), f"rl {name} pass@1 after": (float(end), "%"),
                    f"rl {name} pass@1 lift": (float(end) - float(start), "points")}  # fmt: skip
    return out


def speedrun_figures(run: Path) -> dict[str, tuple[float, str]]:
    """{figure: (value, unit)} of one speedrun folder; stages it has not run contribute nothing."""
    run = Path(run)
    out: dict[str, tuple[float, str]] = {}
    before = _load(run / "eval" / "eval.json")
    if before:
        out |= eval_figures(before["results"], "eval/")
    out |= _rl_figures(_load(run / "rl" / "rl_summary.json") or {})
    after = _load(run / "rl" / "eval" / "eval.json")
    if after:
        figures = eval_figures(after["results"], "rl/eval/")
        out |= figures
        for name, (value, unit) in figures.items():  # what RL changed, task by task
            same = out.get("eval/" + name.removeprefix("rl/eval/"))
            if same is not None and unit == "%":
                out[f"rl change {name.removeprefix('rl/eval/')}"] = (value - same[0], "points")
    stages = _load(run / "stages.json") or {}
    for name, s in stages.items():
        out[f"seconds {name}"] = (float(s.get("seconds", 0.0)), "s")
    if stages:
        out["total minutes"] = (sum(float(s.get("seconds", 0.0)) for s in stages.values()) / 60, "min")
    return out


def tabulate(runs: dict[int, Path]) -> dict:
    """Every figure of every seed's run: per-seed values, mean and spread, in first-seen order."""
    per_seed = {seed: speedrun_figures(path) for seed, path in runs.items()}
    names: dict[str, str] = {}
    for figures in per_seed.values():
        for name, (_, unit) in figures.items():
            names.setdefault(name, unit)
    table = {}
    for name, unit in names.items():
        values = {seed: figures[name][0] for seed, figures in per_seed.items() if name in figures}
        table[name] = {
            "unit": unit,
            "per_seed": {str(s): round(v, 6) for s, v in values.items()},
            **spread_dict(list(values.values()), digits=6),
        }
    samples, machines = {}, {}
    for seed, path in runs.items():
        # the final model's answers: after RL where it ran
        final = _load(Path(path) / "rl" / "eval" / "eval.json") or _load(Path(path) / "eval" / "eval.json") or {}
        samples[str(seed)] = final.get("samples", [])
        stages = _load(Path(path) / "stages.json") or {}
        machines[str(seed)] = sorted({machine_words(s) for s in stages.values() if "cpu" in s})
    return {"seeds": [int(s) for s in runs], "figures": table, "samples": samples, "machines": machines}


def _show(value: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "points":
        return f"{100 * value:+.1f}"
    if unit == "s":
        return f"{value:.1f}"
    if unit == "min":
        return f"{value:.2f}"
    return f"{value:.3f}"


def _show_spread(f: dict) -> tuple[str, str]:
    unit = f["unit"]
    scale = 100 if unit in ("%", "points") else 1
    digits = 1 if unit in ("%", "points", "s") else 2 if unit == "min" else 3
    span = f"{_show(f['min'], unit)} – {_show(f['max'], unit)}"
    return span, f"{scale * f['std']:.{digits}f}"


def seeds_markdown(table: dict, title: str = "Speedrun over world seeds") -> str:
    """The table of seeds.json as markdown: one row per figure, mean, min-max, std, each seed."""
    seeds = [str(s) for s in table["seeds"]]
    lines = [
        f"## {title}",
        "",
        f"World seeds {', '.join(seeds)}. Shares in %, changes in percentage points, times in seconds "
        "(std: sample standard deviation over the seeds; – where a seed has no such figure).",
        "",
    ]
    machines = sorted({m for ms in table.get("machines", {}).values() for m in ms})
    if machines:
        lines += [
            f"Measured on {'; '.join(machines)}"
            + (f", commit {table['commit']}." if "commit" in table else "."),
            "",
        ]
    lines += [
        "| figure | mean | min – max | std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(seeds),
    ]
    for name, f in table["figures"].items():
        span, std = _show_spread(f)
        cells = [_show(f["per_seed"][s], f["unit"]) if s in f["per_seed"] else "–" for s in seeds]
        label = name + (" (n=" + str(f["n"]) + ")" if f["n"] < len(seeds) else "")
        lines.append(
            f"| {label} | {_show(f['mean'], f['unit'])} | {span} | {std} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    if any(table["samples"].values()):
        lines += ["### Sample answers (the final model: after RL where it ran)", ""]
        for seed, samples in table["samples"].items():
            lines += [f"- seed {seed}: **{s['prompt']}**{shown_tools(s)} → {s['answer']}" for s in samples]
        lines.append("")
    return "\n".join(lines)


def write_seed_table(runs: dict[int, Path], out: Path) -> tuple[Path, Path]:
    """OUT/seeds.json and OUT/seeds.md for the seed -> run folder map, with the machine they ran on."""
    table = {**tabulate(runs), "commit": code_commit()}
    atomic_write_json(Path(out) / "seeds.json", table)
    md = Path(out) / "seeds.md"
    atomic_write_text(md, seeds_markdown(table))
    return Path(out) / "seeds.json", md
