"""Tool use: calculator problems asked with the calculator shown (tools on) and without (tools off).

The problems are `eval_tools.jsonl` from the SFT data (`conversations.ToolProblem`): big arithmetic,
word problems about people SFT never asked about ("word") and new word problems about SFT people
("word_seen"). Each question is one user turn. With tools on, `tools.runner.generate_with_tools`
runs the turn with the real calculator, shown exactly as training showed it (`CALCULATOR_TOOL`);
with tools off, the same question is a plain prompt with no tools in it.

A reply is correct when the gold number is a whole number of the final assistant message: "37" in
"turned 37 in 1974", not in "1937" nor "37.5" (`has_number`). Besides accuracy (overall and per
kind) the task reports the call rate (share of problems where the model wrote a tool call) and,
with tools on and fact questions given, the false call rate: the share of plain fact questions
(eval_forward.jsonl) where the model calls a tool though none is needed, and how many of those it
still answers right. A prompt that does not fit the context is counted wrong, with a note.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from chatforge.chat_format import parse_assistant, render_prompt
from chatforge.conversations import ToolProblem
from chatforge.errors import ChatforgeError
from chatforge.eval.base import (
    EvalContext,
    EvalInputs,
    TaskResult,
    accuracy_groups,
    ask_questions,
    register,
    subset,
)
from chatforge.eval.gsm8k import normalize_number
from chatforge.eval.world_qa import contains_answer, load_qa_file
from chatforge.fileio import read_jsonl
from chatforge.tokenizer import TOOL_CALL_OPEN
from chatforge.tools.builtin import calculator_registry
from chatforge.tools.runner import generate_with_tools
from chatforge.world import QA

KINDS = ("arithmetic", "word", "word_seen")
# A number as people write it: an optional sign (not after a digit: "1974-37" is a range or a
# subtraction, not -37), digits with optional thousands commas, an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\d])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def has_number(text: str, gold: str) -> bool:
    """True when a whole number in `text` equals `gold` (both normalised: "35,629,407" = "35629407",
    "37.0" = "37"); a number inside another ("37" in "1937", "37.5") does not count."""
    want = normalize_number(gold.strip())
    return any(normalize_number(m.group()) == want for m in _NUMBER.finditer(text))


def load_tool_problems(path: str | Path) -> list[ToolProblem]:
    """jsonl of `ToolProblem` dicts (eval_tools.jsonl): question, answer and kind are required."""
    problems = []
    for n, obj in read_jsonl(path):
        q, a, kind = obj.get("question"), obj.get("answer"), obj.get("kind")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise ChatforgeError(f"{path} line {n}: need non-empty string fields 'question' and 'answer'")
        if not isinstance(kind, str) or not kind:
            raise ChatforgeError(f"{path} line {n}: need a string field 'kind' (e.g. {', '.join(KINDS)})")
        pid = obj.get("person_id")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
            raise ChatforgeError(f"{path} line {n}: 'person_id' must be an integer or null, got {pid!r}")
        problems.append(
            ToolProblem(
                q,
                a,
                kind,
                str(obj.get("expression", "")),
                str(obj.get("lead", "")),
                str(obj.get("final", "")),
                pid,
            )  # fmt: skip
        )
    if not problems:
        raise ChatforgeError(f"{path} holds no problems")
    return problems


class ToolUse:
    """Ask each problem as a user turn, with the calculator (tools_on) or without; score the final
    answer with `has_number`. With tools on, `fact_questions` (a sample of them: as many as the
    problems asked, at most `n_facts`) measure calls made where no tool is needed."""

    def __init__(
        self,
        problems: Sequence[ToolProblem],
        name: str,
        tools_on: bool,
        fact_questions: Sequence[QA] = (),
        *,
        max_new_tokens: int = 64,
        max_calls: int = 2,
        n_facts: int = 200,
    ) -> None:
        if not problems:
            raise ChatforgeError(f"{name}: no problems to ask")
        self.problems = list(problems)
        self.name = name
        self.tools_on = tools_on
        self.fact_questions = list(fact_questions) if tools_on else []
        self.max_new_tokens = max_new_tokens
        self.max_calls = max_calls
        self.n_facts = n_facts

    def run(self, ctx: EvalContext) -> TaskResult:
        problems = subset(self.problems, ctx.max_examples, ctx.seed)
        facts = subset(self.fact_questions, min(self.n_facts, len(problems)), ctx.seed)
        questions = [p.question for p in problems] + [qa.question for qa in facts]
        answers = self._with_tools(ctx, questions) if self.tools_on else self._without_tools(ctx, questions)

        details = [
            _detail(p.question, p.answer, p.kind, a, has_number(a.final, p.answer))
            for p, a in zip(problems, answers[: len(problems)], strict=True)
        ]
        correct = [d["correct"] for d in details]
        groups = accuracy_groups([d["kind"] for d in details], correct)
        for kind, g in groups.items():  # each kind's call rate beside its accuracy (the report shows both)
            g["call_rate"] = sum(d["called"] for d in details if d["kind"] == kind) / g["n"]
        n = len(details)
        extra: dict[str, float | int] = {"call_rate": sum(d["called"] for d in details) / n}
        if skipped := sum("skipped" in d for d in details):
            extra["skipped"] = skipped
        if facts:
            fact_details = [
                _detail(qa.question, qa.answer, "fact", a, contains_answer(a.final, qa.answer))
                for qa, a in zip(facts, answers[len(problems) :], strict=True)
            ]
            details += fact_details
            extra["false_call_rate"] = sum(d["called"] for d in fact_details) / len(facts)
            extra["fact_accuracy"] = sum(d["correct"] for d in fact_details) / len(facts)
            extra["fact_n"] = len(facts)
            if skipped := sum("skipped" in d for d in fact_details):
                extra["fact_skipped"] = skipped
        return TaskResult(self.name, "accuracy", sum(correct) / n, n, details, extra=extra, groups=groups)

    def _with_tools(self, ctx: EvalContext, questions: list[str]) -> list[_Answer]:
        """One answer per question, through the runner, batch_size conversations at a time."""
        tok, registry = ctx.tokenizer, calculator_registry()
        tools = registry.schemas()
        convs = [[{"role": "user", "content": q}] for q in questions]
        out = [_Answer("", 0, "prompt fills the context")] * len(questions)
        lengths = {i: len(render_prompt(tok, c, tools=tools)) for i, c in enumerate(convs)}
        fits = sorted((i for i, n in lengths.items() if n < ctx.seq_len), key=lengths.__getitem__)
        with ctx.bar(len(questions), "question") as bar:
            bar.update(len(questions) - len(fits))
            for start in range(0, len(fits), ctx.batch_size):
                self._tools_batch(ctx, convs, fits[start : start + ctx.batch_size], out)
                bar.update(min(ctx.batch_size, len(fits) - start))
                if ctx.log and not ctx.progress:
                    ctx.log(f"eval: {self.name} {min(start + ctx.batch_size, len(fits))}/{len(fits)} conversations")
        return out

    def _tools_batch(self, ctx: EvalContext, convs: list[list[dict]], rows: list[int], out: list) -> None:
        """Conversations `rows` answered through the runner; their answers written into `out`."""
        ended: dict[int, str] = {}

        def on_event(event: dict) -> None:
            if event["type"] == "done":
                ended[rows[event["row"]]] = event["reason"]

        new = generate_with_tools(
            ctx.model, ctx.tokenizer, [convs[i] for i in rows], calculator_registry(), max_calls=self.max_calls,
            max_new_tokens=self.max_new_tokens, temperature=0.0, on_event=on_event,
        )  # fmt: skip
        for i, msgs in zip(rows, new, strict=True):
            last = msgs[-1] if msgs else {}
            final = (last.get("content") or "") if last.get("role") == "assistant" else ""
            calls = sum(len(m.get("tool_calls") or []) for m in msgs)
            calls += sum(m["role"] == "tool" and "tool_call_id" not in m for m in msgs)  # malformed calls
            note = "a tool result filled the context" if ended.get(i) == "context" else ""
            out[i] = _Answer(final, calls, note, ended.get(i, ""))

    def _without_tools(self, ctx: EvalContext, questions: list[str]) -> list[_Answer]:
        """Plain greedy generation, no tools shown; a call written anyway is counted (and, with no tool
        to run it, leaves no answer)."""
        tok = ctx.tokenizer
        outs = ask_questions(ctx, questions, self.max_new_tokens)
        answers = []
        for ids in outs:
            if ids is None:
                answers.append(_Answer("", 0, "prompt fills the context"))
                continue
            msg = parse_assistant(tok.decode(ids))
            content = msg.get("content") or ""
            answers.append(_Answer(content, len(msg.get("tool_calls") or []) + content.count(TOOL_CALL_OPEN)))
        return answers


class _Answer(NamedTuple):
    final: str  # the last assistant message's content ("" when there is none)
    calls: int  # tool calls written, malformed ones included
    note: str = ""  # why the question counts as wrong without a real answer (context)
    ended: str = ""  # with tools: how the turn ended (stop, length, limit, context)


def _detail(prompt: str, gold: str, kind: str, a: _Answer, correct: bool) -> dict:
    d = {"prompt": prompt, "gold": gold, "kind": kind, "prediction": a.final, "correct": correct,
         "called": a.calls > 0, "calls": a.calls}  # fmt: skip
    if a.ended:
        d["ended"] = a.ended
    if a.note:
        d["skipped"] = a.note
    return d


def tool_tasks(
    problems: Sequence[ToolProblem], fact_questions: Sequence[QA] = (), max_new_tokens: int | None = None
) -> list[ToolUse]:
    """The same problems with tools on and off ("tools_on", "tools_off": the names the report reads)."""
    kw = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    return [
        ToolUse(problems, "tools_on", True, fact_questions, **kw),
        ToolUse(problems, "tools_off", False, **kw),
    ]


@register("tools")
def _tools_tasks(inputs: EvalInputs) -> list[ToolUse]:
    path = inputs.tools_file
    if path is None:
        raise ChatforgeError("the tools task needs problems: give --tools-file eval_tools.jsonl")
    problems = load_tool_problems(path)
    # fact questions for the false call rate: --qa-file, else eval_forward.jsonl beside the problems
    fact_files = inputs.qa_files or [f for f in [Path(path).with_name("eval_forward.jsonl")] if f.is_file()]
    facts = [qa for f in fact_files for qa in load_qa_file(f)]
    return tool_tasks(problems, facts, inputs.max_new_tokens)
