"""The evaluation interface: a task is anything with a `name` and `run(ctx) -> TaskResult`.

A new task is one short file: a class with `run`, and a factory registered under a name
with `@register("name")` that builds its tasks from the user's inputs (`EvalInputs`).
`run_tasks` runs a list of them; `results_markdown` / `write_results` report them.

Shared helpers live here too, so every task generates, subsets and reads files the same way:
`generate_greedy` (the one place that calls the engine), `subset`, `autocast`.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.device import autocast  # noqa: F401 (tasks import it from here)
from chatforge.engine import generate_batch
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text
from chatforge.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass
class EvalContext:
    """What every task needs to run: the model, its tokenizer, and how much / how fast to evaluate."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    device: torch.device | str = "cpu"
    max_examples: int | None = None  # per task; None = all
    batch_size: int = 16  # rows per forward pass (MC choices, bpb rows, generation prompts)
    seed: int = 0  # picks the subset when max_examples is smaller than a task
    log: Callable[[str], None] | None = None  # progress lines (the CLI prints them to stderr)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.max_examples is not None and self.max_examples < 1:
            raise ChatforgeError(
                f"max_examples must be at least 1 (or None for all), got {self.max_examples}"
            )
        if self.batch_size < 1:
            raise ChatforgeError(f"batch_size must be at least 1, got {self.batch_size}")

    @property
    def seq_len(self) -> int:
        return self.model.cfg.seq_len


@dataclass
class TaskResult:
    task: str
    metric: str  # "accuracy", "bpb", ...
    value: float
    n: int  # examples scored
    details: list[dict] = field(default_factory=list)  # per example: prompt, gold, prediction, correct, ...
    extra: dict[str, float | int] = field(default_factory=dict)  # secondary metrics over the same n
    groups: dict[str, dict] = field(default_factory=dict)  # `metric` per group: {name: {"value", "n"}}
    seconds: float = 0.0


class Task(Protocol):
    name: str

    def run(self, ctx: EvalContext) -> TaskResult: ...


@dataclass
class EvalInputs:
    """The user's files and choices that task factories build tasks from (all optional)."""

    world_dir: Path | None = None
    qa_files: list[Path] = field(default_factory=list)  # jsonl of {question, answer, attribute, person_id}
    people_ids: list[int] | None = None  # world tasks ask about these people only
    mc_files: list[Path] = field(default_factory=list)
    gsm8k_file: Path | None = None
    bpb_files: list[Path] = field(default_factory=list)  # texts for bits per byte (default: world held-out)
    tools_file: Path | None = None  # calculator problems (eval_tools.jsonl) for the tools task
    max_new_tokens: int | None = None  # overrides each generation task's default


TaskFactory = Callable[[EvalInputs], list[Task]]
TASKS: dict[str, TaskFactory] = {}


def register(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator: make a factory available to `chatforge eval --tasks NAME`."""

    def deco(factory: TaskFactory) -> TaskFactory:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = factory
        return factory

    return deco


def build_tasks(names: Sequence[str], inputs: EvalInputs) -> list[Task]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ChatforgeError(f"unknown task(s) {unknown}; choose from {', '.join(sorted(TASKS))}")
    if not names:
        raise ChatforgeError(f"no tasks to run; choose from {', '.join(sorted(TASKS))}")
    return [task for n in names for task in TASKS[n](inputs)]


# ---- running and reporting -------------------------------------------------------------------


def run_tasks(ctx: EvalContext, tasks: Sequence[Task]) -> list[TaskResult]:
    results = []
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        for task in tasks:
            if ctx.log:
                ctx.log(f"eval: {task.name} ...")
            t0 = time.perf_counter()
            r = task.run(ctx)
            r.seconds = round(time.perf_counter() - t0, 3)
            if ctx.log:
                ctx.log(f"eval: {r.task} {r.metric} = {r.value:.4f} (n={r.n}, {r.seconds:.1f}s)")
            results.append(r)
    finally:
        ctx.model.train(was_training)
    return results


def results_markdown(results: Sequence[TaskResult]) -> str:
    """| task | metric | value | n |: each result, its secondary metrics, then its groups."""
    lines = ["| task | metric | value | n |", "|---|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r.task} | {r.metric} | {_fmt(r.value)} | {r.n} |")
        for k, v in r.extra.items():
            lines.append(f"| {r.task} | {k} | {_fmt(v)} | {r.n} |")
        for g, gv in r.groups.items():
            lines.append(f"| {r.task} / {g} | {r.metric} | {_fmt(gv['value'])} | {gv['n']} |")
    return "\n".join(lines)


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def write_results(results: Sequence[TaskResult], out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write eval.json (everything, details included) and eval.md (the table), each atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ChatforgeError(f"{out} exists and is not a folder; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    doc = {**(meta or {}), "results": [asdict(r) for r in results]}
    atomic_write_text(out / "eval.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "eval.md", "# Evaluation\n\n" + results_markdown(results) + "\n")
    return out


def accuracy_groups(groups: Sequence[str], correct: Sequence[bool]) -> dict[str, dict]:
    """{group: {"value": accuracy, "n": count}}, in first-seen order; empty when there is one group."""
    tally: dict[str, list[int]] = {}
    for g, c in zip(groups, correct, strict=True):
        t = tally.setdefault(g, [0, 0])
        t[0] += int(c)
        t[1] += 1
    if len(tally) < 2:
        return {}
    return {g: {"value": k / n, "n": n} for g, (k, n) in tally.items()}


# ---- shared helpers --------------------------------------------------------------------------


def subset(items: Sequence[T], max_examples: int | None, seed: int) -> list[T]:
    """All items, or `max_examples` of them picked by `seed` (kept in their original order)."""
    if max_examples is None or max_examples >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), max_examples))
    return [items[i] for i in keep]


def generate_greedy(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    batch_size: int = 16,
) -> list[list[int] | None]:
    """Greedy completions (stop id removed) for each prompt; None for a prompt that fills the context.

    Each prompt gets min(max_new_tokens, room left in the context). Prompts with the same budget
    are batched together (all of them when everything fits), batch_size at a time.
    """
    seq_len = model.cfg.seq_len
    stops = set(stop_ids)
    out: list[list[int] | None] = [None] * len(prompts)
    budgets = {i: min(max_new_tokens, seq_len - len(p)) for i, p in enumerate(prompts) if len(p) < seq_len}
    order = sorted(budgets, key=lambda i: (-budgets[i], len(prompts[i])))
    for budget, group in itertools.groupby(order, key=budgets.__getitem__):
        group = list(group)
        for start in range(0, len(group), batch_size):
            idx = group[start : start + batch_size]
            batch = [list(prompts[i]) for i in idx]
            completions = generate_batch(model, batch, budget, temperature=0.0, stop_ids=stop_ids)
            for i, ids in zip(idx, completions, strict=True):
                out[i] = [t for t in ids if t not in stops]
    return out


def ask_questions(ctx: EvalContext, questions: Sequence[str], max_new_tokens: int) -> list[list[int] | None]:
    """Each question asked as one user turn and answered greedily until the turn ends: the reply's
    ids, or None for a prompt that fills the context."""
    tok = ctx.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    return generate_greedy(
        ctx.model, prompts, max_new_tokens, stop_ids=turn_end_ids(tok), batch_size=ctx.batch_size
    )


def skipped_extra(outs: Sequence[list[int] | None]) -> dict[str, int]:
    """{"skipped": k} when k prompts did not fit the context (they count as wrong), else {}."""
    k = sum(o is None for o in outs)
    return {"skipped": k} if k else {}
