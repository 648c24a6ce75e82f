"""The one generation engine: KV-cache decoding with temperature, top-k and top-p sampling.

Chat, evaluation, RL and the server all generate through here. The cache is allocated
once per call (no per-token concatenation), the prompt is prefilled in one forward pass,
then each new token costs one forward pass of length 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, KVCache


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones ranked above it already reach top_p (always keep the first)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Stream new token ids for one prompt; stops after a stop id (which is yielded) or max_new_tokens."""
    if not prompt_ids:
        raise ChatforgeError("empty prompt: give at least one token")
    device = next(model.parameters()).device
    total = len(prompt_ids) + max_new_tokens
    if total > model.cfg.seq_len:
        raise ChatforgeError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {model.cfg.seq_len} tokens; shorten the prompt or lower max_new_tokens"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, 1, total, device=device, dtype=dtype)
    logits = model(torch.tensor([list(prompt_ids)], device=device), cache=cache)[:, -1]
    stops = set(stop_ids)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        tid = int(token.item())
        yield tid
        if tid in stops:
            return
        logits = model(token.view(1, 1), cache=cache)[:, -1]
