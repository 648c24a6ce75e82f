"""LoRA teaches SmolLM2 new facts: before/after accuracy, and merged == adapter outputs.

    python bench/lora_facts.py --out runs/lora_facts                    # imports SmolLM2 first (~25 s)
    python bench/lora_facts.py --out runs/lora_facts --base runs/smollm2 --steps 30 --rank 8

SmolLM2-135M-Instruct has never heard of the people in chatforge's synthetic world. This takes
`--facts` of them, one fact each (birth city, employer or university: made-up names nobody
can guess), and writes SFT conversations asking each fact in 3 phrasings (answered with
the world's answer templates). The 2 other phrasings of every question are held out. It
then runs the real `chatforge sft` with `lora_rank` set (only the adapters train) and asks
greedy questions through the engine, scored with `contains_answer`, before and after:

- held-out phrasings (the measure: did it learn the fact, not the sentence?)
- the training phrasings
- a few general-knowledge control questions the base answers (what LoRA should not break)

Then it loads the adapter on the base (adapter model) and the run's merged model.safetensors
(merged model) and reports the largest logit difference between them. Results: lora_facts.json
and lora_facts.png (accuracy before/after, loss curves) in --out.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge import checkpoint as ckpt  # noqa: E402
from chatforge.chat_format import render_prompt, turn_end_ids  # noqa: E402
from chatforge.config import sft_config  # noqa: E402
from chatforge.conversations import fact_turn  # noqa: E402
from chatforge.eval.base import generate_greedy  # noqa: E402
from chatforge.eval.world_qa import contains_answer  # noqa: E402
from chatforge.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from chatforge.model.io import import_gguf, smollm2_path  # noqa: E402
from chatforge.model.lora import load_adapter  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402
from chatforge.train.metrics import read_metrics  # noqa: E402
from chatforge.train.sft import sft  # noqa: E402
from chatforge.world import N_PHRASINGS, build_world, fact_questions  # noqa: E402

ATTRIBUTES = ("birth_city", "employer", "university")  # invented names: no guessing from priors
TRAIN_PHRASINGS = 3  # of the world's 5 phrasings per attribute; the other 2 are held out
# general knowledge the base model answers (a retention check); any of the golds counts
CONTROL = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("How many days are there in a week?", ["seven", "7"]),
    ("What language is spoken in Spain?", ["Spanish"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What is the boiling point of water in Celsius?", ["100"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
]


def make_facts(
    n: int, seed: int, answers: int = 1
) -> tuple[list[list[dict]], list[list[dict]], list[dict], list[dict]]:
    """(train conversations, held-out conversations for val loss, train questions, held-out questions)."""
    world = build_world(seed, max(60, 3 * n), 0)
    rng = random.Random(seed)
    people = rng.sample(list(world.people), n)
    train, val, seen, held = [], [], [], []
    for i, person in enumerate(people):
        attr = ATTRIBUTES[i % len(ATTRIBUTES)]
        qas = fact_questions(person, world, rng, n_phrasings=N_PHRASINGS, attributes=(attr,))
        for j, qa in enumerate(qas):
            record = {"question": qa.question, "golds": [qa.answer], "person": person.name, "attribute": attr}
            replies = [
                fact_turn(person, world, attr, rng)[1] for _ in range(answers)
            ]  # the world's templates
            convs = [
                [{"role": "user", "content": qa.question}, {"role": "assistant", "content": a}]
                for a in replies
            ]
            if j < TRAIN_PHRASINGS:
                train += convs
                seen.append(record)
            else:
                val += convs[:1]
                held.append(record)
    rng.shuffle(train)
    return train, val, seen, held


@torch.no_grad()
def ask(model, tok: Tokenizer, items: list[dict], max_new_tokens: int = 24) -> list[dict]:
    prompts = [render_prompt(tok, [{"role": "user", "content": it["question"]}]) for it in items]
    outs = generate_greedy(model, prompts, max_new_tokens, stop_ids=turn_end_ids(tok), batch_size=32)
    rows = []
    for it, out in zip(items, outs, strict=True):
        reply = tok.decode(out or [])
        rows.append({**it, "reply": reply, "correct": any(contains_answer(reply, g) for g in it["golds"])})
    return rows


def accuracy(rows: list[dict]) -> float:
    return sum(r["correct"] for r in rows) / len(rows)


@torch.no_grad()
def max_logit_diff(a, b, prompts: list[list[int]]) -> float:
    return max(float((a(torch.tensor([p])) - b(torch.tensor([p]))).abs().max()) for p in prompts)


def plot(result: dict, metrics: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = ["held_out", "train_phrasings", "control"]
    labels = ["held-out phrasings", "training phrasings", "general-knowledge control"]
    xs = range(len(groups))
    before = [100 * result["before"][g] for g in groups]
    after = [100 * result["after"][g] for g in groups]
    axes[0].bar([x - 0.2 for x in xs], before, 0.4, label="base SmolLM2", color="C7")
    axes[0].bar([x + 0.2 for x in xs], after, 0.4, label=f"after LoRA (rank {result['rank']})", color="C0")
    for x, b, a in zip(xs, before, after, strict=True):
        axes[0].text(x - 0.2, b + 1, f"{b:.0f}", ha="center")
        axes[0].text(x + 0.2, a + 1, f"{a:.0f}", ha="center")
    axes[0].set_xticks(list(xs), labels)
    axes[0].set(
        ylabel="accuracy (%)",
        ylim=(0, 125),  # room for the legend above the bars
        title=f"{result['facts']} new facts: {result['train_minutes']:.1f} min of LoRA-SFT "
        f"on {result['device']} ({result['threads']} threads)",
    )
    axes[0].legend(loc="upper center", ncol=2)
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    if train:
        axes[1].plot(*zip(*train, strict=True), lw=1, label="train loss (assistant tokens)")
    if val:
        axes[1].plot(*zip(*val, strict=True), "o-", label="val loss (held-out phrasings)")
    axes[1].set(xlabel="step", ylabel="cross-entropy (nats/token)", title="LoRA-SFT loss")
    axes[1].grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument(
        "--base", type=Path, default=None, help="a SmolLM2 run folder (default: import it to OUT/smollm2)"
    )
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="all")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=2, help="rows of --seq-len tokens per step")
    ap.add_argument("--answers", type=int, default=1, help="answer sentences per training phrasing")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    base = args.base or out / "smollm2"
    if not (base / "model.safetensors").is_file():
        t0 = time.perf_counter()
        import_gguf(smollm2_path(), base)
        print(f"imported SmolLM2 into {base} in {time.perf_counter() - t0:.0f} s", flush=True)

    train, val, seen, held = make_facts(args.facts, args.seed, args.answers)
    data = out / "facts"
    for name, convs in (("train", train), ("val", val)):
        atomic_write_text(data / f"{name}.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in convs))
    control = [{"question": q, "golds": g} for q, g in CONTROL]
    print(
        f"{args.facts} facts: {len(train)} training conversations, {len(held)} held-out questions", flush=True
    )

    base_run = ckpt.load_run(base, device=args.device)
    model, tok = base_run.model, base_run.tokenizer
    first = render_prompt(tok, [{"role": "user", "content": held[0]["question"]}])
    starts_with_bos = first[0] == tok.bos_id
    print(f"rendered prompt starts with {tok.id_to_token(first[0])!r} (id {first[0]})", flush=True)
    before = {
        "held_out": ask(model, tok, held),
        "train_phrasings": ask(model, tok, seen),
        "control": ask(model, tok, control),
    }
    print("before: " + ", ".join(f"{k} {100 * accuracy(v):.0f}%" for k, v in before.items()), flush=True)

    run = out / "lora"
    cfg = sft_config(
        seq_len=args.seq_len, device_batch_size=args.batch, max_steps=args.steps, lr=args.lr, warmup_steps=3,
        eval_every=max(1, args.steps // 2), eval_batches=4, ckpt_every=0, log_every=2, device=args.device,
        lora_rank=args.rank, lora_alpha=args.alpha, lora_targets=args.targets, seed=args.seed,
    )  # fmt: skip
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time: the figures are for these settings
    summary = sft(base, data / "train.jsonl", run, cfg, val=data / "val.jsonl")

    merged, _, _ = ckpt.load_model(run, args.device)
    adapted = load_adapter(ckpt.load_model(base, args.device)[0], run)
    after = {
        "held_out": ask(merged, tok, held),
        "train_phrasings": ask(merged, tok, seen),
        "control": ask(merged, tok, control),
    }
    adapter_held = ask(adapted, tok, held)
    prompts = [render_prompt(tok, [{"role": "user", "content": it["question"]}]) for it in held + control]
    diff = max_logit_diff(adapted, merged, prompts)
    same_answers = [r["reply"] for r in adapter_held] == [r["reply"] for r in after["held_out"]]

    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "facts": args.facts,
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": args.targets,
        "steps": args.steps,
        "lr": args.lr,
        "tokens_per_step": args.batch * args.seq_len,
        "trainable_params": summary["trainable_params"],
        "params": summary["params"],
        "train_minutes": round(summary["train_seconds"] / 60, 2),
        "adapter_mb": round((run / "adapter_model.safetensors").stat().st_size / 2**20, 2),
        "prompt_starts_with_bos": starts_with_bos,
        "before": {k: round(accuracy(v), 4) for k, v in before.items()},
        "after": {k: round(accuracy(v), 4) for k, v in after.items()},
        "adapter_model_held_out": round(accuracy(adapter_held), 4),
        "max_abs_logit_diff_merged_vs_adapter": diff,
        "merged_and_adapter_answers_identical": same_answers,
        "val_loss_start": summary["val_loss_start"],
        "val_loss_end": summary["val_loss_end"],
        "answers": {"before": before, "after": after},
    }
    atomic_write_json(out / "lora_facts.json", result)
    plot(result, read_metrics(run / "metrics.jsonl"), out / "lora_facts.png")
    for g in ("held_out", "train_phrasings", "control"):
        print(f"{g:16s} before {100 * result['before'][g]:5.1f}%  after {100 * result['after'][g]:5.1f}%")
    for r in after["held_out"][:4]:
        print(f"  {r['question']!r} -> {r['reply']!r} ({'ok' if r['correct'] else 'wrong'})")
    print(
        f"trainable {result['trainable_params']:,} of {result['params']:,} params, {result['train_minutes']} min "
        f"training on {args.device} ({result['threads']} threads), adapter {result['adapter_mb']} MB; "
        f"max |logits merged - adapter| = {diff:.2e}, same answers: {same_answers}"
    )
    print(f"results: {out / 'lora_facts.json'}, plot: {out / 'lora_facts.png'}")


if __name__ == "__main__":
    main()
