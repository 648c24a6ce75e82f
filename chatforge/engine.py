"""The one generation engine: batched KV-cache decoding with temperature, top-k and top-p sampling.

Chat, evaluation, RL and the server all generate through here. The core is `BatchDecoder`: rows of
one KV cache that advance together, one forward per step. `stream_batch` (and `generate_batch` /
`generate` on it) admits all its prompts at once and steps until every row has finished; the
server's scheduler (serve/scheduler.py) admits requests as they arrive and frees the rows of
finished or cancelled ones. How a batch runs:

    prompts of different lengths --left-pad--> one (B, L) tensor
    one prefill forward (per-row RoPE positions, a mask hiding the padding, last position's logits)
    then one forward of length 1 per step for the rows still running

The KV cache is allocated by need, in chunks of columns, never concatenated per token (see
`BatchDecoder`: it grows with the rows, shrinks when they leave, within a token budget the server
sets). Padding goes on the left so every row's next token sits in the same column; RoPE positions
start at 0 on each row's first real token, so a row computes what it would compute alone. When a row finishes (a stop id or its token
budget), it leaves the batch and the cache, so the remaining rows do not pay for it.

Reproducibility: each row samples with its own `torch.Generator` (seed s + row index, or a
seed per row), so a batch produces the same tokens as running its prompts one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, KVCache
from chatforge.model.quant import _release_freed_memory as release_freed_memory


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


# ---- the batch decoder -----------------------------------------------------------------------
class TokenConstraint(Protocol):
    """A row's rule for which tokens may come next (a grammar, e.g. structured output's JSON schema):
    asked for the allowed ids before each of the row's samples, told each token the row took."""

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: True where the next token may be that id; never all False."""
        ...

    def advance(self, token: int) -> None:
        """The row took `token` (sampled or forced)."""
        ...


@dataclass(eq=False, kw_only=True)  # compared by identity: each is one live sequence
class Row:
    """One sequence for a BatchDecoder: its prompt, how many new tokens it may take, how it samples."""

    prompt: Sequence[int]
    budget: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None  # None: the global RNG
    stop_ids: frozenset[int] = frozenset()
    banned_ids: frozenset[int] = frozenset()  # never sampled (tool_choice "none": the tool-call token)
    forced_ids: Sequence[int] = ()  # the first new tokens, whatever the model prefers (a forced tool call)
    constraint: TokenConstraint | None = None  # the allowed next tokens, step by step (structured output)
    generated: int = 0  # new tokens so far, counted by the decoder


def _constrained(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Each row's banned ids, and the ids its constraint does not allow now, set to -inf (a copy;
    the logits as they are when no row bans or constrains any)."""
    banned = [(j, sorted(r.banned_ids)) for j, r in enumerate(rows) if r.banned_ids]
    ruled = [(j, r.constraint) for j, r in enumerate(rows) if r.constraint is not None]
    if banned or ruled:
        logits = logits.clone()
        for j, ids in banned:
            logits[j, ids] = float("-inf")
        for j, rule in ruled:
            allowed = rule.allowed(logits.size(-1)).to(logits.device)
            logits[j].masked_fill_(~allowed, float("-inf"))
    return logits


def _forced(tokens: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """The sampled ids with each row's next forced id put in place while it has forced ids left."""
    forced = [(j, r.forced_ids[r.generated]) for j, r in enumerate(rows) if r.generated < len(r.forced_ids)]
    if forced:
        tokens = tokens.clone()
        tokens[torch.tensor([j for j, _ in forced], device=tokens.device)] = torch.tensor(
            [int(t) for _, t in forced], device=tokens.device
        )
    return tokens


def _sample_each(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Next ids (B,) for rows with their own settings: one `_sample_rows` call per distinct setting."""
    groups: dict[tuple, list[int]] = {}
    for j, r in enumerate(rows):
        key = (r.temperature, r.top_k, r.top_p) if r.temperature > 0 else (0.0, None, None)
        groups.setdefault(key, []).append(j)
    if len(groups) == 1:
        return _sample_rows(logits, *next(iter(groups)), [r.generator for r in rows])
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    for key, js in groups.items():
        sel = torch.tensor(js, device=logits.device)
        out[sel] = _sample_rows(logits[sel], *key, [rows[j].generator for j in js])
    return out


COLUMN_CHUNK = 256  # the cache grows by this many columns at a time (fewer copies, little slack)


def kv_bytes_per_token(model: GPT) -> int:
    """Bytes one token's keys and values take in the cache, all layers together."""
    cfg, param = model.cfg, next(model.parameters())
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * param.element_size()


def reservation(row: Row) -> int:
    """The most cache columns a row can ever hold: its prompt and every sampled token but the last
    (which is never fed back)."""
    return len(row.prompt) + max(row.budget, 1) - 1


class BatchDecoder:
    """Rows of one KV cache that advance together: `admit` prefills new rows, `step` gives every
    live row its next token with one forward, `remove` frees rows. A row also leaves by itself when
    it samples one of its stop ids or reaches its budget.

    Layout: live rows are packed in rows 0..B-1 of the pool in admission order; each forward runs
    on a view of those rows (`self.cache`, the one object the model is handed). All rows write their
    next key/value into the same column `col`, so row r's tokens occupy columns [start_r, col): left
    padding, generalised to rows that join at different times. Attention does not care where a key
    sits, only about its RoPE position (each row passes its own, 0 at its first token) and the mask
    (a row sees columns >= start_r), so a row computes what it would compute alone.

    Memory by need: the pool (a tensor per layer for keys and one for values) starts empty and holds
    only the rows live now x the columns they span (rounded up to COLUMN_CHUNK, at most `max_len`).
    When a joining prompt is longer than `col`, or the columns run out, the pool is reallocated to
    fit, a layer at a time (live rows copied, the oldest moved to column 0) or, when its size is
    right, the rows move within it. It is freed when the last row leaves and
    shrunk when most rows have left. `max_tokens` caps its size (rows x columns): rows share columns,
    so B rows whose longest `reservation` is R need B x R; `fits` says whether joining rows keep every
    possible future within the cap, and `admit` refuses rows that do not (the server's scheduler
    keeps them waiting instead). A row never holds more than `max_len` tokens."""

    def __init__(self, model: GPT, capacity: int, max_len: int, max_tokens: int | None = None) -> None:
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.capacity, self.max_len = capacity, max_len
        self.max_tokens = capacity * max_len if max_tokens is None else max_tokens
        cfg = model.cfg
        self.n_layer, self.kv_heads, self.head_dim = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        self.k: list[torch.Tensor] = []  # per layer: (rows, kv heads, columns, head dim)
        self.v: list[torch.Tensor] = []
        self.pool_rows = self.pool_cols = 0
        self.cache = KVCache(cfg, 0, 0, device=self.device)  # handed to the model: k, v set to views
        self._allocate(0, 0)
        self.rows: list[Row] = []
        self.start: list[int] = []  # each live row's first column
        self.col = 0  # the column every row writes next
        self.next_token = torch.zeros(0, dtype=torch.long, device=param.device)  # each row's, fed next step
        self.shifts = 0  # times the rows' columns moved (a long prompt joined, or the columns ran out)
        self.reallocations = 0  # times the pool was allocated anew (grown, shrunk or compacted)
        self._rows_changed()

    def _rows_changed(self) -> None:
        """Recompute what the live rows' starts imply: their padding mask, and whether any is padded."""
        self.step_view = False  # self.cache no longer views the live rows
        self.padded = any(self.start)
        self.start_t = torch.tensor(self.start, dtype=torch.long, device=self.device)
        self.cols = torch.arange(self.pool_cols, device=self.device)
        self.key_ok = self.cols[None, :] >= self.start_t[:, None]  # (B, columns): a row's own columns

    def _view(self, rows: slice, first_col: int, pos: int) -> KVCache:
        """The cache for a forward: `rows` of the pool from column `first_col` on, filled up to `pos`."""
        c = self.cache
        c.k = [t[rows, :, first_col:] for t in self.k]
        c.v = [t[rows, :, first_col:] for t in self.v]
        c.max_len, c.pos = self.pool_cols - first_col, pos
        return c

    # ---- memory ---------------------------------------------------------------------------
    @property
    def allocated_tokens(self) -> int:
        """Token slots the pool holds now (rows x columns)."""
        return self.pool_rows * self.pool_cols

    @property
    def used_tokens(self) -> int:
        """Tokens the live rows hold in the cache (padding not counted)."""
        return sum(self.col - s for s in self.start)

    @property
    def reserved_tokens(self) -> int:
        """What the live rows may come to need: rows x the longest reservation."""
        return len(self.rows) * max((reservation(r) for r in self.rows), default=0)

    def fits(self, rows: Sequence[Row]) -> bool:
        """Whether these rows can join now without the pool ever outgrowing `max_tokens` or the rows."""
        together = [*self.rows, *rows]
        longest = max(reservation(r) for r in together)
        return len(together) <= self.capacity and longest <= self.max_len and (
            len(together) * longest <= self.max_tokens
        )

    def _columns_for(self, need: int, rows: int) -> int:
        """Columns to allocate for `need`: rounded up to a chunk, within max_len and the token cap."""
        rounded = -(-need // COLUMN_CHUNK) * COLUMN_CHUNK
        return max(need, min(rounded, self.max_len, self.max_tokens // max(rows, 1)))

    def _allocate(
        self, rows: int, cols: int, move: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    ) -> None:
        """A pool of `rows` x `cols`, a layer at a time: each new layer (zeros: padding stays finite)
        gets `move(old, new)` and the old one is freed before the next is made."""
        self.cache.k = self.cache.v = None  # drop the views, which would keep the old layers alive
        for layers in (self.k, self.v):
            for i in range(self.n_layer):
                shape = (rows, self.kv_heads, cols, self.head_dim)
                new = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if move is not None:
                    move(layers[i], new)
                if i < len(layers):
                    layers[i] = new
                else:
                    layers.append(new)
        self.pool_rows, self.pool_cols = rows, cols

    def _reallocate(self, rows: int, cols: int, new_col: int) -> None:
        """A pool of `rows` x `cols` holding the live rows' columns, moved so `col` becomes `new_col`."""
        B, lo, c = len(self.rows), min(self.start, default=self.col), self.col
        d = new_col - c

        def move(old: torch.Tensor, new: torch.Tensor) -> None:
            if B and c > lo:
                new[:B, :, lo + d : c + d] = old[:B, :, lo:c]

        self._allocate(rows, cols, move)
        self.reallocations += 1
        self._moved(d)

    def _make_room(self, rows: int, left: int) -> None:
        """Ensure `rows` rows, at least `left` columns before the write column and one free at it.
        Reallocate when the pool is too small; else move the rows within it when they must move."""
        lo = min(self.start, default=self.col)
        new_col = max(self.col - lo, left)  # the live rows compacted to column 0, or moved right
        need = new_col + 1
        if rows > self.pool_rows or need > self.pool_cols:
            self._reallocate(rows, self._columns_for(need, rows), new_col)
        elif self.col < left or self.col >= self.pool_cols:
            self._shift(new_col - self.col)

    def _shrink_if_sparse(self) -> None:
        """After rows left: free the pool when none is live, shrink it when half its rows are free."""
        B = len(self.rows)
        if B == 0 and self.allocated_tokens:
            self.col = 0
            self._reallocate(0, 0, 0)
        elif 0 < B <= self.pool_rows // 2:
            span = self.col - min(self.start)
            self._reallocate(B, self._columns_for(span + 1, B), span)
        else:
            return
        release_freed_memory()  # a layer is a few MB: glibc would keep the freed pages otherwise

    def admit(self, rows: list[Row]) -> list[tuple[Row, int, bool]]:
        """Prefill the rows' prompts in one forward (left-padded to the longest; only the last position
        is projected onto the vocabulary) into columns ending at `col`, and sample each one's first
        token. Returns (row, token, finished) per row; a finished row has already left."""
        B, n, L = len(self.rows), len(rows), max(len(r.prompt) for r in rows)
        if not self.fits(rows):
            raise ChatforgeError(
                f"{n} prompts of up to {L} tokens do not fit the decoder's free rows and cache "
                f"({B} of {self.capacity} rows live, {self.max_tokens} token slots)"
            )
        if B == 0:
            self.col = 0
        self._make_room(B + n, L)  # L columns left of the write column for the prompts
        pad = [L - len(r.prompt) for r in rows]
        idx = torch.tensor(
            [[0] * k + [int(t) for t in r.prompt] for k, r in zip(pad, rows, strict=True)], device=self.device
        )
        cache, self.step_view = self._view(slice(B, B + n), self.col - L, 0), False
        if any(pad):
            pad_t = torch.tensor(pad, device=self.device)
            cols = torch.arange(L, device=self.device)
            key_ok = cols[None, :] >= pad_t[:, None]  # (n, L): real prompt tokens
            positions = (cols[None, :] - pad_t[:, None]).clamp(min=0)  # 0 at each row's first real token
            causal = torch.ones(L, L, dtype=torch.bool, device=self.device).tril()
            # a padding query sees only itself: SDPA kernels disagree on an all-hidden row (zeros, garbage,
            # or NaN, which would leak through the padding's keys/values since 0 weight x NaN is NaN)
            eye = torch.eye(L, dtype=torch.bool, device=self.device)
            mask = causal[None] & (key_ok[:, None, :] | eye[None])
            logits = self.model(idx, cache=cache, positions=positions, attn_mask=mask[:, None], last_only=True)
        else:
            logits = self.model(idx, cache=cache, last_only=True)
        self.rows += rows
        self.start += [self.col - L + k for k in pad]
        self._rows_changed()
        return self._sample(logits[:, -1], B)

    def step(self) -> list[tuple[Row, int, bool]]:
        """One forward for every live row (each feeds its last token) and one new token per row.
        Returns (row, token, finished) per row in batch order; finished rows have already left."""
        B = len(self.rows)
        if self.col >= self.pool_cols:  # out of columns: grow the pool, or move the rows left
            self._make_room(B, 0)
        if self.step_view:  # the live rows are as at the last step: only the write column moved
            cache, cache.pos = self.cache, self.col
        else:
            cache, self.step_view = self._view(slice(0, B), 0, self.col), True
        tokens = self.next_token.view(B, 1)
        compiled = getattr(self.model, "decode_step", None)  # quant.compile_decode's forward
        forward = compiled or self.model
        if self.padded or compiled:
            positions = (self.col - self.start_t).view(B, 1)
            if compiled:  # a mask over the whole pool: the step's shapes change only with the pool's, one graph
                mask = (self.key_ok & (self.cols <= self.col))[:, None, None, :]
            else:
                mask = self.key_ok[:, None, None, : self.col + 1]
            logits = forward(tokens, cache=cache, positions=positions, attn_mask=mask)
        else:
            logits = forward(tokens, cache=cache)
        self.col += 1
        return self._sample(logits[:, -1], 0)

    def _sample(self, logits: torch.Tensor, first: int) -> list[tuple[Row, int, bool]]:
        """Sample rows first.. (one per logits row), count them, and remove the finished ones."""
        rows = self.rows[first:]
        tokens = _forced(_sample_each(_constrained(logits, rows), rows), rows)
        self.next_token = torch.cat([self.next_token[:first], tokens]) if first else tokens
        events = []
        for row, t in zip(rows, tokens.tolist(), strict=True):
            row.generated += 1
            if row.constraint is not None:
                row.constraint.advance(t)
            events.append((row, t, t in row.stop_ids or row.generated >= row.budget))
        finished = [row for row, _, done in events if done]
        if finished:
            self.remove(finished)
        return events

    def remove(self, rows: Iterable[Row]) -> None:
        """Free these rows. The rows after the first freed one move up, so the live rows stay packed
        in admission order (which also keeps the global RNG's draws in row order)."""
        gone = {id(r) for r in rows}
        keep = [j for j, r in enumerate(self.rows) if id(r) not in gone]
        first = next((j for j, k in enumerate(keep) if j != k), len(keep))  # rows before it stay put
        if first < len(keep):
            sel = torch.tensor(keep[first:], device=self.device)
            n = len(keep)
            for t in (*self.k, *self.v):
                t[first:n, :, : self.col] = t[:, :, : self.col].index_select(0, sel)
        self.next_token = self.next_token[torch.tensor(keep, dtype=torch.long, device=self.device)]
        self.rows = [self.rows[j] for j in keep]
        self.start = [self.start[j] for j in keep]
        self._rows_changed()
        self._shrink_if_sparse()

    def _shift(self, d: int) -> None:
        """Move every live row's columns by d (right if d > 0, left if d < 0)."""
        B, c = len(self.rows), self.col
        for t in (*self.k, *self.v):
            if d > 0:
                t[:B, :, d : c + d] = t[:B, :, :c].clone()
            else:
                t[:B, :, : c + d] = t[:B, :, -d:c].clone()
        self._moved(d)

    def _moved(self, d: int) -> None:
        """The live rows' columns moved by d: update their starts and the write column."""
        self.start = [s + d for s in self.start]
        self.col += d
        self.shifts += d != 0 and bool(self.rows)  # an empty decoder only picks its write column
        self._rows_changed()


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
    finished: set[int] | None = None,
) -> Iterator[tuple[int, int]]:
    """Generate for several prompts in one batch, yielding `(row, token_id)` events as they come.

    Each step yields one event per still-running row, in row order. A row ends after a stop id
    (which is yielded) or after its budget: min(max_new_tokens, context - its prompt length), see
    `token_budgets` (a prompt that fills the whole context raises ChatforgeError). temperature 0
    is greedy; `seeds` gives row i the generator seed seeds + i (an int) or seeds[i] (a list), so
    the tokens do not depend on what else is in the batch. Without seeds, the global RNG is used.
    A row whose index the caller adds to `finished` (a stop the caller sees in the decoded text,
    not in the ids) leaves before the next step, so it costs no more forwards.
    """
    budgets = token_budgets(model, prompts, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    gens = _generators(seeds, len(prompts), next(model.parameters()).device)
    stops = frozenset(int(s) for s in stop_ids if s is not None)
    if max(budgets) == 0:
        return
    rows = [
        Row(prompt=p, budget=b, temperature=temperature, top_k=top_k, top_p=top_p, generator=g, stop_ids=stops)
        for p, b, g in zip(prompts, budgets, gens, strict=True)
    ]
    index = {id(r): i for i, r in enumerate(rows)}
    # the last sampled token is never fed back, so the cache needs L + budget - 1 columns
    decoder = BatchDecoder(model, len(rows), max(len(p) for p in prompts) + max(budgets) - 1)
    events = decoder.admit(rows)
    while True:
        for row, token, _ in events:
            yield index[id(row)], token
        if finished:
            decoder.remove([r for r in decoder.rows if index[id(r)] in finished])
        if not decoder.rows:
            return
        events = decoder.step()


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
