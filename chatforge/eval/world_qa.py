"""Questions about the synthetic world, asked in chat form, scored by exact phrase match.

`world_forward` asks each person's facts (one phrasing per attribute); the model has read
them in biographies. `world_reverse` is the reversal-curse probe: "Who is X's son?" where
the corpus only ever says "Y's mother is X". A reply is correct when it contains the gold
answer as a whole phrase ("Port Vesk" in "born in Port Vesk.", not in "Port Veskland").
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.eval.base import (
    EvalContext,
    EvalInputs,
    TaskResult,
    accuracy_groups,
    ask_questions,
    mean_or_none,
    register,
    subset,
)
from chatforge.fileio import read_jsonl
from chatforge.world import QA, World, fact_questions, load_world, reverse_questions

_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def normalize(text: str) -> str:
    """Lowercase, whitespace collapsed, punctuation stripped from both ends."""
    return _EDGE_PUNCT.sub("", " ".join(text.lower().split()))


def contains_answer(response: str, gold: str) -> bool:
    """True when normalised `gold` appears in normalised `response` bounded by non-alphanumerics."""
    g, r = normalize(gold), normalize(response)
    if not g:
        return False
    return re.search(r"(?<![^\W_])" + re.escape(g) + r"(?![^\W_])", r) is not None


class WorldQA:
    """Ask each QA as a user turn, greedy-generate the reply, score with `contains_answer`."""

    def __init__(self, qas: Sequence[QA], name: str, max_new_tokens: int = 32) -> None:
        if not qas:
            raise ChatforgeError(f"{name}: no questions to ask (is the list of people empty?)")
        self.qas = list(qas)
        self.name = name
        self.max_new_tokens = max_new_tokens

    def run(self, ctx: EvalContext) -> TaskResult:
        tok = ctx.tokenizer
        qas = subset(self.qas, ctx.max_examples, ctx.seed)
        outs = ask_questions(ctx, [qa.question for qa in qas], self.max_new_tokens)
        details = []
        for qa, out in zip(qas, outs, strict=True):
            detail = {"prompt": qa.question, "gold": qa.answer, "attribute": qa.attribute, "person_id": qa.person_id}
            if out is None:  # not scored: listed in the details, left out of n and the accuracy
                details.append({**detail, "skipped": "prompt fills the context"})
                continue
            reply = tok.decode(out)
            details.append({**detail, "prediction": reply, "correct": contains_answer(reply, qa.answer)})
        scored = [d for d in details if "skipped" not in d]
        correct = [d["correct"] for d in scored]
        skipped, why = ctx.context_skips(outs)
        return TaskResult(
            self.name,
            "accuracy",
            mean_or_none(correct),
            len(correct),
            details,
            groups=accuracy_groups([d["attribute"] for d in scored], correct),
            skipped=skipped,
            skip_reason=why,
        )


# ---- question sets ---------------------------------------------------------------------------


def _people(world: World, people_ids: Iterable[int] | None, default) -> list:
    return list(default) if people_ids is None else [world.person(i) for i in people_ids]


def forward_qas(world: World, people_ids: Iterable[int] | None = None, seed: int = 0) -> list[QA]:
    """One question per attribute per person (default: everyone in the pretraining text); the phrasing
    is picked by (seed, person id), so it does not depend on which other people are asked about."""
    out = []
    for p in _people(world, people_ids, world.visible):
        out += fact_questions(p, world, random.Random(f"chatforge-eval-forward:{seed}:{p.id}"), n_phrasings=1)
    return out


def reverse_qas(world: World, people_ids: Iterable[int] | None = None, seed: int = 0) -> list[QA]:
    """ "Who is X's son/daughter?" about each person with a child (default: parents whose child's
    biography, which names them, is in the pretraining text). people_ids are the parents asked about."""
    default = [p for p in world.people if (c := world.child_of(p)) is not None and not c.held_out]
    out = []
    for p in _people(world, people_ids, default):
        out += reverse_questions(
            p, world, random.Random(f"chatforge-eval-reverse:{seed}:{p.id}"), n_phrasings=1
        )
    return out


def load_qa_file(path: str | Path) -> list[QA]:
    """jsonl of {question, answer[, attribute, person_id]} (the QA records of the world/SFT split)."""
    qas = []
    for n, obj in read_jsonl(path):
        q, a = obj.get("question"), obj.get("answer")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise ChatforgeError(f"{path} line {n}: need non-empty string fields 'question' and 'answer'")
        pid = obj.get("person_id", -1)
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise ChatforgeError(f"{path} line {n}: 'person_id' must be an integer, got {pid!r}")
        qas.append(QA(q, a, str(obj.get("attribute", "qa")), pid))
    if not qas:
        raise ChatforgeError(f"{path} holds no questions")
    return qas


def _world(inputs: EvalInputs, task: str) -> World:
    if inputs.world_dir is None:
        raise ChatforgeError(f"the {task} task needs the world it was trained on: give --world DIR")
    return load_world(inputs.world_dir)


def _max_new(inputs: EvalInputs) -> int:
    return inputs.max_new_tokens or 32


@register("world_forward")
def _forward_tasks(inputs: EvalInputs) -> list[WorldQA]:
    qas = forward_qas(_world(inputs, "world_forward"), inputs.people_ids)
    return [WorldQA(qas, "world_forward", _max_new(inputs))]


@register("world_reverse")
def _reverse_tasks(inputs: EvalInputs) -> list[WorldQA]:
    qas = reverse_qas(_world(inputs, "world_reverse"), inputs.people_ids)
    return [WorldQA(qas, "world_reverse", _max_new(inputs))]


@register("qa")
def _qa_file_tasks(inputs: EvalInputs) -> list[WorldQA]:
    if not inputs.qa_files:
        raise ChatforgeError("the qa task needs questions: give --qa-file FILE.jsonl")
    tasks = []
    for p in inputs.qa_files:
        qas = load_qa_file(p)
        if inputs.people_ids is not None:
            keep = set(inputs.people_ids)
            qas = [qa for qa in qas if qa.person_id in keep]
        tasks.append(WorldQA(qas, f"qa:{Path(p).stem}", _max_new(inputs)))
    return tasks
