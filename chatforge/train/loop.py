"""The training loop every stage shares (pretraining, SFT; later reward model and DPO).

A stage hands `run_training` a model (fresh, or initialised from an earlier run), a batch
loader with `next_batch()` / `state_dict()` / `load_state_dict()`, and a way to make
validation batches. The loop, top to bottom: resume if asked, then for each step: maybe
evaluate (val loss, bits per byte) and sample, run `grad_accum` micro-batches
forward/backward, clip, set the LR, step the optimizers, log, and checkpoint every
`ckpt_every` steps. Under torchrun the model is wrapped in DDP.

Only parameters with requires_grad train, so a model with LoRA adapters (model/lora.py) trains
just those: its checkpoints hold the adapter, and the end of the run writes the adapter and
the merged model (the model passed in is merged in place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from chatforge import checkpoint as ckpt
from chatforge.config import TrainConfig
from chatforge.errors import ChatforgeError
from chatforge.eval.bpb import bits_per_byte
from chatforge.fileio import atomic_write_json
from chatforge.model.gpt import GPT
from chatforge.model.lora import ADAPTER_CONFIG, has_lora, load_adapter, merge_lora, save_adapter
from chatforge.tokenizer import Tokenizer
from chatforge.train.common import (
    Dist,
    MetricsLog,
    all_reduce_sum,
    autocast,
    build_optimizers,
    lr_multiplier,
    peak_flops,
    plot_losses,
    read_metrics,
    set_lr,
)


class BatchLoader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


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


def run_training(
    stage: str,
    cfg: TrainConfig,
    out_dir: Path,
    model: GPT,
    tokenizer: Tokenizer,
    loader: BatchLoader,
    eval_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None,
    sample: Callable[[GPT], list[str]] | None,
    dist: Dist,
    *,
    resume: bool,
    progress: bool,
    meta: dict,
) -> dict:
    """Train `model` for cfg.max_steps optimizer steps; returns a summary dict (rank 0's view).

    eval_batches() makes a fresh pass over validation (x, y) batches, this rank's share;
    sample(model) returns a few generations to print, to watch the model learn.
    """
    out_dir = Path(out_dir)
    device = dist.device
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

    if cfg.seq_len > model.cfg.seq_len:
        raise ChatforgeError(f"seq_len {cfg.seq_len} is longer than the model's context {model.cfg.seq_len}")
    lora_run = has_lora(model)
    if cfg.lora_rank and not lora_run:
        raise ChatforgeError(
            f"lora_rank is set, but {stage} trains every weight; LoRA is for `chatforge sft`"
        )
    optimizers = build_optimizers(model, cfg)  # sees only trainable parameters (the adapters, with LoRA)
    start_step = 0
    resumed_time, resumed_tokens = 0.0, 0
    latest = ckpt.latest_checkpoint(out_dir) if resume else None
    if resume and latest is None and dist.is_main:
        print(f"no checkpoint in {out_dir}: starting from scratch")
    if latest is not None:
        if ckpt.read_config(latest).get("model") != model.cfg.to_dict():
            raise ChatforgeError(f"cannot resume: {latest} was trained with a different model config")
        adapter_ckpt = (latest / ADAPTER_CONFIG).is_file()
        if lora_run != adapter_ckpt:
            have = "a LoRA adapter" if adapter_ckpt else "full weights"
            raise ChatforgeError(
                f"cannot resume: {latest} holds {have}, but this run {'uses' if lora_run else 'has no'} LoRA; "
                "resume with the lora_rank it was started with, or use a new --out"
            )
        if lora_run:  # the frozen base came from the base run; the checkpoint has the adapter
            load_adapter(model, latest)
        else:
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
        # broadcast_buffers=False: the only buffers are the RoPE tables, identical on every rank; broadcasting
        # them at each forward would deadlock evaluation when ranks get different numbers of eval batches
        train_model = DDP(
            train_model,
            device_ids=[dist.local_rank] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64, device=device)
    meta = {"stage": stage, "train": dataclasses.asdict(cfg), **meta}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_params = model.num_params() - (n_trainable if lora_run else 0)  # the model's own size, adapters apart
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak, peak_desc = peak_flops(device)
    metrics = MetricsLog(
        out_dir / "metrics.jsonl", resume_step=start_step if latest else None, enabled=dist.is_main
    )
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"model: {n_params / 1e6:.2f}M params"
            + (f" ({n_trainable / 1e6:.3f}M trainable LoRA)" if lora_run else "")
            + f", {flops_per_token / 1e6:.1f} MFLOPs/token | "
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

    first: tuple[float, float] | None = None  # (val loss, val bpb) at the first and last evaluation
    last_eval: tuple[float, float] | None = None
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
        if eval_batches is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last):
            val_loss, val_bpb = bits_per_byte(
                train_model, eval_batches(), token_bytes, device, all_reduce=True
            )
            if first is None:
                first = (val_loss, val_bpb)
            last_eval = (val_loss, val_bpb)
            metrics.log(step=step, val_loss=round(val_loss, 6), val_bpb=round(val_bpb, 6))
            if dist.is_main:
                bar.write(f"step {step:5d} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}")
        sample_now = (cfg.sample_every and step % cfg.sample_every == 0 and step > 0) or last
        if sample is not None and dist.is_main and sample_now:
            try:
                for text in sample(model):
                    bar.write(f"  sample: {text!r}")
            except (
                ChatforgeError
            ) as e:  # e.g. a sample prompt that does not fit the context: training goes on
                bar.write(f"  (no sample: {e})")
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

        if (cfg.log_every and step % cfg.log_every == 0) or step == cfg.max_steps:
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
    if dist.is_main:
        evals = [r for r in read_metrics(out_dir / "metrics.jsonl") if "val_loss" in r]
        if evals:  # the run's first and last evaluation, across resumed sessions
            first = (evals[0]["val_loss"], evals[0]["val_bpb"])
            last_eval = (evals[-1]["val_loss"], evals[-1]["val_bpb"])
    summary = {
        "params": n_params,
        "trainable_params": n_trainable,
        "steps": cfg.max_steps,
        "tokens": tokens_seen,
        "train_seconds": round(train_time, 2),
        "tokens_per_second": round(tokens_seen / train_time, 1) if train_time else None,
        # None (JSON null) when evaluation is off
        "val_loss_start": first[0] if first else None,
        "val_loss_end": last_eval[0] if last_eval else None,
        "val_bpb_start": first[1] if first else None,
        "val_bpb_end": last_eval[1] if last_eval else None,
    }
    if dist.is_main:
        final_meta = {**meta, "step": cfg.max_steps, "summary": summary}
        if lora_run:
            save_adapter(model, out_dir, final_meta)  # the adapter apart, to share or merge elsewhere
            merge_lora(model)  # and a plain model beside it, which chat, eval and serving load as is
        ckpt.save_model(out_dir, model, tokenizer.to_json(), final_meta)
        title = f"{stage}: {n_params / 1e6:.2f}M params" + (
            f", {n_trainable / 1e6:.3f}M trainable (LoRA rank {cfg.lora_rank})" if lora_run else ""
        )
        png = plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png", title)
        summary["loss_plot"] = str(png)
        atomic_write_json(out_dir / f"{stage}_summary.json", summary)
    return summary
