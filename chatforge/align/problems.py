"""Problems for RL: each a dict with "messages" (the prompt turns) and whatever its reward reads
("answer", "expression", ...). Loaded from .jsonl, or built from a world folder: forward fact
questions, small sums, and calculator problems (3-5 digit arithmetic, word problems)."""

from __future__ import annotations

import random
import re
from pathlib import Path

from chatforge.chat_format import validate_conversation
from chatforge.config import RLConfig
from chatforge.conversations import arithmetic_turn, big_arithmetic_problem, word_problem
from chatforge.errors import ChatforgeError
from chatforge.fileio import read_jsonl
from chatforge.world import Person, World, fact_questions


def load_problems(path: str | Path) -> list[dict]:
    """Problems from .jsonl: {"messages": [...prompt turns]} or {"question": "..."}, plus any fields
    the reward reads ("answer", "expression", ...). Rows are returned with "messages" filled in."""
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


def split_validation(problems: list[dict], n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, validation): `n` problems (at most a tenth, at least one) taken out by a seeded shuffle.
    The validation problems pick RL's best checkpoint; they are never trained on, and being drawn
    from the training pool they are never the held-out ones."""
    if len(problems) < 2:
        raise ChatforgeError("need at least 2 problems to keep some for validation")
    order = list(range(len(problems)))
    random.Random(f"chatforge-rl-validation:{seed}").shuffle(order)
    n_val = max(1, min(n, len(problems) // 10))
    return [problems[i] for i in order[n_val:]], [problems[i] for i in order[:n_val]]


def speedrun_problems(
    world: World,
    sft_people: list[Person],
    eval_people: list[Person],
    cfg: RLConfig,
    asked: set[str] = frozenset(),
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, held out) of the speedrun's rl stage. The pool: forward fact questions
    about the SFT people, as many small sums, and `cfg.tool_problems` calculator problems (none whose
    question is in `asked`, the evaluation's). Without the calculator problems RL learns "a question
    about a person needs no tool" and word problems collapse (measured: 97.5% -> 55.3%). Validation:
    `cfg.eval_problems` of the pool, kept out of training. Held out: fact questions about the
    evaluation people and new sums, a small sum the pool also has removed from it."""
    pool = world_problems(world, sft_people, cfg.seed)
    pool += [
        p for p in tool_problems(world, sft_people, cfg.tool_problems, cfg.seed) if p["question"] not in asked
    ]
    held_out = world_problems(world, eval_people or sft_people, cfg.seed + 1)
    held_questions = {p["messages"][-1]["content"] for p in held_out}
    pool = [p for p in pool if p["messages"][-1]["content"] not in held_questions]
    train, validation = split_validation(pool, cfg.eval_problems, cfg.seed)
    return train, validation, held_out
