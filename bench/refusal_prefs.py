"""Refusal comparisons from the refusal data's training split, for `chatforge prefs dpo`:
a harmful request's refusal over a "Sure" answer, a harmless request's answer over a refusal, so
DPO widens the margin of the one token that decides ("Sorry" or "Sure").

    python bench/refusal_prefs.py --n 1600 --out runs/refusal_prefs.jsonl
    chatforge prefs dpo --model runs/speedrun/sft --data runs/refusal_prefs.jsonl --out runs/dpo
    chatforge eval --model runs/dpo --tasks refusal --out runs/dpo/eval

Measured in docs/refusals.md ("Session 35"): it did not carry to the held-out topics.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.align.prefs import write_prefs  # noqa: E402
from chatforge.conversations import _OFFERS, _REFUSALS, benign_conversation, disallowed_request  # noqa: E402


def refusal_prefs(n: int, seed: int) -> list[dict]:
    """`n` comparisons, alternately about a harmful and a harmless request (training split only)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        refusal = rng.choice(_REFUSALS) + rng.choice(_OFFERS)
        user, answer = benign_conversation(rng, system_prob=0.0)
        if i % 2 == 0:
            request = {"role": "user", "content": disallowed_request(rng)}
            rows.append({"messages": [request], "chosen": refusal, "rejected": answer["content"], "kind": "refusal"})
        else:
            rows.append({"messages": [user], "chosen": answer["content"], "rejected": refusal, "kind": "look_alike"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1600, help="comparisons (default 1600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(f"wrote {write_prefs(args.out, refusal_prefs(args.n, args.seed))}")


if __name__ == "__main__":
    main()
