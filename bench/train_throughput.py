"""Training throughput of a preset's model: tokens/s, MFU and peak memory, printed as JSON.

    python bench/train_throughput.py --preset cpu               # chatforge's model
    python bench/train_throughput.py --preset cpu --naive       # + the same shape written the obvious way
    python bench/train_throughput.py --preset d12 --device cuda # on a GPU (bf16 autocast)

The "naive" model is a plain PyTorch Llama-shaped GPT (hand-written attention with an explicit
T x T mask and softmax, hand-written RMSNorm and RoPE): what one writes first. Both train on
random tokens with the preset's batch and AdamW, so only the model code differs.
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
from chatforge.device import autocast, peak_flops, pick_device  # noqa: E402
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


def measure(model, cfg_train, device, steps: int, warmup: int, flops_per_token: float, peak: float) -> dict:
    opts = build_optimizers(model, cfg_train)
    B, T = cfg_train.device_batch_size, cfg_train.seq_len
    V = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (B, T + 1), generator=gen) for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)].to(device)
        t0 = time.perf_counter()
        with autocast(device):
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    tok_s = B * T / median
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, MiB
    return {
        "tokens_per_second": round(tok_s, 1),
        "step_ms_median": round(1000 * median, 2),
        "mfu": round(flops_per_token * tok_s / peak, 4) if peak else None,
        "peak_memory_mib": round(mem, 1),
        "final_loss": round(float(loss.detach()), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="pretrain config override")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile chatforge's model")
    ap.add_argument("--naive", action="store_true", help="also measure the naive model of the same shape")
    ap.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (default: detected)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = get_preset(args.preset)
    cfg = apply_overrides(preset.pretrain, args.overrides)
    vocab = args.vocab_size or preset.vocab_size
    device = pick_device(args.device)
    peak, peak_desc = (args.peak_flops, "given") if args.peak_flops else peak_flops(device)
    torch.manual_seed(0)
    mcfg = GPTConfig.from_depth(cfg.depth, vocab_size=vocab, seq_len=cfg.seq_len, overrides=cfg.model)
    model = GPT(mcfg).to(device)
    fpt = model.flops_per_token(cfg.seq_len)
    result = {
        "preset": args.preset,
        "device": str(device),
        "peak_flops": peak,
        "peak_flops_source": peak_desc,
        "threads": torch.get_num_threads(),
        "params": model.num_params(),
        "batch": [cfg.device_batch_size, cfg.seq_len],
        "flops_per_token": fpt,
        "torch": torch.__version__,
    }
    train_model = torch.compile(model) if args.compile else model
    result["chatforge"] = measure(train_model, cfg, device, args.steps, args.warmup, fpt, peak)
    if args.naive:
        torch.manual_seed(0)
        naive = NaiveGPT(mcfg).to(device)
        result["naive"] = measure(naive, cfg, device, args.steps, args.warmup, fpt, peak)
        result["speedup_vs_naive"] = round(
            result["chatforge"]["tokens_per_second"] / result["naive"]["tokens_per_second"], 3
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
