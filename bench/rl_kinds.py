"""What RL changed, kind by kind: greedy pass@1 on the speedrun rl stage's held-out and validation
problems split by kind (fact questions, small sums, calculator problems), and how small sums are
answered when sampled at temperature 1 (share that calls the calculator, share right, share of
8-answer groups with both right and wrong answers: the groups GRPO learns from).

    python bench/rl_kinds.py runs/seeds/seed-0 sft rl      # the SFT model, then the RL model

Reads the run folder's world/ and sft_data/ and rebuilds the rl stage's problems exactly as the
stage does (`speedrun_problems` with the preset's rl settings from preset.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.align.problems import speedrun_problems  # noqa: E402
from chatforge.align.rewards import exact_answer  # noqa: E402
from chatforge.align.rl import _sample, sample_answers  # noqa: E402
from chatforge.checkpoint import load_run  # noqa: E402
from chatforge.config import RLConfig  # noqa: E402
from chatforge.conversations import read_people_split  # noqa: E402
from chatforge.eval.tools import load_tool_problems  # noqa: E402
from chatforge.tools.builtin import calculator_registry  # noqa: E402
from chatforge.world import load_world  # noqa: E402

GROUP = 8


def kind_of(problem: dict) -> str:
    if "final" in problem:  # a calculator problem (tool_problems)
        return f"calculator {problem['kind']}"
    return "small sum" if problem["kind"] == "arithmetic" else "fact"


def answers(model, tok, problems: list[dict], cfg: RLConfig, temperature: float, seed: int | None):
    reg, out = calculator_registry(), []
    for i in range(0, len(problems), 64):
        chunk = problems[i : i + 64]
        out += sample_answers(model, tok, [p["messages"] for p in chunk], cfg, temperature=temperature,
                              seed=seed, registry=reg)[2]  # fmt: skip
    return out


def by_kind(problems: list[dict], texts: list[str]) -> dict:
    right = defaultdict(list)
    for p, t in zip(problems, texts, strict=True):
        right[kind_of(p)].append(exact_answer(p["messages"], t, p))
    return {k: {"pass1": round(100 * sum(v) / len(v), 1), "n": len(v)} for k, v in sorted(right.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a speedrun folder")
    ap.add_argument("models", nargs="+", help="model folders inside it (sft, rl, ...)")
    ap.add_argument("--sums", type=int, default=64, help="held-out small sums sampled at temperature 1")
    args = ap.parse_args()
    run = Path(args.run)
    preset = json.loads((run / "preset.json").read_text())
    known = {f.name for f in dataclasses.fields(RLConfig)}  # a run made by older code may hold others
    cfg = RLConfig(**{k: v for k, v in preset["rl"].items() if k in known and k != "tools"}, tools=True)
    world = load_world(run / "world")
    sft_people, eval_people = read_people_split(run / "sft_data", world)
    asked = {p.question for p in load_tool_problems(run / "sft_data" / "eval_tools.jsonl")}
    _, val, held = speedrun_problems(world, sft_people, eval_people, cfg, asked)
    val, held = _sample(val, cfg), _sample(held, cfg)  # the stage asks at most eval_problems of each
    sums = [p for p in held if kind_of(p) == "small sum"][: args.sums]
    for name in args.models:
        loaded = load_run(run / name, inference=True)
        model, tok = loaded.model, loaded.tokenizer
        result = {"model": name, "held_out": by_kind(held, answers(model, tok, held, cfg, 0.0, None)),
                  "validation": by_kind(val, answers(model, tok, val, cfg, 0.0, None))}  # fmt: skip
        group = [p for p in sums for _ in range(GROUP)]
        ids, masks, texts = sample_answers(model, tok, [p["messages"] for p in group], cfg, temperature=1.0,
                                       seed=7, registry=calculator_registry())  # fmt: skip
        rewards = [exact_answer(p["messages"], t, p) for p, t in zip(group, texts, strict=True)]
        written = [tok.decode([t for t, m in zip(i, mask, strict=True) if m]) for i, mask in zip(ids, masks, strict=True)]
        called = ["calculator" in w for w in written]  # the policy's own tokens: a call names the tool
        mixed = [0 < sum(rewards[g : g + GROUP]) < GROUP for g in range(0, len(rewards), GROUP)]
        result["small_sums_t1"] = {"called": round(100 * sum(called) / len(called), 1),
                                   "right": round(100 * sum(rewards) / len(rewards), 1),
                                   "mixed_groups": round(100 * sum(mixed) / len(mixed), 1)}  # fmt: skip
        print(json.dumps(result))


if __name__ == "__main__":
    main()
