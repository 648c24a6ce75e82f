"""The OpenAI-compatible routes: GET /health, GET /v1/models[/{model}], POST /v1/chat/completions
and POST /v1/completions. Each checks its request (protocol.py), starts one job per choice and
answers with the whole result or an SSE stream (streaming.py). Tokenising a prompt and writing to
the store run in the thread pool: a megabyte of prompt takes the tokenizer a while, and the event
loop must keep answering everyone else meanwhile."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from chatforge.align import scored_tokens
from chatforge.chat import fit_window
from chatforge.chat_format import encode_with_specials, render_prompt, tool_call_start, turn_end_ids
from chatforge.constrain import ANY_OBJECT, JsonConstraint, guidance_tokenizer, json_grammar
from chatforge.errors import ChatforgeError
from chatforge.rag.answer import document_objects, rag_prompt
from chatforge.serve.auth import User
from chatforge.serve.protocol import (
    MAX_N,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    sampling_settings,
    stop_strings,
    token_budget,
)
from chatforge.serve.routes_rag import readable
from chatforge.serve.routes_store import conversation_for, store_request
from chatforge.serve.state import Caller, ServerState, State
from chatforge.serve.streaming import (
    answer_message,
    chat_chunks,
    completion_chunks,
    drain,
    finish_choices,
    pump,
    sse,
    start_jobs,
    stream_response,
    usage,
)
from chatforge.think import Thinker, parse_request_think, think_defended
from chatforge.tokenizer import TOOL_CALL_OPEN

router = APIRouter()


@router.get("/health")
async def health(srv: State) -> dict:
    return {
        "status": "ok",
        "model": srv.model_id,
        "context": srv.ctx,
        "store": srv.store is not None,  # whether it keeps conversations; never where (a path)
        **srv.scheduler.load(),
        "stats": srv.scheduler.stats.to_dict(),
    }


# ---- models --------------------------------------------------------------------------------
def _model_obj(srv: ServerState) -> dict:
    return {"id": srv.model_id, "object": "model", "created": srv.created, "owned_by": "chatforge"}


def _check_model(srv: ServerState, name: str) -> None:
    if name != srv.model_id:
        raise APIError(
            404,
            f"The model `{name}` does not exist; this server has `{srv.model_id}` (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )


@router.get("/v1/models")
async def list_models(srv: State) -> dict:
    return {"object": "list", "data": [_model_obj(srv)]}


@router.get("/v1/models/{model}")
async def get_model(model: str, srv: State) -> dict:
    _check_model(srv, model)
    return _model_obj(srv)


# ---- chat completions ----------------------------------------------------------------------
def _message(m: ChatMessage) -> dict:
    """A request message as the renderer's plain dict: text parts joined, developer = system."""
    content = m.content
    if isinstance(content, list):  # text parts (the schema admits no other kind)
        content = "".join(p.text for p in content)
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    return out


@dataclass
class ToolChoice:
    """What a request's tool_choice asks of generation: tools in the prompt and parsed from the
    answer, the ids the answer must begin with, the ids it may not contain, extra stop strings."""

    tools: list[dict] = field(default_factory=list)
    forced_ids: list[int] = field(default_factory=list)
    banned_ids: frozenset[int] = frozenset()
    stops: list[str] = field(default_factory=list)


def _tool_choice(srv: ServerState, req: ChatCompletionRequest) -> ToolChoice:
    """OpenAI's tool_choice: "auto" (the default with tools) lets the model choose; "none" keeps
    tools out of the prompt and the tool-call token out of the answer (banned, or a stop string
    where the tokenizer writes it as text); "required" makes the answer begin with a tool call;
    {"type": "function", "function": {"name": N}} with a call to N."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if choice is None or choice == "auto":
        return ToolChoice(tools=tools)
    if choice == "none":
        if srv.tok.has_special(TOOL_CALL_OPEN):
            return ToolChoice(banned_ids=frozenset({srv.tok.special_id(TOOL_CALL_OPEN)}))
        return ToolChoice(stops=[TOOL_CALL_OPEN])
    if not tools:
        raise APIError(
            400,
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            param="tool_choice",
        )
    if choice == "required":
        return ToolChoice(tools=tools, forced_ids=tool_call_start(srv.tok))
    name = choice.function.name
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(
            400,
            f"Invalid value for 'tool_choice': function '{name}' is not one of the request's tools.",
            param="tool_choice",
        )
    return ToolChoice(tools=tools, forced_ids=tool_call_start(srv.tok, name))


@dataclass
class ChatPrompt:
    """A chat request made ready to generate: the messages as asked (what is stored), the prompt's
    ids, what tool_choice asks, how many old messages `trim_history` left out, and the chunks a
    `collection` put into the prompt (None without one); `grounded` is the prompt's messages before
    the defenses (the request's, with the collection's documents), what a think strategy answers."""

    messages: list[dict]
    ids: list[int]
    tool_choice: ToolChoice
    left_out: int = 0
    documents: list[dict] | None = None
    grounded: list[dict] | None = None


def _chat_prompt(srv: ServerState, req: ChatCompletionRequest, user: User) -> ChatPrompt:
    """The request as a prompt; 400 for what is not supported. Tools as OpenAI has them: the
    schemas go into the prompt, a call comes back as tool_calls (finish_reason "tool_calls"), and
    the client runs it and sends a tool message."""
    _check_model(srv, req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.logprobs and req.stream:
        raise APIError(400, "logprobs are given with stream=false only", param="logprobs")
    choice = _tool_choice(srv, req)
    messages = [_message(m) for m in req.messages]
    prompt, documents = messages, None
    if req.collection is not None:  # the documents go into the prompt; the stored conversation stays as asked
        place = readable(srv, user, req.collection, param="collection", missing=400)  # theirs, or a shared one
        try:
            budget = srv.ctx - min(_answer_room(srv, req), srv.ctx // 4)
            rag = rag_prompt(place.name, messages, srv.tok, budget, root=place.root)
        except ChatforgeError as e:
            raise APIError(400, str(e), param="collection") from None
        prompt, documents = rag.messages, document_objects(rag.hits)
    grounded = prompt
    try:
        if srv.defenses is not None:  # the request's own turns and any retrieved documents; InputBlocked: 400
            prompt = srv.defenses.prepare(prompt)
        ids = render_prompt(srv.tok, prompt, tools=choice.tools or None)
        left_out = 0
        if req.trim_history and len(ids) + _answer_room(srv, req) > srv.ctx:
            ids, left_out = _trimmed_prompt(srv, req, prompt, choice.tools)
    except ChatforgeError as e:
        raise APIError(400, str(e), param="messages") from None
    return ChatPrompt(messages, ids, choice, left_out, documents, grounded)


def _answer_room(srv: ServerState, req: ChatCompletionRequest) -> int:
    """Tokens a trimmed prompt leaves for the answer: max_tokens, else a quarter of the context."""
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return asked if asked is not None else max(1, srv.ctx // 4)


def _trimmed_prompt(
    srv: ServerState, req: ChatCompletionRequest, messages: list[dict], tools: list[dict]
) -> tuple[list[int], int]:
    """The prompt without its oldest turns (the leading system messages stay), as `chatforge chat`
    slides its window; the newest turn alone too long is left whole for token_budget's 400."""
    n_head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    head, rest = messages[:n_head], messages[n_head:]
    render = lambda ms: render_prompt(srv.tok, ms, tools=tools or None)  # noqa: E731
    start, _ = fit_window(head, rest, 0, lambda ms: len(render(ms)), srv.ctx - _answer_room(srv, req))
    return render(head + rest[start:]), start


def _response_constraint(srv: ServerState, fmt: ResponseFormat | None) -> Callable[[], JsonConstraint] | None:
    """What response_format asks: None for text, else a maker of one JsonConstraint per choice (the
    schema compiled once, here in the thread pool; each choice gets a copy); 400 for a schema that
    cannot be enforced."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(
            400, "response_format of type json_schema needs a json_schema object", param="response_format"
        )
    schema = ANY_OBJECT
    if fmt.type == "json_schema" and fmt.json_schema.json_schema is not None:
        schema = fmt.json_schema.json_schema
    stop_ids = turn_end_ids(srv.tok)
    if not stop_ids:
        raise APIError(400, "this model has no stop token to end a JSON answer with", param="response_format")
    ltok = guidance_tokenizer(srv.tok, srv.model.cfg.vocab_size, stop_ids)
    try:
        start = JsonConstraint.compile(ltok, json_grammar(schema, ltok))
    except ChatforgeError as e:
        raise APIError(400, f"Invalid 'response_format': {e}", param="response_format") from None
    return start.fresh


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, srv: State, user: Caller):
    prompt = await run_in_threadpool(_chat_prompt, srv, req, user)
    messages, ids, tool_choice = prompt.messages, prompt.ids, prompt.tool_choice
    if req.think is not None:  # thinking strategies: think.py answers, with the tokens they spent
        reply = await run_in_threadpool(serve_think, srv, req, prompt.grounded, len(ids), srv.verifiers)
        documents = {"documents": prompt.documents} if prompt.documents is not None else {}
        return {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), **reply, **documents}
    constraint = await run_in_threadpool(_response_constraint, srv, req.response_format)
    if constraint is not None and tool_choice.forced_ids:
        raise APIError(
            400, "a forced tool call (tool_choice) and a JSON response_format exclude each other", param="tool_choice"
        )
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    budget = token_budget(srv.ctx, len(ids), max_tokens, "max_tokens")
    sampling, stops = sampling_settings(req), stop_strings(req.stop) + tool_choice.stops
    conv_id = await run_in_threadpool(conversation_for, srv, req, user)  # checked before work starts
    choices, events = start_jobs(
        srv,
        [ids],
        req.n,
        budget,
        sampling,
        req.seed,
        stops,
        tools=bool(tool_choice.tools),
        forced_ids=tool_choice.forced_ids,
        banned_ids=tool_choice.banned_ids,
        constraint=constraint,
    )
    cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    if conv_id is not None or req.store:
        try:
            conv_id = await run_in_threadpool(
                store_request, srv, conv_id, user, req.user, messages, choices, cid, req.collection, prompt.documents
            )
        except BaseException:
            finish_choices(choices, srv.store)
            raise
    head = {"id": cid, "object": "chat.completion", "created": created, "model": srv.model_id}
    if conv_id is not None:
        head["conversation_id"] = conv_id
    if req.trim_history:
        head["trimmed_messages"] = prompt.left_out  # how many of the oldest messages the prompt left out
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if srv.defenses is not None and srv.defenses.checks_output:
            chunks = checked_chunks(srv, messages, head, choices, events, len(ids), include_usage)
        else:
            chunks = chat_chunks(head, choices, events, len(ids), include_usage)
        if prompt.documents is not None:  # one chunk with no choices says what [n] refers to, before the text
            first = {**head, "object": "chat.completion.chunk", "choices": [], "documents": prompt.documents}
            chunks = _after(sse(first), chunks)
        return stream_response(chunks, choices, srv.store)
    await drain(choices, events, request, srv.store)
    answers = [checked_answer(srv, answer_message(c.text), messages) for c in choices]
    if prompt.documents is not None:
        head["documents"] = prompt.documents
    scores = {}
    if req.logprobs:
        scores = await run_in_threadpool(chat_logprobs, srv, ids, choices, req.top_logprobs or 0)
    return {
        **head,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": msg,
                "logprobs": scores.get(c.index),
                "finish_reason": _finish(c.text.finish, msg),
            }
            for c, msg in zip(choices, answers, strict=True)
        ],
        "usage": usage(len(ids), choices),
    }


def _finish(reason: str | None, message: dict) -> str:
    """The finish reason of a checked answer: "stop" where the defenses removed its tool calls."""
    return "stop" if reason == "tool_calls" and not message.get("tool_calls") else reason or "stop"


def checked_answer(srv: ServerState, message: dict, messages: list[dict]) -> dict:
    """The answer after the server's --defenses (the canary, the output policy, tool permissions)."""
    return message if srv.defenses is None else srv.defenses.checked_message(message, messages)


async def checked_chunks(
    srv: ServerState, messages: list[dict], head: dict, choices: list, events, n_prompt: int, include_usage: bool
):
    """A stream whose answers are checked first: each is generated whole, then sent as one chunk."""
    async for _ in pump(choices, events, None):
        pass
    base = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
    for c in choices:
        msg = checked_answer(srv, answer_message(c.text), messages)
        delta = {"role": "assistant", "content": msg.get("content") or ""}
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(msg["tool_calls"])]
        finish = _finish(c.text.finish, msg)
        yield sse({**base, "choices": [{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}]})
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(n_prompt, choices)})
    yield "data: [DONE]\n\n"


async def _after(first: str, rest):
    yield first
    async for chunk in rest:
        yield chunk


_THINKING = threading.Lock()  # one thinking request at a time beside the scheduler


def serve_think(srv, req, messages: list[dict], n_prompt: int, verifiers: dict | None = None) -> dict:
    """A chat completion answered by the request's "think" strategy (run in the thread pool), behind the
    server's --defenses as every answer is (think_defended: the input scanners and spotlighting
    before, the answer checks and the tool gate after, on the answer and every candidate). The
    usage counts every token the strategy generated as completion tokens, as OpenAI counts reasoning
    tokens, with `completion_tokens_details.reasoning_tokens` = those not in the answer returned."""
    try:
        spec = parse_request_think(req.think)
    except ChatforgeError as e:
        raise APIError(400, str(e), param="think") from None
    if req.stream or req.n != 1 or req.tools:
        raise APIError(
            400, '"think" answers once, whole and without tools: drop stream, n and tools', param="think"
        )
    sampling = sampling_settings(req)
    verifiers = verifiers or {}
    th = Thinker(
        srv.model, srv.tok, orm=verifiers.get("orm"), prm=verifiers.get("prm"), spec=spec,
        temperature=sampling["temperature"], top_k=sampling["top_k"], seed=req.seed or 0,
        max_new_tokens=min(req.max_completion_tokens or req.max_tokens or 256, srv.ctx - n_prompt),
    )  # fmt: skip
    try:
        with _THINKING:
            r = think_defended(th, spec, messages, srv.defenses)
    except ChatforgeError as e:
        raise APIError(400, str(e).replace("pass --", "start chatforge serve with --"), param="think") from None
    answer_tokens = len(srv.tok.encode(r.text))
    return {
        "object": "chat.completion",
        "model": srv.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": r.generated_tokens,
            "total_tokens": n_prompt + r.generated_tokens,
            "completion_tokens_details": {"reasoning_tokens": max(0, r.generated_tokens - answer_tokens)},
            "think": {
                "strategy": r.strategy, "generated_tokens": r.generated_tokens, "prompt_tokens_fed": r.prompt_tokens,
                "verifier_tokens": r.verifier_tokens,
            },
        },
    }  # fmt: skip


# ---- completions ---------------------------------------------------------------------------
def _completion_prompts(srv: ServerState, prompt) -> tuple[list[list[int]], list[str]]:
    """The request's prompt(s) as token ids and as text. Text gets the model's start token (unless
    it begins with it) and its special-token strings (`<|im_start|>`) are the special tokens, as
    vLLM and llama.cpp read a raw prompt: the caller writes the whole prompt, template and all."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    out, texts = [], []
    vocab = srv.model.cfg.vocab_size
    for p in prompt:
        ids = _text_prompt(srv, p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "a prompt must hold at least one token", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        out.append(ids)
        texts.append(p if isinstance(p, str) else srv.tok.decode(ids))
    if len(out) > MAX_N:
        raise APIError(400, f"at most {MAX_N} prompts per request", param="prompt")
    return out, texts


def _text_prompt(srv: ServerState, text: str) -> list[int]:
    ids = encode_with_specials(srv.tok, text)
    start = srv.tok.start_ids()
    return ids if ids[: len(start)] == start else start + ids


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, srv: State):
    _check_model(srv, req.model)
    if req.logprobs is not None and req.stream:
        raise APIError(400, "logprobs are given with stream=false only", param="logprobs")
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of is not supported (leave it out, or equal to n)", param="best_of")
    prompts, texts = await run_in_threadpool(_completion_prompts, srv, req.prompt)
    budget = min(token_budget(srv.ctx, len(p), req.max_tokens or 16, "max_tokens") for p in prompts)
    sampling, stops = sampling_settings(req), stop_strings(req.stop)
    constraint = await run_in_threadpool(_response_constraint, srv, req.response_format)
    choices, events = start_jobs(
        srv, prompts, req.n, budget, sampling, req.seed, stops, constraint=constraint
    )
    head = {
        "id": "cmpl-" + secrets.token_hex(12),
        "object": "text_completion",
        "created": int(time.time()),
        "model": srv.model_id,
    }
    n_prompt = sum(len(p) for p in prompts)
    echo = {c.index: texts[c.index // req.n] if req.echo else "" for c in choices}
    if req.stream:
        return stream_response(completion_chunks(head, choices, events, n_prompt, echo), choices, srv.store)
    await drain(choices, events, request, srv.store)
    scores = {}
    if req.logprobs is not None:
        scores = await run_in_threadpool(
            completion_logprobs, srv, prompts, choices, req.n, req.logprobs, req.echo
        )
    return {
        **head,
        "system_fingerprint": None,
        "choices": [
            {
                "text": echo[c.index] + c.text.content,
                "index": c.index,
                "logprobs": scores.get(c.index),
                "finish_reason": c.text.finish or "stop",
            }
            for c in choices
        ],
        "usage": usage(n_prompt, choices),
    }


def _scored_answers(
    srv: ServerState, prompts: list[list[int]], choices: list, n: int, top: int
) -> list[tuple[list[int], list]]:
    """Each choice's prompt + answer ids, and `scored_tokens`' (log p, top alternatives) for every
    token after the first, in one forward pass over them: what both kinds of `logprobs` report."""
    seqs = [prompts[c.index // n] + c.text.ids for c in choices]
    return list(zip(seqs, scored_tokens(srv.model, seqs, top_k=max(top, 1)), strict=True))


def completion_logprobs(
    srv: ServerState, prompts: list[list[int]], choices: list, n: int, top: int, echo: bool
) -> dict[int, dict]:
    """OpenAI's legacy `logprobs` object per choice: each generated token (and with `echo` each
    prompt token, the first without a score) with its log-probability and the `top` most likely
    tokens at its place, all scored in one forward pass over prompt + answer."""
    out = {}
    for c, (seq, scores) in zip(choices, _scored_answers(srv, prompts, choices, n, top), strict=True):
        first = 0 if echo else len(seq) - len(c.text.ids)
        tokens = [srv.tok.decode([t]) for t in seq[first:]]
        entries = [(None, None)] + [
            (lp, dict((srv.tok.decode([i]), v) for i, v in alts[:top])) for lp, alts in scores
        ]
        offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
        out[c.index] = {
            "tokens": tokens,
            "token_logprobs": [lp for lp, _ in entries[first:]],
            "top_logprobs": [alts for _, alts in entries[first:]],
            "text_offset": offsets,
        }
    return out


def chat_logprobs(srv: ServerState, prompt: list[int], choices: list, top: int) -> dict[int, dict]:
    """OpenAI's chat `logprobs` per choice: {"content": [{token, logprob, bytes, top_logprobs}]}
    for each answer token (a stop id that ended the turn left out), scored as completions' are."""
    stop_ids = set(turn_end_ids(srv.tok))

    def entry(i: int, lp: float) -> dict:
        raw = srv.tok.decode_bytes([i]) if i < srv.tok.vocab_size else b""  # the model's padding ids: none
        return {"token": srv.tok.decode([i]), "logprob": lp, "bytes": list(raw)}

    out = {}
    for c, (seq, scores) in zip(choices, _scored_answers(srv, [prompt], choices, len(choices), top), strict=True):
        answer = c.text.ids[:-1] if c.text.ids and c.text.ids[-1] in stop_ids else c.text.ids
        first = len(seq) - len(c.text.ids) - 1  # scores[k] is for seq[k + 1]
        out[c.index] = {
            "content": [
                {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in alts[:top]]}
                for t, (lp, alts) in zip(answer, scores[first:], strict=False)
            ],
            "refusal": None,
        }
    return out
