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
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from tqdm import tqdm

from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.device import autocast  # noqa: F401 (tasks import it from here)
from chatforge.engine import generate_batch
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text
from chatforge.tokenizer import Tokenizer

T = TypeVar("T")

# where a user without the data finds public benchmark files (the README's commands fetch them)
DATA_HINT = (
    "ARC: curl -LO https://raw.githubusercontent.com/mosaicml/llm-foundry/main/scripts/eval/local_data/"
    "world_knowledge/arc_easy.jsonl; GSM8K: curl -LO https://raw.githubusercontent.com/openai/"
    "grade-school-math/master/grade_school_math/data/test.jsonl; more in the README, 'Evaluation data'"
)


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
    progress: bool = False  # a progress bar on stderr over each task's examples
    task: str = ""  # the task running now (run_tasks sets it; the bar shows it)

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

    def bar(self, total: int, unit: str) -> tqdm:
        """The running task's progress bar over `total` units (a no-op bar without ctx.progress)."""
        return tqdm(
            total=total, desc=self.task, unit=unit, disable=not self.progress, leave=False,
            mininterval=1.0, dynamic_ncols=True,
        )  # fmt: skip

    def context_skips(self, outs: Sequence[object | None]) -> tuple[int, str]:
        """(how many prompts were not scored, why) for generation outputs where None means the prompt
        filled the context."""
        k = sum(o is None for o in outs)
        return k, f"longer than the model's {self.seq_len}-token context" if k else ""


@dataclass
class TaskResult:
    task: str
    metric: str  # "accuracy", "bpb", ...
    value: float | None  # None when no example could be scored
    n: int  # examples scored
    details: list[dict] = field(default_factory=list)  # per example: prompt, gold, prediction, correct, ...
    extra: dict[str, float | int] = field(default_factory=dict)  # secondary metrics over the same n
    groups: dict[str, dict] = field(default_factory=dict)  # `metric` per group: {name: {"value", "n"}}
    seconds: float = 0.0
    skipped: int = 0  # examples left out of n and value (e.g. prompts longer than the context)
    skip_reason: str = ""

    def describe(self, with_seconds: bool = False) -> str:
        """One line: `gsm8k accuracy = 0.4000 (n=18, skipped 2: longer than ...)`; never a score over
        nothing (`gsm8k: nothing scored (n=0, skipped 20: ...)`)."""
        notes = f", skipped {self.skipped}: {self.skip_reason}" if self.skipped else ""
        notes += f", {self.seconds:.1f}s" if with_seconds else ""
        if self.value is None:
            return f"{self.task}: nothing scored (n={self.n}{notes})"
        return f"{self.task} {self.metric} = {self.value:.4f} (n={self.n}{notes})"


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
            ctx.task = task.name
            if ctx.log:
                ctx.log(f"eval: {task.name} ...")
            t0 = time.perf_counter()
            r = task.run(ctx)
            r.seconds = round(time.perf_counter() - t0, 3)
            if ctx.log:
                ctx.log(f"eval: {r.describe(with_seconds=True)}")
            results.append(r)
    finally:
        ctx.model.train(was_training)
        ctx.task = ""
    return results


def results_markdown(results: Sequence[TaskResult]) -> str:
    """| task | metric | value | n |: each result, its secondary metrics, then its groups; a result
    with skipped examples is followed by a line saying how many and why."""
    lines = ["| task | metric | value | n |", "|---|---|---:|---:|"]
    notes = [f"{r.task}: {r.skipped} skipped, {r.skip_reason}" for r in results if r.skipped]
    for r in results:
        lines.append(f"| {r.task} | {r.metric} | {_fmt(r.value)} | {r.n} |")
        for k, v in r.extra.items():
            lines.append(f"| {r.task} | {k} | {_fmt(v)} | {r.n} |")
        for g, gv in r.groups.items():
            lines.append(f"| {r.task} / {g} | {r.metric} | {_fmt(gv['value'])} | {gv['n']} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "–"
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


def mean_or_none(values: Sequence[float | bool]) -> float | None:
    """The mean, or None over no values (a score over nothing is no score)."""
    return sum(values) / len(values) if values else None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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
    bar: tqdm | None = None,
) -> list[list[int] | None]:
    """Greedy completions (stop id removed) for each prompt; None for a prompt that fills the context.

    Each prompt gets min(max_new_tokens, room left in the context). Prompts with the same budget
    are batched together (all of them when everything fits), batch_size at a time. `bar` advances
    by one per prompt.
    """
    seq_len = model.cfg.seq_len
    stops = set(stop_ids)
    out: list[list[int] | None] = [None] * len(prompts)
    budgets = {i: min(max_new_tokens, seq_len - len(p)) for i, p in enumerate(prompts) if len(p) < seq_len}
    order = sorted(budgets, key=lambda i: (-budgets[i], len(prompts[i])))
    if bar is not None:
        bar.update(len(prompts) - len(budgets))  # the prompts that fill the context are done
    for budget, group in itertools.groupby(order, key=budgets.__getitem__):
        group = list(group)
        for start in range(0, len(group), batch_size):
            idx = group[start : start + batch_size]
            batch = [list(prompts[i]) for i in idx]
            completions = generate_batch(model, batch, budget, temperature=0.0, stop_ids=stop_ids)
            for i, ids in zip(idx, completions, strict=True):
                out[i] = [t for t in ids if t not in stops]
            if bar is not None:
                bar.update(len(idx))
    return out


def ask_questions(ctx: EvalContext, questions: Sequence[str], max_new_tokens: int) -> list[list[int] | None]:
    """Each question asked as one user turn and answered greedily until the turn ends: the reply's
    ids, or None for a prompt that fills the context."""
    tok = ctx.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    with ctx.bar(len(prompts), "question") as bar:
        return generate_greedy(
            ctx.model, prompts, max_new_tokens, stop_ids=turn_end_ids(tok), batch_size=ctx.batch_size, bar=bar
        )
