"""Stage 3 on a speedrun's assistant: reward model, DPO (judged by the reward model), GRPO with the calculator.

    python bench/align_world.py --run runs/demo --out runs/align
    python bench/align_world.py --run runs/demo --out runs/align --only rm --rm-steps 600

Everything here is a `chatforge` command's function, run in order on the speedrun folder `--run`
(its world, its SFT split and its `sft/` assistant):

1. comparisons: `chatforge prefs world` (sft people; correct vs wrong fact, concise vs rambling,
   exact vs off-by-a-little sum, refusal vs compliance), held out by prompt (--val-fraction);
2. reward model: `chatforge prefs reward` -> held-out pairwise accuracy, overall and per kind;
3. DPO: `chatforge prefs dpo` -> held-out preference accuracy, then `chatforge prefs winrate`: one
   sampled answer per held-out prompt from the DPO model and from the assistant, judged by (2);
4. RL: the speedrun's rl stage recipe (`rl.speedrun_problems`: fact questions, small sums and
   calculator problems, calculator shown) -> held-out pass@1 before and after.

Results: align_world.json in --out (and each stage's run folder with its plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge import checkpoint as ckpt  # noqa: E402
from chatforge.align.dpo import dpo  # noqa: E402
from chatforge.align.prefs import encode_prefs, prompt_key, split_pairs, world_prefs, write_prefs  # noqa: E402
from chatforge.align.problems import load_problems, speedrun_problems  # noqa: E402
from chatforge.align.reward import judge_prompts, load_reward_model, train_reward, win_rate  # noqa: E402
from chatforge.align.rl import grpo  # noqa: E402
from chatforge.config import (
    get_preset,  # noqa: E402
    prefs_config,  # noqa: E402
)
from chatforge.device import pick_device  # noqa: E402
from chatforge.fileio import atomic_write_json  # noqa: E402
from chatforge.world import load_world  # noqa: E402

PAIR_KEYS = ("train_pairs", "val_pairs", "steps", "val_acc_start", "val_acc_end", "val_acc_by_kind")


def log(msg: str) -> None:
    print(f"[align_world] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", required=True, type=Path, help="a finished speedrun folder (world/, sft_data/, sft/)"
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", default="rm,dpo,rl", help="comma list of rm, dpo, rl (default: all)")
    ap.add_argument("--per-person", type=int, default=4, help="fact comparisons per SFT person")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--rm-steps", type=int, default=400)
    ap.add_argument("--rm-lr", type=float, default=3e-4)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--dpo-lr", type=float, default=2e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--winrate-prompts", type=int, default=300)
    # RL: the cpu preset's rl settings unless given
    ap.add_argument("--rl-steps", type=int, default=None)
    ap.add_argument("--rl-lr", type=float, default=None)
    ap.add_argument("--rl-kl", type=float, default=None)
    ap.add_argument("--rl-eval", type=int, default=None, help="held-out problems per evaluation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    run, out = args.run, args.out
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "align_world.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result["run"] = str(run)
    sft = run / "sft"
    world = load_world(run / "world")
    manifest = json.loads((run / "sft_data" / "manifest.json").read_text())
    people = [world.person(i) for i in manifest["sft_people"]]

    prefs = out / "prefs_world.jsonl"
    rows = world_prefs(world, people, seed=0, per_person=args.per_person)
    write_prefs(prefs, rows)
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    result["comparisons"] = {"n": len(rows), "kinds": kinds}
    log(f"{len(rows)} comparisons: {kinds}")

    if "rm" in only:
        t0 = time.time()
        cfg = prefs_config(
            max_steps=args.rm_steps, lr=args.rm_lr, embed_lr=args.rm_lr, device=args.device, eval_every=50
        )
        summary = train_reward(sft, prefs, out / "rm", cfg, val_fraction=args.val_fraction, progress=False)
        result["reward_model"] = {
            **{k: summary[k] for k in PAIR_KEYS},
            "lr": args.rm_lr,
            "seconds": round(time.time() - t0, 1),
        }
        log(f"reward model: {json.dumps(result['reward_model'])}")
        atomic_write_json(result_path, result)

    if "dpo" in only:
        t0 = time.time()
        cfg = prefs_config(
            max_steps=args.dpo_steps, lr=args.dpo_lr, embed_lr=args.dpo_lr, device=args.device, eval_every=25
        )
        summary = dpo(
            sft, prefs, out / "dpo", cfg, beta=args.beta, val_fraction=args.val_fraction, progress=False
        )
        entry = {
            **{k: summary[k] for k in PAIR_KEYS},
            "lr": args.dpo_lr,
            "beta": args.beta,
            "seconds": round(time.time() - t0, 1),
        }
        if (out / "rm" / "reward_summary.json").exists():
            device = pick_device(args.device)
            rm, tok = load_reward_model(out / "rm", device)
            model, _, _ = ckpt.load_model(out / "dpo", device)
            baseline, _, _ = ckpt.load_model(sft, device)
            # held-out prompts: the split DPO and the reward model both held out (same seed, same rule)
            _, val = split_pairs(encode_prefs(tok, rows, model.cfg.seq_len)[0], args.val_fraction, cfg.seed)
            val_keys = {p.key for p in val}
            prompts = [m for m in judge_prompts(prefs) if prompt_key(m) in val_keys][: args.winrate_prompts]
            wr = win_rate(rm, tok, model, baseline, prompts, max_new_tokens=48, temperature=1.0, seed=0)
            entry["win_rate_vs_sft"] = {k: wr[k] for k in ("win_rate", "wins", "ties", "losses", "n")}
        result["dpo"] = entry
        log(f"dpo: {json.dumps(entry)}")
        atomic_write_json(result_path, result)

    if "rl" in only:  # the speedrun's rl stage recipe (rl.speedrun_problems), on this run
        given = {
            "steps": args.rl_steps,
            "lr": args.rl_lr,
            "kl_beta": args.rl_kl,
            "eval_problems": args.rl_eval,
        }
        cfg = dataclasses.replace(
            get_preset("cpu").rl, device=args.device, **{k: v for k, v in given.items() if v is not None}
        )
        asked = {p["question"] for p in load_problems(run / "sft_data" / "eval_tools.jsonl")}
        eval_people = [world.person(i) for i in manifest["eval_people"]]
        train, val, held_out = speedrun_problems(world, people, eval_people, cfg, asked)
        summary = grpo(sft, train, val, out / "rl", cfg, "exact", held_out=held_out, progress=False)
        keys = ("problems", "val_problems", "steps", "train_seconds", "best_step", "heldout_pass1_start",
                "heldout_pass1_end")  # fmt: skip
        result["rl"] = {**{k: summary[k] for k in keys}, "lr": cfg.lr, "kl_beta": cfg.kl_beta}
        log(f"rl: {json.dumps(result['rl'])}")
        atomic_write_json(result_path, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
