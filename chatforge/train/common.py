"""Parts every training stage shares: devices and torchrun, optimizers, LR schedules,
peak FLOPs for MFU, metrics.jsonl and the loss-curve plot."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from chatforge.config import TrainConfig
from chatforge.errors import ChatforgeError

# ---- devices and torchrun ------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ChatforgeError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ChatforgeError("device 'mps' asked for, but MPS is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ChatforgeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


def setup_distributed(device_name: str = "auto") -> Dist:
    """Single process, or one rank of a torchrun job (env RANK/WORLD_SIZE/LOCAL_RANK set by torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(0, 1, 0, pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world_size > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 elsewhere (this CPU has no fast bf16 math)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- optimizers ----------------------------------------------------------------------------


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
    (Under DDP gradients are already averaged, so every rank computes the same update.)"""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov
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


# ---- peak FLOPs for MFU --------------------------------------------------------------------

# dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


def peak_flops(device: torch.device) -> tuple[float, str]:
    """The device's peak FLOP/s for the dtype we train in, and how it was found."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{name} (bf16 dense)"
        return 0.0, f"{name} (peak FLOPs unknown, so no MFU; bench/train_throughput.py takes --peak-flops)"
    if device.type == "cpu":
        # fp32 FMA throughput: threads x GHz x (lanes x 2 flops x 2 FMA units)
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        mhz = re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)
        ghz = float(mhz[0]) / 1000 if mhz else 2.5
        flags = info.split("flags", 1)[1].split("\n", 1)[0] if "flags" in info else ""
        per_cycle = 64 if " avx512f" in flags else 32 if " fma" in flags else 8
        threads = torch.get_num_threads()
        return (
            threads * ghz * 1e9 * per_cycle,
            f"CPU {threads} threads x {ghz:.2f} GHz x {per_cycle} fp32 flops/cycle",
        )
    return 0.0, f"{device.type} (unknown peak)"


# ---- metrics -------------------------------------------------------------------------------


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the resumed step are dropped first, and
    so are evals at it: the resumed loop evaluates that step again (a train line at it stays)."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [
                r
                for r in read_metrics(self.path)
                if r.get("step", 0) < resume_step or (r.get("step", 0) == resume_step and "loss" in r)
            ]
            tmp = self.path.with_name(f".{self.path.name}.tmp")  # atomic: a kill here keeps the old log
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def log(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return rows


def plot_losses(metrics_path: Path, png_path: Path, title: str) -> Path:
    """Train loss and validation loss / bits-per-byte against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    bpb = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        axes[0].plot(*zip(*train, strict=False), label="train loss", lw=1)
    if val:
        axes[0].plot(*zip(*val, strict=False), "o-", label="val loss")
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    axes[0].legend()
    if bpb:
        axes[1].plot(*zip(*bpb, strict=False), "o-", color="C2")
    axes[1].set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
