"""`chatforge serve`: load a run and serve it with uvicorn (its options are `options.ServeOptions`).
`python -m chatforge.serve.command --model RUN` is the same as `chatforge serve --model RUN`.

Before anything loads: the keys (`server_keys`: a keys file, the admin's key from a file, the
environment or the command line) and the address. Without keys the server listens on loopback
only; any other address is refused (fail closed). uvicorn runs with deadlines (`uvicorn_config`):
a connection must finish its request's headers within --header-timeout seconds (else it is closed,
so slow clients cannot pile up), its body within --body-timeout (middleware.Guard), and at most
--max-connections are open at once.

Memory: the KV cache is allocated as requests need it, up to --kv-cache-mb (or --kv-cache-tokens);
--max-model-len caps prompt + completion per request. Logs: --log-level, one access line per
request at info (metrics.AccessLog). The port is bound before the model loads, so a port already in
use is one line naming it, before anything says "serving"."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import resource
import socket
import sys
import time
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from chatforge.align.label import Judge
from chatforge.checkpoint import load_run
from chatforge.device import pick_device
from chatforge.engine import generate_batch, kv_bytes_per_token
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.model.quant import compile_decode
from chatforge.options import ServeOptions, add_options, options_from_args
from chatforge.rag.embed import EMBEDDERS
from chatforge.rag.store import collection_exists, default_root
from chatforge.redteam.defenses import parse_defenses
from chatforge.serve.app import create_app
from chatforge.serve.auth import (
    ADMIN,
    Keys,
    User,
    allowed_hosts,
    check_key,
    is_loopback,
    load_keys_file,
    read_secret_file,
)
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.state import RagSettings
from chatforge.think import load_verifiers

KEEP_ALIVE_S = 5  # an idle connection between requests is closed after this


def server_keys(args: ServeOptions) -> Keys:
    """Everyone's keys: --keys FILE, and the admin's from --api-key-file, $CHATFORGE_API_KEY or
    --api-key. Empty when none is given."""
    keys = Keys()
    if args.keys:
        load_keys_file(args.keys, keys)
    from_env = args.api_key is not None and args.api_key == os.environ.get("CHATFORGE_API_KEY")
    if args.api_key_file:
        if args.api_key and not from_env:
            raise ChatforgeError("give the admin's key once: --api-key-file or --api-key, not both")
        key = check_key(read_secret_file(args.api_key_file, "API key file"), args.api_key_file)
    elif args.api_key:
        key = check_key(args.api_key, "$CHATFORGE_API_KEY" if from_env else "--api-key")
        if not from_env:
            print(
                "chatforge: warning: --api-key shows in the process list (ps) to every user of this "
                "machine; use $CHATFORGE_API_KEY or --api-key-file FILE instead",
                file=sys.stderr,
            )
    else:
        return keys
    keys.add(key, User(ADMIN, admin=True))
    return keys


class DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers: from the connection's start
    (and from each response's end), a client has `header_timeout` seconds until its next request's
    headers are complete, or the connection is closed. uvicorn has no such deadline, so 250 clients
    sending half a request each would hold 250 connections for ever."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._deadline)

    def _deadline(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # its headers came in time: a request is being answered (its body has its own deadline)
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(
    app,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    header_timeout: float = 10.0,
    max_connections: int = 1000,
    log_level: str = "warning",
) -> uvicorn.Config:
    """uvicorn's settings for this server: header deadline, keep-alive, connection cap. uvicorn's
    own access log is off: metrics.AccessLog writes one that names the user and the latency."""
    if header_timeout <= 0 or max_connections < 1:
        raise ChatforgeError("--header-timeout must be > 0 and --max-connections >= 1")
    protocol = type("DeadlineH11", (DeadlineH11,), {"header_timeout": header_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=5,
    )


def open_files_for(connections: int) -> None:
    """Raise this process's open-file limit to what `connections` sockets need (up to the hard
    limit): a server that runs out of descriptors cannot accept anyone, /health included."""
    need = connections + 256  # the model, the store, the page, the thread pool
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        top = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
        if top < need:
            raise ChatforgeError(
                f"--max-connections {connections} needs {need} open files but this process may open "
                f"{top} (ulimit -n); lower --max-connections"
            )


def configure_logging(level: str) -> None:
    """Log lines to stderr at `level` (debug, info, warning, error): chatforge's and uvicorn's."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("chatforge").setLevel(level.upper())


def bind_port(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails in one line, first."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ChatforgeError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ChatforgeError(
                f"port {port} on {host} is already in use (another server?); pick a free one with "
                f"--port N, or stop the program that holds it (e.g. `ss -ltnp 'sport = :{port}'`)"
            ) from None
        raise ChatforgeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def kv_cache_budget(args: ServeOptions, model) -> tuple[int, int | None]:
    """(KV cache budget in tokens, max_model_len or None for the default) from the options.
    Without --max-model-len, a cache smaller than the model's context caps it (said on stderr)."""
    per_token = kv_bytes_per_token(model)
    if args.kv_cache_tokens is not None:
        tokens = args.kv_cache_tokens
        what = f"--kv-cache-tokens {tokens}"
    else:
        if args.kv_cache_mb <= 0:
            raise ChatforgeError(f"--kv-cache-mb must be > 0, got {args.kv_cache_mb:g}")
        tokens = int(args.kv_cache_mb * 2**20 // per_token)
        what = f"--kv-cache-mb {args.kv_cache_mb:g} ({tokens} tokens of this model's cache)"
    ctx = model.cfg.seq_len
    if args.max_model_len is not None:
        if not 2 <= args.max_model_len <= ctx:
            raise ChatforgeError(f"--max-model-len must be in 2..{ctx} (the model's context), got {args.max_model_len}")
        if tokens < args.max_model_len:
            raise ChatforgeError(
                f"{what} cannot hold one request of --max-model-len {args.max_model_len}; "
                "raise the cache budget or lower --max-model-len"
            )
        return tokens, args.max_model_len
    if tokens < 2:
        raise ChatforgeError(f"{what} holds no request at all; raise it")
    if tokens < ctx:
        print(
            f"chatforge: note: {what} holds less than the model's context of {ctx}; requests are "
            f"capped at {tokens} tokens (raise the budget, or set --max-model-len to silence this)",
            file=sys.stderr,
        )
        return tokens, tokens
    return tokens, None


def checked_keys(args: ServeOptions) -> Keys:
    """Check the options that need no model, and return the keys (fail closed: no keys, loopback only)."""
    if args.max_batch < 1:
        raise ChatforgeError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 1 <= args.port <= 65535:
        raise ChatforgeError(f"--port must be in 1..65535, got {args.port}")
    if args.body_timeout <= 0:
        raise ChatforgeError(f"--body-timeout must be > 0, got {args.body_timeout}")
    keys = server_keys(args)
    if not keys and not is_loopback(args.host):
        raise ChatforgeError(
            f"--host {args.host} without keys would let anyone who can reach it read every "
            "conversation; give keys (--keys FILE, --api-key-file FILE or $CHATFORGE_API_KEY) "
            "or listen on 127.0.0.1"
        )
    return keys


def compile_before_serving(model: GPT) -> None:
    """--compile: compile the decode step now, not in the first requests. A step of one row and a
    step of several are two graphs (torch specialises a batch of 1), so both are run once."""
    compile_decode(model)
    print("compiling the decode step (about a minute the first time, less from torch's cache)", flush=True)
    start = time.perf_counter()
    generate_batch(model, [[0, 1, 2]], 3)
    generate_batch(model, [[0, 1], [0, 1, 2]], 3)
    print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)


def build_server_app(args: ServeOptions, keys: Keys | None = None):
    """Check the options, load the run and build the app `cmd_serve` runs (separate so tests can call
    it). `keys`: from `checked_keys`, when the caller checked already. Returns (app, model id,
    feedback file, keys)."""
    if keys is None:
        keys = checked_keys(args)
    link_hosts = [h.strip().lower() for item in args.link_hosts for h in item.split(",") if h.strip()]
    defenses = parse_defenses(args.defenses, allowed_hosts=tuple(link_hosts))  # before the model loads
    rag = rag_settings(args)
    # loaded as `chatforge chat` loads it: the decode layout (quant.decode_layout) or --quantize's format
    loaded = load_run(args.model, inference=args.quantize or True, device=pick_device(args.device))
    if args.compile:
        compile_before_serving(loaded.model)
    kv_tokens, max_model_len = kv_cache_budget(args, loaded.model)
    if defenses is not None:  # for defenses that score text with the model
        defenses.model, defenses.tok = loaded.model, loaded.tokenizer
    run = Path(args.model).resolve()
    store = FeedbackStore(Path(args.db) if args.db else run / "feedback.sqlite")
    name = args.name or run.name
    app = create_app(
        loaded.model,
        loaded.tokenizer,  # the run's chat format (add_bos_token) comes with it
        model_id=name,
        store=store,
        keys=keys,
        allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_model_len=max_model_len,
        kv_cache_tokens=kv_tokens,
        max_body_bytes=args.max_request_kb * 1024,
        body_timeout=args.body_timeout,
        comparisons=Path(args.comparisons) if args.comparisons else run / "comparisons.jsonl",
        judge=_judge(args),
        defenses=defenses,
        verifiers=load_verifiers(loaded.tokenizer, prm=args.prm, orm=args.orm, device=pick_device(args.device)),
        rag=rag,
    )
    return app, name, store.path, keys


def rag_settings(args: ServeOptions) -> RagSettings:
    if args.max_upload_mb <= 0 or args.max_documents < 1:
        raise ChatforgeError("--max-upload-mb must be > 0 and --max-documents >= 1")
    if args.rag_embedding not in EMBEDDERS:
        raise ChatforgeError(f"--rag-embedding {args.rag_embedding}: use one of {', '.join(EMBEDDERS)}")
    root = Path(args.rag_root).expanduser() if args.rag_root else None
    base = root if root is not None else default_root()
    shared = tuple(dict.fromkeys(n.strip() for item in args.shared_collections for n in item.split(",") if n.strip()))
    for name in shared:  # a share that names nothing is a typo: refuse it rather than serve without it
        if not collection_exists(name, base):
            raise ChatforgeError(
                f"--shared-collections {name}: no collection {name!r} in {base}; make it first with "
                f"`chatforge rag add --collection {name} FILES`"
            )
    return RagSettings(root=root, embedding=args.rag_embedding, max_upload_bytes=int(args.max_upload_mb * 2**20),
                       max_documents=args.max_documents, shared=shared)  # fmt: skip


def _judge(args: ServeOptions) -> Judge | None:
    """The compare view's judge, loaded as `chatforge prefs label --judge` loads it."""
    if not args.judge:
        return None
    judged_by = load_run(args.judge, device=pick_device(args.device))
    return Judge(judged_by.model, judged_by.tokenizer, name=Path(args.judge).name)


def cmd_serve(args: ServeOptions) -> None:
    configure_logging(args.log_level)
    open_files_for(args.max_connections)
    keys = checked_keys(args)
    sock = bind_port(args.host, args.port)  # before the model loads: a taken port fails first, in one line
    app, name, db, keys = build_server_app(args, keys)
    hosts = allowed_hosts(args.host, args.allowed_hosts)
    config = uvicorn_config(
        app,
        host=args.host,
        port=args.port,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        log_level=args.log_level,
    )
    sched = app.state.server.scheduler
    memory = (
        f"context {sched.max_model_len}, KV cache up to {sched.decoder.max_tokens} tokens "
        f"({sched.decoder.max_tokens * kv_bytes_per_token(app.state.server.model) / 2**20:.0f} MB)"
    )
    who = (
        f"keys for {', '.join(keys.users)}"
        if keys
        else "no API key: loopback only, and every caller sees every conversation"
    )
    print(
        f"serving {name} (batch {args.max_batch}, {memory}) at http://{args.host}:{args.port}/ "
        f"(chat page; OpenAI API under /v1), {who}, feedback in {db}; answers to Host "
        f"{', '.join(hosts)} (more with --allowed-hosts)",
        flush=True,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="chatforge serve")
    add_options(parser, ServeOptions)
    try:
        cmd_serve(options_from_args(ServeOptions, parser.parse_args()))
    except ChatforgeError as e:
        print(f"chatforge: error: {e}", file=sys.stderr)
        sys.exit(2)
