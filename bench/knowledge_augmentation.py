"""Knowledge augmentation: does writing each fact several ways let a model *use* it?

    python bench/knowledge_augmentation.py --out runs/ka                 # 1 vs 5 biographies
    python bench/knowledge_augmentation.py --out runs/ka --paraphrases 1 3 5 --set pretrain.max_steps=400

For each number of biographies per person, this pretrains a model on the synthetic world
(the speedrun's pipeline up to pretraining, with question-answer text about half the people
mixed in), keeps a checkpoint every `--every` steps, and asks every checkpoint the questions
about the *other* half, in the same "Question: ...\\nAnswer:" form. Those answers exist only in
the biographies, so accuracy measures whether the model can extract a fact it read, not recall
a QA pair it memorised. The result is a plot of held-out accuracy against training time
(`ka.png`) and the numbers (`ka.json`) in --out.

Physics of Language Models 3.1 (Allen-Zhu & Li) found that with one biography per person the
model memorises but cannot extract; with several shuffled paraphrases it can.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.checkpoint import list_checkpoints, load_run  # noqa: E402
from chatforge.engine import generate_batch  # noqa: E402
from chatforge.eval.world_qa import (
    contains_answer,  # noqa: E402
    load_qa_file,  # noqa: E402
)
from chatforge.fileio import atomic_write_json  # noqa: E402
from chatforge.speedrun import speedrun  # noqa: E402
from chatforge.train.metrics import read_metrics  # noqa: E402


@torch.no_grad()
def qa_accuracy(ckpt: Path, qas: list, device: str, batch_size: int = 64) -> float:
    run = load_run(ckpt, device=device)
    model, tok = run.model, run.tokenizer
    prompts = [[tok.bos_id, *tok.encode(f"Question: {qa.question}\nAnswer:")] for qa in qas]
    correct = 0
    for i in range(0, len(prompts), batch_size):
        outs = generate_batch(model, prompts[i : i + batch_size], 16, temperature=0.0)
        for qa, ids in zip(qas[i : i + batch_size], outs, strict=True):
            answer = tok.decode(ids).split("\n")[0]  # the answer line only
            correct += contains_answer(answer, qa.answer)
    return correct / len(qas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--paraphrases", type=int, nargs="+", default=[1, 5, 7])
    ap.add_argument("--people", type=int, default=400)
    ap.add_argument("--every", type=int, default=50, help="checkpoint (and evaluate) every N steps")
    ap.add_argument("--max-questions", type=int, default=600, help="held-out questions asked per checkpoint")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="preset override")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out = Path(args.out)
    curves: dict[str, list[dict]] = {}
    for p in args.paraphrases:
        run = out / f"bios{p}"
        overrides = [
            f"world.people={args.people}", f"world.paraphrases={p}", f"pretrain.ckpt_every={args.every}",
            "pretrain.keep_ckpts=1000", f"pretrain.device={args.device}", *args.overrides,
        ]  # fmt: skip
        speedrun(args.preset, run, overrides, progress=False, until="pretrain")
        qas = load_qa_file(run / "sft_data" / "eval_forward.jsonl")[: args.max_questions]
        times = {
            r["step"]: r["time_s"] for r in read_metrics(run / "base" / "metrics.jsonl") if "time_s" in r
        }
        points = []
        for ckpt in list_checkpoints(run / "base"):
            step = int(ckpt.name.split("_")[1])
            acc = qa_accuracy(ckpt, qas, args.device)
            t = (
                times[max((s for s in times if s <= step), default=0)] if times else 0.0
            )  # last log at or before it
            points.append({"step": step, "minutes": round(t / 60, 2), "accuracy": round(acc, 4)})
            print(
                f"bios={p} step {step:5d} ({t / 60:5.1f} min): held-out accuracy {100 * acc:5.1f}%",
                flush=True,
            )
        curves[f"{p} biograph{'y' if p == 1 else 'ies'} per person"] = points
    result = {"people": args.people, "device": args.device, "questions": len(qas), "curves": curves}
    atomic_write_json(out / "ka.json", result)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        ax.plot([q["minutes"] for q in points], [100 * q["accuracy"] for q in points], "o-", label=label)
    ax.set(xlabel=f"training time (minutes, {args.device})", ylabel="held-out fact accuracy (%)", ylim=(0, 100),
           title=f"Knowledge extraction: {args.people} people, QA text for half of them")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ka.png", dpi=110)
    print(json.dumps({k: v[-1] for k, v in curves.items()}, indent=2))
    print(f"plot: {out / 'ka.png'}")


if __name__ == "__main__":
    main()
