"""Continuous batching: concurrent requests share one forward pass per decode step.

One scheduler thread owns the model. Requests (`Job`s: a prompt, a token budget, sampling
settings) wait in a bounded queue; before each step the thread admits as many as there are free
rows, prefills each one alone, and then every active row advances by one token in ONE forward.
A row leaves the batch the moment it finishes (a stop id, its budget, or its client gone), and a
waiting job takes its place at the next step: nobody waits for the slowest answer of a batch.

The KV cache is a fixed pool of `max_batch` rows x `seq_len` columns (one `KVCache`). Active
rows are kept packed in rows 0..B-1, so each step's forward runs on a view `pool[:, :B]` and a
finished row is removed by moving the last row into its place (one row copied, nothing else).

All rows write their next key/value into the same column `col` (GPT.forward writes at
`cache.pos` for the whole batch), so each row's tokens occupy a contiguous range of columns
[start_r, col) that ends at the shared column: the left padding of engine.py, generalised to rows
that join at different times. A new prompt of P tokens is prefilled alone into a small cache of
its own (exactly what `engine.generate` does for it) and its keys/values are copied into columns
[col - P, col) of a free row. Attention does not care where a key sits, only about its RoPE
position (each row passes its own positions, 0 at its first token) and the mask (a row sees
columns >= start_r). When a prompt is longer than `col`, the pool is shifted right to make room;
when `col` reaches the end of the pool, it is shifted left so the oldest row starts at column 0.
Each row's tokens never exceed the model's context, so a pool of `seq_len` columns always fits.

Why this design rather than one cache per sequence stacked at every step: stacking copies every
row's whole cache per token; the pool copies only when a row joins, leaves, or the columns wrap.

Exactness: a row's prefill is the same computation as running its prompt alone, its decode
attends over exactly its own keys, and each row samples with its own generator through
`engine.sample_next`, so greedy (and seeded) output matches `engine.generate` for that prompt.

`max_batch=1` serves one request at a time through the same code (the load bench compares the two).
"""

from __future__ import annotations

import collections
import copy
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chatforge.engine import check_sampling, sample_next, token_budgets
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, KVCache


class QueueFull(ChatforgeError):
    """The server already holds as many waiting requests as it accepts; the client should retry."""


@dataclass
class Job:
    """One sequence to generate. Events go to `on_event(kind, value)` from the scheduler thread:
    ("token", id) per new token, then ("done", "stop" | "length" | "cancelled") or ("error", message)."""

    prompt: list[int]
    max_new_tokens: int
    on_event: Callable[[str, object], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random seed (each job still samples from its own stream)
    stop_ids: frozenset[int] = frozenset()
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the scheduler
    generator: torch.Generator | None = None
    budget: int = 0
    generated: int = 0
    submitted: float = 0.0

    def cancel(self) -> None:
        """Ask the scheduler to drop this job (its client went away, or a stop string was found)."""
        self.cancelled.set()


@dataclass
class Stats:
    """What the scheduler did, for /health and the tests (rows per forward shows batching happened)."""

    decode_forwards: int = 0
    prefills: int = 0
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    shifts: int = 0  # times the pool's columns were moved (a long prompt arrived, or the columns ran out)
    rows_per_forward: collections.Counter = field(default_factory=collections.Counter)

    @property
    def max_rows(self) -> int:
        return max(dict(self.rows_per_forward), default=0)

    def to_dict(self) -> dict:
        return {
            "decode_forwards": self.decode_forwards,
            "prefills": self.prefills,
            "tokens": self.tokens,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "shifts": self.shifts,
            "max_rows_per_forward": self.max_rows,
            "mean_rows_per_forward": round(
                sum(k * v for k, v in dict(self.rows_per_forward).items()) / max(1, self.decode_forwards), 3
            ),
        }


class Scheduler:
    """Owns the model on one thread; `submit(job)` from any thread. See the module docstring."""

    def __init__(self, model: GPT, *, max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1:
            raise ChatforgeError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ChatforgeError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        param = next(model.parameters())
        self.device = param.device
        self.pool = KVCache(model.cfg, max_batch, model.cfg.seq_len, device=param.device, dtype=param.dtype)
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []  # row r of the pool holds active[r]
        self.start = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # first column per row
        self.next_token = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # fed at next step
        self.col = 0  # the column every row writes next
        self.stats = Stats()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- public, any thread ----------------------------------------------------------------
    def start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chatforge-scheduler", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def check(self, job: Job) -> None:
        """Validate a job (prompt ids, budget, sampling) without queueing it: ChatforgeError if bad."""
        check_sampling(job.temperature, job.top_k, job.top_p)
        if job.max_new_tokens < 1:
            raise ChatforgeError(f"max_new_tokens must be >= 1, got {job.max_new_tokens}")
        token_budgets(self.model, [job.prompt], job.max_new_tokens)

    def submit(self, *jobs: Job) -> None:
        """Queue jobs (all or none). Raises QueueFull when the waiting line is full, ChatforgeError
        for a bad job. The budget is min(max_new_tokens, context - prompt length), as in the engine."""
        for job in jobs:
            self.check(job)
            job.budget = token_budgets(self.model, [job.prompt], job.max_new_tokens)[0]
            seed = job.seed if job.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            job.generator = torch.Generator(device=self.device).manual_seed(seed)
            job.submitted = time.perf_counter()
        with self._cv:
            free = self.max_batch - len(self.active)
            if len(self.waiting) + len(jobs) > self.max_queue + max(0, free):
                raise QueueFull(
                    f"the server is busy ({len(self.active)} generating, {len(self.waiting)} waiting); "
                    "retry shortly"
                )
            self.waiting.extend(jobs)
            self._cv.notify_all()

    def load(self) -> dict:
        with self._cv:
            return {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.max_batch}

    # ---- the scheduler thread --------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self.waiting and not self.active:
                        self._cv.wait()
                    if self._stop:
                        break
                    admit = []
                    while self.waiting and len(self.active) + len(admit) < self.max_batch:
                        admit.append(self.waiting.popleft())
                try:
                    for job in admit:
                        self._admit(job)
                    self._drop_cancelled()
                    if self.active:
                        self._step()
                except Exception as e:  # a failed forward (e.g. out of memory) fails its jobs, not the server
                    message = f"generation failed: {type(e).__name__}: {e}"
                    for job in [*admit, *self.active]:
                        job.on_event("error", message)
                    self.active = []
                    self.col = 0
            for job in [*self.active, *self.waiting]:  # shutting down: tell whoever is still waiting
                job.on_event("error", "the server is shutting down")

    def _emit(self, job: Job, token: int) -> bool:
        """Deliver a token; True when the job is finished (stop id, budget) and must leave."""
        job.generated += 1
        self.stats.tokens += 1
        job.on_event("token", token)
        if token in job.stop_ids or job.generated >= job.budget:
            job.on_event("done", "stop" if token in job.stop_ids else "length")
            self.stats.finished += 1
            return True
        return False

    def _sample(self, logits: torch.Tensor, jobs: list[Job]) -> list[int]:
        """One token per row. Greedy rows share one argmax; other rows draw from their own generator
        with their own settings (one row at a time, as the engine does for seeded batches)."""
        out = logits.argmax(dim=-1).tolist()
        for j, job in enumerate(jobs):
            if job.temperature > 0:
                out[j] = int(
                    sample_next(
                        logits[j : j + 1],
                        temperature=job.temperature,
                        top_k=job.top_k,
                        top_p=job.top_p,
                        generator=job.generator,
                    )[0]
                )
        return out

    def _admit(self, job: Job) -> None:
        """Prefill a prompt alone, emit its first token, and give it a row of the pool."""
        if job.cancelled.is_set():
            job.on_event("done", "cancelled")
            self.stats.cancelled += 1
            return
        P = len(job.prompt)
        own = KVCache(self.model.cfg, 1, P, device=self.device, dtype=self.pool.k.dtype)
        idx = torch.tensor([job.prompt], device=self.device)
        logits = self.model(idx, cache=own)[:, -1]
        self.stats.prefills += 1
        token = self._sample(logits, [job])[0]
        if self._emit(job, token):
            return
        if not self.active:  # an empty pool: the prompt simply takes columns [0, P)
            self.col = P
        elif self.col < P:  # not enough columns left of the write column: shift every row right
            self._shift(P - self.col)
        r = len(self.active)
        self.pool.k[:, r, :, self.col - P : self.col] = own.k[:, 0]
        self.pool.v[:, r, :, self.col - P : self.col] = own.v[:, 0]
        self.start[r] = self.col - P
        self.next_token[r] = token
        self.active.append(job)

    def _shift(self, d: int) -> None:
        """Move every active row's columns by d (right if d > 0, left if d < 0)."""
        B, c = len(self.active), self.col
        for t in (self.pool.k, self.pool.v):
            if d > 0:
                t[:, :B, :, d : c + d] = t[:, :B, :, :c].clone()
            else:
                t[:, :B, :, : c + d] = t[:, :B, :, -d:c].clone()
        self.start[:B] += d
        self.col = c + d
        self.stats.shifts += 1

    def _remove(self, r: int) -> None:
        """Free row r: the last active row moves into it, so rows stay packed in 0..B-1."""
        last = len(self.active) - 1
        if r != last:
            self.pool.k[:, r, :, : self.col] = self.pool.k[:, last, :, : self.col]
            self.pool.v[:, r, :, : self.col] = self.pool.v[:, last, :, : self.col]
            self.start[r] = self.start[last]
            self.next_token[r] = self.next_token[last]
            self.active[r] = self.active[last]
        self.active.pop()
        if not self.active:
            self.col = 0

    def _drop_cancelled(self) -> None:
        for r in reversed(range(len(self.active))):
            job = self.active[r]
            if job.cancelled.is_set():
                job.on_event("done", "cancelled")
                self.stats.cancelled += 1
                self._remove(r)

    def _step(self) -> None:
        """Advance every active row by one token with one forward."""
        B = len(self.active)
        if self.col >= self.pool.max_len:  # out of columns: move all rows left, oldest to column 0
            self._shift(-int(self.start[:B].min()))
        view = copy.copy(self.pool)  # the pool's first B rows: a view, so the forward writes in place
        view.k, view.v, view.pos = self.pool.k[:, :B], self.pool.v[:, :B], self.col
        start = self.start[:B]
        cols = torch.arange(self.col + 1, device=self.device)
        key_ok = cols[None, :] >= start[:, None]  # (B, col + 1): each row sees its own columns only
        positions = (self.col - start).view(B, 1)  # RoPE position of the new token on each row
        logits = self.model(
            self.next_token[:B].view(B, 1),
            cache=view,
            positions=positions,
            attn_mask=key_ok[:, None, None, :],
        )[:, -1]
        self.col += 1
        self.stats.decode_forwards += 1
        self.stats.rows_per_forward[B] += 1
        tokens = self._sample(logits, self.active)
        self.next_token[:B] = torch.tensor(tokens, device=self.device)
        done = [
            r for r, (job, tok) in enumerate(zip(self.active, tokens, strict=True)) if self._emit(job, tok)
        ]
        for r in reversed(done):
            self._remove(r)
