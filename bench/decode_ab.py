"""The decoding engine of another checkout against this one, in one process on one model: are greedy
tokens identical, and how long does generation take with each (rounds alternate, so load from
other processes hits both alike)?

    git worktree add /tmp/old COMMIT     # or any copy of the tree to compare with
    PYTHONPATH=. python bench/decode_ab.py --old /tmp/old --model RUN --new-tokens 40

Prompts are random ids of 7 to 90 tokens; batch sizes 1 and 8 (generate_batch). Reported per batch
size: whether the tokens match, and the median time of each engine over --rounds runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge import engine as new_engine  # noqa: E402
from chatforge.checkpoint import load_run  # noqa: E402


def load_engine(tree: Path):
    """chatforge/engine.py of another checkout, as a module of its own (the model code is this one's)."""
    spec = importlib.util.spec_from_file_location("old_engine", tree / "chatforge" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_engine"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, metavar="TREE", help="the other checkout's root folder")
    ap.add_argument("--model", required=True, metavar="RUN")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    old_engine = load_engine(Path(args.old))
    model = load_run(args.model, inference=True, device=torch.device("cpu")).model
    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (12, 40, 7, 90, 25, 60, 33, 15)]
    engines = {"old": old_engine, "new": new_engine}
    with torch.inference_mode():
        for batch in (1, 8):
            rows = prompts[:batch]
            same = old_engine.generate_batch(model, rows, args.new_tokens) == new_engine.generate_batch(
                model, rows, args.new_tokens
            )
            times: dict[str, list[float]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    t0 = time.perf_counter()
                    engines[name].generate_batch(model, rows, args.new_tokens)
                    times[name].append(time.perf_counter() - t0)
            old, new = (statistics.median(times[k]) for k in ("old", "new"))
            print(
                f"batch {batch}: greedy tokens identical: {same}; {args.new_tokens} tokens per row, median "
                f"{old:.3f} s old, {new:.3f} s new, new/old time {new / old:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
