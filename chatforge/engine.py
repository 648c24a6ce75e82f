"""The one generation engine: batched KV-cache decoding with temperature, top-k and top-p sampling.

Chat, evaluation, RL and the server all generate through here. How a batch runs:

    prompts of different lengths --left-pad--> one (B, L) tensor
    one prefill forward (per-row RoPE positions, a mask hiding the padding)
    then one forward of length 1 per step for the rows still running

The KV cache is allocated once per call (never concatenated per token). Padding goes on the
left so every row's next token sits in the same column; RoPE positions start at 0 on each
row's first real token, so a row computes what it would compute alone. When a row finishes
(a stop id or its token budget), it is dropped from the batch and from the cache, so the
remaining rows do not pay for it.

Reproducibility: each row samples with its own `torch.Generator` (seed s + row index, or a
seed per row), so a batch produces the same tokens as running its prompts one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, KVCache


# ---- sampling ------------------------------------------------------------------------------
def _filtered_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """(B, V) logits scaled by 1/temperature, with tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the ones ranked above it already reach top_p (always keep the first)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy. Every row draws from `generator`."""
    return _sample_rows(logits, temperature, top_k, top_p, [generator] * logits.size(0))


def _sample_rows(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next ids (B,) for a batch: filtering in one call; a multinomial per row only when rows have
    their own generators (one draw per row from its own stream is what makes batching reproducible)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = _filtered_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    if all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat(
        [torch.multinomial(probs[j : j + 1], 1, generator=g).view(1) for j, g in enumerate(generators)]
    )


# ---- checks --------------------------------------------------------------------------------
def token_budgets(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[int]:
    """How many new tokens each prompt may get: min(max_new_tokens, context - prompt length).

    This is the clamping generate_batch / stream_batch apply; call it first to learn whether a
    row was cut short by the context (a row that returns budget tokens without a stop id was).
    Raises ChatforgeError for malformed prompts and for a prompt that leaves no room at all."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ChatforgeError("prompts must be a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ChatforgeError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    ctx, vocab = model.cfg.seq_len, model.cfg.vocab_size
    budgets = []
    for i, p in enumerate(prompts):
        if isinstance(p, int | str) or not isinstance(p, Sequence | torch.Tensor):
            raise ChatforgeError(f"prompt {i} is not a list of token ids; pass a list of lists")
        if len(p) == 0:
            raise ChatforgeError(f"prompt {i} is empty: give at least one token (e.g. the BOS id)")
        if len(p) >= ctx:
            raise ChatforgeError(
                f"prompt {i} has {len(p)} tokens but the model's context is {ctx}, leaving no room "
                "to generate; shorten the prompt"
            )
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab:
            raise ChatforgeError(
                f"prompt {i} holds token id {lo if lo < 0 else hi}, outside the model's vocabulary of "
                f"{vocab}; was it encoded with this model's tokenizer?"
            )
        budgets.append(min(max_new_tokens, ctx - len(p)))
    return budgets


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ChatforgeError for a negative temperature, top_k < 1 or top_p outside (0, 1]."""
    if temperature < 0:
        raise ChatforgeError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ChatforgeError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ChatforgeError(f"top_p must be in (0, 1] (or None), got {top_p}")


def _generators(seeds: int | Sequence[int] | None, n: int, device) -> list[torch.Generator | None]:
    if seeds is None:
        return [None] * n
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(n)]
    elif len(seeds) != n:
        raise ChatforgeError(f"got {len(seeds)} seeds for {n} prompts; give one per prompt or a single int")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


# ---- generation ----------------------------------------------------------------------------
@torch.inference_mode()  # like no_grad, and also skips autograd's version counters on every tensor
def stream_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seeds: int | Sequence[int] | None = None,
    stop_ids: Iterable[int | None] = (),
) -> Iterator[tuple[int, int]]:
    """Generate for several prompts in one batch, yielding `(row, token_id)` events as they come.

    Each step yields one event per still-running row, in row order. A row ends after a stop id
    (which is yielded) or after its budget: min(max_new_tokens, context - its prompt length), see
    `token_budgets` (a prompt that fills the whole context raises ChatforgeError). temperature 0
    is greedy; `seeds` gives row i the generator seed seeds + i (an int) or seeds[i] (a list), so
    the tokens do not depend on what else is in the batch. Without seeds, the global RNG is used.
    """
    budgets = token_budgets(model, prompts, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gens = _generators(seeds, len(prompts), device)
    stops = {int(s) for s in stop_ids if s is not None}
    steps = max(budgets)
    if steps == 0:
        return

    B, L = len(prompts), max(len(p) for p in prompts)
    pad = [L - len(p) for p in prompts]
    idx = torch.tensor(
        [[0] * n + [int(t) for t in p] for n, p in zip(pad, prompts, strict=True)], device=device
    )
    # the last sampled token is never fed back, so the cache needs L + steps - 1 columns
    cache = KVCache(model.cfg, B, L + steps - 1, device=device, dtype=dtype)
    pad_t = torch.tensor(pad, device=device)
    padded = any(pad)
    if padded:
        cols = torch.arange(cache.max_len, device=device)
        key_ok = cols[None, :] >= pad_t[:, None]  # (B, cache len): real prompt tokens and all new ones
        positions = (cols[None, :L] - pad_t[:, None]).clamp(min=0)  # 0 at each row's first real token
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        # a padding query sees only itself: SDPA kernels disagree on an all-hidden row (zeros, garbage,
        # or NaN, which would leak through the padding's keys/values since 0 weight x NaN is NaN)
        eye = torch.eye(L, dtype=torch.bool, device=device)
        mask = causal[None] & (key_ok[:, None, :L] | eye[None])
        logits = model(idx, cache=cache, positions=positions, attn_mask=mask[:, None], last_only=True)[:, -1]
    else:
        logits = model(idx, cache=cache, last_only=True)[:, -1]

    rows = list(range(B))  # original prompt index of each live batch row
    for step in range(steps):
        tokens = _sample_rows(logits, temperature, top_k, top_p, [gens[r] for r in rows])
        keep = []
        for j, (r, t) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            yield r, t
            if t not in stops and step + 1 < budgets[r]:
                keep.append(j)
        if not keep:
            return
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            sel = torch.tensor(keep, device=device)
            cache.k, cache.v = cache.k.index_select(1, sel), cache.v.index_select(1, sel)
            tokens, pad_t, rows = tokens[sel], pad_t[sel], [rows[j] for j in keep]
            if padded:
                key_ok = key_ok[sel]
                padded = bool(pad_t.any())
        pos = cache.pos
        if padded:
            logits = model(
                tokens.view(-1, 1),
                cache=cache,
                positions=(pos - pad_t).view(-1, 1),
                attn_mask=key_ok[:, None, None, : pos + 1],
            )[:, -1]
        else:
            logits = model(tokens.view(-1, 1), cache=cache)[:, -1]


def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seeds: int | Sequence[int] | None = None,
    stop_ids: Iterable[int | None] = (),
) -> list[list[int]]:
    """The new ids for each prompt (stop id included when hit); `stream_batch` without streaming.

    Each row is clamped to min(max_new_tokens, context - prompt length) new tokens (`token_budgets`
    tells the clamp in advance); a prompt that fills the whole context raises ChatforgeError."""
    out: list[list[int]] = [[] for _ in prompts]
    for row, tid in stream_batch(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seeds=seeds,
        stop_ids=stop_ids,
    ):
        out[row].append(tid)
    return out


def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Stream new token ids for one prompt; stops after a stop id (which is yielded) or max_new_tokens.

    Stricter than generate_batch: prompt + max_new_tokens over the context raises ChatforgeError
    rather than clamping, so a single caller never gets a silently shorter answer."""
    if not prompt_ids:
        raise ChatforgeError("empty prompt: give at least one token")
    if len(prompt_ids) + max_new_tokens > model.cfg.seq_len:
        raise ChatforgeError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {model.cfg.seq_len} tokens; shorten the prompt or lower max_new_tokens"
        )
    for _, tid in stream_batch(
        model,
        [prompt_ids],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seeds=seed,
        stop_ids=stop_ids,
    ):
        yield tid


# ---- text streaming ------------------------------------------------------------------------
class IncrementalDecoder:
    """Turns a growing list of token ids into printable text deltas.

    It decodes the whole list each time and returns only the new suffix, holding it back while
    the text ends in U+FFFD (a multi-byte character split across tokens), so a character is
    printed once, whole. `flush()` returns whatever is still held back at the end."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def flush(self) -> str:
        text = self.decode(self.ids)
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta

    @property
    def text(self) -> str:
        return self.decode(self.ids)
