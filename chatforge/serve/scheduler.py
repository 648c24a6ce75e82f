"""Continuous batching: concurrent requests share one forward pass per decode step.

One scheduler thread owns the model. Requests (`Job`s: a prompt, a token budget, sampling
settings) wait in a bounded queue; before each step the thread admits as many as there are free
rows, prefilling each one alone, and then every active row advances by one token in ONE forward.
A row leaves the batch the moment it finishes (a stop id, its budget, or its client gone), and a
waiting job takes its place at the next step: nobody waits for the slowest answer of a batch.

The rows, their KV cache and their sampling are engine.BatchDecoder's, the same core that
`engine.generate` runs: one KV cache whose rows the running jobs share, allocated by need (the rows
live now x the columns they span, grown in chunks, freed when the last row leaves) under a budget
of `kv_cache_tokens` token slots. Rows cost a copy only when one leaves or the pool grows, never per
token (stacking a cache per sequence at every step would copy every row's whole cache per token).

Memory and waiting: a job reserves the columns it may come to need (prompt + its token budget),
and the rows share columns, so B rows cost B x the longest reservation. A waiting job joins only
when that stays within the budget and a row is free (`BatchDecoder.fits`), in arrival order: when
the budget is full, new requests wait in the queue; nothing runs out of memory mid-answer and no
answer is cut short. `max_model_len` caps prompt + completion per request.

Exactness: a row computes what it would compute alone (its own RoPE positions and attention mask)
and samples with its own generator, so greedy (and seeded) output matches `engine.generate` for
that prompt. `max_batch=1` serves one request at a time through the same code (the load bench
compares the two).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chatforge.engine import BatchDecoder, Row, check_sampling, token_budgets
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.serve.metrics import SchedulerMetrics


class QueueFull(ChatforgeError):
    """The server already holds as many waiting requests as it accepts; the client should retry."""


@dataclass(eq=False, kw_only=True)
class Job(Row):
    """One sequence to generate: a decoder Row plus where its events go. Events go to
    `on_event(kind, value)` from the scheduler thread: ("token", id) per new token, then
    ("done", "stop" | "length" | "cancelled") or ("error", message)."""

    max_new_tokens: int
    on_event: Callable[[str, object], None]
    seed: int | None = None  # None: a fresh random seed (each job still samples from its own stream)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by `submit`, with Row's generator: min(max_new_tokens, context - prompt length)
    budget: int = 0
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

    def __init__(
        self,
        model: GPT,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_model_len: int | None = None,
        kv_cache_tokens: int | None = None,
    ) -> None:
        """max_model_len: prompt + completion per request (default: the model's context);
        kv_cache_tokens: the KV cache's budget in token slots (default: max_batch x max_model_len)."""
        if max_batch < 1:
            raise ChatforgeError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ChatforgeError(f"max_queue must be >= 0, got {max_queue}")
        ctx = model.cfg.seq_len
        max_model_len = ctx if max_model_len is None else max_model_len
        if not 2 <= max_model_len <= ctx:
            raise ChatforgeError(f"max_model_len must be in 2..{ctx} (the model's context), got {max_model_len}")
        kv_cache_tokens = max_batch * max_model_len if kv_cache_tokens is None else kv_cache_tokens
        if kv_cache_tokens < max_model_len:
            raise ChatforgeError(
                f"a KV cache of {kv_cache_tokens} tokens cannot hold one request of max_model_len "
                f"{max_model_len}; raise the cache or lower max_model_len"
            )
        self.model, self.max_model_len = model, max_model_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self.decoder = BatchDecoder(model, max_batch, max_model_len, max_tokens=kv_cache_tokens)
        self.metrics = SchedulerMetrics()  # for /metrics: fed here, gauges read from `load`
        self.metrics.watch(self.load)
        self.waiting: collections.deque[Job] = collections.deque()
        self.stats = Stats()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> list[Job]:
        """The jobs generating now, in the decoder's row order."""
        return self.decoder.rows  # type: ignore[return-value]  # it holds only the Jobs admitted here

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

    def check(self, job: Job) -> int:
        """Validate a job (prompt ids, budget, sampling) without queueing it: ChatforgeError if bad.
        Returns its budget: min(max_new_tokens, max_model_len - prompt length), as in the engine."""
        check_sampling(job.temperature, job.top_k, job.top_p)
        if job.max_new_tokens < 1:
            raise ChatforgeError(f"max_new_tokens must be >= 1, got {job.max_new_tokens}")
        budget = token_budgets(self.model, [job.prompt], job.max_new_tokens)[0]
        if len(job.prompt) >= self.max_model_len:
            raise ChatforgeError(
                f"the prompt has {len(job.prompt)} tokens but this server's max_model_len is "
                f"{self.max_model_len}, leaving no room to generate; shorten the prompt"
            )
        return min(budget, self.max_model_len - len(job.prompt))

    def submit(self, *jobs: Job) -> None:
        """Queue jobs (all or none). Raises QueueFull when the waiting line is full, ChatforgeError
        for a bad job."""
        for job in jobs:
            job.budget = self.check(job)
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
        """What runs and waits now, and the KV cache's use in token slots."""
        with self._cv:
            d = self.decoder
            return {
                "active": len(self.active),
                "waiting": len(self.waiting),
                "max_batch": self.max_batch,
                "kv_cache": {
                    "used_tokens": d.used_tokens,  # the live rows' tokens
                    "reserved_tokens": d.reserved_tokens,  # what they may come to need
                    "allocated_tokens": d.allocated_tokens,  # what the pool holds now
                    "budget_tokens": d.max_tokens,
                },
            }

    def _next_admissions(self) -> list[Job]:
        """Waiting jobs that may join now, in arrival order (called holding the lock): as many as
        there are free rows and KV budget; cancelled ones too (they only need their end event)."""
        admit: list[Job] = []
        while self.waiting:
            head = self.waiting[0]
            joining = [job for job in admit if not job.cancelled.is_set()]
            if not head.cancelled.is_set() and not self.decoder.fits([*joining, head]):
                break  # the budget or the rows are full: it waits, and so do the ones behind it
            admit.append(self.waiting.popleft())
        return admit

    # ---- the scheduler thread --------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self.waiting and not self.active:
                        self._cv.wait()
                    if self._stop:
                        break
                    admit = self._next_admissions()
                try:
                    self._admit(admit)
                    self._drop_cancelled()
                    if self.active:
                        self._step()
                except Exception as e:  # a failed forward (e.g. out of memory) fails its jobs, not the server
                    message = f"generation failed: {type(e).__name__}: {e}"
                    admitted = {id(job) for job in admit}
                    for job in [*admit, *(j for j in self.active if id(j) not in admitted)]:
                        job.on_event("error", message)
                        self.metrics.finished("error")
                    self.decoder.remove(self.active)
            for job in [*self.active, *self.waiting]:  # shutting down: tell whoever is still waiting
                job.on_event("error", "the server is shutting down")

    def _emit(self, events: list[tuple[Job, int, bool]]) -> None:
        """Deliver each job's new token, and "done" to the ones that finished (they have left)."""
        for job, token, finished in events:
            self.stats.tokens += 1
            if job.generated == 1:
                self.metrics.first_token(time.perf_counter() - job.submitted)
            job.on_event("token", token)
            if finished:
                reason = "stop" if token in job.stop_ids else "length"
                job.on_event("done", reason)
                self.metrics.finished(reason)
                self.stats.finished += 1
        self.metrics.generated(len(events))
        self.stats.shifts = self.decoder.shifts

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill each job still wanted, alone (no padding: exactly what `engine.generate` computes
        for it), and emit its first token; it joins the batch. A job leaves `jobs` once handled, so
        after a failure `jobs` holds only those that never ran (one end event per job)."""
        while jobs:
            job = jobs[0]
            if job.cancelled.is_set():
                job.on_event("done", "cancelled")
                self.metrics.finished("cancelled")
                self.stats.cancelled += 1
            else:
                events = self.decoder.admit([job])
                self.stats.prefills += 1
                self._emit(events)
            jobs.pop(0)

    def _drop_cancelled(self) -> None:
        cancelled = [job for job in self.active if job.cancelled.is_set()]
        for job in cancelled:
            job.on_event("done", "cancelled")
            self.metrics.finished("cancelled")
            self.stats.cancelled += 1
        if cancelled:
            self.decoder.remove(cancelled)

    def _step(self) -> None:
        """Advance every active row by one token with one forward."""
        B = len(self.active)
        events = self.decoder.step()
        self.stats.decode_forwards += 1
        self.stats.rows_per_forward[B] += 1
        self._emit(events)
