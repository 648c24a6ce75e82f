"""Dry-run planning: what a training config will cost, without building the model.

Used by `chatforge presets` and `--dry-run`, so GPU presets can be checked on a laptop.
Shapes and FLOPs are exact (they come from a meta-device model); memory is an estimate, and a
GPU preset's estimate must fit the GPU it names (with room for the CUDA context and fragmentation).
"""

from __future__ import annotations

import torch

from chatforge.config import PRESETS, TrainConfig, get_preset
from chatforge.device import GPU_MEMORY_GIB, GPU_PEAK_FLOPS
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import PresetsOptions

USABLE_FRACTION = 0.9  # of a GPU's memory a plan may fill: the rest is CUDA context, NCCL and fragmentation


def memory_bytes(cfg: TrainConfig, model: GPT, world_size: int) -> dict[str, float]:
    """Bytes per device, estimated: weights + gradients + optimizer states (fp32; divided over the ranks
    under FSDP, plus two blocks gathered whole at a time), and the activations kept for backward."""
    mcfg, n = model.cfg, model.num_params()
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embed" not in name)
    # fp32 weights + fp32 grads + optimizer state: AdamW keeps 2 moments, Muon 1 (for the hidden matrices)
    opt_floats = 2 * n if cfg.optimizer == "adamw" else 2 * (n - matrices) + matrices
    state = 4 * (2 * n + opt_floats)
    if cfg.parallel == "fsdp" and world_size > 1:
        block = sum(p.numel() for p in model.layers[0].parameters())
        state = state / world_size + 2 * 4 * 2 * block  # two blocks' weights + grads unsharded
    # activations kept for backward per token per layer, roughly (8 x width + 4 x MLP width) values,
    # 2 bytes each in bf16 (attention by SDPA/flash keeps no T x T matrix); with activation checkpointing
    # only each block's fp32 input is kept, and one block's activations while it is recomputed
    per_layer = (8 * mcfg.n_embd + 4 * mcfg.intermediate_size) * 2
    layers = (
        mcfg.n_layer * 4 * mcfg.n_embd + per_layer if cfg.activation_checkpointing else mcfg.n_layer * per_layer
    )
    logits = 2 * 4 * mcfg.vocab_size  # fp32 log-softmax kept for backward, and its gradient
    activations = cfg.device_batch_size * cfg.seq_len * (layers + logits)
    return {"state": state, "activations": activations, "total": state + activations}


def plan(cfg: TrainConfig, vocab_size: int, world_size: int = 1) -> dict:
    mcfg = GPTConfig.from_depth(cfg.depth, vocab_size=vocab_size, seq_len=cfg.seq_len, overrides=cfg.model)
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(mcfg)
    rows_per_micro = cfg.device_batch_size * cfg.seq_len * world_size
    tokens_per_step = cfg.total_batch_tokens or rows_per_micro
    if tokens_per_step % rows_per_micro:
        raise ChatforgeError(
            f"total_batch_tokens {tokens_per_step} is not a multiple of device_batch_size x seq_len x "
            f"{world_size} GPUs = {rows_per_micro}"
        )
    flops_per_token = model.flops_per_token(cfg.seq_len)
    total_flops = flops_per_token * tokens_per_step * cfg.max_steps
    memory = memory_bytes(cfg, model, world_size)
    return {
        "config": mcfg.to_dict(),
        "params": model.num_params(),
        "flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step,
        "grad_accum": tokens_per_step // rows_per_micro,
        "total_tokens": tokens_per_step * cfg.max_steps,
        "total_flops": total_flops,
        "memory_gib_per_device": memory["total"] / 2**30,
        "memory_gib_state": memory["state"] / 2**30,
        "memory_gib_activations": memory["activations"] / 2**30,
        "hours_on_h100_at_40pct_mfu": total_flops / (0.4 * GPU_PEAK_FLOPS["H100"]) / 3600,
    }


def fits(p: dict, gpu: str) -> bool:
    """Whether a plan's memory estimate fits the named GPU, leaving it room to work."""
    return p["memory_gib_per_device"] <= USABLE_FRACTION * GPU_MEMORY_GIB[gpu]


def describe_plan(cfg: TrainConfig, vocab_size: int, world_size: int = 1, gpu: str = "") -> str:
    p = plan(cfg, vocab_size, world_size)
    c = p["config"]
    ways = [
        f"{p['grad_accum']} accumulated" if p["grad_accum"] > 1 else "",
        "activation checkpointing" if cfg.activation_checkpointing else "",
        f"FSDP2 over {world_size}" if cfg.parallel == "fsdp" and world_size > 1 else "",
    ]
    memory = (
        f"memory (estimate): {p['memory_gib_per_device']:.2f} GiB per device at batch {cfg.device_batch_size}"
        f" ({p['memory_gib_state']:.1f} weights/grads/optimizer + {p['memory_gib_activations']:.1f} activations"
        + "".join(f", {w}" for w in ways if w)
        + ")"
    )
    if gpu:
        budget = USABLE_FRACTION * GPU_MEMORY_GIB[gpu]
        memory += f"; {'fits' if fits(p, gpu) else 'DOES NOT FIT'} {world_size} x {gpu} ({budget:.0f} GiB usable)"
    return "\n".join(
        [
            f"model: {c['n_layer']} layers x {c['n_embd']} wide, {c['n_head']} heads ({c['n_kv_head']} kv) of "
            f"{c['n_embd'] // c['n_head']}, MLP {c['intermediate_size']}, vocab {c['vocab_size']}, context {c['seq_len']}",
            f"params: {p['params'] / 1e6:.2f}M | {p['flops_per_token'] / 1e6:.1f} MFLOPs per token (fwd+bwd)",
            f"batch: {p['tokens_per_step']:,} tokens/step x {cfg.max_steps:,} steps = {p['total_tokens'] / 1e6:,.1f}M tokens"
            f" ({p['total_tokens'] / p['params']:.1f} tokens/param), {p['total_flops']:.2e} FLOPs",
            memory,
            f"time: {p['hours_on_h100_at_40pct_mfu']:.2f} h on one H100 at 40% MFU",
        ]
    )


def cmd_presets(opts: PresetsOptions) -> None:
    if opts.name:
        get_preset(opts.name)  # an unknown name is an error, not an empty listing
    for name, preset in PRESETS.items():
        if opts.name and name != opts.name:
            continue
        print(f"== {name}: {preset.description}")
        print(describe_plan(preset.pretrain, preset.vocab_size, world_size=preset.gpus, gpu=preset.gpu))
        print()
