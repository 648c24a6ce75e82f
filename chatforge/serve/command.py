"""`chatforge serve`: load a run and serve it with uvicorn (its options are `options.ServeOptions`).
`python -m chatforge.serve.command --model RUN` is the same as `chatforge serve --model RUN`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from chatforge.checkpoint import load_run
from chatforge.device import pick_device
from chatforge.errors import ChatforgeError
from chatforge.options import ServeOptions, add_options, options_from_args
from chatforge.serve.app import create_app
from chatforge.serve.feedback import FeedbackStore


def build_server_app(args: ServeOptions):
    """Load the run and build the app `cmd_serve` runs (separate so tests can call it)."""
    if args.max_batch < 1:
        raise ChatforgeError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 1 <= args.port <= 65535:
        raise ChatforgeError(f"--port must be in 1..65535, got {args.port}")
    # loaded as `chatforge chat` loads it: the decode layout (quant.decode_layout), the same logits
    loaded = load_run(args.model, inference=True, device=pick_device(args.device))
    run = Path(args.model).resolve()
    store = FeedbackStore(Path(args.db) if args.db else run / "feedback.sqlite")
    name = args.name or run.name
    app = create_app(
        loaded.model,
        loaded.tokenizer,  # the run's chat format (add_bos_token) comes with it
        model_id=name,
        store=store,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_request_kb * 1024,
    )
    return app, name, store.path


def cmd_serve(args: ServeOptions) -> None:
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="chatforge serve")
    add_options(parser, ServeOptions)
    try:
        cmd_serve(options_from_args(ServeOptions, parser.parse_args()))
    except ChatforgeError as e:
        print(f"chatforge: error: {e}", file=sys.stderr)
        sys.exit(2)
