"""Dry-run planning: what a training config will cost, without building the model.

Used by `chatforge presets` and `--dry-run`, so GPU presets can be checked on a laptop.
Shapes and FLOPs are exact (they come from a meta-device model); memory is an estimate.
"""

from __future__ import annotations

import torch

from chatforge.config import PRESETS, TrainConfig, get_preset
from chatforge.device import GPU_PEAK_FLOPS
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import PresetsOptions


def plan(cfg: TrainConfig, vocab_size: int, world_size: int = 1) -> dict:
    mcfg = GPTConfig.from_depth(cfg.depth, vocab_size=vocab_size, seq_len=cfg.seq_len, overrides=cfg.model)
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(mcfg)
    n = model.num_params()
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embed" not in name)
    # fp32 weights + fp32 grads + optimizer state: AdamW keeps 2 moments, Muon 1 (for the hidden matrices)
    opt_floats = 2 * n if cfg.optimizer == "adamw" else 2 * (n - matrices) + matrices
    state_bytes = 4 * (2 * n + opt_floats)
    # activations kept for backward per token per layer, roughly (8 x width + 4 x MLP width) values,
    # 2 bytes each in bf16 (attention by SDPA/flash keeps no T x T matrix); plus fp32 logits and grads
    act_bytes = (
        cfg.device_batch_size
        * cfg.seq_len
        * (mcfg.n_layer * (8 * mcfg.n_embd + 4 * mcfg.intermediate_size) * 2 + 2 * 4 * vocab_size)
    )
    tokens_per_step = cfg.total_batch_tokens or cfg.device_batch_size * cfg.seq_len * world_size
    flops_per_token = model.flops_per_token(cfg.seq_len)
    total_flops = flops_per_token * tokens_per_step * cfg.max_steps
    return {
        "config": mcfg.to_dict(),
        "params": n,
        "flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step,
        "total_tokens": tokens_per_step * cfg.max_steps,
        "total_flops": total_flops,
        "memory_gib_per_device": (state_bytes + act_bytes) / 2**30,
        "hours_on_h100_at_40pct_mfu": total_flops / (0.4 * GPU_PEAK_FLOPS["H100"]) / 3600,
    }


def describe_plan(cfg: TrainConfig, vocab_size: int, world_size: int = 1) -> str:
    p = plan(cfg, vocab_size, world_size)
    c = p["config"]
    return "\n".join(
        [
            f"model: {c['n_layer']} layers x {c['n_embd']} wide, {c['n_head']} heads ({c['n_kv_head']} kv) of "
            f"{c['n_embd'] // c['n_head']}, MLP {c['intermediate_size']}, vocab {c['vocab_size']}, context {c['seq_len']}",
            f"params: {p['params'] / 1e6:.2f}M | {p['flops_per_token'] / 1e6:.1f} MFLOPs per token (fwd+bwd)",
            f"batch: {p['tokens_per_step']:,} tokens/step x {cfg.max_steps:,} steps = {p['total_tokens'] / 1e6:,.1f}M tokens"
            f" ({p['total_tokens'] / p['params']:.1f} tokens/param), {p['total_flops']:.2e} FLOPs",
            f"memory (estimate): {p['memory_gib_per_device']:.2f} GiB per device at batch {cfg.device_batch_size}; "
            f"{p['hours_on_h100_at_40pct_mfu']:.2f} h on one H100 at 40% MFU",
        ]
    )


def cmd_presets(opts: PresetsOptions) -> None:
    if opts.name:
        get_preset(opts.name)  # an unknown name is an error, not an empty listing
    for name, preset in PRESETS.items():
        if opts.name and name != opts.name:
            continue
        print(f"== {name}: {preset.description}")
        print(describe_plan(preset.pretrain, vocab_size=preset.vocab_size))
        print()
