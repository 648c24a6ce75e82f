"""Does a one-token matmul use every core? F.linear against decode_layout's split (one bmm).

    PYTHONPATH=. python bench/matvec_cores.py --threads 2

A decode step multiplies one activation row by every weight matrix: a matrix-vector product,
bound by streaming the weights from memory. For each of SmolLM2-135M's shapes this times
back-to-back calls for about a second over enough distinct matrices to miss the caches, and
reports process CPU time / wall time (about 1.0 = one core busy) and the weight bytes streamed
per second, for torch's F.linear on decode_layout's memory order and for SplitLinear (the same
memory in one block of outputs per thread, one bmm). Then one whole token's 121 matmuls
(30 layers x 4 + the lm_head, 538 MB of distinct weights), fastest and median of --steps.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from chatforge.model.quant import SplitLinear, _streaming_order  # noqa: E402

# SmolLM2-135M: (out, in) of fused q/k/v, o_proj, fused gate/up, down_proj; then the lm_head
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD = (49152, 576)


def plain(out: int, n_in: int) -> nn.Linear:
    lin = nn.Linear(n_in, out, bias=False)
    lin.weight.data = _streaming_order(lin.weight.data)
    return lin


def busy(fn, mods: list, seconds: float) -> tuple[float, float]:
    """(CPU time / wall time, GB/s of weights) over `seconds` of calls cycling through mods."""
    x = torch.randn(1, 1, mods[0].in_features)
    c0, t0, n = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for m in mods:
            fn(m, x)
            n += 1
    wall = time.perf_counter() - t0
    return (time.process_time() - c0) / wall, n * mods[0].weight.numel() * 4 / wall / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report: dict = {"threads": args.threads, "torch": torch.__version__, "shapes": {}}
    with torch.inference_mode():
        for out, n_in in [*LAYER, HEAD]:
            copies = max(2, int(100e6 // (out * n_in * 4)))  # ~100 MB: more than any cache
            lins = [plain(out, n_in) for _ in range(copies)]
            split = [SplitLinear(lin, args.threads) for lin in lins]
            row = {}
            for name, mods in (("F.linear", lins), ("split bmm", split)):
                cpu_per_wall, gbs = busy(lambda m, x: m(x), mods, args.seconds)
                row[name] = {"cpu_per_wall": round(cpu_per_wall, 2), "GB_per_s": round(gbs, 1)}
            report["shapes"][f"{out}x{n_in}"] = row
            print(f"{out}x{n_in}: {row}", file=sys.stderr)
        # one token's matmuls, in order, each matrix distinct as in the model
        layers = [[plain(o, i) for o, i in LAYER] for _ in range(30)] + [[plain(*HEAD)]]
        ways = {
            "F.linear": layers,
            "split bmm": [[SplitLinear(m, args.threads) for m in layer] for layer in layers],
        }
        times: dict[str, list[float]] = {k: [] for k in ways}
        x = torch.randn(1, 1, 1536)
        for _ in range(args.steps):
            for name, mats in ways.items():  # interleaved, so drifting load hits both
                t = time.perf_counter()
                for layer in mats:
                    for m in layer:
                        m(x[..., : m.in_features])
                times[name].append((time.perf_counter() - t) * 1000)
        report["one_token_121_matmuls_ms"] = {
            k: {"fastest": round(min(v), 1), "median": round(statistics.median(v), 1)}
            for k, v in times.items()
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
