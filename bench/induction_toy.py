"""When do copying (induction) heads form? The GPT class trained from scratch on pure copying.

    python bench/induction_toy.py                                   # the cpu preset's shape, lr 3e-3 and 1e-3
    python bench/induction_toy.py --lr 3e-3 --qk-norm --seeds 0 1 2
    python bench/induction_toy.py --lr 3e-3 --smear                 # previous token mixed into each embedding

Each row of 64 random tokens (vocabulary 2,048, as the cpu preset's) holds a random string of 4-28
tokens written twice at a random place; only the second copy is scored. The offset between the
copies changes from row to row, so a fixed relative-position head cannot solve it: the model has
to find where the current token occurred before and read the token after it (an induction head).
Training shows a plateau, then an abrupt drop of the loss; the bench prints copy accuracy every
100 steps and, per setting and seed, the first step where it passes 50% ("-" if it never does).

--smear is not a chatforge model option: a learned per-channel gate mixes the previous token's
embedding into each position's (Olsson et al.'s "smeared key" idea, applied at the embedding),
which hands attention the previous token and so makes an induction head one layer deep. It is here
to show how much of the plateau is the model having to build that previous-token lookup itself.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.config import TrainConfig  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.train.optim import build_optimizers  # noqa: E402

VOCAB, ROW = 2048, 64


class SmearedEmbedding(torch.nn.Module):
    """embed(x_t) + gate * embed(x_{t-1}), the gate learned per channel and starting at 0."""

    def __init__(self, embed: torch.nn.Embedding) -> None:
        super().__init__()
        self.embed = embed
        self.gate = torch.nn.Parameter(torch.zeros(embed.embedding_dim))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        return x + self.gate * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)


def copy_batch(n: int, gen: torch.Generator, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(n):
        length = rng.randint(4, 28)
        at = rng.randint(0, ROW - 2 * length - 1)
        x = torch.randint(0, VOCAB, (ROW + 1,), generator=gen)
        x[at + length : at + 2 * length] = x[at : at + length]
        y = torch.full_like(x, -1)
        scored = slice(at + length + 1, at + 2 * length)  # the copy's first token cannot be foreseen
        y[scored] = x[scored]
        xs.append(x)
        ys.append(y)
    x, y = torch.stack(xs), torch.stack(ys)
    return x[:, :-1], y[:, 1:]


def train(args: argparse.Namespace, lr: float, seed: int) -> int | None:
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    cfg = GPTConfig.from_depth(
        args.depth, vocab_size=VOCAB, seq_len=ROW, n_embd=args.n_embd, qk_norm=args.qk_norm
    )
    model = GPT(cfg)
    if args.smear:
        model.embed_tokens = SmearedEmbedding(model.embed_tokens)
    tcfg = TrainConfig(optimizer=args.optimizer, lr=lr, embed_lr=lr, weight_decay=0.1)
    optimizers = build_optimizers(model, tcfg)
    label = f"lr {lr:g} seed {seed}"
    formed, start = None, time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(*copy_batch(32, gen, rng))
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                x, y = copy_batch(64, gen, rng)
                mask = y >= 0
                acc = (model(x).argmax(-1)[mask] == y[mask]).float().mean().item()
            print(f"{label} step {step}: loss {loss.item():.3f}, copy accuracy {acc:.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip
            if acc > 0.5 and formed is None:
                formed = step
                if args.stop_when_formed:
                    break
    return formed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=[3e-3, 1e-3],
        help="learning rates (with --optimizer muon, of the AdamW groups only)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    ap.add_argument("--qk-norm", action="store_true")
    ap.add_argument(
        "--smear", action="store_true", help="mix the previous token's embedding in (not a model option)"
    )
    ap.add_argument(
        "--stop-when-formed", action="store_true", help="stop a run once copy accuracy passes 50%%"
    )
    args = ap.parse_args()
    if args.steps < 100:
        raise SystemExit(
            "induction_toy: error: --steps must be at least 100 (accuracy is measured every 100)"
        )
    formed = {(lr, s): train(args, lr, s) for lr in args.lr for s in args.seeds}
    extras = " ".join(f for f, on in (("qk_norm", args.qk_norm), ("smear", args.smear)) if on)
    print(
        f"\nfirst step with copy accuracy > 50% (depth {args.depth}, n_embd {args.n_embd}, {args.optimizer} {extras})"
    )
    print("| lr | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---:|" * len(args.seeds))
    for lr in args.lr:
        print(f"| {lr:g} | " + " | ".join(str(formed[lr, s] or "-") for s in args.seeds) + " |")


if __name__ == "__main__":
    main()
