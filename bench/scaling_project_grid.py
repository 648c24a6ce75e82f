"""A planned sweep grid under a fitted law, before training it: which runs it has, how many of its
IsoFLOP curves would have an interior minimum if the law were right, and what the runs would cost.

    python bench/scaling_project_grid.py FIT.json SWEEP --sizes S [--tokens T] [--max-flops C]

FIT.json is a `chatforge scaling fit` result (any form); SWEEP a measured sweep on this machine, whose
runs give the seconds per token per FLOP that price the plan, and whose sizes a grown copy of it would
not train again (a sweep folder's grid may grow: only the new runs train). The cost is one core's
time: under WSD a size costs its stable run (3/4 of its longest budget) plus a quarter of each budget.
A projection, not a measurement: the law decides every loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatforge.options import ScalingSweepOptions, parse  # noqa: E402
from chatforge.scaling.fit import isoflop_curves, law_from_fit, load_results  # noqa: E402
from chatforge.scaling.sweep import model_counts, parse_sizes, parse_tokens, plan_work, run_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fit", help="fit.json from `chatforge scaling fit`")
    parser.add_argument("sweep", help="a measured sweep: prices the runs; its sizes are not trained again")
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--tokens", default="1M,2M,4M,8M,16M")
    parser.add_argument("--max-flops", default="1.1e13")
    parser.add_argument("--vocab-size", type=int, default=1024, help="the sweep's tokenizer's (default 1024)")
    args = parser.parse_args()
    law = law_from_fit(json.loads(Path(args.fit).read_text()))
    measured = load_results(Path(args.sweep))
    seconds_per_flop = float(
        np.median([r["train_seconds"] / (r["tokens"] * r["flops_per_token"]) for r in measured])
    )
    trained = {(r["depth"], r["width"]) for r in measured}
    opts = parse(ScalingSweepOptions, ["--data", "-", "--out", "-", "--sizes", args.sizes, "--tokens", args.tokens,
                                       "--max-flops", args.max_flops])  # fmt: skip
    sizes = parse_sizes(opts.sizes)
    counts = {s: model_counts(run_config(opts, *s, steps=16), vocab_size=args.vocab_size) for s in sizes}
    work = plan_work(opts, sizes, parse_tokens(opts.tokens), counts)
    rows = [
        {"run": w["name"], "params_nonembedding": counts[w["size"]]["params_nonembedding"], "tokens": w["tokens"],
         "val_loss": float(law.loss(counts[w["size"]]["params_nonembedding"], w["tokens"]))}
        for w in work
    ]  # fmt: skip
    cost = {}
    for size in sizes:
        budgets = [w["tokens"] for w in work if w["size"] == size]
        tokens = 0.75 * max(budgets) + 0.25 * sum(budgets) if budgets else 0.0
        cost[size] = tokens * counts[size]["flops_per_token"] * seconds_per_flop / 60
    new = [f"{d}x{w}" for d, w in sizes if (d, w) not in trained]
    print(f"{len(work)} runs; {sum(cost.values()):.0f} core-minutes in all, "
          f"{sum(c for s, c in cost.items() if s not in trained):.0f} for the sizes not in {args.sweep}: {', '.join(new) or 'none'}")  # fmt: skip
    curves = isoflop_curves(rows, "params_nonembedding", law)
    print(
        f"IsoFLOP curves with an interior minimum under the law: {sum(c['interior'] for c in curves)} of {len(curves)}"
    )
    for c in curves:
        points = ", ".join(f"{p['n']:,.0f}: {p['loss']:.3f}" for p in c["points"])
        print(f"  C = {c['flops']:.3g} ({'interior' if c['interior'] else 'at an end'}): {points}")


if __name__ == "__main__":
    main()
