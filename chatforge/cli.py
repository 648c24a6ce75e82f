"""`chatforge`: one command, a sub-command per stage. Each handler is a few lines that parse
arguments and call the stage's module; errors from bad input print as one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatforge.errors import ChatforgeError


def _add_overrides(
    p: argparse.ArgumentParser, example: str = "--set max_steps=200 --set model.n_embd=384"
) -> None:
    p.add_argument(
        "--preset", default="cpu", help="recipe to start from (see `chatforge presets`); default cpu"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"override a config field, e.g. {example} (repeatable)",
    )


# ---- handlers ------------------------------------------------------------------------------


def cmd_world(args) -> None:
    from chatforge.world import build_world, write_world

    world = build_world(args.seed, args.people, args.heldout)
    manifest = write_world(world, args.out, paraphrases=args.paraphrases, seed=args.seed)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    print(f"world written to {args.out}")


def cmd_tokenizer_train(args) -> None:
    from chatforge.data.clean import normalize_whitespace
    from chatforge.data.sources import iter_many
    from chatforge.tokenizer import Tokenizer

    texts = (normalize_whitespace(t) for t in iter_many(args.source, field=args.field, limit=args.max_docs))
    tok = Tokenizer.train(texts, args.vocab_size, show_progress=True)
    tok.save(args.out)
    print(f"tokenizer with {tok.vocab_size} tokens saved to {args.out}")


def cmd_tokenizer_eval(args) -> None:
    from chatforge.data.sources import iter_many
    from chatforge.tokenizer import Tokenizer, compare_tokenizers, format_table, load_reference

    texts = list(iter_many(args.source, field=args.field, limit=args.max_docs))
    if not texts:
        raise ChatforgeError("no text to evaluate on: the --source is empty")
    named = {"chatforge": Tokenizer.load(args.tokenizer)}
    for ref in args.ref:
        named[Path(ref).name] = load_reference(ref)
    print(format_table(compare_tokenizers(named, texts)))


def cmd_data(args) -> None:
    from chatforge.data.pipeline import build_shards

    index = build_shards(
        args.source,
        args.tokenizer,
        args.out,
        field=args.field,
        near_dup_threshold=None if args.no_near_dedup else args.near_dup_threshold,
        val_fraction=args.val_fraction,
        max_docs=args.max_docs,
        conversations=args.conversations,
    )
    print(
        f"shards written to {args.out}: {index['splits']['train']['tokens']:,} train / {index['splits']['val']['tokens']:,} val tokens"
    )


def cmd_pretrain(args) -> None:
    from chatforge.config import apply_overrides, get_preset
    from chatforge.train.pretrain import pretrain

    cfg = apply_overrides(get_preset(args.preset).pretrain, args.overrides)
    if args.dry_run:
        from chatforge.plan import describe_plan

        print(describe_plan(cfg, vocab_size=args.vocab_size or get_preset(args.preset).vocab_size))
        return
    if not args.data or not args.out:
        raise ChatforgeError(
            "pretrain needs --data (a shard folder from `chatforge data`) and --out (a run folder)"
        )
    tokenizer = args.tokenizer or Path(args.data) / "tokenizer.json"
    summary = pretrain(args.data, tokenizer, args.out, cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))


def cmd_sft(args) -> None:
    from chatforge.config import apply_overrides, get_preset
    from chatforge.train.sft import sft

    overrides = list(args.overrides)
    if args.lora_rank is not None:
        overrides.append(f"lora_rank={args.lora_rank}")
    cfg = apply_overrides(get_preset(args.preset).sft, overrides)
    summary = sft(
        args.model, args.data, args.out, cfg, val=args.val, resume=args.resume, progress=not args.no_progress
    )
    print(json.dumps(summary, indent=2))


def cmd_report(args) -> None:
    from chatforge.report import build_report

    print(f"report written to {build_report(args.run)}")


def cmd_speedrun(args) -> None:
    from chatforge.speedrun import speedrun

    if args.dry_run:
        from chatforge.config import apply_overrides, get_preset
        from chatforge.plan import describe_plan

        preset = apply_overrides(get_preset(args.preset), args.overrides)
        print(describe_plan(preset.pretrain, vocab_size=preset.vocab_size))
        return
    speedrun(args.preset, args.out, args.overrides, progress=not args.no_progress, until=args.until)


def cmd_presets(args) -> None:
    from chatforge.config import PRESETS, get_preset
    from chatforge.plan import describe_plan

    if args.name:
        get_preset(args.name)  # an unknown name is an error, not an empty listing
    for name, preset in PRESETS.items():
        if args.name and name != args.name:
            continue
        print(f"== {name}: {preset.description}")
        print(describe_plan(preset.pretrain, vocab_size=preset.vocab_size))
        print()


# ---- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatforge",
        description="Build your own ChatGPT end to end. Start with `chatforge speedrun --preset cpu --out runs/demo`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("world", help="generate the synthetic world corpus (people, biographies, stories)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--people", type=int, default=600, help="number of people (default 600)")
    p.add_argument(
        "--heldout", type=int, default=50, help="people whose documents are kept out of pretraining"
    )
    p.add_argument("--paraphrases", type=int, default=5, help="biographies per person (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("tokenizer", help="train or evaluate a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tok_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a tokenizer on text sources")
    t.add_argument(
        "--source",
        action="append",
        required=True,
        help="file, folder, jsonl, parquet, hf:NAME or world folder",
    )
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--field", default="text", help="jsonl field / parquet column holding the text")
    t.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    t.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    t.set_defaults(func=cmd_tokenizer_train)
    t = tsub.add_parser("eval", help="bytes per token on held-out text, beside reference tokenizers")
    t.add_argument("--tokenizer", required=True, help="tokenizer.json or a run folder")
    t.add_argument("--source", action="append", required=True, help="held-out text source(s)")
    t.add_argument(
        "--ref",
        action="append",
        default=[],
        help="reference tokenizer.json, or GPT-2 vocab.json+merges.txt folder",
    )
    t.add_argument("--field", default="text")
    t.add_argument("--max-docs", type=int, default=2000)
    t.set_defaults(func=cmd_tokenizer_eval)

    p = sub.add_parser("data", help="clean, deduplicate and tokenize text sources into token shards")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        help="file, folder, jsonl, parquet, hf:NAME or world folder",
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer.json to encode with")
    p.add_argument("--out", required=True, help="shard folder to write")
    p.add_argument("--field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument(
        "--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard threshold (default 0.8)"
    )
    p.add_argument("--no-near-dedup", action="store_true", help="skip near-duplicate removal")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument(
        "--conversations", action="append", default=[], metavar="JSONL",
        help="conversations (OpenAI messages jsonl) to pretrain on in ChatML, special tokens included (repeatable)",
    )  # fmt: skip
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("pretrain", help="stage 1: next-token prediction on shards -> base model")
    p.add_argument("--data", help="shard folder from `chatforge data`")
    p.add_argument("--tokenizer", help="tokenizer.json (default: DATA/tokenizer.json)")
    p.add_argument("--out", help="run folder for checkpoints, metrics and the final model")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument(
        "--dry-run", action="store_true", help="print shapes, FLOPs and a memory estimate, train nothing"
    )
    p.add_argument("--vocab-size", type=int, default=None, help="with --dry-run: vocabulary to plan for")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_overrides(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="stage 2: supervised finetuning on conversations -> assistant")
    p.add_argument("--model", required=True, help="run folder to start from (a base model)")
    p.add_argument(
        "--data",
        required=True,
        help="conversations .jsonl (OpenAI messages), or a folder with sft_train.jsonl",
    )
    p.add_argument(
        "--val", default=None, help="held-out conversations .jsonl (default: sft_val.jsonl, or 5%% of --data)"
    )
    p.add_argument("--out", required=True, help="run folder for the assistant")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument(
        "--lora-rank", type=int, default=None, metavar="R",
        help="train only rank-R LoRA adapters (saved apart, plus a merged model); same as --set lora_rank=R",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    _add_overrides(p)
    p.set_defaults(func=cmd_sft)

    from chatforge.model.lora import add_merge_arguments, cmd_merge

    p = sub.add_parser("merge", help="merge LoRA adapters into their base model -> a plain run folder")
    add_merge_arguments(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("report", help="(re)build RUN/report.md with plots from what the stages wrote")
    p.add_argument("run", help="a speedrun folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("speedrun", help="the whole pipeline on the synthetic world, resumable stage by stage")
    p.add_argument("--out", default="runs/speedrun", help="run folder (default runs/speedrun)")
    p.add_argument("--dry-run", action="store_true", help="print the model plan, run nothing")
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage (e.g. pretrain)")
    p.add_argument("--no-progress", action="store_true")
    _add_overrides(p, "--set pretrain.max_steps=200 --set world.people=800 --set sft.lr=1e-4")
    p.set_defaults(func=cmd_speedrun)

    from chatforge.chat import add_chat_arguments, cmd_chat
    from chatforge.model.io import add_export_arguments, add_import_arguments, cmd_export, cmd_import

    p = sub.add_parser(
        "import",
        help="import published weights (a GGUF file, an HF Llama folder, or `smollm2`) into a run folder",
    )
    add_import_arguments(p)
    p.set_defaults(func=cmd_import)
    p = sub.add_parser(
        "export", help="export a run for other tools: `hf` (transformers) or `gguf` (llama.cpp)"
    )
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)
    from chatforge.eval.run import add_eval_arguments, cmd_eval

    p = sub.add_parser(
        "eval", help="evaluate a model: bits per byte, world QA, reversal probe, multiple choice, GSM8K"
    )
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="talk to a model, or answer one prompt with -p")
    add_chat_arguments(p)
    p.set_defaults(func=cmd_chat)

    from chatforge.align.dpo import add_dpo_arguments, cmd_dpo
    from chatforge.align.label import add_label_arguments, cmd_label
    from chatforge.align.prefs import add_world_prefs_arguments, cmd_world_prefs
    from chatforge.align.reward import add_reward_arguments, add_winrate_arguments, cmd_reward, cmd_winrate
    from chatforge.align.rl import add_rl_arguments, cmd_rl

    p = sub.add_parser("prefs", help="stage 3: comparisons (label, world pairs), reward model, DPO")
    psub = p.add_subparsers(dest="prefs_command", required=True, metavar="ACTION")
    for name, add, run, help_text in (
        ("label", add_label_arguments, cmd_label, "label pairs of sampled answers in the terminal (optionally judge-assisted)"),
        ("world", add_world_prefs_arguments, cmd_world_prefs, "write comparisons made from the synthetic world"),
        ("reward", add_reward_arguments, cmd_reward, "train a reward model (Bradley-Terry) on comparisons"),
        ("dpo", add_dpo_arguments, cmd_dpo, "direct preference optimisation against a frozen reference"),
        ("winrate", add_winrate_arguments, cmd_winrate, "how often a reward model prefers one model's sampled answers to another's"),
    ):  # fmt: skip
        q = psub.add_parser(name, help=help_text)
        add(q)
        q.set_defaults(func=run)
    p = sub.add_parser("rl", help="reinforcement learning from a checkable reward (GRPO)")
    add_rl_arguments(p)
    p.set_defaults(func=cmd_rl)

    from chatforge.serve.command import add_serve_arguments, cmd_serve
    from chatforge.serve.feedback import add_feedback_arguments, cmd_feedback

    p = sub.add_parser("serve", help="OpenAI-compatible API server with a web chat page and a feedback store")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("feedback", help="list rated conversations; export them as sft / prefs data")
    add_feedback_arguments(p)
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("presets", help="list presets with their model shapes, FLOPs and memory estimates")
    p.add_argument("name", nargs="?", help="show only this preset")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ChatforgeError as e:
        print(f"chatforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
