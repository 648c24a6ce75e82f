"""Training throughput of a preset's model: tokens/s, MFU and peak memory, printed as JSON.

    python bench/train_throughput.py --preset cpu --threads 1            # chatforge, naive, nanoGPT-shaped
    python bench/train_throughput.py --preset d12 --device cuda --only chatforge   # on a GPU (bf16 autocast)

Three models of the same shape (depth, width, heads, context, batch, vocabulary) train on the same
random tokens, and the JSON gives chatforge's speed relative to each, measured in the same run:
- "naive": a plain PyTorch Llama-shaped GPT (hand-written attention with an explicit T x T mask and
  softmax, hand-written RMSNorm and RoPE), what one writes first;
- "nanogpt": karpathy/nanoGPT's model written out here (LayerNorm, GELU MLP of 4 x width, learned
  positions, one fused q/k/v matrix, SDPA, bias=False, tied head), trained as nanoGPT's train.py
  does (AdamW with decay on matrices, fused only on CUDA, clip 1.0).
chatforge trains as `chatforge pretrain` does: its optimizers (train/optim.py), its autocast, and
torch.compile when the preset (or --set compile=true) asks; --compile-time reports what compiling cost.
Steps are timed one by one after warm-up and the median is reported; rounds interleave the models so a
busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.config import apply_overrides, get_preset  # noqa: E402
from chatforge.device import autocast, cpu_has_native_bf16, peak_flops, pick_device  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.train.optim import build_optimizers  # noqa: E402


class NaiveBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.n_embd, cfg.head_dim
        self.n1 = nn.Parameter(torch.ones(d))
        self.n2 = nn.Parameter(torch.ones(d))
        self.q = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.k = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.v = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.o = nn.Linear(cfg.n_head * hd, d, bias=False)
        self.gate = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)

    @staticmethod
    def rmsnorm(x, w, eps=1e-5):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    @staticmethod
    def rope(x, cos, sin):
        half = x.size(-1) // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        c = self.cfg
        h = self.rmsnorm(x, self.n1)
        q = self.rope(self.q(h).view(B, T, c.n_head, c.head_dim).transpose(1, 2), cos, sin)
        k = self.rope(self.k(h).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2), cos, sin)
        v = self.v(h).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        rep = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c.head_dim)
        att = att.masked_fill(mask[:T, :T] == 0, float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, -1))
        h = self.rmsnorm(x, self.n2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class NaiveGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(NaiveBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.Parameter(torch.ones(cfg.n_embd))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        ang = torch.outer(torch.arange(cfg.seq_len).float(), inv)
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())
        self.register_buffer("mask", torch.tril(torch.ones(cfg.seq_len, cfg.seq_len)))

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.embed_tokens(idx)
        for b in self.blocks:
            x = b(x, self.cos[:T], self.sin[:T], self.mask)
        logits = self.lm_head(NaiveBlock.rmsnorm(x, self.norm))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


class NanoBlock(nn.Module):
    """nanoGPT's Block with bias=False: LayerNorm, causal self-attention (SDPA), GELU MLP."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)
        self.gelu = nn.GELU()

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (model.py) with bias=False and dropout 0: learned positions, tied head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.h = nn.ModuleList(NanoBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = (
                    0.02 / math.sqrt(2 * cfg.n_layer)
                    if name.endswith(("c_proj.weight", "mlp_proj.weight"))
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def nanogpt_optimizers(model: nn.Module, cfg_train) -> list[torch.optim.Optimizer]:
    """nanoGPT's configure_optimizers: weight decay on matrices, fused AdamW only on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg_train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params)
    return [torch.optim.AdamW(groups, lr=cfg_train.lr, betas=(0.9, 0.95), fused=fused or None)]


class Timed:
    """One model in training: its optimizers and batches; `run(n)` trains n steps and returns their times."""

    def __init__(self, model, cfg_train, device, optimizers=build_optimizers, precision="auto") -> None:
        self.model, self.device, self.precision = model, device, precision
        self.opts = optimizers(model, cfg_train)
        B, T = cfg_train.device_batch_size, cfg_train.seq_len
        gen = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, model.cfg.vocab_size, (B, T + 1), generator=gen) for _ in range(4)]
        self.tokens = B * T
        self.done = 0
        self.loss = torch.zeros(())

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            batch = self.batches[self.done % len(self.batches)].to(self.device)
            t0 = time.perf_counter()
            with autocast(self.device, self.precision):
                loss = self.model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            for o in self.opts:
                o.step()
            self.model.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            self.done += 1
            self.loss = loss.detach()
        return times


def summarize(
    timed: Timed, first_step: float, times: list[float], flops_per_token: float, peak: float
) -> dict:
    median = sorted(times)[len(times) // 2]
    tok_s = timed.tokens / median
    return {
        "tokens_per_second": round(tok_s, 1),
        "step_ms_median": round(1000 * median, 2),
        "first_step_s": round(first_step, 2),  # with torch.compile: the compile time
        "mfu": round(flops_per_token * tok_s / peak, 4) if peak else None,
        "final_loss": round(float(timed.loss), 4),
    }


def build(name: str, mcfg: GPTConfig, cfg, device) -> Timed:
    torch.manual_seed(0)
    if name.startswith("chatforge"):  # chatforge as configured; chatforge-bf16: with precision=bf16
        model = GPT(mcfg).to(device)
        model.set_activation_checkpointing(cfg.activation_checkpointing)
        precision = "bf16" if name == "chatforge-bf16" else cfg.precision
        return Timed(torch.compile(model) if cfg.compile else model, cfg, device, precision=precision)
    if name == "naive":
        return Timed(NaiveGPT(mcfg).to(device), cfg, device, nanogpt_optimizers)
    return Timed(NanoGPT(mcfg).to(device), cfg, device, nanogpt_optimizers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="pretrain config override")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--models",
        default="chatforge,naive,nanogpt",
        help="comma list of chatforge, chatforge-bf16, naive, nanogpt",
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each times every model in turn")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile chatforge's model (--set compile=true)"
    )
    ap.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (default: detected)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = get_preset(args.preset)
    cfg = apply_overrides(preset.pretrain, args.overrides + (["compile=true"] if args.compile else []))
    vocab = args.vocab_size or preset.vocab_size
    device = pick_device(args.device)
    peak, peak_desc = (args.peak_flops, "given") if args.peak_flops else peak_flops(device)
    mcfg = GPTConfig.from_depth(cfg.depth, vocab_size=vocab, seq_len=cfg.seq_len, overrides=cfg.model)
    fpt = GPT(mcfg).flops_per_token(cfg.seq_len)
    names = args.models.split(",")
    result = {
        "preset": args.preset, "device": str(device), "peak_flops": peak, "peak_flops_source": peak_desc,
        "threads": torch.get_num_threads(), "batch": [cfg.device_batch_size, cfg.seq_len],
        "flops_per_token": fpt, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "compile": cfg.compile, "optimizer": cfg.optimizer, "precision": cfg.precision,
        "cpu_native_bf16": cpu_has_native_bf16(),
    }  # fmt: skip
    timed = {name: build(name, mcfg, cfg, device) for name in names}
    first = {name: t.run(1)[0] for name, t in timed.items()}
    for t in timed.values():
        t.run(args.warmup)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, t in timed.items():
            times[name] += t.run(args.steps)
    for name, t in timed.items():
        result[name] = summarize(t, first[name], times[name], fpt, peak)
        result[name]["params"] = sum(p.numel() for p in t.model.parameters())
    if device.type == "cuda":
        result["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for ours in [n for n in names if n.startswith("chatforge")]:
        for other in [n for n in names if not n.startswith("chatforge")]:
            result[f"{ours}_vs_{other}"] = round(
                result[ours]["tokens_per_second"] / result[other]["tokens_per_second"], 3
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
