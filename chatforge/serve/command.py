"""`chatforge serve`: its command-line options, loading the run, and running the app with uvicorn.
`python -m chatforge.serve.command --model RUN` is the same as `chatforge serve --model RUN`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.serve.feedback import FeedbackStore


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="RUN", help="run folder (or checkpoint folder) to serve")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CHATFORGE_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* (default: $CHATFORGE_API_KEY; none = open)",
    )
    p.add_argument(
        "--max-batch", type=int, default=16, help="sequences generated together (1 = one at a time)"
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests allowed to wait; more get 429 (default 64)"
    )
    p.add_argument("--db", metavar="FILE", help="feedback SQLite file (default RUN/feedback.sqlite)")
    p.add_argument("--name", metavar="ID", help="model id in the API (default: the run folder's name)")
    p.add_argument(
        "--max-request-kb", type=int, default=1024, help="largest request body in KiB (default 1024)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")


def build_server_app(args: argparse.Namespace):
    """Load the run and build the app `cmd_serve` runs (separate so tests can call it)."""
    # imported here so that building the CLI's parser needs neither FastAPI nor torch
    from chatforge.model.quant import load_for_inference
    from chatforge.serve.app import create_app
    from chatforge.tokenizer import Tokenizer
    from chatforge.train.common import pick_device

    if args.max_batch < 1:
        raise ChatforgeError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 1 <= args.port <= 65535:
        raise ChatforgeError(f"--port must be in 1..65535, got {args.port}")
    # loaded as `chatforge chat` loads it: the decode layout (quant.decode_layout), the same logits
    model, _meta, model_dir = load_for_inference(Path(args.model), None, pick_device(args.device))
    tok = Tokenizer.load(model_dir)  # the run's chat format (add_bos_token) comes with it
    run = Path(args.model).resolve()
    store = FeedbackStore(Path(args.db) if args.db else run / "feedback.sqlite")
    name = args.name or run.name
    app = create_app(
        model,
        tok,
        model_id=name,
        store=store,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_request_kb * 1024,
    )
    return app, name, store.path


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    app, name, db = build_server_app(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"chatforge: warning: listening on {args.host} with no --api-key: "
            "anyone who can reach it can use it",
            file=sys.stderr,
        )
    print(
        f"serving {name} (batch {args.max_batch}) at http://{args.host}:{args.port}/ "
        "(chat page; OpenAI API under /v1), "
        f"feedback in {db}",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":  # python -m chatforge.serve.command --model RUN (the same as `chatforge serve`)
    parser = argparse.ArgumentParser(prog="chatforge serve")
    add_serve_arguments(parser)
    try:
        cmd_serve(parser.parse_args())
    except ChatforgeError as e:
        print(f"chatforge: error: {e}", file=sys.stderr)
        sys.exit(2)
