"""Evaluation: bits per byte, world QA (forward facts and the reversal probe), multiple choice
by log-likelihood, GSM8K-style generation, tool use (calculator problems with and without the
calculator), refusals (held-out disallowed requests and harmless look-alikes), and
`chatforge eval` to run them.

A task is one file: a class with `name` and `run(ctx) -> TaskResult`, plus a factory
registered with `@register("name")`; import the module below so the registry sees it.
"""

from chatforge.eval.base import (
    TASKS,
    EvalContext,
    EvalInputs,
    Task,
    TaskResult,
    build_tasks,
    register,
    results_markdown,
    run_tasks,
    write_results,
)
from chatforge.eval.bpb import BitsPerByte, bits_per_byte
from chatforge.eval.gsm8k import GSM8K, extract_answer, load_gsm8k
from chatforge.eval.multiple_choice import MCExample, MultipleChoice, load_mc, score_choices
from chatforge.eval.refusal import Refusals, load_prompts, refusal_tasks
from chatforge.eval.run import cmd_eval, evaluate
from chatforge.eval.tools import ToolUse, has_number, load_tool_problems, tool_tasks
from chatforge.eval.world_qa import WorldQA, contains_answer, forward_qas, load_qa_file, reverse_qas

__all__ = [
    "TASKS",
    "BitsPerByte",
    "EvalContext",
    "EvalInputs",
    "GSM8K",
    "MCExample",
    "MultipleChoice",
    "Task",
    "Refusals",
    "TaskResult",
    "ToolUse",
    "WorldQA",
    "bits_per_byte",
    "build_tasks",
    "cmd_eval",
    "contains_answer",
    "evaluate",
    "extract_answer",
    "forward_qas",
    "has_number",
    "load_gsm8k",
    "load_mc",
    "load_prompts",
    "load_qa_file",
    "load_tool_problems",
    "register",
    "refusal_tasks",
    "results_markdown",
    "reverse_qas",
    "run_tasks",
    "score_choices",
    "tool_tasks",
    "write_results",
]
