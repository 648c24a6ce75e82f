"""GCG adversarial suffixes (Zou et al. 2023, "Universal and Transferable Adversarial Attacks").

A suffix of `suffix_len` tokens is appended to the user's message, rendered with the one chat format
(`render_prompt`), and the assistant's answer is forced to start with a target string ("Sure, here
is"). Each step:
1. the gradient of the target's cross-entropy with respect to one-hot rows of the embedding matrix at
   the suffix positions (one forward + backward from embeddings, `GPT.forward(inputs_embeds=...)`);
2. for each position, the `top_k` tokens whose swap most lowers that linearised loss;
3. `batch` candidates, each the current suffix with one random position swapped for one of its
   top-k tokens, scored exactly in one batched forward (the prompt before the suffix is a shared
   KV-cache prefix, so only the suffix, the turn's end and the target are run per candidate);
4. the best candidate becomes the suffix.
Special tokens, tokens that are not printable ASCII and suffixes that do not come back the same
through decode -> encode are never candidates: the text a user would paste must give these tokens.

`universal_gcg` sums the loss over several goals, adding the next goal once the suffix works on the
ones so far (the paper's incremental schedule). `suffix_success` re-renders goal + suffix text and
decodes greedily with the engine: success means the answer starts with the target. Run it with
another model to measure transfer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.engine import generate
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, KVCache
from chatforge.model.quant import QuantizedLinear
from chatforge.tokenizer import Tokenizer

INIT_TOKEN = " !"  # the paper starts from "! ! ! ...": a neutral, single-token filler


@dataclass
class SuffixSlot:
    """One goal rendered around the suffix: ids = before + suffix + after + target."""

    goal: str
    target_text: str
    before: list[int]  # the chat up to the end of the user's goal text
    after: list[int]  # the end of the user's turn and the assistant's header
    target: list[int]


@dataclass
class GCGResult:
    suffix_ids: list[int]
    suffix_text: str
    loss_curve: list[float]  # the loss of the suffix kept, before step 1 then after each step
    success_step: int | None  # the step after which greedy decoding gave every target (None: never)
    iterations: int
    seconds: float
    goals_used: int = 1  # universal: how many goals the incremental schedule had reached
    history: list[dict] = field(default_factory=list)


def _messages(goal: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": goal}]


def suffix_slot(tok: Tokenizer, goal: str, target: str, system: str | None = None) -> SuffixSlot:
    """Split the rendered prompt at the end of the user's text. The turn's end is what two prompts
    differing only in their last character share at their end; the template must not glue it to the text."""
    if not isinstance(goal, str) or not goal.strip():
        raise ChatforgeError("a GCG goal must be a non-empty string")
    if not isinstance(target, str) or not target.strip():
        raise ChatforgeError("a GCG target must be a non-empty string, e.g. 'Sure, here is'")
    a, b = (
        render_prompt(tok, _messages(goal + " a", system)),
        render_prompt(tok, _messages(goal + " b", system)),
    )
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    full = render_prompt(tok, _messages(goal, system))
    tail = a[len(a) - n :]
    if n == 0 or full[len(full) - n :] != tail:
        raise ChatforgeError(
            "this chat template joins the user's text to the turn's end; GCG cannot place a suffix"
        )
    return SuffixSlot(goal, target, full[: len(full) - n], tail, tok.encode(target))


def embedding_matrix(model: nn.Module) -> torch.Tensor:
    """The fp32 token-embedding matrix (V, d), through which the one-hot gradient flows."""
    emb = getattr(model, "embed_tokens", None)
    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    if (
        not isinstance(model, GPT)
        or not isinstance(emb, nn.Embedding)
        or quantized
        or emb.weight.dtype not in (torch.float32, torch.float64)
    ):
        raise ChatforgeError(
            "GCG needs the model's fp32 embedding matrix and differentiable layers (not int8, int4 or bf16): "
            "load it in fp32 (load_run(path), no --quantize)"
        )
    return emb.weight


def allowed_tokens(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(V,) bool: ids a suffix may use. Not special, printable ASCII, and the same id after decode -> encode."""
    ids = [i for i in range(min(tok.vocab_size, vocab_size)) if i not in tok.special_ids]
    texts = [tok.decode([i]) for i in ids]
    back = tok.encode_batch(texts)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i, text, again in zip(ids, texts, back, strict=True):
        if text and text.isascii() and text.isprintable() and again == [i]:
            mask[i] = True
    if not mask.any():
        raise ChatforgeError("no token of this vocabulary can go in a suffix (none is printable ASCII)")
    return mask


def one_hot_gradient(
    model: GPT, slots: Sequence[SuffixSlot], suffix: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """d(summed target loss)/d(one-hot suffix) (L, V) and that loss, one forward + backward per slot."""
    weight = embedding_matrix(model)
    device = weight.device
    one_hot = F.one_hot(suffix.to(device), weight.size(0)).to(weight.dtype).requires_grad_()
    suffix_embeds = one_hot @ weight
    table = weight.detach()
    losses = []
    for slot in slots:
        head = table[torch.tensor(slot.before, device=device)]
        rest = table[torch.tensor(slot.after + slot.target, device=device)]
        embeds = torch.cat([head, suffix_embeds, rest]).unsqueeze(0)
        hidden = model(None, inputs_embeds=embeds, return_hidden=True)[0]
        n, t = embeds.size(1), len(slot.target)
        logits = model.lm_head(hidden[n - t - 1 : n - 1])
        losses.append(F.cross_entropy(logits, torch.tensor(slot.target, device=device)))
    total = torch.stack(losses).sum()
    (grad,) = torch.autograd.grad(total, one_hot)
    return grad, float(total.detach())


@torch.no_grad()
def prefix_cache(model: GPT, ids: list[int]) -> KVCache:
    """Keys and values of the prompt before the suffix, computed once for every candidate."""
    cache = KVCache(model.cfg, 1, len(ids), device=embedding_matrix(model).device)
    model(torch.tensor([ids], device=cache.k.device), cache=cache, last_only=True)
    return cache


@torch.no_grad()
def candidate_losses(
    model: GPT, slot: SuffixSlot, prefix: KVCache, candidates: torch.Tensor, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate suffix's mean target cross-entropy (B,) and whether greedy decoding would write
    the target after it (every target token the argmax), in batches of `chunk` over the shared prefix."""
    device = prefix.k.device
    tail = torch.tensor(slot.after + slot.target, device=device)
    target = torch.tensor(slot.target, device=device)
    losses, hits = [], []
    for part in candidates.to(device).split(chunk):
        b, p = part.size(0), prefix.pos
        rows = torch.cat([part, tail.expand(b, -1)], dim=1)
        n, t = rows.size(1), target.numel()
        cache = KVCache(model.cfg, b, p + n, device=device, dtype=prefix.k.dtype)
        cache.k[:, :, :, :p] = prefix.k[:, :1, :, :p]
        cache.v[:, :, :, :p] = prefix.v[:, :1, :, :p]
        cache.pos = p
        hidden = model(rows, cache=cache, return_hidden=True)
        logits = model.lm_head(hidden[:, n - t - 1 : n - 1]).float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), target.expand(b, -1), reduction="none").mean(1))
        hits.append((logits.argmax(-1) == target).all(1))
    return torch.cat(losses), torch.cat(hits)


def sample_candidates(
    suffix: torch.Tensor,
    grad: torch.Tensor,
    allowed: torch.Tensor,
    top_k: int,
    batch: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """`batch` copies of the suffix, each with one random position swapped for one of the `top_k`
    allowed tokens with the most negative gradient there."""
    scores = grad.detach().float().cpu().clone()
    scores[:, ~allowed] = float("inf")
    top = (-scores).topk(min(top_k, int(allowed.sum())), dim=1).indices  # (L, k)
    pos = torch.randint(0, suffix.numel(), (batch,), generator=gen)
    pick = torch.randint(0, top.size(1), (batch,), generator=gen)
    out = suffix.cpu().repeat(batch, 1)
    out[torch.arange(batch), pos] = top[pos, pick]
    return out


def keep_round_trips(tok: Tokenizer, candidates: torch.Tensor, goals: Sequence[str]) -> torch.Tensor:
    """The candidates whose text, after each goal, encodes back to the goal's ids + exactly these ids."""
    rows = candidates.tolist()
    texts = [tok.decode(r) for r in rows]
    ok = [tok.encode(t) == r for t, r in zip(texts, rows, strict=True)]
    for goal in goals:
        head = tok.encode(goal)
        again = tok.encode_batch([goal + t for t in texts])
        ok = [o and a == head + r for o, a, r in zip(ok, again, rows, strict=True)]
    return candidates[torch.tensor(ok, dtype=torch.bool)]


def initial_suffix(tok: Tokenizer, allowed: torch.Tensor, suffix_len: int) -> torch.Tensor:
    ids = tok.encode(INIT_TOKEN)
    first = ids[0] if len(ids) == 1 and allowed[ids[0]] else int(allowed.nonzero()[0])
    return torch.full((suffix_len,), first, dtype=torch.long)


def _check_settings(suffix_len: int, steps: int, top_k: int, batch: int) -> None:
    for name, value in (("suffix_len", suffix_len), ("steps", steps), ("top_k", top_k), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ChatforgeError(f"GCG {name} must be an integer >= 1, got {value!r}")


def universal_gcg(
    model: GPT,
    tok: Tokenizer,
    goals: Sequence[str],
    targets: str | Sequence[str],
    *,
    suffix_len: int = 20,
    steps: int = 100,
    top_k: int = 256,
    batch: int = 128,
    seed: int = 0,
    system: str | None = None,
    incremental: bool = True,
    chunk: int = 64,
    time_budget_s: float | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> GCGResult:
    """One suffix for every goal: loss summed over the goals in play. With `incremental`, start with
    the first goal and add the next once greedy decoding gives every target in play; success is all
    goals at once. `targets`: one string for all goals, or one per goal."""
    _check_settings(suffix_len, steps, top_k, batch)
    if not goals:
        raise ChatforgeError("GCG needs at least one goal")
    targets = [targets] * len(goals) if isinstance(targets, str) else list(targets)
    if len(targets) != len(goals):
        raise ChatforgeError(
            f"{len(goals)} goals but {len(targets)} targets: give one target, or one per goal"
        )
    weight = embedding_matrix(model)
    was_training = model.training
    model.eval()
    slots = [suffix_slot(tok, g, t, system) for g, t in zip(goals, targets, strict=True)]
    prefixes = [prefix_cache(model, s.before) for s in slots]
    allowed = allowed_tokens(tok, weight.size(0))
    gen = torch.Generator().manual_seed(seed)
    suffix = initial_suffix(tok, allowed, suffix_len)
    active = 1 if incremental else len(slots)
    start = time.perf_counter()
    curve, history, success_step, step = [], [], None, 0
    try:
        losses, hits = _score(model, slots[:active], prefixes[:active], suffix[None], chunk)
        curve.append(float(losses[0]))
        for step in range(1, steps + 1):
            grad, _ = one_hot_gradient(model, slots[:active], suffix)
            grad = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            candidates = sample_candidates(suffix, grad, allowed, top_k, batch, gen)
            candidates = keep_round_trips(tok, candidates, [s.goal for s in slots[:active]])
            if len(candidates) == 0:  # every swap re-tokenised differently: keep the suffix, sample again
                candidates = suffix[None]
            losses, hits = _score(model, slots[:active], prefixes[:active], candidates, chunk)
            best = int(losses.argmin())
            suffix = candidates[best].clone()
            curve.append(float(losses[best]))
            row = {"step": step, "loss": curve[-1], "goals": active, "hit": bool(hits[best]),
                   "seconds": time.perf_counter() - start}  # fmt: skip
            history.append(row)
            if on_step:
                on_step(row)
            if hits[best] and active == len(slots):
                success_step = step
                break
            if hits[best]:  # works on the goals so far: the next goal joins the summed loss
                active += 1
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                break
    finally:
        model.train(was_training)
    ids = suffix.tolist()
    return GCGResult(
        ids, tok.decode(ids), curve, success_step, step, time.perf_counter() - start, active, history
    )


def _score(
    model: GPT, slots: Sequence[SuffixSlot], prefixes: Sequence[KVCache], candidates: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss over the slots and whether every slot's target is hit, per candidate."""
    total, all_hit = None, None
    for slot, prefix in zip(slots, prefixes, strict=True):
        losses, hits = candidate_losses(model, slot, prefix, candidates, chunk)
        total = losses if total is None else total + losses
        all_hit = hits if all_hit is None else all_hit & hits
    return total.cpu(), all_hit.cpu()


def gcg_attack(
    model: GPT,
    tok: Tokenizer,
    goal: str,
    target: str,
    *,
    suffix_len: int = 20,
    steps: int = 100,
    top_k: int = 256,
    batch: int = 128,
    seed: int = 0,
    system: str | None = None,
    chunk: int = 64,
    time_budget_s: float | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> GCGResult:
    """A suffix that makes greedy decoding of `goal` + suffix start with `target`; stops at success."""
    return universal_gcg(
        model, tok, [goal], target, suffix_len=suffix_len, steps=steps, top_k=top_k, batch=batch, seed=seed,
        system=system, chunk=chunk, time_budget_s=time_budget_s, on_step=on_step,
    )  # fmt: skip


def suffix_success(
    model: GPT,
    tok: Tokenizer,
    goals: Sequence[str],
    targets: str | Sequence[str],
    suffix_text: str,
    *,
    system: str | None = None,
    extra_tokens: int = 8,
) -> list[tuple[str, bool]]:
    """(greedy answer, starts with the target) for each goal with the suffix appended to its text,
    rendered and decoded by the same code chat uses. On another model this measures transfer."""
    targets = [targets] * len(goals) if isinstance(targets, str) else list(targets)
    stop = turn_end_ids(tok)
    out = []
    for goal, target in zip(goals, targets, strict=True):
        prompt = render_prompt(tok, _messages(goal + suffix_text, system))
        budget = min(len(tok.encode(target)) + extra_tokens, model.cfg.seq_len - len(prompt))
        if budget < 1:
            raise ChatforgeError(
                f"the prompt ({len(prompt)} tokens) fills the model's context; shorten the goal"
            )
        with torch.no_grad():
            ids = [i for i in generate(model, prompt, budget, stop_ids=stop) if i not in stop]
        answer = tok.decode(ids)
        out.append((answer, answer.startswith(target)))
    return out
