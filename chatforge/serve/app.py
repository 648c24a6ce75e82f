"""`chatforge serve`: an OpenAI-compatible HTTP server, a web chat page, and the feedback store.

    GET  /                        the chat page (web/: plain HTML + JS + CSS, nothing from elsewhere)
    GET  /health                  liveness, load and batching counters (no API key needed)
    GET  /v1/models               the one model this server holds
    POST /v1/chat/completions     OpenAI chat completions, streamed over SSE or not
    POST /v1/completions          OpenAI (legacy) text completions
    GET  /v1/conversations        stored conversations, newest first (POST creates one)
    GET  /v1/conversations/{id}   one conversation with every message and rating (DELETE removes it)
    POST /v1/feedback             rate an answer: {"message_id", "rating": 1|-1|0, "comment", "correction"}

Requests go through a `Scheduler` (scheduler.py): every running generation shares one forward
pass per token (continuous batching); `--max-batch 1` serves one at a time. Errors use OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with 400 for anything wrong in the request
(FastAPI's 422 is converted), 401 for a missing or wrong API key, 404 for an unknown model,
413 for a body over the size limit and 429 when the waiting line is full.

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

Security: the page renders model output with its own small Markdown renderer that escapes all
HTML first and never makes an <img>; every response carries a Content-Security-Policy that allows
scripts, styles, images and connections from this server only, so even a rendering bug cannot
load a remote image (a known way to leak a conversation through its URL).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.chat_format import parse_assistant, render_prompt
from chatforge.chat_format import turn_end_ids as chat_stop_ids
from chatforge.checkpoint import load_run
from chatforge.engine import IncrementalDecoder
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.options import ServeOptions
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.scheduler import Job, QueueFull, Scheduler
from chatforge.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tokenizer

WEB_DIR = Path(__file__).parent / "web"
WEB_FILES = {  # name -> media type; the page is these files and nothing else
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI allows
POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


# ---- errors --------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"retry-after": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


_TYPE_TAG = re.compile(r"(str|int|float|bool|dict|list|none|[A-Za-z_-]+\[.*\])")


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 list of errors -> one OpenAI-style 400 about the first problem."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(
            400,
            "We could not parse the JSON body of your request. The body must be valid JSON "
            f"({first.get('ctx', {}).get('error', 'invalid JSON')}).",
            code="invalid_json",
        )
    # drop "body" and pydantic's union-branch tags ("str", "list[int]") from the location
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_TAG.fullmatch(str(x))]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "missing" and not loc:
        return APIError(400, "The request needs a JSON body.", code="invalid_json")
    msg = first.get("msg", "invalid request")
    return APIError(400, f"Invalid value for '{param}': {msg}." if param else f"{msg}.", param=param)


# ---- request bodies ------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]  # images and audio are not something these models read
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="chatforge extension: sample from the k most likely")
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class ConversationCreate(_Strict):
    title: str = Field("", max_length=200)
    source: Literal["web", "api"] = "api"


class FeedbackRequest(_Strict):
    message_id: str = Field(min_length=1, max_length=200)
    rating: Literal[-1, 0, 1]
    comment: str | None = Field(None, max_length=10_000)
    correction: str | None = Field(None, max_length=100_000)


# ---- server state --------------------------------------------------------------------------
@dataclass
class Server:
    model: GPT
    tok: Tokenizer
    model_id: str
    scheduler: Scheduler
    store: FeedbackStore | None
    created: int = field(default_factory=lambda: int(time.time()))
    inbox: Inbox | None = None

    @property
    def ctx(self) -> int:
        return self.model.cfg.seq_len


class Inbox:
    """Events from the scheduler thread to the event loop's per-request queues, with one wake-up of
    the loop per burst (a decode step of 16 rows makes 16 events, not 16 wake-ups)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, tuple]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: tuple) -> None:  # any thread
        with self.lock:
            self.items.append((queue, item))
            wake = len(self.items) == 1  # the first of a burst schedules the delivery
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # the event loop
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class TextStream:
    """Token ids of one choice -> content deltas, ending at a stop id, a stop string, or (with tools)
    the end of the model's tool call.

    Text that could begin a stop string is held back until it is known not to, so a stop string
    never reaches the client, streamed or not. With tools, everything from `<tool_call>` on is held
    back too: at the end it becomes `tool_calls` if it parses (parse_assistant), else content."""

    def __init__(self, tok: Tokenizer, stop_ids: set[int], stops: list[str], tools: bool = False) -> None:
        self.decoder = IncrementalDecoder(tok.decode)
        self.stop_ids, self.stops, self.tools = stop_ids, stops, tools
        self.text, self.sent = "", 0  # everything decoded; how much of it went out as content
        self.tokens = 0  # generated tokens, stop id included
        self.finish: str | None = None
        self.tool_calls: list[dict] | None = None
        self.content_end: int | None = None  # set at the end: text[:content_end] is the content

    @property
    def content(self) -> str:
        return self.text[: self.content_end]

    def push(self, tid: int) -> str:
        self.tokens += 1
        if tid in self.stop_ids:
            return ""
        self.text += self.decoder.push(tid)
        return self._release(final=False)

    def flush(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish = "stop"
            final = True
        call = self.text.find(TOOL_CALL_OPEN) if self.tools else -1
        if call >= 0 and (close := self.text.find(TOOL_CALL_CLOSE, call)) >= 0:
            self.text = self.text[: close + len(TOOL_CALL_CLOSE)]  # one call per turn: the turn ends here
            final = True
        safe = len(self.text) if call < 0 else call
        if final:
            calls = parse_assistant(self.text).get("tool_calls") if call >= 0 else None
            if calls:
                self.tool_calls = [{"id": "call_" + secrets.token_hex(8), **c} for c in calls]
                self.finish = "tool_calls"
            else:  # no call, or a malformed one: all of it is content
                safe = len(self.text)
                if call >= 0:
                    self.finish = self.finish or "stop"
            self.content_end = safe
        else:  # hold back a suffix that may begin a stop string (or the tool-call tag)
            for s in self.stops + ([TOOL_CALL_OPEN] if self.tools else []):
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out


@dataclass
class Choice:
    index: int
    job: Job
    text: TextStream
    message_id: str | None = None  # where the answer is stored, when the request asked to store it


# ---- generation glue -----------------------------------------------------------------------
def _sampling(req: _Sampling) -> dict:
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(
            400, "presence_penalty and frequency_penalty are not supported (use 0)", param="presence_penalty"
        )
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    temperature = 1.0 if req.temperature is None else req.temperature
    return {"temperature": temperature, "top_k": req.top_k, "top_p": req.top_p}


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stops


def _budget(srv: Server, n_prompt: int, max_tokens: int | None, param: str) -> int:
    """The token budget: what was asked for, or all the room the context leaves; 400 if it overflows."""
    if n_prompt >= srv.ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {srv.ctx} tokens. However, your messages resulted in "
            f"{n_prompt} tokens. Please reduce the length of the messages.",
            param="messages" if param == "max_tokens" else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return srv.ctx - n_prompt
    if n_prompt + max_tokens > srv.ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {srv.ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
            "Please reduce the prompt or the completion length.",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def _start(
    srv: Server,
    prompts: list[list[int]],
    n: int,
    budget: int,
    sampling: dict,
    seed,
    stops,
    tools: bool = False,
) -> tuple[list[Choice], asyncio.Queue]:
    """Submit n jobs per prompt to the scheduler; their events arrive on the returned queue. With
    tools, generation also stops after the model's `</tool_call>` (TextStream finds it as text too)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    if srv.inbox is None or srv.inbox.loop is not loop:
        srv.inbox = Inbox(loop)
    inbox = srv.inbox
    stop_ids = frozenset(chat_stop_ids(srv.tok))
    job_stops = stop_ids
    if tools and srv.tok.has_special(TOOL_CALL_CLOSE):
        job_stops = stop_ids | {srv.tok.special_id(TOOL_CALL_CLOSE)}  # decoded as text, so not in stop_ids
    choices = []
    for p, ids in enumerate(prompts):
        for j in range(n):
            i = p * n + j

            def on_event(kind, value, i=i) -> None:  # runs on the scheduler thread
                inbox.put(events, (i, kind, value))

            job = Job(
                prompt=ids,
                max_new_tokens=budget,
                on_event=on_event,
                seed=None if seed is None else (seed + j) % 2**63,
                stop_ids=job_stops,
                **sampling,
            )
            choices.append(Choice(i, job, TextStream(srv.tok, set(stop_ids), stops, tools)))
    try:
        srv.scheduler.submit(*(c.job for c in choices))
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
    except ChatforgeError as e:
        raise APIError(400, str(e)) from None
    return choices, events


async def _pump(
    choices: list[Choice], events: asyncio.Queue, request: Request | None
) -> AsyncIterator[list[tuple[Choice, str, bool]]]:
    """Yield batches of (choice, new text, finished now) until every choice has finished. Events that
    are already waiting are taken together, so a busy server sends fewer, larger SSE chunks.
    With `request` (non-streamed calls), a client that went away cancels the work."""
    live = {c.index: c for c in choices}
    while live:
        try:
            first = (
                await asyncio.wait_for(events.get(), POLL_S) if request is not None else await events.get()
            )
        except TimeoutError:
            if await request.is_disconnected():
                return
            continue
        batch = [first]
        while not events.empty():
            batch.append(events.get_nowait())
        out: dict[int, list] = {}
        for i, kind, value in batch:
            c = live.get(i)
            if c is None:
                continue  # finished already (a stop string), its row is being dropped
            if kind == "token":
                delta = c.text.push(value)
                done = c.text.finish is not None
            elif kind == "done":
                delta = c.text.flush()
                c.text.finish = c.text.finish or ("length" if value == "length" else "stop")
                done = True
            else:
                raise APIError(500, str(value), type="server_error")
            if done:
                c.job.cancel()  # frees the row at once when a stop string ended it early
                del live[i]
            prev = out.get(i)
            out[i] = [c, (prev[1] if prev else "") + delta, done]
        if out:
            yield [tuple(v) for v in out.values()]


def _answer(text: TextStream) -> dict:
    """The assistant message of a finished choice (content None when it is only a tool call)."""
    if text.tool_calls:
        content = text.content if text.content.strip() else None
        return {"role": "assistant", "content": content, "refusal": None, "tool_calls": text.tool_calls}
    return {"role": "assistant", "content": text.content, "refusal": None}


def _usage(n_prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.text.tokens for c in choices)
    return {
        "prompt_tokens": n_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": n_prompt_tokens + completion,
    }


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- the app -------------------------------------------------------------------------------
def create_app(
    model: GPT,
    tok: Tokenizer,
    *,
    model_id: str,
    store: FeedbackStore | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The server for one model. The scheduler thread starts with the app and stops with it."""
    if tok.vocab_size > model.cfg.vocab_size:
        raise ChatforgeError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}"
        )
    srv = Server(model, tok, model_id, Scheduler(model, max_batch=max_batch, max_queue=max_queue), store)
    web = {name: (WEB_DIR / name).read_bytes() for name in WEB_FILES}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.scheduler.start_thread()
        yield
        srv.scheduler.shutdown()

    app = FastAPI(title="chatforge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return APIError(
                404, f"Unknown URL {request.method} {request.url.path}", code="unknown_url"
            ).response()
        if exc.status_code == 405:
            return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    # ---- the page and health ---------------------------------------------------------------
    def _file(name: str) -> Response:
        return Response(web[name], media_type=WEB_FILES[name], headers={"cache-control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _file("index.html")

    @app.get("/app.js", include_in_schema=False)
    async def app_js() -> Response:
        return _file("app.js")

    @app.get("/style.css", include_in_schema=False)
    async def style_css() -> Response:
        return _file("style.css")

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": srv.model_id,
            "context": srv.ctx,
            "store": str(srv.store.path) if srv.store else None,
            **srv.scheduler.load(),
            "stats": srv.scheduler.stats.to_dict(),
        }

    # ---- models ----------------------------------------------------------------------------
    def _model_obj() -> dict:
        return {"id": srv.model_id, "object": "model", "created": srv.created, "owned_by": "chatforge"}

    def _check_model(name: str) -> None:
        if name != srv.model_id:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server has `{srv.model_id}` (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_obj()]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict:
        _check_model(model)
        return _model_obj()

    # ---- chat completions ------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _check_model(req.model)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.tool_choice not in (None, "auto", "none"):
            raise APIError(
                400,
                'tool_choice may be "auto" or "none": this server cannot force a call',
                param="tool_choice",
            )
        # tools as OpenAI has them: the schemas go into the prompt, a call comes back as tool_calls
        # (finish_reason "tool_calls"), and the client runs it and sends the result as a tool message
        tools = (
            [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
        )
        messages = [_message(m) for m in req.messages]
        try:
            ids = render_prompt(srv.tok, messages, tools=tools or None)
        except ChatforgeError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        budget = _budget(srv, len(ids), max_tokens, "max_tokens")
        sampling, stops = _sampling(req), _stops(req.stop)
        conv_id = _conversation_for(req)  # checked before any work starts
        choices, events = _start(srv, [ids], req.n, budget, sampling, req.seed, stops, tools=bool(tools))
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        if conv_id is not None or req.store:
            try:
                conv_id = _store_request(conv_id, req.user, messages, choices, cid)
            except BaseException:
                _finish(choices)
                raise
        head = {"id": cid, "object": "chat.completion", "created": created, "model": srv.model_id}
        if conv_id is not None:
            head["conversation_id"] = conv_id
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(_chat_chunks(head, choices, events, len(ids), include_usage), choices)
        try:
            async for _ in _pump(choices, events, request):
                pass
        finally:
            _finish(choices)
        return {
            **head,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": c.index,
                    "message": _answer(c.text),
                    "logprobs": None,
                    "finish_reason": c.text.finish or "stop",
                }
                for c in choices
            ],
            "usage": _usage(len(ids), choices),
        }

    async def _chat_chunks(head, choices, events, n_prompt, include_usage) -> AsyncIterator[str]:
        base = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
        for c in choices:
            first = {
                "index": c.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield _sse({**base, "choices": [first]})
        async for batch in _pump(choices, events, None):
            for c, delta, done in batch:
                if delta:
                    ch = {
                        "index": c.index,
                        "delta": {"content": delta},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield _sse({**base, "choices": [ch]})
                if done and c.text.tool_calls:
                    calls = [{"index": k, **call} for k, call in enumerate(c.text.tool_calls)]
                    ch = {
                        "index": c.index,
                        "delta": {"tool_calls": calls},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield _sse({**base, "choices": [ch]})
                if done:
                    ch = {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.text.finish}
                    yield _sse({**base, "choices": [ch]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(n_prompt, choices)})
        yield "data: [DONE]\n\n"

    # ---- completions -----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model)
        if req.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if req.best_of not in (None, req.n):
            raise APIError(400, "best_of is not supported (leave it out, or equal to n)", param="best_of")
        prompts, texts = _completion_prompts(req.prompt)
        budget = min(_budget(srv, len(p), req.max_tokens or 16, "max_tokens") for p in prompts)
        sampling, stops = _sampling(req), _stops(req.stop)
        choices, events = _start(srv, prompts, req.n, budget, sampling, req.seed, stops)
        head = {
            "id": "cmpl-" + secrets.token_hex(12),
            "object": "text_completion",
            "created": int(time.time()),
            "model": srv.model_id,
        }
        n_prompt = sum(len(p) for p in prompts)
        echo = {c.index: texts[c.index // req.n] if req.echo else "" for c in choices}
        if req.stream:
            return _stream(_completion_chunks(head, choices, events, n_prompt, echo), choices)
        try:
            async for _ in _pump(choices, events, request):
                pass
        finally:
            _finish(choices)
        return {
            **head,
            "system_fingerprint": None,
            "choices": [
                {
                    "text": echo[c.index] + c.text.content,
                    "index": c.index,
                    "logprobs": None,
                    "finish_reason": c.text.finish or "stop",
                }
                for c in choices
            ],
            "usage": _usage(n_prompt, choices),
        }

    async def _completion_chunks(head, choices, events, n_prompt, echo) -> AsyncIterator[str]:
        base = head  # OpenAI streams completions as "text_completion" objects too
        for c in choices:
            if echo[c.index]:
                yield _sse(
                    {
                        **base,
                        "choices": [
                            {"text": echo[c.index], "index": c.index, "logprobs": None, "finish_reason": None}
                        ],
                    }
                )
        async for batch in _pump(choices, events, None):
            for c, delta, done in batch:
                finish = c.text.finish if done else None
                yield _sse(
                    {
                        **base,
                        "choices": [
                            {"text": delta, "index": c.index, "logprobs": None, "finish_reason": finish}
                        ],
                    }
                )
        yield _sse({**base, "choices": [], "usage": _usage(n_prompt, choices)})
        yield "data: [DONE]\n\n"

    def _completion_prompts(prompt) -> tuple[list[list[int]], list[str]]:
        """The request's prompt(s) as token ids (text gets the model's start token) and as text."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and all(isinstance(x, int) for x in prompt):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        out, texts = [], []
        for p in prompt:
            ids = srv.tok.start_ids() + srv.tok.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "a prompt must hold at least one token", param="prompt")
            if min(ids) < 0 or max(ids) >= srv.model.cfg.vocab_size:
                raise APIError(
                    400, f"prompt token ids must be in [0, {srv.model.cfg.vocab_size})", param="prompt"
                )
            out.append(ids)
            texts.append(p if isinstance(p, str) else srv.tok.decode(ids))
        if len(out) > MAX_N:
            raise APIError(400, f"at most {MAX_N} prompts per request", param="prompt")
        return out, texts

    # ---- streaming and storing -------------------------------------------------------------
    def _stream(chunks: AsyncIterator[str], choices: list[Choice]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            except APIError as e:  # a failed generation mid-stream: say so in the stream, then end it
                yield _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
                yield "data: [DONE]\n\n"
            finally:  # the end, an error, or the client went away (Starlette cancels us): free the rows
                _finish(choices)

        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    def _finish(choices: list[Choice]) -> None:
        for c in choices:
            c.job.cancel()  # no-op for a finished job; frees the row of one still running
            if c.message_id is not None and srv.store is not None:
                msg = _answer(c.text)
                srv.store.finish_answer(
                    c.message_id, msg["content"], c.text.finish or "cancelled", msg.get("tool_calls")
                )
                c.message_id = None

    def _conversation_for(req: ChatCompletionRequest) -> str | None:
        """metadata's conversation_id, checked; None when there is none (`store` then makes a new one)."""
        cid = (req.metadata or {}).get("conversation_id")
        if cid is None and not req.store:
            return None
        if srv.store is None:
            raise APIError(400, "this server keeps no conversations (start it with --db FILE)", param="store")
        if cid is None:
            return None
        try:
            srv.store.conversation_summary(cid)
        except KeyError:
            raise APIError(
                404, f"no conversation {cid}", param="metadata.conversation_id", code="not_found"
            ) from None
        return cid

    def _store_request(conv_id: str | None, user: str | None, messages: list[dict], choices, cid: str) -> str:
        """Write the request's messages and an empty answer per choice (filled in by _finish)."""
        assert srv.store is not None
        if conv_id is None:
            conv_id = srv.store.create_conversation(model=srv.model_id, source="api", user=user)["id"]
        parent = srv.store.store_path(conv_id, messages)
        for c in choices:
            c.message_id = f"{cid}-{c.index}"
            srv.store.add_answer(conv_id, parent, c.message_id, srv.model_id)
        return conv_id

    def _message(m: ChatMessage) -> dict:
        """A request message as the renderer's plain dict: text parts joined, developer = system."""
        content = m.content
        if isinstance(content, list):  # text parts (the schema admits no other kind)
            content = "".join(p.text for p in content)
        out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            out["tool_calls"] = m.tool_calls
        return out

    # ---- conversations and feedback --------------------------------------------------------
    def _store() -> FeedbackStore:
        if srv.store is None:
            raise APIError(
                400, "this server keeps no conversations (start it with --db FILE)", code="store_disabled"
            )
        return srv.store

    @app.get("/v1/conversations")
    def list_conversations(limit: int = 100) -> dict:
        return {"object": "list", "data": _store().list_conversations(limit=max(1, min(limit, 1000)))}

    @app.post("/v1/conversations")
    def create_conversation(req: ConversationCreate) -> dict:
        return _store().create_conversation(title=req.title, model=srv.model_id, source=req.source)

    @app.get("/v1/conversations/{conversation_id}")
    def get_conversation(conversation_id: str) -> dict:
        try:
            return _store().get_conversation(conversation_id)
        except KeyError:
            raise APIError(404, f"no conversation {conversation_id}", code="not_found") from None

    @app.delete("/v1/conversations/{conversation_id}")
    def delete_conversation(conversation_id: str) -> dict:
        if not _store().delete_conversation(conversation_id):
            raise APIError(404, f"no conversation {conversation_id}", code="not_found")
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @app.post("/v1/feedback")
    def feedback(req: FeedbackRequest) -> dict:
        try:
            return _store().rate(req.message_id, req.rating, req.comment, req.correction)
        except KeyError:
            raise APIError(
                404, f"no stored answer {req.message_id}", param="message_id", code="not_found"
            ) from None
        except ChatforgeError as e:
            raise APIError(400, str(e), param="message_id") from None

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


class Guard:
    """ASGI middleware in front of the routes: the API key (401), the body size limit (413), and the
    security headers on every response. Pure ASGI, so a rejected request's body is never parsed."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secure_send(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                msg = (
                    "Incorrect API key provided."
                    if given
                    else "You didn't provide an API key (Authorization: Bearer KEY)."
                )
                err = APIError(401, msg, code="invalid_api_key")
                return await err.response()(scope, receive, secure_send)
        too_big = APIError(
            413, f"The request body is larger than {self.max_body} bytes.", code="request_too_large"
        )
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await too_big.response()(scope, receive, secure_send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True  # read the body here (bounded), then hand it on
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await too_big.response()(scope, receive, secure_send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, secure_send)
        await self.app(scope, receive, secure_send)


# ---- CLI -----------------------------------------------------------------------------------
def build_server_app(args: ServeOptions):
    """Load the run and build the app `cmd_serve` runs (separate so tests can call it)."""
    from chatforge.device import pick_device

    if args.max_batch < 1:
        raise ChatforgeError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 1 <= args.port <= 65535:
        raise ChatforgeError(f"--port must be in 1..65535, got {args.port}")
    # loaded as `chatforge chat` loads it: the decode layout (quant.decode_layout), the same logits
    loaded = load_run(args.model, inference=True, device=pick_device(args.device))
    model, tok = loaded.model, loaded.tokenizer  # the run's chat format (add_bos_token) comes with it
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

