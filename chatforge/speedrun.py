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
                      and sums, calculator shown, the step that scored best on validation
                      (rl.png, rl_pass1.png, rl_summary.json), and rl/eval/ (every task of the
                      eval stage again)
    rag/              with data.open_book_chats: the held-out people's biographies as a collection
                      and the final assistant's answers about them, closed-book and with
                      retrieval (rag_eval.json, rag_eval.md, rag.png)
    report.md         the report card

A stage whose output is complete is not redone, and an interrupted pretraining resumes
from its newest checkpoint, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

from chatforge.align.problems import speedrun_problems
from chatforge.align.rl import grpo
from chatforge.config import Preset, apply_overrides, get_preset
from chatforge.conversations import (
    build_sft_data,
    pretrain_chats,
    read_people_split,
    write_conversations,
    write_sft_data,
)
from chatforge.data.pipeline import build_shards, train_tokenizer
from chatforge.data.sources import iter_documents
from chatforge.device import machine
from chatforge.errors import ChatforgeError
from chatforge.eval.suite import evaluate_world
from chatforge.eval.tools import load_tool_problems
from chatforge.fileio import atomic_write_json
from chatforge.options import RagEvalOptions, RagWorldOptions, SpeedrunOptions
from chatforge.plan import describe_plan
from chatforge.rag.command import cmd_rag_world
from chatforge.rag.embed import DEFAULT_EMBEDDING, get_embedder
from chatforge.rag.evaluate import cmd_rag_eval
from chatforge.rag.open_book import open_book_conversations, repeat_conversations
from chatforge.report import build_report, plot_rag_bars
from chatforge.tokenizer import bytes_per_token
from chatforge.train.pretrain import pretrain
from chatforge.train.sft import sft
from chatforge.world import build_world, load_world, write_world


def _stage_world(preset: Preset, out: Path, progress: bool) -> dict:
    w = preset.world
    return write_world(
        build_world(w.seed, w.people, w.heldout), out / "world", paraphrases=w.paraphrases, seed=w.seed
    )


def _stage_sft_data(preset: Preset, out: Path, progress: bool) -> dict:
    """Conversations about half the visible people; questions about the other half for evaluation."""
    d, seed = preset.data, preset.world.seed
    world = load_world(out / "world")
    data = build_sft_data(
        world, seed=seed, eval_fraction=d.eval_fraction, convs_per_person=d.convs_per_person,
        qa_phrasings=d.qa_phrasings, tool_use=d.tool_use, n_pretrain_tools=d.tool_chats_in_pretrain,
        n_pretrain_assistant=d.assistant_chats_in_pretrain, short_tool_share=d.short_tool_share,
        n_refusal=d.refusal_chats or None, n_benign=d.refusal_chats or None,
    )  # fmt: skip
    if d.open_book_chats:  # reading retrieved documents, taught on strangers (SFT only)
        rng = random.Random(f"chatforge-open-book:{seed}")
        chats = open_book_conversations(d.open_book_chats, rng, seed=seed, avoid=world, follow_ups=(0, 1))
        n_val = max(1, round(len(chats) * 0.05))
        data.val += chats[:n_val]
        data.train += chats[n_val:]
        data.counts["open_book"] = len(chats)
    manifest = write_sft_data(data, out / "sft_data")
    chats = pretrain_chats(world, data, seed=seed, qa_phrasings=d.qa_phrasings, qa=d.qa_in_pretrain)
    rng = random.Random(f"chatforge-open-book-pretrain:{seed}")
    if d.open_book_in_pretrain:  # strangers other than SFT's (seed + 1), one chat each
        chats += open_book_conversations(
            d.open_book_in_pretrain, rng, seed=seed + 1, people=d.open_book_in_pretrain, avoid=world,
            docs=(1,), instruction=False,
        )  # fmt: skip
    if d.copy_chats_in_pretrain:
        chats += repeat_conversations(d.copy_chats_in_pretrain, rng, seed=seed, avoid=world)
    if d.open_book_in_pretrain or d.copy_chats_in_pretrain:
        rng.shuffle(chats)
    write_conversations(chats, out / "sft_data" / "qa_pretrain.jsonl")  # last: the stage's done marker
    return {"counts": manifest.get("counts"), "qa_pretrain_docs": len(chats)}


def _qa_conversations(out: Path) -> list[Path]:
    path = out / "sft_data" / "qa_pretrain.jsonl"
    return [path] if path.stat().st_size else []


def _stage_tokenizer(preset: Preset, out: Path, progress: bool) -> dict:
    chats = [*_qa_conversations(out), out / "sft_data" / "sft_train.jsonl"]
    world = [str(out / "world")]
    tok = train_tokenizer(
        world, out / "tokenizer.json", preset.vocab_size, conversations=chats, progress=progress
    )
    heldout = iter_documents(str(out / "world" / "heldout.jsonl"))
    return {"vocab_size": tok.vocab_size, "bytes_per_token": round(bytes_per_token(tok, heldout), 3)}


def _stage_data(preset: Preset, out: Path, progress: bool) -> dict:
    index = build_shards(
        [str(out / "world")], out / "tokenizer.json", out / "data",
        conversations=_qa_conversations(out), progress=progress,
    )  # fmt: skip
    splits = index["splits"]
    return {
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "clean": index["clean"],
    }


def _stage_pretrain(preset: Preset, out: Path, progress: bool) -> dict:
    resume = (out / "base" / "ckpt").is_dir()
    return pretrain(
        out / "data", out / "tokenizer.json", out / "base", preset.pretrain, resume=resume, progress=progress
    )


def _stage_sft(preset: Preset, out: Path, progress: bool) -> dict:
    resume = (out / "sft" / "ckpt").is_dir()
    return sft(out / "base", out / "sft_data", out / "sft", preset.sft, resume=resume, progress=progress)


def _evaluate(preset: Preset, out: Path, model_run: Path, eval_out: Path, progress: bool, full: bool) -> dict:
    """`evaluate_world` with the preset's settings; prints each score and returns them rounded."""
    results = evaluate_world(
        model_run, out, eval_out, tool_use=preset.data.tool_use, full=full, progress=progress,
        max_examples=preset.eval.max_examples, batch_size=preset.eval.batch_size, device=preset.sft.device,
    )  # fmt: skip
    for r in results:
        print(f"  {r.task}: {r.metric} {r.value:.4f} (n={r.n})")
    return {r.task: round(r.value, 4) for r in results}


def _stage_eval(preset: Preset, out: Path, progress: bool) -> dict:
    return _evaluate(preset, out, out / "sft", out / "eval", progress, full=True)


# metrics where a rise is a loss; every other evaluation metric is a rate where a rise is a gain
LOWER_IS_BETTER = ("bpb", "false_refusal_rate")


def eval_changes(before: Path, after: Path, tolerance: float = 0.02) -> dict:
    """Every task both eval.json files hold: its value before and after, the change, and whether it got
    worse by more than `tolerance` (2 points of a rate; 0.02 bits per byte)."""
    old = {r["task"]: r for r in json.loads(Path(before).read_text())["results"]}
    out = {}
    for r in json.loads(Path(after).read_text())["results"]:
        if r["task"] not in old or r["value"] is None or old[r["task"]]["value"] is None:
            continue
        change = r["value"] - old[r["task"]]["value"]
        worse = round(
            change if r["metric"] in LOWER_IS_BETTER else -change, 4
        )  # 2.00 points is not more than 2
        out[r["task"]] = {
            "metric": r["metric"], "before": round(old[r["task"]]["value"], 4), "after": round(r["value"], 4),
            "change": round(change, 4), "worse": worse > tolerance,
        }  # fmt: skip
    return out


def _stage_rl(preset: Preset, out: Path, progress: bool) -> dict:
    """GRPO from the assistant on the world's checkable problems, calculator shown, reward 1 when the
    answer states the right one; the run keeps the model that scores best on a validation split of
    the training problems, and asks the held-out problems (the evaluation people) before and after.
    Then every task of the eval stage again on the RL model, each beside its value before RL."""
    cfg = dataclasses.replace(preset.rl, tools=True)
    if cfg.steps <= 0:
        return {"skipped": "rl.steps is 0"}
    world = load_world(out / "world")
    sft_people, eval_people = read_people_split(out / "sft_data", world)
    tools_file = out / "sft_data" / "eval_tools.jsonl"
    asked = {p.question for p in load_tool_problems(tools_file)} if tools_file.exists() else set()
    train, val, held_out = speedrun_problems(world, sft_people, eval_people, cfg, asked)
    summary = grpo(
        out / "sft", train, val, out / "rl", cfg, "exact", held_out=held_out, resume=(out / "rl" / "ckpt").is_dir(),
        progress=progress, meta_extra={"problems": "world+tools", "world": str(out / "world")},
    )  # fmt: skip
    after = _evaluate(preset, out, out / "rl", out / "rl" / "eval", progress, full=True)
    changes = eval_changes(out / "eval" / "eval.json", out / "rl" / "eval" / "eval.json")
    kept = {k: v for k, v in summary.items() if k not in ("val_curve", "loss_plot", "pass1_plot")}
    return {
        **kept,
        "after": after,
        "changes": changes,
        "worse": [t for t, c in changes.items() if c["worse"]],
    }


RAG_ANSWER_K = 3  # biographies in an answer's prompt: three and the question fit a 512-token context


def _stage_rag(preset: Preset, out: Path, progress: bool) -> dict:
    """The held-out people's biographies as a collection (rag/world), and every question about them
    asked of the final assistant closed-book and with the retrieved biographies in the prompt."""
    if not preset.data.open_book_chats:
        return {"skipped": "data.open_book_chats is 0: the assistant was not taught to read documents"}
    try:  # MiniLM when the rag extra is installed (`make test` installs it); else the lexical hash embedder
        get_embedder(DEFAULT_EMBEDDING)
        embedding = DEFAULT_EMBEDDING
    except ChatforgeError:
        embedding = "hash-384"
    root = str(out / "rag" / "collections")
    cmd_rag_world(RagWorldOptions(collection="world", root=root, world=str(out / "world"), embedding=embedding))
    model = out / "rl" if (out / "rl" / "model.safetensors").is_file() else out / "sft"
    result = cmd_rag_eval(RagEvalOptions(
        collection="world", root=root, modes="bm25,dense,fused", model=str(model), answer_k=RAG_ANSWER_K,
        max_new_tokens=32, device=preset.sft.device, out=str(out / "rag"),
    ))  # fmt: skip
    answers, k = result["answers"], result["k"]
    plot_rag_bars(answers["by_kind"], out / "rag" / "rag.png")
    return {
        "model": str(model.relative_to(out)), "embedding": embedding,
        f"recall@{k}": {m: round(r[f"recall@{k}"], 4) for m, r in result["retrieval"].items()},
        "closed_book": round(answers["closed_book"], 4), "with_retrieval": round(answers["with_retrieval"], 4),
        "by_kind": answers["by_kind"], "citation_rate": round(answers["citation_rate"], 4),
    }  # fmt: skip


def _stage_report(preset: Preset, out: Path, progress: bool) -> dict:
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
    ("rag", _stage_rag, "rag/rag.png"),
    ("report", _stage_report, "report.md"),
]


def copy_run(src: Path, dst: Path, redo: list[str]) -> None:
    """Make `dst` a copy of the speedrun folder `src` without the outputs of the stages in `redo`,
    so that `speedrun` into `dst` runs those again (with other settings) and reuses the rest: e.g.
    redo ["rl", "rag", "report"] tries an RL recipe on the same SFT model. The kept stages are taken
    as they are, whatever settings made them; preset.json is left out for the new run to write."""
    names = [name for name, _, _ in STAGES]
    unknown = [r for r in redo if r not in names]
    if unknown:
        raise ChatforgeError(f"unknown stage {unknown[0]!r} to redo; stages are: {', '.join(names)}")
    src, dst = Path(src), Path(dst)
    if not (src / "stages.json").is_file():
        raise ChatforgeError(f"{src} is not a speedrun folder (no stages.json)")
    if dst.exists():
        raise ChatforgeError(f"{dst} exists already; give a new folder")
    left_out = {marker.split("/")[0] for name, _, marker in STAGES if name in redo} | {"preset.json"}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=lambda folder, files: [f for f in files if Path(folder) == src and f in left_out])
    status = json.loads((src / "stages.json").read_text())
    atomic_write_json(tmp / "stages.json", {k: v for k, v in status.items() if k not in redo})
    tmp.rename(dst)  # whole or not at all: a stopped copy leaves only the .tmp folder


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
        status[name] = {
            "seconds": round(earlier + time.perf_counter() - t0, 2), "result": result, **machine(),
        }  # fmt: skip
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
