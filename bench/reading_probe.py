"""Can a model read? Three probes of copying from the context, on strangers it never saw.

    python bench/reading_probe.py RUN [RUN ...]           # each a run folder (or a checkpoint)
    python bench/reading_probe.py --from-scratch          # the GPT class on a pure copying task

- repeat: "Repeat this exactly: <2-4 names>" -> the same string (exact matches of 40);
- one_doc: one biography and a question about it, no instruction (the answer's fact in the reply, of 50);
- open_book: three biographies in rag_prompt's layout and a question (the fact in the reply, of 60).
--from-scratch trains a 2-layer GPT (n_embd 128) on random 32-token strings shown twice and prints
the copy accuracy on the second half every 100 steps: what the architecture does when copying pays."""

from __future__ import annotations

import argparse
import random
import time

import torch

from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.checkpoint import load_run
from chatforge.errors import ChatforgeError
from chatforge.eval.base import generate_greedy
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.rag.open_book import open_book_conversation, reading_world


def _replies(run, messages: list[list[dict]], max_new: int) -> list[str]:
    prompts = [render_prompt(run.tokenizer, m) for m in messages]
    outs = generate_greedy(run.model, prompts, max_new, stop_ids=turn_end_ids(run.tokenizer), batch_size=10)
    return [run.tokenizer.decode(o or []) for o in outs]


def probe(path: str) -> dict:
    run = load_run(path, inference=True)
    strangers = reading_world(99, 300)  # a seed no speedrun uses for its reading worlds
    rng = random.Random(1)
    strings = [", ".join(rng.choice(strangers.people).name for _ in range(rng.randint(2, 4))) for _ in range(40)]
    got = _replies(run, [[{"role": "user", "content": "Repeat this exactly: " + s}] for s in strings], 40)
    out = {"repeat": sum(g.strip() == s for s, g in zip(strings, got, strict=True)) / len(strings)}
    for name, docs, instruction, n in (("one_doc", 1, False, 50), ("open_book", 3, True, 60)):
        chats = [open_book_conversation(strangers, rng, docs, 0, instruction) for _ in range(3 * n)]
        chats = [c for c in chats if c.answer][:n]
        replies = _replies(run, [c.messages[:-1] for c in chats], 32)
        out[name] = sum(c.answer in r for c, r in zip(chats, replies, strict=True)) / len(chats)
    out["example"] = f"Repeat this exactly: {strings[0]} -> {got[0]}"
    return out


def from_scratch(steps: int = 600) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, seq_len=64, n_layer=2, n_embd=128, n_head=2, n_kv_head=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        half = torch.randint(0, 256, (n, 32))
        x = torch.cat([half, half], 1)
        y = x.clone()
        y[:, :32] = -1  # only the repeat is scored
        return x[:, :-1], y[:, 1:]

    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(*batch(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                x, y = batch(64)
                mask = y >= 0
                acc = (model(x).argmax(-1)[mask] == y[mask]).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, copy accuracy {acc:.3f} ({time.perf_counter() - start:.0f}s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run folders or checkpoints to probe")
    ap.add_argument("--from-scratch", action="store_true", help="train the copying task from scratch instead")
    args = ap.parse_args()
    if args.from_scratch:
        from_scratch()
    for path in args.runs:
        try:
            r = probe(path)
        except ChatforgeError as e:
            raise SystemExit(f"reading_probe: error: {e}") from None
        print(f"{path}: repeat {r['repeat']:.3f}, one_doc {r['one_doc']:.3f}, open_book {r['open_book']:.3f}")
        print(f"  {r['example']}")


if __name__ == "__main__":
    main()
