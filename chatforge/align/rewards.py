"""Reward functions for RL: plain callables `reward(messages, answer_text, example) -> float`.

`messages` are the prompt turns, `answer_text` the model's reply (decoded, stop token removed),
`example` the problem it answers (a dict; checkable problems carry "answer", arithmetic ones
also "expression"). Verifiable rewards return 1.0 or 0.0:

    exact_answer         the reply states the gold answer: the gold as a whole phrase, or for a
                         number, one of the reply's whole numbers ("37" in "X turned 37 in 1974",
                         not in "1937"); the rules world QA and the tool evaluation score by. A
                         refusal problem ("refuse": true or false, no "answer") is right when the
                         reply refuses exactly when it should (the refusal evaluation's detector)
    number_match         the reply's last number equals example["answer"]
    calculator_verified  the reply's last number equals what the calculator tool computes for
                         example["expression"], so the gold is recomputed, not trusted
    RewardModelReward    a learned reward: a `chatforge prefs reward` model's score (not 0/1)

`get_reward("exact" | "number" | "calculator" | "rm:PATH")` picks one by name (the CLI's --reward).
A reward may also offer `batch(items) -> list[float]` (the reward model does): RL calls it for a
whole rollout at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import torch

from chatforge.align.reward import load_reward_model, score
from chatforge.errors import ChatforgeError
from chatforge.eval.tools import has_number
from chatforge.eval.world_qa import contains_answer
from chatforge.redteam.detectors import is_refusal
from chatforge.tools import calculator

RewardFn = Callable[[list[dict], str, dict], float]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def last_number(text: str) -> Fraction | None:
    """The last number written in `text` ("1,234" reads as 1234), exactly; None if there is none."""
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    return Fraction(found[-1]) if found else None


def _gold(example: dict) -> str:
    gold = example.get("answer")
    if gold is None:
        raise ChatforgeError("this reward needs problems with an 'answer' field")
    return str(gold)


def _as_number(text: str) -> Fraction | None:
    text = _THOUSANDS.sub("", text.strip())
    return Fraction(text) if _NUMBER.fullmatch(text) else None


def number_match(messages: list[dict], answer_text: str, example: dict) -> float:
    """1.0 when the reply's last number equals example["answer"] (a number), else 0.0."""
    gold = _as_number(_gold(example))
    if gold is None:
        raise ChatforgeError(f"number_match needs a numeric answer, got {example.get('answer')!r}")
    return float(last_number(answer_text) == gold)


def exact_answer(messages: list[dict], answer_text: str, example: dict) -> float:
    """1.0 when the reply states the gold answer: a numeric gold as one of its whole numbers
    (eval.tools.has_number, the tool evaluation's rule), else the gold as a whole phrase
    (eval.world_qa.contains_answer, world QA's rule). So RL optimises what evaluation scores.
    A problem with "refuse" scores 1.0 when `is_refusal(reply)` equals it, the refusal evaluation's rule."""
    if "refuse" in example and "answer" not in example:
        return float(is_refusal(answer_text) == bool(example["refuse"]))
    gold = _gold(example)
    if _as_number(gold) is not None:
        return float(has_number(answer_text, gold))
    return float(contains_answer(answer_text, gold))


def calculator_verified(messages: list[dict], answer_text: str, example: dict) -> float:
    """1.0 when the reply's last number equals the calculator tool's exact value of
    example["expression"] (chatforge/tools/calculator.py): the check does not trust a stored gold."""
    expression = example.get("expression")
    if not isinstance(expression, str):
        raise ChatforgeError("calculator_verified needs problems with an 'expression' field, e.g. '17 * 23'")
    return float(last_number(answer_text) == calculator.evaluate(expression))


class RewardModelReward:
    """A reward model's score of the reply (see reward.py); batch() scores a rollout in one go."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.rm, self.tok = load_reward_model(path, device)
        self.batch_size = batch_size

    def __call__(self, messages: list[dict], answer_text: str, example: dict) -> float:
        return self.batch([(messages, answer_text, example)])[0]

    def batch(self, items: list[tuple[list[dict], str, dict]]) -> list[float]:
        convs = [[*m, {"role": "assistant", "content": a}] for m, a, _ in items]
        return score(self.rm, self.tok, convs, self.batch_size)


REWARDS: dict[str, RewardFn] = {
    "exact": exact_answer,
    "number": number_match,
    "calculator": calculator_verified,
}


def get_reward(spec: str, device: str | torch.device = "cpu") -> RewardFn:
    """A reward by name: exact, number, calculator, or rm:PATH (a reward model run folder)."""
    if spec.startswith("rm:"):
        return RewardModelReward(spec[3:], device)
    if spec not in REWARDS:
        raise ChatforgeError(f"unknown reward {spec!r}; choose {', '.join(REWARDS)} or rm:RUN_FOLDER")
    return REWARDS[spec]


def score_all(reward: RewardFn, items: list[tuple[list[dict], str, dict]]) -> list[float]:
    """Rewards for (messages, answer_text, example) items, batched when the reward can batch."""
    if hasattr(reward, "batch"):
        return [float(r) for r in reward.batch(items)]  # type: ignore[attr-defined]
    return [float(reward(m, a, ex)) for m, a, ex in items]
