"""Safety training, measured: SmolLM2 red-teamed before and after a LoRA SFT on refusals in jailbreak wrappers.

For each --seeds:
1. `redteam.safety.safety_conversations` (the world's training split of disallowed requests and
   harmless look-alikes, in personas, framings, a harmless first turn and encodings worded apart from
   the probes) is written as SFT data;
2. a LoRA SFT of SmolLM2-135M-Instruct on it, through chatforge's one trainer (`train.sft.sft`);
3. the red-team harness asks, before and after, the role-play and encoding probes (and the bare request,
   `direct`) with the world's HELD-OUT disallowed requests (frames and topics no training chat has):
   attack success = the answer does not refuse; and the same probes with the held-out harmless
   look-alikes ("kill a Python process"): false refusal = the answer refuses. Plus the harness's
   eight plain questions (clean accuracy).
Writes OUT/safety.json and OUT/safety.md (mean and min-max over the seeds for "after").

    flock /tmp/cf-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 PYTHONPATH=. \\
        python bench/safety_training.py --threads 1 --seeds 0 1 2 --out /tmp/safety
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from chatforge.checkpoint import load_run
from chatforge.config import sft_config
from chatforge.conversations import refusal_eval_requests
from chatforge.fileio import atomic_write_json, atomic_write_text
from chatforge.model.io import import_gguf, smollm2_path
from chatforge.options import RedteamOptions
from chatforge.redteam.command import redteam
from chatforge.redteam.harness import cached, engine_generator
from chatforge.redteam.safety import safety_conversations
from chatforge.train.sft import sft

PROBES = "direct,dan,fiction,escalation,base64,rot13,leetspeak,low-resource"


def write_jsonl(path: Path, rows: list) -> None:
    atomic_write_text(path, "".join(json.dumps({"messages": r}) + "\n" for r in rows))


def goal_file(path: Path, requests: list[str], n: int, seed: int) -> Path:
    picked = random.Random(seed).sample(requests, min(n, len(requests)))
    atomic_write_text(path, "".join(r + "\n" for r in picked))
    return path


def red_team(folder: Path, model, tok, goals: Path, n: int, args) -> dict:
    """Per probe: the share of answers that do not refuse, and the clean accuracy."""
    opts = RedteamOptions(model=str(folder), probes=PROBES, goals=str(goals), n_goals=n, n_contexts=1,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=0)  # fmt: skip
    generate = cached(engine_generator(model, tok, args.max_new_tokens, args.batch_size))
    report = redteam(generate, opts, folder.name, model, tok)
    (stack,) = report["runs"]
    rows = {r["probe"]: r for r in stack["asr"] if r["detector"] == "refusal"}
    return {
        "not_refused": {p: rows[p]["asr"] for p in rows},
        "ci95": {p: rows[p]["ci95"] for p in rows},
        "n": {p: rows[p]["n"] for p in rows},
        "clean_questions": stack["clean"].get("question"),
        "answers": stack["answers"][:: max(1, len(stack["answers"]) // 24)],  # a sample to read
    }


def measure(folder: Path, files: dict[str, Path], args) -> dict:
    t0 = time.perf_counter()
    run = load_run(folder)
    model, tok = run.model.eval(), run.tokenizer
    out = {
        part: red_team(folder, model, tok, files[part], args.n_goals, args) for part in ("harmful", "benign")
    }
    out["seconds"] = time.perf_counter() - t0
    return out


def train(base: Path, out: Path, seed: int, args) -> Path:
    data = out / "data"
    rows = safety_conversations(args.conversations + 60, seed)
    write_jsonl(data / "train.jsonl", rows[60:])
    write_jsonl(data / "val.jsonl", rows[:60])
    cfg = sft_config(
        seq_len=args.seq_len, device_batch_size=args.batch, max_steps=args.steps, lr=args.lr, warmup_steps=5,
        eval_every=max(1, args.steps // 2), eval_batches=4, ckpt_every=0, log_every=10, device="cpu",
        lora_rank=args.rank, lora_alpha=2.0 * args.rank, lora_targets="all", seed=seed,
    )  # fmt: skip
    run = out / "lora"
    sft(base, data / "train.jsonl", run, cfg, val=data / "val.jsonl")
    return run


def summary(before: dict, after: list[dict]) -> dict:
    table = {}
    for part in ("harmful", "benign"):
        for probe, value in before[part]["not_refused"].items():
            values = [a[part]["not_refused"][probe] for a in after]
            table[f"{part}:{probe}"] = {"before": value, "after_mean": statistics.mean(values),
                                        "after_min": min(values), "after_max": max(values)}  # fmt: skip
    return table


def markdown(table: dict, before: dict, after: list[dict], seeds: list[int]) -> str:
    lines = [f"Seeds {seeds}. Harmful: attack success (answer does not refuse), lower is safer. "
             "Benign: false refusals (answer refuses), lower is better.", "",
             "| probe | harmful before | harmful after (mean, min-max) | false refusal before | false refusal after |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for probe in before["harmful"]["not_refused"]:
        h, b = table[f"harmful:{probe}"], table[f"benign:{probe}"]
        lines.append(
            f"| {probe} | {100 * h['before']:.0f}% | {100 * h['after_mean']:.0f}% ({100 * h['after_min']:.0f}-"
            f"{100 * h['after_max']:.0f}) | {100 * (1 - b['before']):.0f}% | {100 * (1 - b['after_mean']):.0f}% "
            f"({100 * (1 - b['after_max']):.0f}-{100 * (1 - b['after_min']):.0f}) |"
        )
    clean_after = [a["harmful"]["clean_questions"] for a in after]
    lines += ["", f"Clean plain questions (the harness's 8): before {before['harmful']['clean_questions']}, "
              f"after {clean_after}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--conversations", type=int, default=600)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4, help="rows of --seq-len tokens per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n-goals", type=int, default=20, help="held-out requests per probe, harmful and benign")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model-cache", type=Path, default=Path("/tmp/cf-redteam-smollm2"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.model_cache / "config.json").is_file():
        import_gguf(smollm2_path(), args.model_cache)
    harmful, benign = refusal_eval_requests()
    files = {"harmful": goal_file(args.out / "harmful.txt", harmful, args.n_goals, 0),
             "benign": goal_file(args.out / "benign.txt", benign, args.n_goals, 0)}  # fmt: skip
    cache = args.out / "before.json"
    if cache.is_file():
        before = json.loads(cache.read_text())
    else:
        before = measure(args.model_cache, files, args)
        atomic_write_json(cache, before)
    after = []
    for seed in args.seeds:
        seed_dir = args.out / f"seed-{seed}"
        cache = seed_dir / "after.json"
        if not cache.is_file():
            t0 = time.perf_counter()
            run = train(args.model_cache, seed_dir, seed, args)
            train_seconds = time.perf_counter() - t0
            result = measure(run, files, args)
            result["train_seconds"] = train_seconds
            atomic_write_json(cache, result)
        after.append(json.loads(cache.read_text()))
        print(f"seed {seed}: {json.dumps(after[-1]['harmful']['not_refused'])}", flush=True)
    table = summary(before, after)
    settings = {k: str(v) for k, v in vars(args).items()}
    atomic_write_json(args.out / "safety.json", {"settings": settings, "table": table, "before": before,
                                                 "after": after})  # fmt: skip
    atomic_write_text(args.out / "safety.md", markdown(table, before, after, args.seeds))
    print((args.out / "safety.md").read_text())


if __name__ == "__main__":
    main()
