"""Accuracy against tokens generated, for every thinking strategy, on one task: the curve.

    flock /tmp/cf-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/think_curve.py \\
        --model runs/think/sft --prm runs/think/prm_game24 --orm runs/think/orm_game24 \\
        --task game24 --ranks 801-900 --seeds 0,1,2 --out runs/think/report/game24

Strategies (chatforge/think.py): direct and cot (greedy; the floor), vote:N, best-of:N:orm,
best-of:N:prm, best-of:N:oracle (pass@N: the ceiling) for N in --budgets, and tree:bBdD for each
--trees shape. Self-consistency and best-of-N at N are read off the first N of one pool of samples
per problem (the usual way to draw these curves: the same samples, ranked differently), so their
x value is the mean tokens of those N samples. Each point is the accuracy pooled over --seeds
(sampling seeds) with a 95% Wilson interval, and each seed's accuracy beside it. Writes
OUT/curve.json and OUT/curve.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from chatforge.align.reward import load_reward_model
from chatforge.checkpoint import load_run
from chatforge.eval.base import wilson
from chatforge.fileio import atomic_write_json
from chatforge.tasks import get_task
from chatforge.think import Thinker, majority_vote, parse_spec, tree_answers

GAME24_CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "game24" / "24.csv"
TOT_GPT4 = {"direct": 0.073, "cot": 0.040, "vote:100 (CoT-SC)": 0.09, "tree:b5 (ToT)": 0.74}


def problems_for(task_name: str, ranks: str, n: int):
    task = get_task(task_name)
    if task_name == "game24":
        lo, hi = (int(x) for x in ranks.split("-"))
        if lo <= 800:
            sys.exit("report on ranks past 800: 1-800 are what the model and its verifiers trained on")
        return task, task.load(GAME24_CSV, (lo, hi))
    return task, task.make(n, seed=303)  # training used seeds 1 (SFT), 2 (validation), 101 (verifiers)


def one_seed(
    th: Thinker, task, problems, budgets: list[int], trees: list[str]
) -> dict[str, tuple[float, list[bool]]]:
    """{strategy: (mean tokens generated per problem, correct per problem)} for one sampling seed."""
    out = {}
    direct_q = [task.prompt(p, False) for p in problems]
    steps_q = [task.prompt(p, True) for p in problems]
    for name, prompts in (("direct", direct_q), ("cot", steps_q)):
        before = th.generated
        got = th.sample_many(prompts, 1, greedy=True)
        out[name] = (
            (th.generated - before) / len(problems),
            [task.check(p, g[0].answer) for p, g in zip(problems, got, strict=True)],
        )
    t0 = time.time()
    pool = th.sample_many(steps_q, max(budgets))
    print(f"  {len(problems)} x {max(budgets)} samples in {time.time() - t0:.0f}s", flush=True)
    items = [(q, s.text) for q, group in zip(steps_q, pool, strict=True) for s in group]
    k = max(budgets)
    scores = {}
    if th.orm is not None:
        scores["orm"] = th.orm_scores(items)
    if th.prm is not None:
        scores["prm"] = th.prm_scores(items)
    print(f"  scored by the verifiers at {time.time() - t0:.0f}s", flush=True)
    for n in budgets:
        tokens = sum(s.tokens for group in pool for s in group[:n]) / len(problems)
        vote = [
            task.check(p, majority_vote([s.answer for s in g[:n]])[0])
            for p, g in zip(problems, pool, strict=True)
        ]
        out[f"vote:{n}"] = (tokens, vote)
        out[f"best-of:{n}:oracle"] = (
            tokens,
            [any(task.check(p, s.answer) for s in g[:n]) for p, g in zip(problems, pool, strict=True)],
        )
        for v, sc in scores.items():
            picks = []
            for j, (p, g) in enumerate(zip(problems, pool, strict=True)):
                row = sc[j * k : j * k + n]
                picks.append(task.check(p, g[row.index(max(row))].answer))  # ties: the first sample
            out[f"best-of:{n}:{v}"] = (tokens, picks)
    if th.prm is not None:
        for shape in trees:
            before = th.generated
            answers = tree_answers(th, parse_spec(f"tree:{shape}"), steps_q)
            print(f"  tree:{shape} at {time.time() - t0:.0f}s", flush=True)
            out[f"tree:{shape}"] = (
                (th.generated - before) / len(problems),
                [task.check(p, task.extract(text)) for p, (text, _) in zip(problems, answers, strict=True)],
            )
    return out


def aggregate(per_seed: list[dict]) -> list[dict]:
    points = []
    for name in per_seed[0]:
        correct = [sum(s[name][1]) for s in per_seed]
        n = sum(len(s[name][1]) for s in per_seed)
        lo, hi = wilson(sum(correct), n)
        points.append({
            "strategy": name,
            "family": name.split(":")[0] + (":" + name.split(":")[2] if name.startswith("best-of") else ""),
            "tokens": sum(s[name][0] for s in per_seed) / len(per_seed),
            "accuracy": sum(correct) / n,
            "ci95": [lo, hi],
            "accuracy_by_seed": [c / len(s[name][1]) for c, s in zip(correct, per_seed, strict=True)],
            "n": n,
        })  # fmt: skip
    return points


def paired_by_problem(per_seed: list[dict], a: str, b: str, resamples: int = 10_000) -> dict:
    """Strategy a against b on the same problems, with each problem as one unit: its accuracy averaged
    over the sampling seeds (seeds reuse the problems, so pooling them as independent answers would
    overstate the evidence). The mean difference with a 95% bootstrap interval over problems, and an
    exact two-sided sign test over the problems where the two differ."""
    diffs = np.mean([np.array(s[a][1], dtype=float) - np.array(s[b][1], dtype=float) for s in per_seed], axis=0)
    rng = np.random.default_rng(0)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    better, worse = int((diffs > 0).sum()), int((diffs < 0).sum())
    n = better + worse
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2**n if n else 1.0
    return {
        "problems": len(diffs), "mean_difference": float(diffs.mean()),
        "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "problems_better": better, "problems_worse": worse, "sign_test_p": min(1.0, 2 * tail),
    }  # fmt: skip


def equal_tokens(points: list[dict], per_seed: list[dict] | None = None) -> list[dict]:
    """Each tree point beside the self-consistency point given at least as many tokens (the fewest
    such N; None past the largest), so "beats self-consistency at equal tokens" is read off fairly;
    with per_seed, the two compared problem by problem too (`paired_by_problem`)."""
    votes = sorted((p for p in points if p["family"] == "vote"), key=lambda p: p["tokens"])
    rows = []
    for t in (p for p in points if p["family"] == "tree"):
        v = next((p for p in votes if p["tokens"] >= t["tokens"]), None)
        rows.append({
            "tree": t["strategy"], "tree_tokens": t["tokens"], "tree_accuracy": t["accuracy"], "tree_ci95": t["ci95"],
            "vote": v and v["strategy"], "vote_tokens": v and v["tokens"], "vote_accuracy": v and v["accuracy"],
            "vote_ci95": v and v["ci95"], "separated": bool(v and t["ci95"][0] > v["ci95"][1]),
            "paired": paired_by_problem(per_seed, t["strategy"], v["strategy"]) if v and per_seed else None,
        })  # fmt: skip
    return rows


def verifier_order(points: list[dict], per_seed: list[dict]) -> dict | None:
    """Lightman et al.'s ordering at the largest N: PRM-ranked >= ORM-ranked >= majority vote, each
    neighbour pair compared problem by problem (`paired_by_problem`); None without an N that all
    three ran at."""
    names = {p["strategy"] for p in points}
    ns = [int(p["strategy"].split(":")[1]) for p in points if p["family"] == "vote"]
    n = max((k for k in ns if {f"best-of:{k}:prm", f"best-of:{k}:orm"} <= names), default=None)
    if n is None:
        return None
    acc = {p["strategy"]: p["accuracy"] for p in points}
    prm, orm, vote = f"best-of:{n}:prm", f"best-of:{n}:orm", f"vote:{n}"
    return {
        "n": n, "prm": acc[prm], "orm": acc[orm], "vote": acc[vote],
        "holds": acc[prm] >= acc[orm] >= acc[vote],
        "prm_vs_orm": paired_by_problem(per_seed, prm, orm),
        "orm_vs_vote": paired_by_problem(per_seed, orm, vote),
        "prm_vs_vote": paired_by_problem(per_seed, prm, vote),
    }  # fmt: skip


def plot(points: list[dict], title: str, path: Path, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"best-of:oracle": ("k", "--", "pass@N (oracle ceiling)"), "vote": ("tab:blue", "-", "self-consistency (vote)"),
              "best-of:orm": ("tab:orange", "-", "best-of-N, ORM"), "best-of:prm": ("tab:green", "-", "best-of-N, PRM"),
              "tree": ("tab:red", "-", "tree search (PRM value)")}  # fmt: skip
    for family, (color, ls, label) in styles.items():
        pts = sorted((p for p in points if p["family"] == family), key=lambda p: p["tokens"])
        if pts:
            x = [p["tokens"] for p in pts]
            y = [p["accuracy"] for p in pts]
            err = [[p["accuracy"] - p["ci95"][0] for p in pts], [p["ci95"][1] - p["accuracy"] for p in pts]]
            ax.errorbar(x, y, yerr=err, color=color, linestyle=ls, marker="o", capsize=3, label=label)
            for p in pts:
                ax.annotate(p["strategy"].split(":", 1)[1].split(":")[0], (p["tokens"], p["accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3), color=color)  # fmt: skip
    for name, marker in (("direct", "s"), ("cot", "^")):
        p = next((p for p in points if p["strategy"] == name), None)
        if p:
            err = [[p["accuracy"] - p["ci95"][0]], [p["ci95"][1] - p["accuracy"]]]
            ax.errorbar([p["tokens"]], [p["accuracy"]], yerr=err, color="gray", marker=marker, capsize=3,
                        linestyle="none", label=f"{name} (greedy)")  # fmt: skip
    d = next((p for p in points if p["strategy"] == "direct"), None)
    if d:
        ax.axhline(d["accuracy"], color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("tokens generated per problem (log scale)")
    ax.set_ylabel("accuracy (95% Wilson interval, pooled over seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if note:
        ax.text(0.99, 0.99, note, transform=ax.transAxes, fontsize=7, ha="right", va="top", color="dimgray")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--prm")
    ap.add_argument("--orm")
    ap.add_argument("--task", choices=("game24", "world"), default="game24")
    ap.add_argument("--ranks", default="801-900")
    ap.add_argument("--problems", type=int, default=100, help="world: problems to make")
    ap.add_argument("--budgets", default="1,2,4,8,16")
    ap.add_argument("--trees", default="b1d4,b2d4,b4d4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--merge", nargs="+", metavar="DIR", help="pool the seeds of earlier runs' curve.json (same task)"
    )
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    task, problems = problems_for(args.task, args.ranks, args.problems)
    run = load_run(args.model, inference=True)
    prm = load_reward_model(args.prm)[0] if args.prm else None
    orm = load_reward_model(args.orm)[0] if args.orm else None
    budgets = [int(b) for b in args.budgets.split(",")]
    trees = [t for t in args.trees.split(",") if t]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in (int(s) for s in args.seeds.split(",")):
        th = Thinker(
            run.model,
            run.tokenizer,
            orm=orm,
            prm=prm,
            extract=task.extract,
            temperature=args.temperature,
            seed=seed,
        )
        per_seed.append(one_seed(th, task, problems, budgets, trees))
        print(f"seed {seed} done at {time.time() - t0:.0f}s", flush=True)
        write(
            args, task, problems, per_seed, out, time.time() - t0
        )  # after every seed: a cut run keeps its seeds


def merge(args) -> None:
    """One curve from runs made seed by seed (each run's per-seed results, pooled)."""
    runs = [json.loads((Path(d) / "curve.json").read_text()) for d in args.merge]
    if len({r["task"] for r in runs}) != 1:
        sys.exit("--merge takes runs of one task")
    per_seed = [
        {k: (v[0], [bool(c) for c in v[1]]) for k, v in seed.items()} for r in runs for seed in r["per_seed"]
    ]
    args.seeds = ",".join(r["seeds"] for r in runs)
    args.task, args.model, args.prm, args.orm = (
        runs[0]["task"],
        runs[0]["model"],
        runs[0]["prm"],
        runs[0]["orm"],
    )
    args.temperature = runs[0]["temperature"]
    problems = [None] * runs[0]["problems"]
    write(args, None, problems, per_seed, Path(args.out), sum(r["seconds"] for r in runs))


def write(args, task, problems, per_seed: list[dict], out: Path, seconds: float) -> None:
    points = aggregate(per_seed)
    seeds = ",".join(args.seeds.split(",")[: len(per_seed)])
    what = (
        f"Game of 24, ranks {args.ranks}"
        if args.task == "game24"
        else f"world age problems ({len(problems)})"
    )
    atomic_write_json(out / "curve.json", {
        "task": args.task, "problems": len(problems), "model": args.model, "prm": args.prm, "orm": args.orm,
        "seeds": seeds, "temperature": args.temperature, "points": points, "seconds": round(seconds),
        "command": " ".join(sys.argv), "reference_tot_gpt4_game24": TOT_GPT4,
        "tree_vs_vote": equal_tokens(points, per_seed),
        "verifier_order": verifier_order(points, per_seed),
        "per_seed": [{k: [tokens, [int(c) for c in correct]] for k, (tokens, correct) in r.items()} for r in per_seed],
    })  # fmt: skip
    note = (
        "reference, not comparable: ToT paper, GPT-4, ranks 901-1000\n"
        "direct 7.3%, CoT 4.0%, CoT-SC k=100 9%, ToT b=5 74%"
        if args.task == "game24" else ""
    )  # fmt: skip
    plot(points, f"{what}: {Path(args.model).name}, seeds {seeds}", out / "curve.png", note)
    for p in points:
        lo, hi = p["ci95"]
        print(
            f"{p['strategy']:>20}  tokens {p['tokens']:7.1f}  acc {p['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  by seed {p['accuracy_by_seed']}"
        )
    for r in equal_tokens(points, per_seed):
        if r["vote"]:
            d = r["paired"]
            print(
                f"{r['tree']} ({r['tree_tokens']:.0f} tokens) {r['tree_accuracy']:.3f} vs {r['vote']} "
                f"({r['vote_tokens']:.0f} tokens) {r['vote_accuracy']:.3f}: intervals apart {r['separated']}; "
                f"by problem {d['mean_difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
                f"better on {d['problems_better']}, worse on {d['problems_worse']}, sign test p {d['sign_test_p']:.3g}"
            )
    order = verifier_order(points, per_seed)
    if order:
        print(f"at N={order['n']}: PRM {order['prm']:.3f} >= ORM {order['orm']:.3f} >= vote {order['vote']:.3f}: {order['holds']}")
        for pair in ("prm_vs_orm", "orm_vs_vote", "prm_vs_vote"):
            d = order[pair]
            print(
                f"  {pair}: by problem {d['mean_difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
                f"better on {d['problems_better']}, worse on {d['problems_worse']}, sign test p {d['sign_test_p']:.3g}"
            )


if __name__ == "__main__":
    main()
