"""The one model class: a Llama-compatible decoder-only transformer.

Every stage (pretrain, SFT, reward model, DPO, RL, serving, imported SmolLM2
weights) uses this file. Module names follow Hugging Face's LlamaForCausalLM
(`layers.N.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...) so a
state dict maps to HF weights by adding a `model.` prefix, with no converter.

Shape of a forward pass, for a batch of token ids idx (B, T):
    embed_tokens -> [RMSNorm -> attention (RoPE, GQA, SDPA) -> +residual
                     RMSNorm -> SwiGLU MLP -> +residual] x n_layer
    -> RMSNorm -> lm_head -> logits (B, T, vocab)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chatforge.errors import ChatforgeError


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    seq_len: int = 256  # the longest context the model is trained / asked to handle
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 4  # < n_head gives grouped-query attention
    intermediate_size: int = 0  # SwiGLU hidden width; 0 = about 8/3 * n_embd, rounded up to 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (stabilises training)
    tie_embeddings: bool = True  # lm_head shares the embedding matrix

    def __post_init__(self) -> None:
        self._check_fields()
        if self.intermediate_size <= 0:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        elif (self.n_embd // self.n_head) % 2:
            problems.append(f"head dim {self.n_embd // self.n_head} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if problems:
            raise ChatforgeError("bad model config: " + "; ".join(problems))

    def _check_fields(self) -> None:
        """Each field's type (that of its default) and range, so a hand-edited config.json gets one line
        naming the field instead of a traceback from deep inside torch."""
        for f in fields(self):
            v, kind = getattr(self, f.name), type(f.default)
            if kind is float:  # an int is a fine float (JSON writes 10000.0 as 10000 sometimes)
                ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                want = "a positive number"
            elif kind is int:
                low = 0 if f.name == "intermediate_size" else 1  # intermediate_size 0: automatic
                ok, want = isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}"
            else:
                ok, want = isinstance(v, bool), "true or false"
            if not ok:
                raise ChatforgeError(f"bad model config: {f.name} must be {want}, got {v!r:.40}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(
        cls, depth: int, vocab_size: int, seq_len: int, overrides: dict | None = None, **kw
    ) -> GPTConfig:
        """The one dial, as in nanochat: width = 64 * depth, heads of 64 dims (128 from depth 16 up).

        Every knob stays overridable: from_depth(4, ..., n_embd=384) keeps depth 4 but widens it.
        """
        if depth < 1:
            raise ChatforgeError(f"depth must be >= 1, got {depth}")
        overrides = {**(overrides or {}), **kw}
        settable = {f.name for f in fields(cls)} - {"vocab_size", "seq_len"}  # those two come from data
        unknown = sorted(set(overrides) - settable)
        if unknown:
            raise ChatforgeError(
                f"unknown model setting(s) {unknown}; model.* can set: {', '.join(sorted(settable))}"
            )
        n_embd = overrides.pop("n_embd", 64 * depth)
        head_dim = 128 if n_embd >= 1024 else 64
        n_head = overrides.pop("n_head", max(1, n_embd // head_dim))
        n_kv_head = overrides.pop("n_kv_head", n_head)
        return cls(
            vocab_size=vocab_size,
            seq_len=seq_len,
            n_layer=overrides.pop("n_layer", depth),
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=n_kv_head,
            **overrides,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        if not isinstance(d, dict):
            raise ChatforgeError(f"bad model config: expected an object of model settings, got {d!r:.40}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ChatforgeError(
                f"unknown model config keys {sorted(unknown)}; is this a chatforge config.json?"
            )
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(cfg: GPTConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each (length, head_dim), in HF Llama's half-split layout.

    HF rotates with rotate_half(x) = (-x2, x1); the minus is folded into the first half of sin here, so
    apply_rope is a roll and two multiplies (no slicing, negation or concatenation each call)."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    )
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(device), torch.cat([-sin, sin], dim=-1).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin from rope_tables: (T, D) or (B, 1, T, D). Rotates pairs (i, i + D/2):
    x * cos + rotate_half(x) * sin, where roll gives (x2, x1) and the signed sin supplies the minus."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class LayerKV:
    """One layer's slice of a KVCache: keys and values (B, KV, max_len, D) and how many positions are
    filled. What Attention reads and writes, so a layer's code never indexes by its layer number
    (the whole model then compiles as one graph: quant.compile_decode)."""

    __slots__ = ("k", "v", "pos")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        self.k, self.v, self.pos = k, v, pos


class KVCache:
    """Pre-allocated keys/values for every layer; generation writes in place, never concatenates.
    k and v are (n_layer, B, KV, max_len, D) tensors, or lists of one (B, KV, max_len, D) tensor per
    layer (the engine's pool, which grows a layer at a time)."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k: torch.Tensor | list[torch.Tensor] = torch.zeros(shape, device=device, dtype=dtype)
        self.v: torch.Tensor | list[torch.Tensor] = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # how many positions are filled
        self.max_len = max_len

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], self.pos)

    def reset(self) -> None:
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def heads(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, n_embd) -> q (B, H, T, D), k and v (B, KV, T, D), RoPE applied to q and k.
        A method of its own so the decode layout (quant.FusedAttention) can replace it with one matmul."""
        B, T, _ = x.shape
        cfg = self.cfg
        H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q, k, v = self.heads(x, cos, sin)
        if kv is not None:
            # write this step's keys/values into the cache, attend over everything so far
            start = kv.pos
            kv.k[:, :, start : start + T] = k
            kv.v[:, :, start : start + T] = v
            if attn_mask is not None and attn_mask.size(-1) == kv.k.size(2):  # a mask over the whole cache
                k, v = kv.k, kv.v
            else:
                k, v = kv.k[:, :, : start + T], kv.v[:, :, : start + T]
        gqa = KV != H
        if attn_mask is None:
            # a fresh sequence, or one new token that may see the whole cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

        # set by GPT.set_activation_checkpointing: keep only the block's input for backward, recompute the rest
        self.checkpoint_activations = False

    def forward(self, x, cos, sin, kv: LayerKV | None, attn_mask):
        if self.checkpoint_activations and kv is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, None, attn_mask, use_reentrant=False)
        return self._forward(x, cos, sin, kv, attn_mask)

    def _forward(self, x, cos, sin, kv: LayerKV | None, attn_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE tables are derived, not learned: non-persistent buffers, rebuilt if a longer context is asked
        cos, sin = rope_tables(cfg, cfg.seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # set by quant.compile_decode: forward compiled, which the engine calls for one-token steps
        self.decode_step: Callable | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute each block's activations during backward instead of keeping them: activation memory
        drops from every layer's to one layer's plus the residual stream, for about a third more compute."""
        for block in self.layers:
            block.checkpoint_activations = on

    # ---- sizes -------------------------------------------------------------------------
    def lengthen_context(self, seq_len: int) -> None:
        """Take a context of `seq_len` (> cfg.seq_len) for finetuning at it. NTK-aware RoPE scaling:
        the base grows by s^(d/(d-2)) (s the length ratio, d the head size), so the slowest rotations
        stretch over the new length while the fast ones, which order nearby tokens, barely move; a
        short finetune then suffices (bloc97's "NTK-aware scaled RoPE", 2023; Code Llama raised the base too)."""
        ratio, d = seq_len / self.cfg.seq_len, self.cfg.head_dim
        theta = self.cfg.rope_theta * ratio ** (d / (d - 2))
        self.cfg = replace(self.cfg, seq_len=seq_len, rope_theta=theta)
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, seq_len, self.rope_cos.device)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied matrix is counted once
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM / nanochat estimate:
        6 x (parameters touched by matmuls) + 12 x layers x heads x head_dim x context (attention)."""
        cfg = self.cfg
        t = seq_len or cfg.seq_len
        matmul_params = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()  # the tied head still does a matmul
        return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * t

    # ---- forward -----------------------------------------------------------------------
    def _rope(self, start: int, length: int, positions: torch.Tensor | None):
        # per-row positions count from each row's own first cache column, so they stay below
        # start + length: no need to read them (a host sync, and a graph break when compiled)
        need = start + length
        if need > self.rope_cos.size(0):
            # a longer context than configured: grow the tables (RoPE extrapolates poorly; the caller warns)
            with torch.inference_mode(False):  # grown while generating, the tables must serve training too
                cos, sin = rope_tables(self.cfg, max(need, 2 * self.rope_cos.size(0)), self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin
        if positions is not None:  # per-row positions (B, T), e.g. left-padded batches
            return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        return self.rope_cos[start : start + length], self.rope_sin[start : start + length]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        last_only: bool = False,
        return_hidden: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V), or the loss if targets (B, T) are given (-1 = ignored).

        With a cache, idx holds the next T tokens after cache.pos; they are written to the cache and
        cache.pos advances. positions (B, T): each row's RoPE positions where rows start at different
        cache columns (left padding); they count from the row's first column, so stay below
        cache.pos + T. attn_mask (bool, True = may attend, broadcastable to (B, 1, T, keys)) is needed only when new tokens must not see some cached ones (padding, or T > 1 after a prefix).
        last_only=True returns logits (B, 1, V) for the last position only: a prefill needs no others,
        and the vocabulary projection is the largest matmul of a short sequence.
        return_hidden=True returns the final normalised hidden states (B, T, n_embd) instead of
        logits: what a reward model's scalar head reads.
        inputs_embeds (B, T, n_embd) replaces embed_tokens(idx) (idx may then be None): gradient attacks
        differentiate through one-hot rows of the embedding matrix.
        """
        B, T = (idx if inputs_embeds is None else inputs_embeds).shape[:2]
        start = cache.pos if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ChatforgeError(f"context overflow: {start + T} tokens > cache size {cache.max_len}")
        cos, sin = self._rope(start, T, positions)
        if T > 1 and cache is not None and start > 0 and attn_mask is None:  # T first: no guard on start when compiled
            # new tokens see all cached ones and are causal among themselves (bottom-right alignment)
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=cos.device).tril(diagonal=start)
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache.layer(i) if cache is not None else None, attn_mask)
        if cache is not None:
            cache.pos += T
        if return_hidden:
            return self.norm(x)
        if targets is None:
            return self.lm_head(self.norm(x[:, -1:] if last_only else x))
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
