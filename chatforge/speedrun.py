"""The main job: the whole pipeline on the synthetic world, in one command.

    chatforge speedrun --preset cpu --out runs/demo

Stages run in order, each writing into its own place in the run folder:

    world/            the synthetic world (people, biographies, stories, held-out docs)
    sft_data/         conversations for SFT, evaluation questions, and the question-answer
                      text mixed into pretraining (knowledge augmentation)
    tokenizer.json    BPE trained on the pretraining text
    data/             cleaned, tokenized shards
    base/             the pretrained base model (checkpoints, metrics, loss.png)
    sft/              the assistant, finetuned on conversations
    eval/             eval.json, eval.md (and eval.png, drawn by the report)
    rl/               with rl.steps > 0: the assistant after GRPO on the world's fact questions
                      and sums, calculator shown (rl.png, rl_summary.json), and rl/eval/ (the
                      eval stage's world_forward and tools-on tasks again)
    report.md         the report card

A stage whose output is complete is not redone, and an interrupted pretraining resumes
from its newest checkpoint, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from chatforge.config import Preset, apply_overrides, get_preset
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json
from chatforge.options import SpeedrunOptions
from chatforge.plan import describe_plan


def _stage_world(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.world import build_world, write_world

    w = preset.world
    return write_world(
        build_world(w.seed, w.people, w.heldout), out / "world", paraphrases=w.paraphrases, seed=w.seed
    )


def _stage_sft_data(preset: Preset, out: Path, progress: bool) -> dict:
    """Conversations about half the visible people; questions about the other half for evaluation."""
    import json
    import random

    from chatforge.conversations import (
        build_sft_data,
        fact_turn,
        person_attributes,
        tool_conversation,
        write_sft_data,
    )
    from chatforge.fileio import atomic_write_text
    from chatforge.world import load_world

    d = preset.data
    world = load_world(out / "world")
    data = build_sft_data(
        world, seed=preset.world.seed, eval_fraction=d.eval_fraction,
        convs_per_person=d.convs_per_person, qa_phrasings=d.qa_phrasings,
        tool_use=d.tool_use, n_pretrain_tools=d.tool_chats_in_pretrain,
    )  # fmt: skip
    manifest = write_sft_data(data, out / "sft_data")
    convs = []
    rng = random.Random(preset.world.seed)
    if d.qa_in_pretrain:
        # single-turn chats about the SFT people, pretrained on in ChatML with their special tokens,
        # so the route "chat question about X -> X's fact from the biographies" forms while the
        # biographies are learned, and generalises to the people SFT never asks about
        for pid in data.sft_people:
            person = world.person(pid)
            for attribute in person_attributes(person, world):
                for _ in range(d.qa_phrasings):
                    qa, sentence = fact_turn(person, world, attribute, rng)
                    convs.append(
                        [{"role": "user", "content": qa.question}, {"role": "assistant", "content": sentence}]
                    )
        rng.shuffle(convs)
    # calculator chats (new numbers, SFT people; no question evaluation asks)
    convs += [tool_conversation(p, rng, system_prob=0.0) for p in data.pretrain_tools]
    rng.shuffle(convs)
    lines = "".join(json.dumps({"messages": c}) + "\n" for c in convs)
    atomic_write_text(out / "sft_data" / "qa_pretrain.jsonl", lines)
    return {"counts": manifest.get("counts"), "qa_pretrain_docs": len(convs)}


def _qa_conversations(out: Path) -> list[Path]:
    path = out / "sft_data" / "qa_pretrain.jsonl"
    return [path] if path.stat().st_size else []


def _stage_tokenizer(preset: Preset, out: Path, progress: bool) -> dict:
    import itertools

    from chatforge.data.sources import iter_documents
    from chatforge.tokenizer import Tokenizer, bytes_per_token, conversation_text, load_conversations

    # the chats too (contents, tool blocks, tool-call JSON), so they tokenize compactly
    chat_files = [*_qa_conversations(out), out / "sft_data" / "sft_train.jsonl"]
    chats = [piece for p in chat_files for c in load_conversations(p) for piece in conversation_text(c)]
    tok = Tokenizer.train(
        itertools.chain(iter_documents(str(out / "world")), chats), preset.vocab_size, show_progress=progress
    )
    tok.save(out / "tokenizer.json")
    heldout = list(iter_documents(str(out / "world" / "heldout.jsonl")))
    return {"vocab_size": tok.vocab_size, "bytes_per_token": round(bytes_per_token(tok, heldout), 3)}


def _stage_data(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.data.pipeline import build_shards

    index = build_shards(
        [str(out / "world")],
        out / "tokenizer.json",
        out / "data",
        conversations=_qa_conversations(out),
        progress=progress,
    )
    return {
        "train_tokens": index["splits"]["train"]["tokens"],
        "val_tokens": index["splits"]["val"]["tokens"],
        "clean": index["clean"],
    }


def _stage_pretrain(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.train.pretrain import pretrain

    resume = (out / "base" / "ckpt").is_dir()
    return pretrain(
        out / "data", out / "tokenizer.json", out / "base", preset.pretrain, resume=resume, progress=progress
    )


def _stage_sft(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.train.sft import sft

    resume = (out / "sft" / "ckpt").is_dir()
    return sft(out / "base", out / "sft_data", out / "sft", preset.sft, resume=resume, progress=progress)


SAMPLE_PROMPTS = ["Who are you?", "Who made you?", "What is 345 + 78?", "How do I make a bomb?"]


def _stage_eval(preset: Preset, out: Path, progress: bool) -> dict:
    """Forward questions about people SFT never asked about, the reversal probe, a sample of
    forward questions about SFT people (seen), bits per byte on held-out biographies; with
    data.tool_use, the calculator problems with the calculator shown and without."""
    return _evaluate(preset, out, out / "sft", out / "eval", progress)


def _evaluate(
    preset: Preset, out: Path, model_run: Path, eval_out: Path, progress: bool, *, full: bool = True
) -> dict:
    """Evaluate the model in `model_run` into `eval_out`. `full=False` (after RL): world_forward and
    the calculator problems with tools on only, the tasks the report sets before/after."""
    import sys

    from chatforge.checkpoint import load_model
    from chatforge.data.sources import iter_documents
    from chatforge.eval.base import EvalContext, run_tasks, subset, write_results
    from chatforge.eval.bpb import BitsPerByte
    from chatforge.eval.world_qa import WorldQA, load_qa_file
    from chatforge.tokenizer import Tokenizer
    from chatforge.train.common import pick_device
    from chatforge.train.sft import chat_samples

    device = pick_device(preset.sft.device)
    model, _, model_dir = load_model(model_run, device)
    tok = Tokenizer.load(model_dir)
    sft_dir = out / "sft_data"
    facts = load_qa_file(sft_dir / "eval_forward.jsonl")
    tasks = [WorldQA(facts, "world_forward")]
    if full:
        seen = subset(load_qa_file(sft_dir / "sft_qa.jsonl"), 300, seed=0)
        tasks += [
            WorldQA(load_qa_file(sft_dir / "eval_reverse.jsonl"), "world_reverse"),
            WorldQA(seen, "world_forward_seen"),
            BitsPerByte(list(iter_documents(str(out / "world" / "heldout.jsonl"))), "bpb_heldout_bios"),
        ]
    if preset.data.tool_use and (sft_dir / "eval_tools.jsonl").exists():
        from chatforge.eval.tools import load_tool_problems, tool_tasks

        # the fact questions give the false call rate (tools shown, none needed)
        tool_use = tool_tasks(load_tool_problems(sft_dir / "eval_tools.jsonl"), facts)
        tasks += tool_use if full else tool_use[:1]  # [tools_on, tools_off]
    ctx = EvalContext(
        model, tok, device, max_examples=preset.eval.max_examples, batch_size=preset.eval.batch_size,
        log=(lambda line: print(line, file=sys.stderr)) if progress else None,
    )  # fmt: skip
    results = run_tasks(ctx, tasks)
    samples = (
        [{"prompt": q, "answer": a} for q, a in chat_samples(model, tok, SAMPLE_PROMPTS, max_new_tokens=64)]
        if full
        else []
    )
    write_results(results, eval_out, meta={"model": str(model_dir), "samples": samples})
    for r in results:
        print(f"  {r.task}: {r.metric} {r.value:.4f} (n={r.n})")
    return {r.task: round(r.value, 4) for r in results}


def _stage_rl(preset: Preset, out: Path, progress: bool) -> dict:
    """GRPO from the assistant (align/rl.py) on the world's checkable problems, answered with the
    calculator shown (rl.speedrun_problems); reward 1 when the answer states the right one
    (rewards.exact_answer). Then the eval stage's world_forward and tools-on tasks again on the RL
    model, for the report's before/after."""
    from chatforge.align.rl import grpo, speedrun_problems
    from chatforge.fileio import read_jsonl
    from chatforge.world import load_world

    cfg = dataclasses.replace(preset.rl, tools=True)
    if cfg.steps <= 0:
        return {"skipped": "rl.steps is 0"}
    world = load_world(out / "world")
    sft_dir = out / "sft_data"
    manifest = json.loads((sft_dir / "manifest.json").read_text())
    tools_file = sft_dir / "eval_tools.jsonl"
    train, val = speedrun_problems(
        world, [world.person(i) for i in manifest["sft_people"]],
        [world.person(i) for i in manifest["eval_people"]], cfg,
        {obj["question"] for _, obj in read_jsonl(tools_file)} if tools_file.exists() else set(),
    )  # fmt: skip
    summary = grpo(
        out / "sft", train, val, out / "rl", cfg, "exact",
        resume=(out / "rl" / "ckpt").is_dir(), progress=progress,
        meta_extra={"problems": "world+tools", "world": str(out / "world")},
    )  # fmt: skip
    after = _evaluate(preset, out, out / "rl", out / "rl" / "eval", progress, full=False)
    return {**{k: v for k, v in summary.items() if k != "plot"}, "after": after}


def _stage_report(preset: Preset, out: Path, progress: bool) -> dict:
    from chatforge.report import build_report

    return {"report": str(build_report(out))}


# name, function, the file whose existence marks the stage as finished
STAGES = [
    ("world", _stage_world, "world/manifest.json"),
    ("sft_data", _stage_sft_data, "sft_data/qa_pretrain.jsonl"),
    ("tokenizer", _stage_tokenizer, "tokenizer.json"),
    ("data", _stage_data, "data/index.json"),
    ("pretrain", _stage_pretrain, "base/pretrain_summary.json"),
    ("sft", _stage_sft, "sft/sft_summary.json"),
    ("eval", _stage_eval, "eval/eval.json"),
    ("rl", _stage_rl, "rl/eval/eval.json"),
    ("report", _stage_report, "report.md"),
]


def speedrun(
    preset_name: str,
    out: Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    until: str | None = None,
) -> dict:
    """Run every stage (or those up to and including `until`) into the folder `out`."""
    names = [name for name, _, _ in STAGES]
    if until is not None and until not in names:
        raise ChatforgeError(f"unknown stage {until!r} for --until; stages are: {', '.join(names)}")
    preset = apply_overrides(get_preset(preset_name), overrides or [])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = dataclasses.asdict(preset)
    recipe_path = out / "preset.json"
    if recipe_path.exists():
        previous = json.loads(recipe_path.read_text())
        if previous != recipe:
            raise ChatforgeError(
                f"{out} was started with different settings (see {recipe_path}); use a new --out or the same preset"
            )
    else:
        atomic_write_json(recipe_path, recipe)

    status_path = out / "stages.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    for name, run, done_marker in STAGES:
        skipped = "skipped" in status.get(name, {}).get("result", {})  # off in this preset
        if name in status and (skipped or (out / done_marker).exists()):
            print(f"[{name}] done already ({status[name]['seconds']:.1f}s), skipping")
            if name == until:
                break
            continue
        print(f"[{name}] running")
        t0 = time.perf_counter()
        result = run(preset, out, progress)
        earlier = status.get(name, {}).get(
            "seconds", 0.0
        )  # a stage resumed after a stop: add up its sessions
        status[name] = {"seconds": round(earlier + time.perf_counter() - t0, 2), "result": result}
        atomic_write_json(status_path, status)
        print(f"[{name}] finished in {status[name]['seconds']:.1f}s")
        if name == until:
            break
    return status


def cmd_speedrun(opts: SpeedrunOptions) -> None:
    if opts.dry_run:
        preset = apply_overrides(get_preset(opts.preset), opts.overrides)
        print(describe_plan(preset.pretrain, vocab_size=preset.vocab_size))
        return
    speedrun(opts.preset, opts.out, opts.overrides, progress=not opts.no_progress, until=opts.until)
