"""`chatforge`: one command, a sub-command per stage.

Each verb maps to its options dataclass (options.py, which argparse flags are generated from) and
to the "module:function" that handles it. The module is imported only when its verb runs, so
`chatforge --help` and `chatforge VERB --help` load neither torch nor FastAPI. Errors from bad
input print as one line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
from typing import Any, NamedTuple

from chatforge import __version__
from chatforge import options as o
from chatforge.errors import ChatforgeError


class Command(NamedTuple):
    options: type
    handler: str  # "module:function", imported when the command runs
    help: str


# a verb with sub-verbs maps to a dict of them
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "world": Command(o.WorldOptions, "chatforge.world:cmd_world", "generate the synthetic world corpus (people, biographies, stories)"),
    "tokenizer": {
        "train": Command(o.TokenizerTrainOptions, "chatforge.data.pipeline:cmd_tokenizer_train", "train a tokenizer on text sources"),
        "eval": Command(o.TokenizerEvalOptions, "chatforge.data.pipeline:cmd_tokenizer_eval", "bytes per token on held-out text, beside reference tokenizers"),
    },
    "data": Command(o.DataOptions, "chatforge.data.pipeline:cmd_data", "clean, deduplicate and tokenize text sources into token shards"),
    "pretrain": Command(o.PretrainOptions, "chatforge.train.pretrain:cmd_pretrain", "stage 1: next-token prediction on shards -> base model"),
    "sft": Command(o.SFTOptions, "chatforge.train.sft:cmd_sft", "stage 2: supervised finetuning on conversations -> assistant"),
    "merge": Command(o.MergeOptions, "chatforge.checkpoint:cmd_merge", "merge LoRA adapters into their base model -> a plain run folder"),
    "report": Command(o.ReportOptions, "chatforge.report:cmd_report", "(re)build RUN/report.md with plots from what the stages wrote"),
    "speedrun": Command(o.SpeedrunOptions, "chatforge.speedrun:cmd_speedrun", "the whole pipeline on the synthetic world, resumable stage by stage"),
    "import": Command(o.ImportOptions, "chatforge.model.io:cmd_import", "import published weights (a GGUF file, an HF Llama folder, or `smollm2`) into a run folder"),
    "export": Command(o.ExportOptions, "chatforge.model.io:cmd_export", "export a run for other tools: `hf` (transformers) or `gguf` (llama.cpp)"),
    "eval": Command(o.EvalOptions, "chatforge.eval.run:cmd_eval", "evaluate a model: bits per byte, world QA, reversal probe, multiple choice, GSM8K"),
    "chat": Command(o.ChatOptions, "chatforge.chat:cmd_chat", "talk to a model, or answer one prompt with -p"),
    "prefs": {
        "label": Command(o.LabelOptions, "chatforge.align.label:cmd_label", "label pairs of sampled answers in the terminal (optionally judge-assisted)"),
        "world": Command(o.WorldPrefsOptions, "chatforge.align.prefs:cmd_world_prefs", "write comparisons made from the synthetic world"),
        "reward": Command(o.RewardOptions, "chatforge.align.reward:cmd_reward", "train a reward model (Bradley-Terry) on comparisons"),
        "dpo": Command(o.DPOOptions, "chatforge.align.dpo:cmd_dpo", "direct preference optimisation against a frozen reference"),
        "winrate": Command(o.WinrateOptions, "chatforge.align.reward:cmd_winrate", "how often a reward model prefers one model's sampled answers to another's"),
        "prm": Command(o.PRMOptions, "chatforge.think:cmd_prm", "a process reward model (or --outcome: an outcome one) on a task's traces, steps labelled by program"),
    },
    "rl": Command(o.RLOptions, "chatforge.align.rl:cmd_rl", "reinforcement learning from a checkable reward (GRPO)"),
    "redteam": Command(o.RedteamOptions, "chatforge.redteam.command:cmd_redteam", "attack your own model (jailbreaks, encodings, prompt injection, exfiltration) and measure defenses"),
    "serve": Command(o.ServeOptions, "chatforge.serve.command:cmd_serve", "OpenAI-compatible API server with a web chat page and a feedback store"),
    "feedback": {
        "list": Command(o.FeedbackListOptions, "chatforge.serve.feedback:cmd_feedback_list", "conversations in a feedback database, newest first, with their ratings"),
        "export": Command(o.FeedbackExportOptions, "chatforge.serve.feedback:cmd_feedback_export", "rated conversations as training data: sft or preference pairs"),
    },
    "rag": {
        "add": Command(o.RagAddOptions, "chatforge.rag.command:cmd_rag_add", "add files to a collection (changed ones replaced, unchanged skipped)"),
        "remove": Command(o.RagRemoveOptions, "chatforge.rag.command:cmd_rag_remove", "delete files and their chunks from a collection"),
        "list": Command(o.RagListOptions, "chatforge.rag.command:cmd_rag_list", "the collections, or one collection's documents"),
        "search": Command(o.RagSearchOptions, "chatforge.rag.command:cmd_rag_search", "the chunks a query retrieves (BM25, dense, fused)"),
        "world": Command(o.RagWorldOptions, "chatforge.rag.command:cmd_rag_world", "the world's held-out biographies as a collection, with forward and reverse questions"),
        "eval": Command(o.RagEvalOptions, "chatforge.rag.evaluate:cmd_rag_eval", "recall@k, MRR, latency; with --model answers closed-book vs with retrieval"),
    },
    "doctor": Command(o.DoctorOptions, "chatforge.tools.sandbox:cmd_doctor", "what this machine gives the python tool's sandbox (Landlock, seccomp, namespaces) and whether it runs"),
    "scaling": {
        "sweep": Command(o.ScalingSweepOptions, "chatforge.scaling.sweep:cmd_scaling_sweep", "train a grid of model sizes x token budgets, resumable run by run"),
        "fit": Command(o.ScalingFitOptions, "chatforge.scaling.fit:cmd_scaling_fit", "fit a scaling law L(N, D) (Chinchilla or Kaplan form) to a sweep; IsoFLOP view, plots, held-out check"),
        "plan": Command(o.ScalingPlanOptions, "chatforge.scaling.plan:cmd_scaling_plan", "compute-optimal N, D and predicted loss for a FLOP or GPU-hour budget"),
    },
    "presets": Command(o.PresetsOptions, "chatforge.plan:cmd_presets", "list presets with their model shapes, FLOPs and memory estimates"),
}  # fmt: skip

GROUP_HELP = {
    "tokenizer": "train or evaluate a byte-level BPE tokenizer",
    "prefs": "stage 3: comparisons (label, world pairs), reward model, DPO",
    "feedback": "list rated conversations; export them as sft / prefs data",
    "scaling": "scaling laws: sweep sizes x tokens, fit L(N, D), plan a compute budget",
    "rag": "collections of your files: add, search, answer from them with citations",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatforge",
        description="Build your own ChatGPT end to end. Start with `chatforge speedrun --preset cpu --out runs/demo`.",
    )
    parser.add_argument(
        "--no-verify", action="store_true",
        help="load model weights even when they do not match the sha256 saved with them",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"chatforge {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb, entry in COMMANDS.items():
        if isinstance(entry, Command):
            _add_command(sub, verb, entry)
            continue
        group = sub.add_parser(verb, help=GROUP_HELP[verb])
        actions = group.add_subparsers(dest=f"{verb}_command", required=True, metavar="ACTION")
        for action, command in entry.items():
            _add_command(actions, action, command)
    return parser


def package_version() -> str:
    """The installed distribution's version; the source tree's when it runs uninstalled."""
    try:
        return importlib.metadata.version("chatforge")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def _add_command(sub: Any, name: str, command: Command) -> None:
    p = sub.add_parser(name, help=command.help)
    o.add_options(p, command.options)
    p.set_defaults(handler=command)


def parse_command(argv: list) -> tuple[Command, Any]:
    """The command `argv` names and its options object (strings, or anything str() makes one)."""
    ns = build_parser().parse_args([str(a) for a in argv])
    return ns.handler, o.options_from_args(ns.handler.options, ns)


def run_command(command: Command, opts: Any) -> Any:
    module, function = command.handler.split(":")
    return getattr(importlib.import_module(module), function)(opts)


def main(argv: list[str] | None = None) -> int:
    code = run_cli(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun worker leaves as soon as its files are written: gloo's threads can abort (SIGABRT)
        # while Python finalises, and torchrun then calls a finished job failed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_cli(argv: list[str] | None) -> int:
    ns = build_parser().parse_args([str(a) for a in (sys.argv[1:] if argv is None else argv)])
    if ns.no_verify:  # read where weights load (checkpoint.verify_weights), however deep
        os.environ[o.NO_VERIFY_ENV] = "1"
    try:
        run_command(ns.handler, o.options_from_args(ns.handler.options, ns))
    except ChatforgeError as e:
        print(f"chatforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
