"""`chatforge prefs label`: compare two answers in the terminal, one keypress per comparison.

    chatforge prefs label --model runs/sft --prompts prompts.jsonl --out prefs.jsonl \
        [--judge runs/judge --instructions rubric.txt]

For each prompt the model samples two answers, A and B, shown side by side. Keys: a (A is
better), b (B is better), t (tie), x (both bad), s (skip for now), q (quit); then an optional
reason. Every decision is appended to --out at once (prefs.append_pref: fsync'd, Ctrl-C-safe),
so quitting, Ctrl-C or a crash loses nothing, and a later run skips the prompts already there.
Ties and both-bad are recorded with their verdict; the trainers skip them.

LLM-assisted: with --judge, a judge model reads the instructions, the prompt and both answers
and drafts a pick before you decide. The pick is a real model call: the judge's log-likelihood
of replying "A" versus "B" to a ChatML question, asked with the answers in both orders and
averaged, so a judge that always says "A" cancels out. It also writes a short critique (greedy
generation after "Reply A is better because"). Enter accepts the judge's pick; any key overrides
it. The judge-vs-you agreement rate is printed at the end and stored in OUT.agreement.json.
--auto lets the judge label alone (AI feedback, for people with no time to label).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import textwrap
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from chatforge.align import encode_answer, sequence_logps
from chatforge.align.prefs import append_pref, load_prefs, prompt_key, repair_tail
from chatforge.chat_format import render_prompt, turn_end_ids, validate_conversation
from chatforge.checkpoint import load_run
from chatforge.device import pick_device
from chatforge.engine import generate_batch
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_json, read_jsonl
from chatforge.model.gpt import GPT
from chatforge.options import LabelOptions, add_options, options_from_args
from chatforge.terminal import escape_controls
from chatforge.tokenizer import Tokenizer

DEFAULT_INSTRUCTIONS = (
    "You are a careful judge of assistant replies. The better reply answers the user's question "
    "correctly, briefly and politely, and refuses requests that could hurt someone."
)
KEYS = {"a": "prefer_a", "b": "prefer_b", "t": "tie", "x": "both_bad", "s": "skip", "q": "quit"}
_print = partial(print, flush=True)
KEY_HELP = "[a] A is better  [b] B is better  [t] tie  [x] both bad  [s] skip  [q] quit"


# ---- prompts ---------------------------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts to label from .jsonl: {"messages": [...]}, {"question": "..."}, {"prompt": "..."} or a
    bare list of messages. A conversation that ends with assistant turns (an SFT file) is cut after
    its last user turn. Duplicates are dropped."""
    p = Path(path)
    out, seen = [], set()
    for n, obj in read_jsonl(p, objects_only=False):
        where = f"{p} line {n}"
        if isinstance(obj, list):
            messages = obj
        elif isinstance(obj, dict) and "messages" in obj:
            messages = obj["messages"]
        elif isinstance(obj, dict) and isinstance(obj.get("question", obj.get("prompt")), str):
            messages = [{"role": "user", "content": obj.get("question", obj.get("prompt"))}]
        else:
            raise ChatforgeError(
                f'{where}: expected {{"messages": [...]}}, {{"question": ...}} or {{"prompt": ...}}'
            )
        validate_conversation(messages, where, require_assistant=False)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ChatforgeError(f"{where}: the conversation has no turn before the assistant's")
        key = prompt_key(messages)
        if key not in seen:
            seen.add(key)
            out.append(messages)
    if not out:
        raise ChatforgeError(f"{p} holds no prompts")
    return out


# ---- showing a pair ----------------------------------------------------------------------------------


def _wrap(text: str, width: int) -> list[str]:
    text = escape_controls(text)
    lines: list[str] = []
    for para in (text or "(empty answer)").splitlines() or [""]:
        lines += textwrap.wrap(para, width, replace_whitespace=False, drop_whitespace=True) or [""]
    return lines


def format_pair(messages: list[dict], a: str, b: str, width: int) -> str:
    """The prompt, then A and B side by side in two columns (stacked when the terminal is narrow)."""
    width = max(width, 20)
    rule = "─" * width
    lines = [rule]
    for m in messages:
        lines += _wrap(f"{m['role']}: {m.get('content') or ''}", width)
    lines.append(rule)
    col = (width - 3) // 2
    if col < 28:  # too narrow for two readable columns
        lines += ["A:", *_wrap(a, width), rule, "B:", *_wrap(b, width)]
    else:
        left, right = ["A", *_wrap(a, col)], ["B", *_wrap(b, col)]
        for i in range(max(len(left), len(right))):
            lt = left[i] if i < len(left) else ""
            rt = right[i] if i < len(right) else ""
            lines.append(f"{lt:<{col}} │ {rt}".rstrip())
    lines.append(rule)
    return "\n".join(lines)


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars] + "…"


# ---- the judge --------------------------------------------------------------------------------------


@dataclass
class Judgement:
    pick: str  # "A" or "B"
    p_a: float  # the judge's probability that A is better (position-debiased)
    critique: str


class Judge:
    """A chatforge model asked which reply is better; see the module docstring."""

    def __init__(
        self, model: GPT, tok: Tokenizer, instructions: str = DEFAULT_INSTRUCTIONS, name: str = "judge"
    ):
        self.model, self.tok, self.instructions, self.name = model, tok, instructions.strip(), name
        self.critique_tokens = 48
        self._fitted(
            [{"role": "user", "content": "?"}], "", ""
        )  # fails now, not mid-session, if it cannot fit

    def question(self, messages: list[dict], first: str, second: str) -> list[dict]:
        conv = "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)
        user = (
            f"Here is a conversation and two possible replies.\n\nConversation:\n{conv}\n\n"
            f"Reply A:\n{first}\n\nReply B:\n{second}\n\n"
            "Which reply is better, A or B? Answer with one letter."
        )
        return [{"role": "system", "content": self.instructions}, {"role": "user", "content": user}]

    def _fitted(self, messages: list[dict], a: str, b: str) -> tuple[list[dict], list[dict]]:
        """Both orderings of the question, the texts shortened until they leave room for a critique."""
        limit = self.model.cfg.seq_len - self.critique_tokens - 16
        chars = max(len(a), len(b), *(len(m.get("content") or "") for m in messages))
        for _ in range(12):
            msgs = [{**m, "content": _cut(m.get("content") or "", chars)} for m in messages]
            ca, cb = _cut(a, chars), _cut(b, chars)
            q_ab, q_ba = self.question(msgs, ca, cb), self.question(msgs, cb, ca)
            if max(len(render_prompt(self.tok, q)) for q in (q_ab, q_ba)) <= limit:
                return q_ab, q_ba
            chars //= 2
        raise ChatforgeError(
            f"the judge's {self.model.cfg.seq_len}-token context cannot hold its instructions and question; "
            "shorten --instructions or use a judge with a longer context"
        )

    @torch.no_grad()
    def __call__(self, messages: list[dict], a: str, b: str) -> Judgement:
        q_ab, q_ba = self._fitted(messages, a, b)
        seq_len = self.model.cfg.seq_len
        rows = [encode_answer(self.tok, q, letter, seq_len) for q in (q_ab, q_ba) for letter in ("A", "B")]
        device = next(self.model.parameters()).device
        lp = sequence_logps(self.model, [r[0] for r in rows], [r[1] for r in rows], device).tolist()
        # order AB: "A" means A; order BA: "B" means A. Averaging cancels a bias for either letter.
        score = ((lp[0] - lp[1]) + (lp[3] - lp[2])) / 2
        p_a = 1 / (1 + math.exp(-max(min(score, 50.0), -50.0)))
        pick = "A" if score >= 0 else "B"
        prefix = f"Reply {pick} is better because"
        prompt = render_prompt(self.tok, q_ab) + self.tok.encode(prefix)
        stops = turn_end_ids(self.tok)
        out = generate_batch(self.model, [prompt], self.critique_tokens, stop_ids=stops)[0]
        critique = prefix + self.tok.decode([t for t in out if t not in stops])
        return Judgement(pick, p_a, " ".join(critique.split()))


# ---- the labeling loop -------------------------------------------------------------------------------


def judge_agreement(rows: list[dict]) -> dict:
    """How often the judge's pick matched the person's A/B decision (ties, both-bad and rows the
    judge labelled alone are left out)."""
    judged = [
        r["judge"]["agrees"]
        for r in rows
        if isinstance(r.get("judge"), dict) and r["judge"].get("agrees") is not None
    ]
    agree = sum(bool(a) for a in judged)
    return {"decisions": len(judged), "agree": agree, "rate": agree / len(judged) if judged else None}


def agreement_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).stem + ".agreement.json")


def label_loop(
    prompts: list[list[dict]],
    sample: Callable[[list[dict]], tuple[str, str] | None],
    out: str | Path,
    *,
    judge: Callable[[list[dict], str, str], Judgement] | None = None,
    judge_name: str = "judge",
    labeller: str = "human",
    auto: bool = False,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[[str], None] = _print,
    width: int | None = None,
) -> dict:
    """Label the prompts not yet in `out`; returns a summary. Every decision is on disk before the
    next prompt is shown. q, end of input or Ctrl-C stop the loop cleanly."""
    out = Path(out)
    if auto and judge is None:
        raise ChatforgeError("--auto needs a --judge to label with")
    repair_tail(out)
    done = (
        {prompt_key(r["messages"]) for r in load_prefs(out)}
        if out.is_file() and out.stat().st_size
        else set()
    )
    todo = [m for m in prompts if prompt_key(m) not in done]
    width = width or shutil.get_terminal_size((100, 24)).columns
    counts = {"labelled": 0, "skipped": 0}
    print_fn(
        f"{len(prompts) - len(todo)} of {len(prompts)} prompts already labelled in {out}; {len(todo)} to go"
    )
    stopped = "done"
    try:
        for i, messages in enumerate(todo, start=1):
            pair = sample(messages)
            if pair is None:
                print_fn("(prompt too long for the model's context: skipped)")
                counts["skipped"] += 1
                continue
            a, b = pair
            print_fn(f"\nprompt {i} of {len(todo)}\n" + format_pair(messages, a, b, width))
            j = judge(messages, a, b) if judge is not None else None
            if j is not None:
                print_fn(f"judge prefers {j.pick} (p(A better) = {j.p_a:.2f}): {escape_controls(j.critique)}")
            choice = _ask_choice(input_fn, print_fn, j, auto)
            if choice == "quit":
                stopped = "quit"
                break
            if choice == "skip":
                counts["skipped"] += 1
                continue
            who = "judge:" + judge_name if auto else labeller
            try:
                reason = "" if auto else input_fn("reason (optional, Enter for none): ").strip()
            except (KeyboardInterrupt, EOFError):  # the decision was made: keep it, without a reason
                append_pref(out, comparison_row(messages, a, b, choice, "", j, judge_name, who))
                counts["labelled"] += 1
                raise
            append_pref(out, comparison_row(messages, a, b, choice, reason, j, judge_name, who))
            counts["labelled"] += 1
    except (KeyboardInterrupt, EOFError) as e:
        stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else "end of input"
        print_fn("")
    rows = load_prefs(out) if out.is_file() and out.stat().st_size else []
    summary = {**counts, "total_in_file": len(rows), "stopped": stopped, "out": str(out)}
    if judge is not None:
        summary["agreement"] = judge_agreement(rows)
        atomic_write_json(agreement_path(out), {**summary["agreement"], "judge": judge_name})
    print_fn(
        f"{counts['labelled']} labelled, {counts['skipped']} skipped ({stopped}); {len(rows)} comparisons in {out}"
    )
    ag = summary.get("agreement")
    if ag and ag["decisions"]:
        print_fn(
            f"judge agreed with you on {ag['agree']} of {ag['decisions']} A/B decisions ({100 * ag['rate']:.0f}%)"
        )
    return summary


def _ask_choice(input_fn, print_fn, j: Judgement | None, auto: bool) -> str:
    if auto:
        return "prefer_a" if j.pick == "A" else "prefer_b"  # type: ignore[union-attr]
    hint = f"  [Enter] accept the judge ({j.pick})" if j is not None else ""
    while True:
        key = input_fn(f"{KEY_HELP}{hint}\n> ").strip().lower()
        if not key and j is not None:
            return "prefer_a" if j.pick == "A" else "prefer_b"
        if key[:1] in KEYS and len(key) == 1:
            return KEYS[key]
        print_fn(f"unknown key {key!r}: press one of a, b, t, x, s, q" + (" or Enter" if j else ""))


def comparison_row(
    messages: list[dict], a: str, b: str, choice: str, reason: str, j: Judgement | None,
    judge_name: str, labeller: str,
) -> dict:  # fmt: skip
    """One comparison as prefs.py stores it; `choice` is prefer_a, prefer_b, tie or both_bad and `j`
    the judge's draft, if one was asked (the terminal labeller and the web page's compare view)."""
    if choice == "prefer_b":
        chosen, rejected, verdict, pick = b, a, "prefer", "B"
    else:  # ties and both-bad keep A first; their verdict tells the trainers to skip them
        chosen, rejected = a, b
        verdict, pick = {"prefer_a": ("prefer", "A"), "tie": ("tie", None), "both_bad": ("both_bad", None)}[
            choice
        ]
    row = {
        "messages": messages,
        "chosen": {"role": "assistant", "content": chosen},
        "rejected": {"role": "assistant", "content": rejected},
        "verdict": verdict,
        "labeller": labeller,
    }
    if reason:
        row["reason"] = reason
    if j is not None:
        row["critique"] = j.critique
        auto = labeller.startswith("judge:")
        row["judge"] = {
            "model": judge_name,
            "pick": j.pick,
            "p_a": round(j.p_a, 4),
            "agrees": None if auto or pick is None else pick == j.pick,
        }
    return row


# ---- sampling two answers --------------------------------------------------------------------------


def make_sampler(
    model: GPT, tok: Tokenizer, *, max_new_tokens: int, temperature: float, top_p: float | None, seed: int
) -> Callable[[list[dict]], tuple[str, str] | None]:
    """Two sampled answers per prompt, seeded by the prompt itself, so a resumed session (or a rerun)
    shows the same pair. Up to three tries to get two different answers."""
    stops = turn_end_ids(tok)

    def sample(messages: list[dict]) -> tuple[str, str] | None:
        prompt = render_prompt(tok, messages)
        if len(prompt) >= model.cfg.seq_len:
            return None
        base = (seed * 1_000_003 + zlib.crc32(prompt_key(messages).encode())) % (2**31)
        for attempt in range(3):
            outs = generate_batch(
                model, [prompt, prompt], max_new_tokens, temperature=temperature, top_p=top_p,
                seeds=[base + 2 * attempt, base + 2 * attempt + 1], stop_ids=stops,
            )  # fmt: skip
            a, b = (tok.decode([t for t in o if t not in stops]).strip() for o in outs)
            if a != b:
                break
        return a, b

    return sample


# ---- CLI ---------------------------------------------------------------------------------------------


def cmd_label(args: LabelOptions) -> None:
    if args.temperature <= 0:
        raise ChatforgeError("--temperature must be > 0: greedy decoding would give the same answer twice")
    device = pick_device(args.device)
    prompts = load_prompts(args.prompts)
    run = load_run(args.model, device=device)
    model, tok = run.model, run.tokenizer
    sample = make_sampler(
        model,
        tok,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    judge = None
    if args.judge:
        instructions = DEFAULT_INSTRUCTIONS
        if args.instructions:
            try:
                instructions = Path(args.instructions).read_text(encoding="utf-8")
            except OSError as e:
                raise ChatforgeError(
                    f"cannot read --instructions {args.instructions} ({e.strerror or e})"
                ) from None
        judged_by = load_run(args.judge, device=device)
        judge = Judge(judged_by.model, judged_by.tokenizer, instructions, name=str(args.judge))
    elif args.instructions:
        raise ChatforgeError("--instructions are for the judge: add --judge MODEL")
    summary = label_loop(
        prompts, sample, Path(args.out), judge=judge, judge_name=str(args.judge or ""),
        labeller=args.labeller, auto=args.auto,
    )  # fmt: skip
    print(json.dumps(summary), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m chatforge.align.label ...` (the same as `chatforge prefs label ...`)."""
    p = argparse.ArgumentParser(prog="chatforge prefs label", description=__doc__.split("\n\n")[0])
    add_options(p, LabelOptions)
    args = options_from_args(LabelOptions, p.parse_args(argv))
    try:
        cmd_label(args)
    except ChatforgeError as e:
        print(f"chatforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the loop (loading the model): nothing was being written
        print("chatforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
