"""`create_app`: the OpenAI-compatible HTTP server for one model, with a web chat page and the
feedback store. The app is put together here; its parts live beside it:

    protocol.py       request bodies, OpenAI's error shape, request checks
    routes_openai.py  GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions
    routes_store.py   GET / (the chat page: web/), /v1/conversations[/{id}], POST /v1/feedback
    routes_compare.py the page's compare view: a pick between two answers -> --comparisons FILE
    routes_rag.py     /v1/collections: each user's collections of files, uploads, cited chunks
    streaming.py      jobs -> text (stop strings, tool calls) -> SSE chunks
    auth.py           API keys -> users (who owns which conversation), the Host allow-list
    middleware.py     Host check, API key, body size and time limits, security headers, errors in
                      OpenAI's shape
    state.py          ServerState (model, tokenizer, scheduler, store) that every route shares
    command.py        `chatforge serve`'s options and uvicorn
    metrics.py        GET /metrics (Prometheus) and the access log

Requests go through a `Scheduler` (scheduler.py): every running generation shares one forward
pass per token (continuous batching); `--max-batch 1` serves one at a time. Errors use OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with 400 for anything wrong in the request
(FastAPI's 422 is converted, and a Host header not on the allow-list), 401 for a missing or wrong
API key, 404 for an unknown model (and for another user's conversation), 408 for a body that came
too slowly, 413 for a body over the size limit and 429 when the waiting line is full.

Tools work as in OpenAI's API: a request's `tools` (function schemas) are shown to the model in
the system turn (`render_prompt(..., tools=)`, the format chatforge's tool use trains on); when the
model writes a `<tool_call>{...}</tool_call>`, generation stops there and the answer comes back
as `tool_calls` with finish_reason "tool_calls"; the client runs the tool and sends its result as
a `tool` message. (Running tools inside the server is `chatforge.tools.runner`'s job, not the API's.)

Storing conversations: a chat request with `"store": true`, or with `"metadata":
{"conversation_id": ID}`, is written to the feedback store (feedback.py): its messages as a path in
the conversation's tree, and each answer as it streams. Answer i of completion `chatcmpl-X` is
stored as message `chatcmpl-X-i`, so a client rates it with POST /v1/feedback without another
lookup; the response also says `conversation_id`. The web page works exactly this way: it creates
a conversation, sends each turn with its id, and rates answers by their completion id.

Security (docs/security.md, "The server"): each conversation belongs to the user whose key stored
it, and only they (or an admin) can list, read, rate, extend or delete it; the Host header must be
one the server answers to (against DNS rebinding); connections and bodies have deadlines
(command.py). The page renders model output with markdown-it (raw HTML off) and DOMPurify (a short
list of tags, http(s) links only, never an <img>), both vendored in web/vendor/; every response
carries a Content-Security-Policy (middleware.py) that allows nothing from elsewhere.
"""

from __future__ import annotations

import html
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from chatforge.align.label import Judge
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.redteam.defenses import DefenseStack
from chatforge.serve import metrics, routes_compare, routes_openai, routes_rag, routes_store
from chatforge.serve.auth import ADMIN, LOOPBACK_HOSTS, Keys, User
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.middleware import Guard, add_error_handlers
from chatforge.serve.scheduler import Scheduler
from chatforge.serve.state import RagSettings, ServerState
from chatforge.tokenizer import Tokenizer

UPLOAD_JSON_SLACK = 64 * 1024  # an upload's JSON around its base64: names, quotes, brackets


def base64_size(n: int) -> int:
    return (n + 2) // 3 * 4


def create_app(
    model: GPT,
    tok: Tokenizer,
    *,
    model_id: str,
    store: FeedbackStore | None = None,
    api_key: str | None = None,
    keys: Keys | None = None,
    allowed_hosts: list[str] | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_model_len: int | None = None,
    kv_cache_tokens: int | None = None,
    max_body_bytes: int = 1 << 20,
    body_timeout: float = 30.0,
    comparisons: Path | None = None,
    judge: Judge | None = None,
    defenses: DefenseStack | None = None,
    verifiers: dict | None = None,
    rag: RagSettings | None = None,
) -> FastAPI:
    """The server for one model. The scheduler thread starts with the app and stops with it.
    `api_key` is the admin's key (the single-user shortcut), `keys` everyone's; with neither, every
    caller is the local user. `allowed_hosts`: the Host names it answers (default: loopback names;
    ["*"] for any). `comparisons`: the file the compare view appends picks to (None: it keeps none),
    `judge`: the model that drafts a pick there. `defenses`: what chat requests and answers pass through. `verifiers`: the reward models
    ("prm", "orm") the "think" field may rank with. `rag`: where collections live and how large an upload may be."""
    if tok.vocab_size > model.cfg.vocab_size:
        raise ChatforgeError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}"
        )
    scheduler = Scheduler(
        model, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len, kv_cache_tokens=kv_cache_tokens
    )
    srv = ServerState(model, tok, model_id, scheduler, store, page=routes_store.read_page(), defenses=defenses)
    srv.verifiers = verifiers or {}
    srv.rag = rag or RagSettings()
    if defenses is not None and "output-policy" in defenses.names:  # the page applies the same host list
        hosts = html.escape(",".join(defenses.allowed_hosts), quote=True)
        meta = f'<head>\n  <meta name="chatforge-link-hosts" content="{hosts}">'.encode()
        srv.page["index.html"] = srv.page["index.html"].replace(b"<head>", meta, 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.scheduler.start_thread()
        yield
        srv.scheduler.shutdown()

    app = FastAPI(title="chatforge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv
    app.state.compare = routes_compare.CompareState(comparisons, judge)
    add_error_handlers(app)
    app.include_router(routes_openai.router)
    app.include_router(routes_store.router)
    app.include_router(routes_compare.router)
    app.include_router(routes_rag.router)
    app.include_router(metrics.router)
    all_keys = keys.copy() if keys else Keys()
    if api_key:
        all_keys.add(api_key, User(ADMIN, admin=True))
    app.add_middleware(
        Guard,
        keys=all_keys,
        hosts=list(LOOPBACK_HOSTS) if allowed_hosts is None else allowed_hosts,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
        upload_body_bytes=base64_size(srv.rag.max_upload_bytes) + UPLOAD_JSON_SLACK,
    )
    srv.keys_required = bool(all_keys)
    app.add_middleware(metrics.AccessLog, metrics=scheduler.metrics)  # outermost: sees every answer
    return app
