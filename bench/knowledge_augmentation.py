"""Knowledge augmentation: does writing each fact several ways let a model *use* it?

    python bench/knowledge_augmentation.py --out runs/ka --seeds 0 1 2        # the documented contrast
    python bench/knowledge_augmentation.py --out runs/ka-quick --quick --check  # minutes; fails if it broke

For each number of biographies per person (1 and 5), this pretrains a small model from scratch
on a synthetic world with question-answer text about half the people mixed in, written as plain
"Question: ...\\nAnswer: ..." documents, and asks the questions about the *other* half in that same
form. Those answers exist only in the biographies, so accuracy measures whether the model can
extract a fact it read, not recall a QA pair it memorised. Physics of Language Models 3.1
(Allen-Zhu & Li) found that with one biography per person the model memorises but cannot
extract; with several shuffled paraphrases it can.

The recipe is pinned here (RECIPES), not taken from a preset: the presets move with the
speedrun, and this bench's figures must not move with them. `--check` exits non-zero, with one
line saying what broke, when the contrast's direction or size no longer holds.
Writes ka.json (per seed and mean/spread) and ka.png into --out; runs resume stage by stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.checkpoint import list_checkpoints, load_run  # noqa: E402
from chatforge.config import TrainConfig  # noqa: E402
from chatforge.conversations import split_people  # noqa: E402
from chatforge.data.pipeline import build_shards, train_tokenizer  # noqa: E402
from chatforge.device import machine  # noqa: E402
from chatforge.engine import generate_batch  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.eval.world_qa import contains_answer, load_qa_file  # noqa: E402
from chatforge.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from chatforge.seeds import code_commit, spread_dict  # noqa: E402
from chatforge.train.metrics import read_metrics  # noqa: E402
from chatforge.train.pretrain import pretrain  # noqa: E402
from chatforge.world import build_world, fact_questions, load_world, write_world  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the figure: world, QA text, tokenizer, model and training."""

    people: int
    heldout: int
    qa_phrasings: int  # phrasings per attribute of the QA text about the QA half
    vocab_size: int
    train: dict  # TrainConfig fields
    eval_points: int  # checkpoints asked along the curve (the last one always)
    max_questions: int
    # the contrast --check holds it to: (few, many) biographies, many >= min_many, many - few >= min_gap
    few: int = 1
    many: int = 5
    min_many: float = 0.85
    min_gap: float = 0.5


_MODEL = dict(depth=4, model={"n_embd": 192}, seq_len=128, warmup_steps=20, lr=3e-3)  # 1.97M parameters
RECIPES = {
    # 3 seeds x 2 settings in under an hour on one shared core: 30 people (14 with QA text, 14 asked),
    # a 4-layer model of width 128 (0.9M parameters), 410 steps of 8 x 128-token rows, about 20 passes
    # over the 5-biography text (at width 192, 60 people and 13 passes reached 64% held-out; smaller
    # batches extract better at equal tokens: docs/benchmarks.md's preset sweep)
    "full": Recipe(
        people=30,
        heldout=2,
        qa_phrasings=2,
        vocab_size=1024,
        eval_points=2,
        max_questions=600,
        train={**_MODEL, "model": {"n_embd": 128}, "device_batch_size": 8, "max_steps": 410},
        min_many=0.4,  # measured: 50.9% mean over seeds 0-2 (43.2-55.3%) vs 1 biography 2-3% (docs/seeds.md)
        min_gap=0.35,
    ),  # fmt: skip
    # the size of docs/benchmarks.md's first figure (400 people, 1,700 steps of 16 x 128 tokens), about
    # 13 min per run on one Zen 4 thread; measured: 89.1% mean over seeds 0-2 (86.7-91.8%) vs 1 biography
    # 8.2% (7.2-9.0%), so the default bounds (85%, a 50-point gap) hold (docs/seeds.md)
    "large": Recipe(
        people=400,
        heldout=40,
        qa_phrasings=2,
        vocab_size=2048,
        eval_points=4,
        max_questions=600,
        train={**_MODEL, "device_batch_size": 16, "max_steps": 1700},
    ),  # fmt: skip
}
# --quick (`make bench-check`): the full recipe on world seed 0 alone, 2 x 5-6 minutes on a shared core;
# measured 43.2% vs 2.1% held-out, the bounds leave about 13 points for drift before they fail
RECIPES["quick"] = dataclasses.replace(RECIPES["full"], min_many=0.3, min_gap=0.25)


def train_config(recipe: Recipe, seed: int, device: str) -> TrainConfig:
    """The recipe's training, with a checkpoint (and a point on the curve) every steps / eval_points."""
    cfg = TrainConfig(**recipe.train)
    every = max(1, cfg.max_steps // recipe.eval_points)
    return dataclasses.replace(
        cfg, ckpt_every=every, keep_ckpts=1000, eval_every=every, eval_batches=10, log_every=50,
        device=device, seed=1337 + seed,
    )  # fmt: skip


def build_data(run: Path, recipe: Recipe, seed: int, paraphrases: int) -> None:
    """world/, qa.jsonl (plain QA text about the QA half), eval.jsonl (the other half), tokenizer, shards."""
    if not (run / "world" / "manifest.json").exists():
        write_world(
            build_world(seed, recipe.people, recipe.heldout),
            run / "world",
            paraphrases=paraphrases,
            seed=seed,
        )
    if not (run / "eval.jsonl").exists():
        world = load_world(run / "world")
        qa_people, eval_people = split_people(world, eval_fraction=0.5, seed=seed)
        rng = random.Random(f"ka-qa:{seed}")
        docs = [
            {"text": f"Question: {qa.question}\nAnswer: {qa.answer}"}
            for p in qa_people
            for qa in fact_questions(p, world, rng, n_phrasings=recipe.qa_phrasings)
        ]
        atomic_write_text(run / "qa.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
        rng = random.Random(f"ka-eval:{seed}")
        asked = [qa.to_dict() for p in eval_people for qa in fact_questions(p, world, rng, n_phrasings=1)]
        rng.shuffle(asked)
        atomic_write_text(run / "eval.jsonl", "".join(json.dumps(d) + "\n" for d in asked))
    sources = [str(run / "world"), str(run / "qa.jsonl")]
    if not (run / "tokenizer.json").exists():
        train_tokenizer(sources, run / "tokenizer.json", recipe.vocab_size, progress=False)
    if not (run / "data" / "index.json").exists():
        # 2% of the documents for validation loss, more only where a small world leaves that under one row
        for val_fraction in (0.02, 0.05, 0.1):
            index = build_shards(
                sources, run / "tokenizer.json", run / "data", val_fraction=val_fraction, progress=False
            )
            if index["splits"]["val"]["tokens"] > recipe.train["seq_len"] + 1:
                break


@torch.no_grad()
def qa_accuracy(ckpt: Path, qas: list, device: str, batch_size: int = 64) -> float:
    """Greedy answers to "Question: ...\\nAnswer:", the form of the QA text; right when the first line
    contains the answer."""
    loaded = load_run(ckpt, device=device)
    model, tok = loaded.model, loaded.tokenizer
    prompts = [[tok.bos_id, *tok.encode(f"Question: {qa.question}\nAnswer:")] for qa in qas]
    correct = 0
    for i in range(0, len(prompts), batch_size):
        outs = generate_batch(model, prompts[i : i + batch_size], 16, temperature=0.0)
        for qa, ids in zip(qas[i : i + batch_size], outs, strict=True):
            correct += contains_answer(tok.decode(ids).split("\n")[0], qa.answer)
    return correct / len(qas)


def run_curve(run: Path, recipe: Recipe, seed: int, paraphrases: int, device: str) -> list[dict]:
    """Pretrain (resuming) and ask every checkpoint; the curve is cached in curve.json."""
    made_with = {**dataclasses.asdict(recipe), "seed": seed, "paraphrases": paraphrases}
    for bound in ("min_many", "min_gap"):  # the check's bounds do not change what is trained
        made_with.pop(bound)
    if (run / "recipe.json").exists() and json.loads((run / "recipe.json").read_text()) != made_with:
        raise ChatforgeError(
            f"{run} was made with another recipe (see {run / 'recipe.json'}); use a new --out"
        )
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "recipe.json", made_with)
    if (run / "curve.json").exists():
        return json.loads((run / "curve.json").read_text())
    build_data(run, recipe, seed, paraphrases)
    cfg = train_config(recipe, seed, device)
    if not (run / "base" / "pretrain_summary.json").exists():
        pretrain(run / "data", run / "tokenizer.json", run / "base", cfg, resume=(run / "base" / "ckpt").is_dir(),
                 progress=False)  # fmt: skip
    qas = load_qa_file(run / "eval.jsonl")[: recipe.max_questions]
    times = {r["step"]: r["time_s"] for r in read_metrics(run / "base" / "metrics.jsonl") if "time_s" in r}
    points = []
    for ckpt in list_checkpoints(run / "base"):
        step = int(ckpt.name.split("_")[1])
        acc = qa_accuracy(ckpt, qas, device)
        t = times[max((s for s in times if s <= step), default=min(times))] if times else 0.0
        points.append(
            {"step": step, "minutes": round(t / 60, 2), "accuracy": round(acc, 4), "questions": len(qas)}
        )
        print(
            f"seed {seed} bios={paraphrases} step {step:5d} ({t / 60:5.1f} min): held-out {100 * acc:5.1f}%",
            flush=True,
        )
    atomic_write_json(run / "curve.json", points)
    return points


def contrast(result: dict, recipe: Recipe) -> str | None:
    """None when the contrast holds on the mean over the seeds, else one line saying what broke."""
    few, many = result["final"][str(recipe.few)]["mean"], result["final"][str(recipe.many)]["mean"]
    if many < recipe.min_many:
        return (f"knowledge augmentation: {recipe.many} biographies reach {100 * many:.1f}% held-out, "
                f"below the {100 * recipe.min_many:.0f}% this recipe is held to")  # fmt: skip
    if many - few < recipe.min_gap:
        return (f"knowledge augmentation: {recipe.many} vs {recipe.few} biographies {100 * many:.1f}% vs "
                f"{100 * few:.1f}% held-out, a gap under the {100 * recipe.min_gap:.0f} points this recipe is held to")  # fmt: skip
    return None


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (bios, seeds) in enumerate(result["curves"].items()):
        for j, points in enumerate(seeds.values()):
            label = f"{bios} biograph{'y' if bios == '1' else 'ies'} per person" if j == 0 else None
            ax.plot([q["step"] for q in points], [100 * q["accuracy"] for q in points], "o-", color=f"C{i}",
                    alpha=0.7, label=label)  # fmt: skip
    ax.set(xlabel="pretraining step", ylabel="held-out fact accuracy (%)", ylim=(0, 100),
           title=f"Knowledge extraction ({result['recipe_name']}): {result['recipe']['people']} people, "
                 f"{len(result['seeds'])} seeds")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--recipe", choices=list(RECIPES), default="full", help="which pinned recipe (default full)"
    )
    ap.add_argument("--quick", action="store_true", help="--recipe quick: minutes on one core")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="world seeds (default: 0 1 2; --quick: 0)"
    )
    ap.add_argument(
        "--paraphrases", type=int, nargs="+", default=None, help="biographies per person (default 1 5)"
    )
    ap.add_argument("--check", action="store_true", help="exit 1 when the contrast's direction or size broke")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = "quick" if args.quick else args.recipe
    recipe = RECIPES[name]
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    paraphrases = args.paraphrases or [recipe.few, recipe.many]
    out = Path(args.out)
    curves: dict[str, dict[str, list[dict]]] = {}
    for seed in seeds:
        for p in paraphrases:
            try:
                points = run_curve(out / f"seed-{seed}" / f"bios{p}", recipe, seed, p, args.device)
            except ChatforgeError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            curves.setdefault(str(p), {})[str(seed)] = points
    final = {
        p: spread_dict([pts[-1]["accuracy"] for pts in by_seed.values()]) for p, by_seed in curves.items()
    }
    for p, by_seed in curves.items():
        final[p]["per_seed"] = {s: pts[-1]["accuracy"] for s, pts in by_seed.items()}
    result = {
        "commit": code_commit(),
        "machine": machine(),
        "recipe_name": name, "recipe": dataclasses.asdict(recipe), "seeds": seeds, "threads": args.threads,
        "device": args.device, "final": final, "curves": curves,
    }  # fmt: skip
    atomic_write_json(out / "ka.json", result)
    plot(result, out / "ka.png")
    for p, s in final.items():
        print(f"{p} biograph{'y' if p == '1' else 'ies'}: held-out {100 * s['mean']:.1f}% mean, {100 * s['min']:.1f}-{100 * s['max']:.1f}% "
              f"(std {100 * s['std']:.1f}) over {s['n']} seed(s)")  # fmt: skip
    if args.check:
        broken = contrast(result, recipe) if {str(recipe.few), str(recipe.many)} <= set(final) else (
            f"knowledge augmentation: --check needs --paraphrases {recipe.few} {recipe.many}")  # fmt: skip
        if broken:
            print(broken)
            sys.exit(1)
        print(f"knowledge augmentation ({name}): the contrast holds")


if __name__ == "__main__":
    main()
