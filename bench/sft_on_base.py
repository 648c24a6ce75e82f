"""SFT recipes on an existing base model: the speedrun's sft_data, sft and eval stages again, with
this checkout's conversations, on the base of a finished speedrun folder (no pretraining).

    python bench/sft_on_base.py --run runs/demo --out runs/sft-new              # seed 0
    python bench/sft_on_base.py --run runs/seed1 --out runs/sft-new1 --set world.seed=1

--out gets a copy of the run up to its pretraining (`speedrun.copy_run`), new sft_data/, sft/ and
eval/, and eval_before/: the run's own sft/ model asked the same (new) evaluation files, so the
before/after table compares the two assistants on identical questions. `--set` takes the
speedrun's overrides (the world seed must be the run's); the pretraining ones do not matter here.
Prints the table and writes it with the sample answers to --out/compare.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.config import apply_overrides, get_preset  # noqa: E402
from chatforge.eval.suite import evaluate_world  # noqa: E402
from chatforge.fileio import atomic_write_json  # noqa: E402
from chatforge.speedrun import _evaluate, _stage_sft, _stage_sft_data, copy_run  # noqa: E402

FIGURES = ("world_forward", "tools_on", "arithmetic_small", "refusal", "false_refusal")


def prepare(run: Path, out: Path, world_seed: int) -> None:
    """--out as a copy of the run without its SFT data and the stages after pretraining
    (`speedrun.copy_run`); refuses a run of another world seed."""
    manifest = json.loads((run / "world" / "manifest.json").read_text())
    if manifest["seed"] != world_seed:
        raise SystemExit(f"{run} is world seed {manifest['seed']}; pass --set world.seed={manifest['seed']}")
    if not out.exists():
        copy_run(run, out, ["sft_data", "sft", "eval", "rl", "rag", "report"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", type=Path, required=True, help="a finished speedrun folder (world/, base/, sft/)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--before-from", type=Path, help="take eval_before/ from this earlier --out (same eval files)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = apply_overrides(get_preset(args.preset), args.overrides)
    prepare(args.run, args.out, preset.world.seed)
    _stage_sft_data(preset, args.out, False)
    if not (args.out / "sft" / "sft_summary.json").exists():
        _stage_sft(preset, args.out, False)
    after = _evaluate(preset, args.out, args.out / "sft", args.out / "eval", False, full=True)
    if args.before_from:
        shutil.copytree(args.before_from / "eval_before", args.out / "eval_before", dirs_exist_ok=True)
    else:
        evaluate_world(
            args.run / "sft", args.out, args.out / "eval_before", tool_use=preset.data.tool_use, full=True,
            batch_size=preset.eval.batch_size, device=preset.sft.device,
        )  # fmt: skip
    results = json.loads((args.out / "eval_before" / "eval.json").read_text())["results"]
    before = {r["task"]: round(r["value"], 4) for r in results if r["value"] is not None}
    samples = {
        name: json.loads((args.out / folder / "eval.json").read_text())["samples"]
        for name, folder in (("before", "eval_before"), ("after", "eval"))
    }
    table = {k: {"before": before.get(k), "after": after.get(k)} for k in FIGURES}
    atomic_write_json(args.out / "compare.json", {"figures": table, "samples": samples})
    print("| figure | before | after |\n|---|---:|---:|")
    for k, v in table.items():
        print(f"| {k} | {v['before']} | {v['after']} |")
    for b, a in zip(samples["before"], samples["after"], strict=True):
        print(f"- {b['prompt']}\n    before: {b['answer']}\n    after:  {a['answer']}")


if __name__ == "__main__":
    main()
