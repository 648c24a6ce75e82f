"""The OpenAI-compatible routes: GET /health, GET /v1/models[/{model}], POST /v1/chat/completions
and POST /v1/completions. Each checks its request (protocol.py), starts one job per choice and
answers with the whole result or an SSE stream (streaming.py). Tokenising a prompt and writing to
the store run in the thread pool: a megabyte of prompt takes the tokenizer a while, and the event
loop must keep answering everyone else meanwhile."""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from chatforge.chat_format import render_prompt
from chatforge.errors import ChatforgeError
from chatforge.serve.protocol import (
    MAX_N,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    sampling_settings,
    stop_strings,
    token_budget,
)
from chatforge.serve.routes_store import conversation_for, store_request
from chatforge.serve.state import Caller, ServerState, State
from chatforge.serve.streaming import (
    answer_message,
    chat_chunks,
    completion_chunks,
    drain,
    finish_choices,
    start_jobs,
    stream_response,
    usage,
)

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


def _chat_prompt(srv: ServerState, req: ChatCompletionRequest) -> tuple[list[dict], list[int], bool]:
    """The request's messages, its prompt ids and whether tools are offered; 400 for what is not
    supported. Tools as OpenAI has them: the schemas go into the prompt, a call comes back as
    tool_calls (finish_reason "tool_calls"), and the client runs it and sends a tool message."""
    _check_model(srv, req.model)
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if req.tool_choice not in (None, "auto", "none"):
        raise APIError(
            400, 'tool_choice may be "auto" or "none": this server cannot force a call', param="tool_choice"
        )
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
    messages = [_message(m) for m in req.messages]
    try:
        ids = render_prompt(srv.tok, messages, tools=tools or None)
    except ChatforgeError as e:
        raise APIError(400, str(e), param="messages") from None
    return messages, ids, bool(tools)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, srv: State, user: Caller):
    messages, ids, tools = await run_in_threadpool(_chat_prompt, srv, req)
    if req.think is not None:  # thinking strategies: think.py answers, with the tokens they spent
        from chatforge.think import serve_think

        reply = await run_in_threadpool(serve_think, srv, req, messages, len(ids))
        return {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), **reply}
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    budget = token_budget(srv.ctx, len(ids), max_tokens, "max_tokens")
    sampling, stops = sampling_settings(req), stop_strings(req.stop)
    conv_id = await run_in_threadpool(conversation_for, srv, req, user)  # checked before work starts
    choices, events = start_jobs(srv, [ids], req.n, budget, sampling, req.seed, stops, tools=tools)
    cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    if conv_id is not None or req.store:
        try:
            conv_id = await run_in_threadpool(
                store_request, srv, conv_id, user, req.user, messages, choices, cid
            )
        except BaseException:
            finish_choices(choices, srv.store)
            raise
    head = {"id": cid, "object": "chat.completion", "created": created, "model": srv.model_id}
    if conv_id is not None:
        head["conversation_id"] = conv_id
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream_response(
            chat_chunks(head, choices, events, len(ids), include_usage), choices, srv.store
        )
    await drain(choices, events, request, srv.store)
    return {
        **head,
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": answer_message(c.text),
                "logprobs": None,
                "finish_reason": c.text.finish or "stop",
            }
            for c in choices
        ],
        "usage": usage(len(ids), choices),
    }


# ---- completions ---------------------------------------------------------------------------
def _completion_prompts(srv: ServerState, prompt) -> tuple[list[list[int]], list[str]]:
    """The request's prompt(s) as token ids (text gets the model's start token) and as text."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    out, texts = [], []
    vocab = srv.model.cfg.vocab_size
    for p in prompt:
        ids = srv.tok.start_ids() + srv.tok.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "a prompt must hold at least one token", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        out.append(ids)
        texts.append(p if isinstance(p, str) else srv.tok.decode(ids))
    if len(out) > MAX_N:
        raise APIError(400, f"at most {MAX_N} prompts per request", param="prompt")
    return out, texts


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, srv: State):
    _check_model(srv, req.model)
    if req.logprobs is not None:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of is not supported (leave it out, or equal to n)", param="best_of")
    prompts, texts = await run_in_threadpool(_completion_prompts, srv, req.prompt)
    budget = min(token_budget(srv.ctx, len(p), req.max_tokens or 16, "max_tokens") for p in prompts)
    sampling, stops = sampling_settings(req), stop_strings(req.stop)
    choices, events = start_jobs(srv, prompts, req.n, budget, sampling, req.seed, stops)
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
        "usage": usage(n_prompt, choices),
    }
