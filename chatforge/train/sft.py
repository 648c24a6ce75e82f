"""Stage 2: supervised finetuning on conversations -> an assistant.

    chatforge sft --model runs/base --data convs.jsonl --out runs/sft

Starts from a base run's weights and tokenizer, packs whole conversations into rows, and
trains with the loss on the assistant's tokens only (the loader sets every other target to
-1). Same step, loop, checkpoint format and resume as pretraining (train/pretrain.py's
language_model_stage, train/loop.py).

With `--set sft.lora_rank=8` the base stays frozen and only low-rank adapters train
(model/lora.py): checkpoints hold just the adapter, and the finished run folder holds the
adapter (adapter_model.safetensors + adapter_config.json) and the merged model, so chat, eval and
serving load it like any run. The base's chat format (chat_template, add_bos_token, ...) is
kept in config.json either way, so imported models (SmolLM2) keep talking their own way.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from chatforge import checkpoint as ckpt
from chatforge.chat_format import load_conversations, render_prompt, turn_end_ids
from chatforge.config import TrainConfig, training_config
from chatforge.data.sft import SFTLoader, iter_sft_eval_batches
from chatforge.device import Dist, cleanup_distributed, setup_distributed, wait_for_all_ranks
from chatforge.errors import ChatforgeError
from chatforge.eval.base import generate_greedy
from chatforge.model.gpt import GPT
from chatforge.model.lora import ADAPTER_FILE, apply_lora, parse_targets, trainable_parameters
from chatforge.options import SFTOptions
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import print_summary, run_training
from chatforge.train.pretrain import language_model_stage

SAMPLE_QUESTIONS = ["Who are you?", "What is 23 + 19?"]


def chat_samples(
    model: GPT, tokenizer: Tokenizer, questions: list[str], max_new_tokens: int = 40
) -> list[tuple[str, str]]:
    """Greedy answers to single-turn questions, as (question, answer) pairs ("" for a question
    that fills the context)."""
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    was_training = model.training
    model.eval()  # no dropout (LoRA's) while answering; training mode comes back after
    try:
        answers = generate_greedy(model, prompts, max_new_tokens, stop_ids=turn_end_ids(tokenizer))
    finally:
        model.train(was_training)
    return [(q, tokenizer.decode(a) if a is not None else "") for q, a in zip(questions, answers, strict=True)]


def resolve_sft_files(data: Path, val: Path | None) -> tuple[Path, Path | None]:
    """A conversations jsonl, or a folder from the world's SFT data (sft_train.jsonl + sft_val.jsonl)."""
    data = Path(data)
    if data.is_dir():
        if not (data / "sft_train.jsonl").is_file():
            raise ChatforgeError(f"{data} has no sft_train.jsonl; pass a conversations .jsonl file")
        return data / "sft_train.jsonl", val or (
            (data / "sft_val.jsonl") if (data / "sft_val.jsonl").is_file() else None
        )
    if not data.is_file():
        raise ChatforgeError(f"no such conversations file: {data}")
    return data, val


def lora_setup(model: GPT, cfg: TrainConfig) -> dict:
    """Freeze `model` and put LoRA adapters on it as cfg asks; returns what config.json records."""
    if cfg.lora_rank < 0:
        raise ChatforgeError(f"lora_rank must be >= 0 (0 = train every weight), got {cfg.lora_rank}")
    if cfg.optimizer != "adamw":
        # Muon orthogonalises whole weight matrices; the rank-r factors of an adapter are not that
        raise ChatforgeError(f"LoRA trains with AdamW, not {cfg.optimizer}: set sft.optimizer=adamw")
    apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    return {
        "rank": cfg.lora_rank,
        "alpha": cfg.lora_alpha,
        "targets": list(parse_targets(cfg.lora_targets)),
        "trainable_params": trainable_parameters(model),
        "adapter": ADAPTER_FILE,
    }


def sft(
    base: Path,
    data: Path,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    val: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Finetune the model in `base` on the conversations in `data`; returns a summary dict."""
    train_file, val_file = resolve_sft_files(data, val)
    dist = setup_distributed(cfg.device)
    try:
        # the model lives in the helper's frame, so it is gone (and collected) before the group is torn down
        result = _finetune(base, train_file, val_file, Path(out_dir), cfg, dist, resume, progress)
        wait_for_all_ranks()
        return result
    finally:
        cleanup_distributed()


def _finetune(
    base: Path, train_file: Path, val_file: Path | None, out_dir: Path, cfg: TrainConfig, dist: Dist,
    resume: bool, progress: bool,
) -> dict:
    run = ckpt.load_run(base, device=dist.device)
    model, tokenizer, base_meta, model_dir = run.model, run.tokenizer, run.meta, run.folder
    if cfg.seq_len > model.cfg.seq_len:  # a longer context than pretraining's, taught here
        before = model.cfg
        model.lengthen_context(cfg.seq_len)
        if dist.is_main:
            print(f"context {before.seq_len} -> {cfg.seq_len} tokens (RoPE base {before.rope_theta:g} -> "
                  f"{model.cfg.rope_theta:g}); SFT trains the new positions")
    model.train()
    train_convs = load_conversations(train_file)
    if val_file is not None:
        val_convs = load_conversations(val_file)
    else:  # hold out 5% of the training conversations, at least one
        n_val = max(1, len(train_convs) // 20)
        train_convs, val_convs = train_convs[:-n_val], train_convs[-n_val:]
    torch.manual_seed(cfg.seed)  # before apply_lora: the adapters' random init is seeded too
    lora_meta = {}
    if cfg.lora_rank:
        lora_meta = {"lora": lora_setup(model, cfg)}
        if dist.is_main:
            print(
                f"LoRA rank {cfg.lora_rank} on {', '.join(lora_meta['lora']['targets'])}: "
                f"{lora_meta['lora']['trainable_params']:,} trainable of {model.num_params():,} parameters"
            )
    loader = SFTLoader(
        train_convs, tokenizer, cfg.device_batch_size, cfg.seq_len,
        rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, device=dist.device,
    )  # fmt: skip
    if loader.n_truncated and dist.is_main:
        print(
            f"note: {loader.n_truncated} conversations longer than {cfg.seq_len + 1} tokens were truncated"
        )
    eval_batches = partial(
        iter_sft_eval_batches, val_convs, tokenizer, cfg.device_batch_size, cfg.seq_len,
        rank=dist.rank, world_size=dist.world_size, max_batches=cfg.eval_batches, device=dist.device,
    )  # fmt: skip
    meta = {
        **ckpt.inherited_meta(base_meta),  # the chat format of the base (chat_template, add_bos_token, ...)
        "data": str(train_file),
        "base": str(model_dir),
        "base_stage": base_meta.get("stage"),
        **lora_meta,
    }
    stage = language_model_stage(
        "sft", cfg, model, tokenizer, loader, eval_batches,
        lambda m: [f"{q} -> {a}" for q, a in chat_samples(m, tokenizer, SAMPLE_QUESTIONS)], dist, meta,
    )  # fmt: skip
    return run_training(stage, cfg, out_dir, tokenizer, dist, resume=resume, progress=progress)


def cmd_sft(opts: SFTOptions) -> None:
    cfg = training_config(opts.preset, "sft", opts.settings, opts.overrides)
    summary = sft(
        opts.model, opts.data, opts.out, cfg, val=opts.val, resume=opts.resume, progress=not opts.no_progress
    )
    print_summary(summary)
