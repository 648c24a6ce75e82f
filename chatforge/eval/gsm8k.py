"""GSM8K-style math word problems: ask in chat form, generate, compare the final number.

The data is jsonl of {question, answer} where the answer's worked solution ends with
"#### 42". The model's reply is scored by the number after its own "####" (what an SFT'd
model is taught to write), else the last number it wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.eval.base import (
    DATA_HINT,
    EvalContext,
    EvalInputs,
    TaskResult,
    ask_questions,
    mean_or_none,
    register,
    subset,
)
from chatforge.fileio import read_jsonl

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(s: str) -> str:
    """ "1,234" -> "1234", "7.0" -> "7", "2.50" -> "2.5", "-0" -> "0"."""
    s = s.replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def extract_answer(text: str) -> str | None:
    """The number after the first "####", else the last number in the text, normalised; None if none."""
    if "####" in text:
        m = _NUMBER.search(text.split("####", 1)[1])
        if m:
            return normalize_number(m.group())
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


@dataclass
class MathProblem:
    question: str
    answer: str  # the gold number, normalised
    solution: str = ""  # the worked solution, when the data has one


def load_gsm8k(path: str | Path) -> list[MathProblem]:
    if not Path(path).is_file():
        raise ChatforgeError(f"no GSM8K file at {path}: check the path ({DATA_HINT})")
    out = []
    for n, obj in read_jsonl(path):
        q, a = obj.get("question"), obj.get("answer")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str):
            raise ChatforgeError(f"{path} line {n}: need string fields 'question' and 'answer'")
        if "####" not in a or (gold := extract_answer(a)) is None:
            raise ChatforgeError(f"{path} line {n}: the answer must end with '#### <number>' (GSM8K format)")
        out.append(MathProblem(q, gold, a))
    if not out:
        raise ChatforgeError(f"{path} holds no problems")
    return out


class GSM8K:
    def __init__(self, problems: list[MathProblem], name: str = "gsm8k", max_new_tokens: int = 256) -> None:
        if not problems:
            raise ChatforgeError(f"{name}: no problems")
        self.problems = problems
        self.name = name
        self.max_new_tokens = max_new_tokens

    def run(self, ctx: EvalContext) -> TaskResult:
        tok = ctx.tokenizer
        problems = subset(self.problems, ctx.max_examples, ctx.seed)
        outs = ask_questions(ctx, [p.question for p in problems], self.max_new_tokens)
        details = []
        for p, out in zip(problems, outs, strict=True):
            if out is None:  # not scored: listed in the details, left out of n and the accuracy
                details.append({"prompt": p.question, "gold": p.answer, "skipped": "prompt fills the context"})
                continue
            reply = tok.decode(out)
            pred = extract_answer(reply)
            details.append(
                {"prompt": p.question, "gold": p.answer, "prediction": reply, "extracted": pred,
                 "correct": pred == p.answer}
            )  # fmt: skip
        correct = [d["correct"] for d in details if "skipped" not in d]
        skipped, why = ctx.context_skips(outs)
        return TaskResult(
            self.name, "accuracy", mean_or_none(correct), len(correct), details, skipped=skipped, skip_reason=why
        )


@register("gsm8k")
def _gsm8k_tasks(inputs: EvalInputs) -> list[GSM8K]:
    if inputs.gsm8k_file is None:
        raise ChatforgeError(
            "the gsm8k task needs problems: give --gsm8k FILE.jsonl ({question, answer} lines)"
        )
    return [GSM8K(load_gsm8k(inputs.gsm8k_file), max_new_tokens=inputs.max_new_tokens or 256)]
