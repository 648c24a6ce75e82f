"""Stage 1: pretraining, next-token prediction on token shards -> a base model.

    chatforge pretrain --data SHARDS --out RUN --preset cpu
    torchrun --nproc_per_node=2 -m chatforge.cli pretrain --data SHARDS --out RUN   # DDP

Builds a fresh model from the config's depth dial and a TokenLoader over the shards, and hands
the training loop (train/loop.py) a language-model step: next-token loss on a loader's batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from chatforge.config import TrainConfig, get_preset, training_config
from chatforge.data.shards import TokenLoader, iter_eval_batches, read_index
from chatforge.device import (
    Dist,
    all_reduce_max,
    autocast,
    cleanup_distributed,
    is_sharded,
    setup_distributed,
    wait_for_all_ranks,
)
from chatforge.engine import generate
from chatforge.errors import ChatforgeError
from chatforge.eval.bpb import bits_per_byte
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import PretrainOptions
from chatforge.plan import describe_plan
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import Stage, print_summary, run_training, token_batches

SAMPLE_PROMPTS = ["The", "Once upon a time", "12 + 35 ="]
LM_PLOT = [("cross-entropy (nats/token)", ["loss", "val_loss"]), ("bits per byte", ["val_bpb"])]


class BatchLoader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def language_model_stage(
    name: str,
    cfg: TrainConfig,
    model: GPT,
    tokenizer: Tokenizer,
    loader: BatchLoader,
    eval_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    sample: Callable[[GPT], list[str]],
    dist: Dist,
    meta: dict,
) -> Stage:
    """Pretraining's and SFT's stage: next-token loss on the loader's (x, y) batches (targets of -1
    are not scored), validation loss and bits per byte on eval_batches() (a fresh pass, this rank's
    share), and the loader's position in every checkpoint."""
    grad_accum, tokens_per_step = token_batches(cfg, model, dist)
    autocast(dist.device, cfg.precision)  # a precision this device cannot run fails here, before training
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=dist.device)

    def step(module: torch.nn.Module, step: int, update: int) -> tuple[torch.Tensor, dict]:
        x, y = loader.next_batch()
        with autocast(dist.device, cfg.precision):
            return module(x, y), {}

    def evaluate(module: torch.nn.Module) -> dict:
        batches = eval_batches()
        if is_sharded(module):
            batches = padded_to_every_rank(batches, dist, (cfg.device_batch_size, cfg.seq_len))
        val_loss, val_bpb = bits_per_byte(module, batches, token_bytes, dist.device, all_reduce=True)
        return {"val_loss": val_loss, "val_bpb": val_bpb}

    def summarize(first: dict | None, last: dict | None) -> dict:
        # None (JSON null) when evaluation is off
        return {
            f"val_{k}_{when}": ev[f"val_{k}"] if ev else None
            for k in ("loss", "bpb")
            for when, ev in (("start", first), ("end", last))
        }

    return Stage(
        name=name, model=model, step=step, evaluate=evaluate, summarize=summarize, plot=("loss.png", LM_PLOT),
        meta={"stage": name, "train": dataclasses.asdict(cfg), **meta}, grad_accum=grad_accum,
        tokens_per_step=tokens_per_step, sample=sample,
        state=lambda: {"loader": loader.state_dict()},
        load_state=lambda state: loader.load_state_dict(state["loader"]),
        header=f"{model.flops_per_token(cfg.seq_len) / 1e6:.1f} MFLOPs/token | {tokens_per_step:,} tokens/step = "
        f"{cfg.device_batch_size} rows x {cfg.seq_len} x {dist.world_size} ranks x {grad_accum} accum",
    )  # fmt: skip


def padded_to_every_rank(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], dist: Dist, shape: tuple[int, int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's evaluation batches, padded with (shape) batches that score nothing (targets -1) to as
    many as any rank has: a sharded model's forward needs every rank, and shares can differ by one."""
    batches = list(batches)
    missing = all_reduce_max(len(batches), dist) - len(batches)
    x = torch.zeros(shape, dtype=torch.long, device=dist.device)
    return batches + [(x, torch.full_like(x, -1))] * missing


def sample_text(model: GPT, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy continuations of plain-text prompts (no RNG used: training stays reproducible)."""
    out = []
    for prompt in prompts:
        ids = tokenizer.start_ids() + tokenizer.encode(prompt)  # as documents start (no BOS if the model adds none)
        room = min(max_new_tokens, model.cfg.seq_len - len(ids))
        stops = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        new = list(generate(model, ids, room, temperature=0.0, stop_ids=stops))
        out.append(prompt + tokenizer.decode([t for t in new if t not in stops]))
    return out


def check_tokenizer_matches(tokenizer: Tokenizer, tokenizer_path: Path, data_dir: Path) -> None:
    index = read_index(data_dir)
    if tokenizer.vocab_size != index["vocab_size"]:
        raise ChatforgeError(
            f"tokenizer has {tokenizer.vocab_size} tokens but {data_dir} was tokenized with "
            f"{index['vocab_size']}; re-run `chatforge data` with this tokenizer"
        )
    shard_tok = data_dir / "tokenizer.json"  # `chatforge data` keeps a copy of the tokenizer it used
    if shard_tok.is_file() and Tokenizer.load(shard_tok).to_json() != tokenizer.to_json():
        raise ChatforgeError(
            f"{tokenizer_path} is not the tokenizer {data_dir} was made with ({shard_tok}); "
            "pass that one, or re-run `chatforge data` with this tokenizer"
        )


def pretrain(
    data_dir: Path,
    tokenizer_path: Path,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train a base model on the shards in data_dir; returns a summary dict (rank 0's view)."""
    owns_group = not torch.distributed.is_initialized()  # a sweep under torchrun keeps one for all its runs
    dist = setup_distributed(cfg.device)
    try:
        # the model lives in the helper's frame, so it is gone (and collected) before the group is torn down
        result = _train_base(Path(data_dir), Path(tokenizer_path), Path(out_dir), cfg, dist, resume, progress)
        wait_for_all_ranks()
        return result
    finally:
        if owns_group:
            cleanup_distributed()


def _train_base(
    data_dir: Path, tokenizer_path: Path, out_dir: Path, cfg: TrainConfig, dist: Dist, resume: bool, progress: bool
) -> dict:
    read_index(data_dir)  # a missing or unfinished shard folder is the first thing to report
    tokenizer = Tokenizer.load(tokenizer_path)
    check_tokenizer_matches(tokenizer, Path(tokenizer_path), data_dir)
    torch.manual_seed(cfg.seed)
    mcfg = GPTConfig.from_depth(
        cfg.depth, vocab_size=tokenizer.vocab_size, seq_len=cfg.seq_len, overrides=cfg.model
    )
    model = GPT(mcfg).to(dist.device)
    loader = TokenLoader(
        data_dir, "train", cfg.device_batch_size, cfg.seq_len,
        rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, device=dist.device,
    )  # fmt: skip
    eval_batches = partial(
        iter_eval_batches, data_dir, "val", cfg.device_batch_size, cfg.seq_len,
        max_batches=cfg.eval_batches, rank=dist.rank, world_size=dist.world_size, device=dist.device,
    )  # fmt: skip
    stage = language_model_stage(
        "pretrain", cfg, model, tokenizer, loader, eval_batches,
        partial(sample_text, tokenizer=tokenizer, prompts=SAMPLE_PROMPTS), dist, {"data": str(data_dir)},
    )  # fmt: skip
    return run_training(stage, cfg, out_dir, tokenizer, dist, resume=resume, progress=progress)


def dry_run_vocab_size(opts: PretrainOptions) -> int:
    """The vocabulary a dry run plans for: --vocab-size, else the --data shards', else the preset's."""
    if opts.vocab_size:
        return opts.vocab_size
    if opts.data:  # the model is built with the data's tokenizer, so plan with its real size
        return int(read_index(opts.data)["vocab_size"])
    return get_preset(opts.preset).vocab_size


def cmd_pretrain(opts: PretrainOptions) -> None:
    cfg = training_config(opts.preset, "pretrain", opts.settings, opts.overrides)
    if opts.dry_run:
        print(describe_plan(cfg, vocab_size=dry_run_vocab_size(opts)))
        return
    if not opts.data or not opts.out:
        raise ChatforgeError(
            "pretrain needs --data (a shard folder from `chatforge data`) and --out (a run folder)"
        )
    tokenizer = opts.tokenizer or Path(opts.data) / "tokenizer.json"
    summary = pretrain(opts.data, tokenizer, opts.out, cfg, resume=opts.resume, progress=not opts.no_progress)
    print_summary(summary)
