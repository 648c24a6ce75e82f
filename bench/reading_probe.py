"""Can a model read? Five probes of copying from the context, on strangers it never saw.

    python bench/reading_probe.py RUN [RUN ...]           # each a run folder (or a checkpoint)

- repeat: "Repeat this exactly: <2-4 names>" -> the same string (exact matches of 40);
- numbers: "Repeat this exactly: <two numbers of 3-6 digits>" -> the same string (of 40): what a
  calculator call copies from the question and an answer from the tool's result;
- calls: a new calculator problem ("Multiply 91644 by 5185.", calculator shown) -> the call's
  expression copies both numbers exactly (of 60);
- one_doc: one biography and a question about it, no instruction (the answer's fact in the reply, of 50);
- open_book: three biographies in rag_prompt's layout and a question (the fact in the reply, of 60).
bench/induction_toy.py trains the GPT class from scratch on pure copying: when copying heads form."""

from __future__ import annotations

import argparse
import random

from chatforge.chat_format import render_prompt, turn_end_ids, with_tools
from chatforge.checkpoint import load_run
from chatforge.conversations import big_arithmetic_problem
from chatforge.errors import ChatforgeError
from chatforge.eval.base import generate_greedy
from chatforge.rag.open_book import open_book_conversation, reading_world
from chatforge.tools.calculator import CALCULATOR_TOOL


def _replies(run, messages: list[list[dict]], max_new: int) -> list[str]:
    prompts = [render_prompt(run.tokenizer, m) for m in messages]
    outs = generate_greedy(run.model, prompts, max_new, stop_ids=turn_end_ids(run.tokenizer), batch_size=10)
    return [run.tokenizer.decode(o or []) for o in outs]


def probe(path: str) -> dict:
    run = load_run(path, inference=True)
    strangers = reading_world(99, 300)  # a seed no speedrun uses for its reading worlds
    rng = random.Random(1)
    strings = [
        ", ".join(rng.choice(strangers.people).name for _ in range(rng.randint(2, 4))) for _ in range(40)
    ]
    got = _replies(run, [[{"role": "user", "content": "Repeat this exactly: " + s}] for s in strings], 40)
    out = {"repeat": sum(g.strip() == s for s, g in zip(strings, got, strict=True)) / len(strings)}
    num_rng = random.Random(2)  # its own: the document probes below ask what they always asked
    numbers = [
        f"{num_rng.randrange(100, 10 ** num_rng.randint(3, 6))}, {num_rng.randrange(100, 10 ** num_rng.randint(3, 6))}"
        for _ in range(40)
    ]
    got_n = _replies(run, [[{"role": "user", "content": "Repeat this exactly: " + s}] for s in numbers], 24)
    out["numbers"] = sum(g.strip() == s for s, g in zip(numbers, got_n, strict=True)) / len(numbers)
    problems = [big_arithmetic_problem(num_rng) for _ in range(60)]
    asked = [with_tools([{"role": "user", "content": p.question}], [CALCULATOR_TOOL]) for p in problems]
    calls = _replies(run, asked, 40)
    out["calls"] = sum(f'"{p.expression}"' in c for p, c in zip(problems, calls, strict=True)) / len(problems)
    for name, docs, instruction, n in (("one_doc", 1, False, 50), ("open_book", 3, True, 60)):
        chats = [open_book_conversation(strangers, rng, docs, 0, instruction) for _ in range(3 * n)]
        chats = [c for c in chats if c.answer][:n]
        replies = _replies(run, [c.messages[:-1] for c in chats], 32)
        out[name] = sum(c.answer in r for c, r in zip(chats, replies, strict=True)) / len(chats)
    out["example"] = f"Repeat this exactly: {strings[0]} -> {got[0]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run folders or checkpoints to probe")
    args = ap.parse_args()
    for path in args.runs:
        try:
            r = probe(path)
        except ChatforgeError as e:
            raise SystemExit(f"reading_probe: error: {e}") from None
        print(
            f"{path}: repeat {r['repeat']:.3f}, numbers {r['numbers']:.3f}, calls {r['calls']:.3f}, one_doc {r['one_doc']:.3f}, open_book {r['open_book']:.3f}"
        )
        print(f"  {r['example']}")


if __name__ == "__main__":
    main()
