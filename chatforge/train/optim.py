"""Optimizers and the learning-rate schedule every trainer uses: AdamW, or Muon for hidden
matrices + AdamW for the rest; linear warmup, then cosine or WSD decay."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from chatforge.config import TrainConfig
from chatforge.errors import ChatforgeError


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G (push its singular values towards 1): Muon's core.
    Quintic iteration with the coefficients from Keller Jordan's Muon."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, then an orthogonalised update, for 2-D hidden weight matrices only.
    (Under DDP gradients are already averaged, so every rank computes the same update; under FSDP2
    each rank gathers the whole matrix, orthogonalises it and applies its own shard of the update.)"""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # closure: torch.distributed.checkpoint passes None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov
                if isinstance(update, DTensor):  # sharded by FSDP2: orthogonalise the whole matrix, keep our rows
                    whole = newton_schulz(update.full_tensor(), group["ns_steps"])
                    update = distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)
                else:
                    update = newton_schulz(update, group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for everything (decay on matrices only), or Muon for hidden matrices + AdamW for the rest.
    Each group remembers its base lr in 'initial_lr' for the schedule."""
    matrices, embeddings, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "embed_tokens" in name or "lm_head" in name:
            embeddings.append(p)
        elif p.ndim >= 2:
            matrices.append(p)
        else:
            vectors.append(p)
    adam_groups = [
        dict(params=embeddings, lr=cfg.embed_lr, weight_decay=0.0),
        dict(params=vectors, lr=cfg.lr, weight_decay=0.0),
    ]
    if cfg.optimizer == "adamw":
        adam_groups.append(dict(params=matrices, lr=cfg.lr, weight_decay=cfg.weight_decay))
        optimizers = [_adamw(adam_groups, cfg)]
    elif cfg.optimizer == "muon":
        optimizers = [_adamw(adam_groups, cfg), Muon(matrices, lr=cfg.muon_lr)]
    else:
        raise ChatforgeError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or muon")
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; torch's fused kernel on CUDA. Not on a CPU, though it is 5x faster there: it rounds
    differently from the loop over tensors, so CPU runs would stop reproducing earlier ones bit for bit,
    for about 1.4% of a cpu-preset step (docs/gpu.md)."""
    groups = [g for g in groups if g["params"]]
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay or WSD (stable, then linear cooldown) to final_lr_frac."""
    total = max(1, cfg.max_steps)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, progress))
        )
    if cfg.schedule == "wsd":
        # round, not int(): 10 * (1 - 0.9) is 0.999..., which int() would floor to 0
        decay_start = total - round(total * cfg.cooldown_frac)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total - decay_start)
        return 1.0 - (1 - cfg.final_lr_frac) * min(1.0, progress)
    raise ChatforgeError(f"unknown schedule {cfg.schedule!r}; choose cosine or wsd")


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
