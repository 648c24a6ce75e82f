"""Each law form of `chatforge scaling fit` on the same sweeps, side by side.

    python bench/scaling_forms.py SWEEP [SWEEP ...] [--mean] [--forms chinchilla,kaplan] [--min-tokens 1M] [--out DIR]

For each sweep (or, with --mean, for the runs' validation losses averaged over the sweeps: seeds of
one grid, which halves the noise of two) and each form: the RMS error of log-loss on the fitted runs,
every held-out run's error (the largest N and the largest D), how many IsoFLOP curves have their
measured minimum inside, the fitted constants with 95% bootstrap intervals and N_opt ~ C^a. Each fit's
whole result goes to OUT/LABEL_FORM.json, the table to OUT/forms.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from chatforge.scaling.fit import FORMS, analyse, drop_short_runs, load_results  # noqa: E402


def mean_rows(sweeps: list[Path]) -> list[dict]:
    """Each run's row with its validation loss averaged over the sweeps that all have it."""
    by_sweep = [{r["run"]: r for r in load_results(s)} for s in sweeps]
    common = [run for run in by_sweep[0] if all(run in b for b in by_sweep[1:])]
    for key in ("data_sha256", "tokenizer_sha256"):
        if len({b[run][key] for b in by_sweep for run in common}) > 1:
            raise ChatforgeError(f"the sweeps differ in {key}: average only seeds of one grid on one data")
    return [
        dict(by_sweep[0][run], val_loss=float(np.mean([b[run]["val_loss"] for b in by_sweep])), seed="mean")
        for run in common
    ]


def table_row(label: str, result: dict, seconds: float) -> str:
    ci = result["intervals_95"]
    constants = ", ".join(
        f"{k} {v:.3g} [{ci[k][0]:.2g}, {ci[k][1]:.2g}]" if k in ci else f"{k} {v:.3g}"
        for k, v in result["law"].items() if not (k == "E" and result["form"] == "kaplan-no-e")
    )  # fmt: skip
    held = ", ".join(f"{p['run']} {p['error']:+.3f}" for p in result["heldout"])
    within = sum(abs(p["error"]) < 0.05 for p in result["heldout"])
    interior = sum(c["interior"] for c in result["isoflop"])
    a, a_ci = result["compute_optimal"]["a"], ci.get("a_exponent", [float("nan")] * 2)
    return (
        f"| {label} | {result['form']} | {result['rms_log_loss']:.4f} | {within} of {len(result['heldout'])}: {held} "
        f"| {interior} of {len(result['isoflop'])} | {constants} | {a:.2f} [{a_ci[0]:.2f}, {a_ci[1]:.2f}] "
        f"| {len(result['monotone_violations'])} | {seconds:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="sweep folders (or results.jsonl files)")
    parser.add_argument("--mean", action="store_true", help="fit the runs' losses averaged over the sweeps")
    parser.add_argument(
        "--forms", default=",".join(FORMS), help=f"comma-separated (default {','.join(FORMS)})"
    )
    parser.add_argument("--label", help="name of the sweep in the table (default: its folder's name)")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", default="scaling_forms", help="folder for the fits and forms.md")
    parser.add_argument("--min-tokens", default="", help="fit only the runs of at least this many tokens, e.g. 1M")
    args = parser.parse_args()
    sweeps = [Path(s) for s in args.sweeps]
    if args.mean:
        label = args.label or "mean of " + " + ".join(s.name for s in sweeps)
        sets = [(label, drop_short_runs(mean_rows(sweeps), args.min_tokens))]
    else:
        sets = [(args.label or s.name, drop_short_runs(load_results(s), args.min_tokens)) for s in sweeps]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| sweep | form | RMS log-loss | held out within 0.05 nats: errors | IsoFLOP interior minima "
        "| constants [95% bootstrap] | N_opt ~ C^a [95%] | monotone violations | fit time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in sets:
        for form in args.forms.split(","):
            start = time.perf_counter()
            result = analyse(rows, resamples=args.bootstrap, form=form)
            seconds = time.perf_counter() - start
            atomic_write_json(out / f"{label.replace(' ', '_')}_{form}.json", result)
            lines.append(table_row(label, result, seconds))
            print(lines[-1], flush=True)
    atomic_write_text(out / "forms.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
