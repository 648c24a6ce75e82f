"""Stage 1: pretraining, next-token prediction on token shards -> a base model.

The loop, top to bottom: set up (torchrun or single process), build or resume the model,
then for each step: maybe evaluate (val loss, bits per byte) and sample, run
`grad_accum` micro-batches forward/backward, clip, set the LR, step the optimizer,
log, and checkpoint every `ckpt_every` steps. Run with torchrun for DDP:

    torchrun --nproc_per_node=2 -m chatforge.cli pretrain --data D --tokenizer T --out RUN
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from chatforge import checkpoint as ckpt
from chatforge.config import TrainConfig
from chatforge.data.shards import TokenLoader, iter_eval_batches, read_index
from chatforge.engine import generate
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer
from chatforge.train.common import (
    Dist,
    MetricsLog,
    all_reduce_sum,
    autocast,
    build_optimizers,
    cleanup_distributed,
    lr_multiplier,
    peak_flops,
    plot_losses,
    set_lr,
    setup_distributed,
)

SAMPLE_PROMPTS = ["The", "Once upon a time", "12 + 35 ="]


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    data_dir: Path,
    token_bytes: torch.Tensor,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    dist: Dist,
) -> tuple[float, float]:
    """Mean validation loss (nats/token) and bits per byte.

    Bits per byte = total nats / ln 2 / total UTF-8 bytes of the predicted tokens. It does not
    depend on the tokenizer, so models with different vocabularies compare fairly. Special
    tokens (0 bytes) are left out of both sums, as in nanochat.
    """
    model.eval()
    device = dist.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats on bytes, bytes
    for x, y in iter_eval_batches(
        data_dir,
        "val",
        batch_size,
        seq_len,
        max_batches=max_batches,
        rank=dist.rank,
        world_size=dist.world_size,
    ):
        x, y = x.to(device), y.to(device)
        with autocast(device):
            loss = model(x, y, loss_reduction="none").view(-1).double()
        nbytes = token_bytes[y.view(-1)]
        counted = nbytes > 0
        sums += torch.stack(
            [
                loss.sum(),
                torch.tensor(loss.numel(), device=device, dtype=torch.float64),
                loss[counted].sum(),
                nbytes.sum().double(),
            ]
        )
    all_reduce_sum(sums, dist)
    model.train()
    if sums[1] == 0:
        raise ChatforgeError(f"the validation split in {data_dir} is too small for seq_len {seq_len}")
    return float(sums[0] / sums[1]), float(sums[2] / math.log(2) / max(1.0, float(sums[3])))


def sample_text(model: GPT, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy continuations, to watch the model learn (a separate generator: training RNG untouched)."""
    out = []
    model.eval()
    for prompt in prompts:
        ids = (
            [tokenizer.bos_id, *tokenizer.encode(prompt)]
            if tokenizer.bos_id is not None
            else tokenizer.encode(prompt)
        )
        room = min(max_new_tokens, model.cfg.seq_len - len(ids))
        new = list(generate(model, ids, room, temperature=0.0, stop_ids=[tokenizer.bos_id]))
        out.append(prompt + tokenizer.decode([t for t in new if t != tokenizer.bos_id]))
    model.train()
    return out


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pretrain(
    data_dir: Path,
    tokenizer_path: Path,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    stage: str = "pretrain",
) -> dict:
    """Train a base model on the shards in data_dir; returns a summary dict (rank 0's view)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dist = setup_distributed(cfg.device)
    try:
        return _pretrain(data_dir, Path(tokenizer_path), out_dir, cfg, dist, resume, progress, stage)
    finally:
        cleanup_distributed()


def _pretrain(data_dir, tokenizer_path, out_dir, cfg, dist, resume, progress, stage) -> dict:
    device = dist.device
    index = read_index(data_dir)
    tokenizer = Tokenizer.load(tokenizer_path)
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
    tokens_per_micro = cfg.device_batch_size * cfg.seq_len * dist.world_size
    if cfg.total_batch_tokens:
        if cfg.total_batch_tokens % tokens_per_micro:
            raise ChatforgeError(
                f"total_batch_tokens {cfg.total_batch_tokens} is not a multiple of device_batch_size x seq_len x "
                f"ranks = {tokens_per_micro}"
            )
        grad_accum = cfg.total_batch_tokens // tokens_per_micro
    else:
        grad_accum = 1
    tokens_per_step = tokens_per_micro * grad_accum

    torch.manual_seed(cfg.seed)
    mcfg = GPTConfig.from_depth(
        cfg.depth, vocab_size=tokenizer.vocab_size, seq_len=cfg.seq_len, **dict(cfg.model)
    )
    model = GPT(mcfg).to(device)
    optimizers = build_optimizers(model, cfg)
    loader = TokenLoader(
        data_dir,
        "train",
        cfg.device_batch_size,
        cfg.seq_len,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.seed,
        device=device,
    )
    start_step = 0
    resumed_time, resumed_tokens = 0.0, 0
    latest = ckpt.latest_checkpoint(out_dir) if resume else None
    if resume and latest is None and dist.is_main:
        print(f"no checkpoint in {out_dir}: starting from scratch")
    if latest is not None:
        meta = ckpt.read_config(latest)
        if meta.get("model") != mcfg.to_dict():
            raise ChatforgeError(f"cannot resume: {latest} was trained with a different model config")
        ckpt.load_weights(model, latest)
        state = ckpt.load_train_state(latest)
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        if start_step > cfg.max_steps:  # the loop stops at step == max_steps: it would never end
            raise ChatforgeError(
                f"cannot resume: {latest} is at step {start_step}, past max_steps {cfg.max_steps}; "
                "raise max_steps or use a new --out"
            )
        resumed_time, resumed_tokens = state.get("train_seconds", 0.0), state.get("tokens_seen", 0)
        if dist.is_main:
            print(f"resuming from {latest} at step {start_step}")
    elif not resume and ckpt.list_checkpoints(out_dir):
        raise ChatforgeError(
            f"{out_dir} already has checkpoints: pass --resume to continue, or use a new --out"
        )

    train_model: torch.nn.Module = model
    if cfg.compile:
        train_model = torch.compile(model)
    if dist.world_size > 1:
        train_model = DDP(train_model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=device)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak, peak_desc = peak_flops(device)
    metrics = MetricsLog(
        out_dir / "metrics.jsonl", resume_step=start_step if latest else None, enabled=dist.is_main
    )
    meta = {"stage": stage, "train": dataclasses.asdict(cfg), "data": str(data_dir)}
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"model: {model.num_params() / 1e6:.2f}M params, {flops_per_token / 1e6:.1f} MFLOPs/token | "
            f"{tokens_per_step:,} tokens/step = {cfg.device_batch_size} rows x {cfg.seq_len} x "
            f"{dist.world_size} ranks x {grad_accum} accum | {cfg.max_steps} steps on {device} ({peak_desc})"
        )

    def save(step: int) -> None:
        state = {
            "step": step,
            "optimizers": [opt.state_dict() for opt in optimizers],
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "train_seconds": train_time,
            "tokens_seen": tokens_seen,
            "train_config": dataclasses.asdict(cfg),
        }
        if dist.is_main:
            ckpt.save_checkpoint(out_dir, step, model, tokenizer.to_json(), meta, state, keep=cfg.keep_ckpts)

    first_bpb: float | None = None  # None (JSON null), not NaN: stays valid JSON when eval is off
    last_bpb: float | None = None
    train_time, tokens_seen = resumed_time, resumed_tokens  # totals over all sessions of this run
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        disable=not (progress and dist.is_main),
        desc=stage,
        unit="step",
        mininterval=1.0,
        dynamic_ncols=True,
    )
    step = start_step
    while True:
        last = step == cfg.max_steps
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            val_loss, val_bpb = evaluate_bpb(
                train_model, data_dir, token_bytes, cfg.device_batch_size, cfg.seq_len, cfg.eval_batches, dist
            )
            first_bpb = val_bpb if step == start_step and first_bpb is None else first_bpb
            last_bpb = val_bpb
            metrics.log(step=step, val_loss=round(val_loss, 6), val_bpb=round(val_bpb, 6))
            if dist.is_main:
                bar.write(f"step {step:5d} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}")
        if dist.is_main and ((cfg.sample_every and step % cfg.sample_every == 0 and step > 0) or last):
            for text in sample_text(model, tokenizer, SAMPLE_PROMPTS):
                bar.write(f"  sample: {text!r}")
        if last:
            break

        t0 = time.perf_counter()
        set_lr(optimizers, lr_multiplier(step, cfg))
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = loader.next_batch()
            sync = micro == grad_accum - 1
            context = (
                train_model.no_sync() if (dist.world_size > 1 and not sync) else contextlib.nullcontext()
            )
            with context, autocast(device):
                loss = train_model(x, y)
                (loss / grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        )
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_time += dt
        tokens_seen += tokens_per_step
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # the only host sync in the step: reading the loss, every log_every steps
            loss_value = float(all_reduce_sum(loss_sum, dist)) / grad_accum / dist.world_size
            tok_s = tokens_per_step / dt
            mfu = flops_per_token * tok_s / peak if peak else float("nan")
            metrics.log(
                step=step,
                loss=round(loss_value, 6),
                lr_mult=round(lr_multiplier(step - 1, cfg), 6),
                grad_norm=round(float(grad_norm), 4) if grad_norm is not None else None,
                tok_s=round(tok_s, 1),
                mfu=round(mfu, 5),
                time_s=round(train_time, 3),
            )
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%")
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            save(step)
    bar.close()

    if start_step < cfg.max_steps or latest is None:  # resuming a finished run: its checkpoint is this one
        save(cfg.max_steps)
    summary = {
        "params": model.num_params(),
        "steps": cfg.max_steps,
        "tokens": tokens_seen,
        "train_seconds": round(train_time, 2),
        "tokens_per_second": round(tokens_seen / train_time, 1) if train_time else None,
        "val_bpb_start": first_bpb,
        "val_bpb_end": last_bpb,
    }
    if dist.is_main:
        ckpt.save_model(
            out_dir, model, tokenizer.to_json(), {**meta, "step": cfg.max_steps, "summary": summary}
        )
        png = plot_losses(
            out_dir / "metrics.jsonl",
            out_dir / "loss.png",
            f"{stage}: {model.num_params() / 1e6:.2f}M params",
        )
        summary["loss_plot"] = str(png)
        atomic_write_json(out_dir / f"{stage}_summary.json", summary)
    return summary
