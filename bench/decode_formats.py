"""Inference formats side by side in ONE process: decode tokens/s and time to first token of fp32,
int8 and int4 (any kernel, any int4 group size) on the same weights, runs interleaved so load from
other processes hits every format alike; the ratios are fair even on a shared machine.

    PYTHONPATH=. python bench/decode_formats.py --model RUN --threads 1 \\
        --formats fp32,int8,int8:int8pack,int4,int4:g32 --new-tokens 64 --rounds 3

A format is fp32, bf16, int8[:KERNEL] or int4[:KERNEL][:gN] (model/quant.py's kernels). Each is
built from one load of the run (decode_layout with one part for fp32), warmed up once, then timed
--rounds times through the one engine (engine.generate, greedy, exactly --new-tokens tokens).
bench/infer.py measures each engine in its own process instead (peak memory, quality, HF, llama.cpp).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.chat_format import render_prompt  # noqa: E402
from chatforge.checkpoint import load_run  # noqa: E402
from chatforge.engine import generate  # noqa: E402
from chatforge.fileio import atomic_write_text  # noqa: E402
from chatforge.model.quant import (  # noqa: E402
    INT4_GROUP_SIZE,
    cpu_features,
    inference_model,
    quantization_kernels,
)

PROMPT = "Explain how a large language model writes an answer, one token at a time, in a few paragraphs."


def build(model, spec: str):
    """A deep copy of `model` in the format `spec` names (see the module docstring)."""
    mode, *options = spec.split(":")
    group = next((int(o[1:]) for o in options if o[:1] == "g" and o[1:].isdigit()), INT4_GROUP_SIZE)
    kernel = next((o for o in options if not (o[:1] == "g" and o[1:].isdigit())), None)
    if mode == "fp32":
        return inference_model(copy.deepcopy(model), None, parts=1)
    return inference_model(copy.deepcopy(model), mode, kernel=kernel, group_size=group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a chatforge run folder")
    ap.add_argument("--formats", default="fp32,int8,int4")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.model)
    ids = render_prompt(run.tokenizer, [{"role": "user", "content": PROMPT}])
    specs = [s.strip() for s in args.formats.split(",") if s.strip()]
    models, built_s = {}, {}
    for spec in specs:
        t = time.perf_counter()
        models[spec] = build(run.model, spec)
        built_s[spec] = round(time.perf_counter() - t, 2)
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in specs}
    tokens: dict[str, list[int]] = {}
    n = args.new_tokens
    with torch.inference_mode():
        for spec in specs:  # warm-up
            list(generate(models[spec], ids, 8, temperature=0.0))
        for r in range(args.rounds):
            for spec in specs if r % 2 == 0 else specs[::-1]:
                start, stamps, out = time.perf_counter(), [], []
                for t in generate(models[spec], ids, n, temperature=0.0):
                    stamps.append(time.perf_counter())
                    out.append(t)
                times[spec].append(((n - 1) / (stamps[-1] - stamps[0]), stamps[0] - start))
                tokens[spec] = out
    rows = {}
    for spec in specs:
        decode = [d for d, _ in times[spec]]
        ttft = statistics.median(f for _, f in times[spec])
        rows[spec] = {
            "decode_tok_s": round(statistics.median(decode), 2),
            "decode_tok_s_all_rounds": [round(d, 2) for d in decode],
            "ttft_s": round(ttft, 4),
            "prefill_tok_s": round(len(ids) / ttft, 1),
            "kernels": quantization_kernels(models[spec]),
            "build_s": built_s[spec],
            f"equal_tokens_vs_{specs[0]}": sum(
                a == b for a, b in zip(tokens[spec], tokens[specs[0]], strict=True)
            ),
        }
        print(
            f"{spec:16s} decode {rows[spec]['decode_tok_s']:6.1f} tok/s {rows[spec]['decode_tok_s_all_rounds']}  "
            f"TTFT {ttft * 1000:5.0f} ms  prefill {rows[spec]['prefill_tok_s']:6.1f} tok/s  {rows[spec]['kernels']}"
        )
    if args.out:
        report = {
            "model": args.model,
            "prompt_tokens": len(ids),
            "new_tokens": n,
            "rounds": args.rounds,
            "threads": args.threads,
            "torch": torch.__version__,
            "cpu_features": cpu_features(),
            "formats": rows,
        }
        atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
