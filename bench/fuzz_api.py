"""Fuzz the server's API from its own OpenAPI schema (schemathesis + hypothesis): no request, valid or
not, may get a 5xx, and every 4xx must be an OpenAI-shaped error.

    PYTHONPATH=. python bench/fuzz_api.py --examples 200          # per operation and mode

Each operation is fuzzed in schemathesis's two modes: positive (bodies that fit the schema) and
negative (bodies that break it: wrong types, missing fields, out-of-range numbers). The model is
a tiny random one, so the generated requests run real generation through the real scheduler.
Seeded (hypothesis derandomize), so a run is repeatable. Prints one line per operation and mode and
a JSON summary; exits 1 if any response was a 5xx or a malformed error.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path


def build_app(db: Path):
    import torch

    from chatforge.model.gpt import GPT, GPTConfig
    from chatforge.serve.app import create_app
    from chatforge.serve.feedback import FeedbackStore
    from chatforge.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tok = Tokenizer.train(["Hello there, how are you today? I am fine, thank you very much."] * 40, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, seq_len=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)).eval()
    # schemathesis's ASGI client sends `Host: testserver`
    return create_app(
        model, tok, model_id="tiny", store=FeedbackStore(db), max_batch=4, max_queue=64,
        allowed_hosts=["testserver"],
    )  # fmt: skip


def check(case, seen: collections.Counter, failures: list[dict], mode: str) -> None:
    """Send one generated request; count its status; record a 5xx or a malformed error. Valid bodies
    name the served model (as a real client would), so they reach generation instead of a 404."""
    if mode == "positive" and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"
    response = case.call(timeout=30)
    seen[response.status_code] += 1
    problem = None
    if response.status_code >= 500:
        problem = "server error"
    elif response.status_code >= 400:
        try:
            err = response.json()["error"]
            if set(err) != {"message", "type", "param", "code"} or not err["message"]:
                problem = "malformed error body"
        except (ValueError, KeyError, TypeError):
            problem = "error body is not OpenAI-shaped JSON"
    if problem:
        failures.append(
            {
                "operation": case.operation.label,
                "mode": mode,
                "problem": problem,
                "status": response.status_code,
                "request": case.as_curl_command(),
                "response": response.text[:300],
            }
        )


def checker(seen: collections.Counter, failures: list[dict], mode: str):
    def run(case) -> None:
        check(case, seen, failures, mode)

    return run


def fuzz(app, examples: int, progress: bool = True) -> dict:
    """Run every operation in both modes; return counts and the failures found."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: collections.Counter = collections.Counter()
    failures: list[dict] = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen: collections.Counter = collections.Counter()
            run = given(case=op.as_strategy(generation_mode=mode))(checker(seen, failures, mode.value))
            run = settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(run)
            t0 = time.perf_counter()
            try:
                run()
            except Unsatisfiable:  # negative mode on an operation that takes no input: nothing to break
                continue
            statuses.update(seen)
            if progress:
                print(
                    f"{op.label:<45} {mode.value:<8} {sum(seen.values()):>4} requests "
                    f"{dict(sorted(seen.items()))} in {time.perf_counter() - t0:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
    return {"statuses": dict(sorted(statuses.items())), "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=100, help="hypothesis examples per operation and mode")
    args = ap.parse_args()
    app = build_app(Path(tempfile.mkdtemp(prefix="fuzz_api_")) / "fb.sqlite")
    app.state.server.scheduler.start_thread()  # schemathesis calls the app without running its lifespan
    try:
        report = fuzz(app, args.examples)
    finally:
        app.state.server.scheduler.shutdown()
    print(json.dumps({"examples_per_operation_and_mode": args.examples, **report}, indent=2))
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
