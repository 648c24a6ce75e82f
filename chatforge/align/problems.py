"""Problems for RL: each a dict with "messages" (the prompt turns) and whatever its reward reads
("answer", "expression", ...). Loaded from .jsonl, or built from a world folder: forward fact
questions, small sums, and calculator problems (3-5 digit arithmetic, word problems)."""

from __future__ import annotations

import random
import re
from pathlib import Path

from chatforge.chat_format import validate_conversation
from chatforge.config import RLConfig
from chatforge.conversations import (
    arithmetic_turn,
    benign_conversation,
    big_arithmetic_problem,
    disallowed_request,
    word_problem,
)
from chatforge.errors import ChatforgeError
from chatforge.fileio import read_jsonl
from chatforge.world import Person, World, fact_questions


def load_problems(path: str | Path) -> list[dict]:
    """Problems from .jsonl: {"messages": [...prompt turns]} or {"question": "..."}, plus any fields
    the reward reads ("answer", "expression", ...), and "tools": false for a question RL with tools
    should ask without them. Rows are returned with "messages" filled in."""
    p = Path(path)
    out = []
    for n, obj in read_jsonl(p):
        where = f"{p} line {n}"
        if "messages" in obj:
            messages = obj["messages"]
        elif isinstance(obj.get("question"), str) and obj["question"].strip():
            messages = [{"role": "user", "content": obj["question"]}]
        else:
            raise ChatforgeError(f"{where}: a problem needs 'messages' (prompt turns) or a 'question' string")
        validate_conversation(messages, where, require_assistant=False)
        if messages[-1]["role"] == "assistant":
            raise ChatforgeError(f"{where}: the prompt ends with an assistant turn; end it with the question")
        if "answer" in obj and not isinstance(obj["answer"], str | int | float):
            raise ChatforgeError(f"{where}: 'answer' must be a string or a number")
        if not isinstance(obj.get("tools", True), bool):
            raise ChatforgeError(f"{where}: 'tools' must be true or false")
        if not isinstance(obj.get("refuse", False), bool):
            raise ChatforgeError(f"{where}: 'refuse' must be true or false")
        out.append({**obj, "messages": messages})
    if not out:
        raise ChatforgeError(f"{p} holds no problems")
    return out


_EXPR = re.compile(r"(\d+) (\+|-|\*|plus|minus|times) (\d+)")
_WORD_OP = {"plus": "+", "minus": "-", "times": "*"}


def arithmetic_problem(rng: random.Random) -> dict:
    """One arithmetic question (conversations.arithmetic_turn) with its answer and expression."""
    question, reference, result = arithmetic_turn(rng)
    a, op, b = _EXPR.search(reference).groups()  # the reference answer states "a op b"
    return {
        "messages": [{"role": "user", "content": question}],
        "answer": str(result),
        "expression": f"{a} {_WORD_OP.get(op, op)} {b}",
        "kind": "arithmetic",
    }


def world_problems(
    world: World, people: list[Person], seed: int = 0, *, n_arithmetic: int | None = None
) -> list[dict]:
    """Checkable problems from the world: one forward question per attribute per person (one phrasing,
    seeded) and `n_arithmetic` sums (default: as many as fact questions). Shuffled."""
    rng = random.Random(f"chatforge-rl:{seed}")
    out = []
    for p in people:
        for qa in fact_questions(p, world, rng, n_phrasings=1):
            out.append(
                {
                    "messages": [{"role": "user", "content": qa.question}],
                    "answer": qa.answer,
                    "kind": qa.attribute,
                    "person_id": qa.person_id,
                }
            )
    out += [arithmetic_problem(rng) for _ in range(len(out) if n_arithmetic is None else n_arithmetic)]
    rng.shuffle(out)
    return out


def tool_problems(world: World, people: list[Person], n: int, seed: int = 0) -> list[dict]:
    """`n` calculator problems (conversations.py): half 3-5 digit arithmetic, half world word problems
    about `people` ("In what year did X turn 37?"), each with its answer and the expression to compute."""
    rng = random.Random(f"chatforge-rl-tools:{seed}")
    out = []
    for i in range(n):
        problem = big_arithmetic_problem(rng) if i % 2 else word_problem(rng.choice(people), world, rng)
        out.append({"messages": [{"role": "user", "content": problem.question}], **problem.to_dict()})
    return out


def refusal_problems(n: int, seed: int = 0) -> list[dict]:
    """`n` requests from the refusal data's training split, alternately harmful ("refuse": true) and
    harmless ("refuse": false: look-alikes, kind requests, everyday ones), asked without the calculator
    as the refusal evaluation asks them. The exact reward pays for refusing exactly the harmful ones,
    so RL on facts and sums is also paid to keep refusing (it held two seeds of three within 2 points
    on the held-out requests: docs/rl-recipe.md)."""
    rng = random.Random(f"chatforge-rl-refusal:{seed}")
    out = []
    for i in range(n):
        harmful = i % 2 == 0
        request = disallowed_request(rng) if harmful else benign_conversation(rng, system_prob=0.0)[0]["content"]
        out.append(
            {
                "messages": [{"role": "user", "content": request}],
                "refuse": harmful,
                "kind": "refusal" if harmful else "look_alike",
                "tools": False,
            }
        )
    return out


def split_validation(problems: list[dict], n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, validation): `n` problems (at most a tenth, at least one) taken out by a seeded shuffle,
    for problems from a file: the validation problems pick RL's best checkpoint and are never trained on."""
    if len(problems) < 2:
        raise ChatforgeError("need at least 2 problems to keep some for validation")
    order = list(range(len(problems)))
    random.Random(f"chatforge-rl-validation:{seed}").shuffle(order)
    n_val = max(1, min(n, len(problems) // 10))
    return [problems[i] for i in order[n_val:]], [problems[i] for i in order[:n_val]]


def split_people_for_validation(people: list[Person], seed: int = 0) -> tuple[list[Person], list[Person]]:
    """(validation people, held-out people): the evaluation people halved by a seeded shuffle. RL picks
    its checkpoint by questions about the first half and reports pass@1 on the second, so the problems
    it reports on never steer it. Both halves are people whose facts SFT never asked about: questions
    about SFT people are drilled to the ceiling and would not tell one checkpoint from another."""
    order = sorted(people, key=lambda p: p.id)
    random.Random(f"chatforge-rl-people:{seed}").shuffle(order)
    half = len(order) // 2
    return order[:half], order[half:]


def speedrun_problems(
    world: World,
    sft_people: list[Person],
    eval_people: list[Person],
    cfg: RLConfig,
    asked: set[str] = frozenset(),
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, held out) of the speedrun's rl stage. Train: forward fact questions about the
    SFT people, as many small sums, `cfg.tool_problems` calculator problems and `cfg.refusal_problems`
    requests to refuse or answer (`refusal_problems`). Without the
    calculator problems RL learns "a question about a person needs no tool" and word problems
    collapse (measured: 97.5% -> 55.3%). Validation: `cfg.eval_problems` problems about half the
    evaluation people (`split_people_for_validation`), a third each fact questions, small sums and
    calculator problems, so the kept model is the one that gained on facts and sums without losing
    the calculator; held out: fact questions and small sums about the other half.
    None is a question the evaluation asks (`asked`), and none is in two of the three sets."""
    val_people, held_people = split_people_for_validation(eval_people, cfg.seed)
    if not val_people or not held_people:  # a world too small to halve: the SFT people stand in
        val_people, held_people = val_people or sft_people, held_people or sft_people
    held_out = world_problems(world, held_people, cfg.seed + 1)
    taken = {p["messages"][-1]["content"] for p in held_out} | set(asked)

    def fresh(problems: list[dict]) -> list[dict]:
        kept = [p for p in problems if p["messages"][-1]["content"] not in taken]
        taken.update(p["messages"][-1]["content"] for p in kept)
        return kept

    third = max(1, cfg.eval_problems // 3)  # a third facts, a third small sums, a third calculator problems
    mix = world_problems(world, val_people, cfg.seed + 2, n_arithmetic=third)
    facts = [p for p in mix if p["kind"] != "arithmetic"][:third]
    sums = [p for p in mix if p["kind"] == "arithmetic"]
    validation = fresh(facts + sums + tool_problems(world, val_people, third, cfg.seed + 2))
    train = fresh(
        world_problems(world, sft_people, cfg.seed)
        + tool_problems(world, sft_people, cfg.tool_problems, cfg.seed)
        + refusal_problems(cfg.refusal_problems, cfg.seed)
    )
    return train, validation, held_out
