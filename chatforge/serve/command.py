"""`chatforge serve`: load a run and serve it (python -m chatforge.serve.command --model RUN is the same)."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from chatforge.errors import ChatforgeError
from chatforge.options import ServeOptions, add_options, options_from_args
from chatforge.serve.app import build_server_app


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
