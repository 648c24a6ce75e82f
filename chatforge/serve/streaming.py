"""From a request's jobs to what its client reads. `start_jobs` submits one scheduler job per
choice, `pump` turns their events into text through `TextStream` (stop strings and the model's
tool call held back by chat_format's `ToolCallScanner`), and the chunk builders
make OpenAI's SSE stream of it. `finish_choices` ends every request: rows freed, answers stored."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from chatforge.chat_format import ToolCallScanner, parse_assistant, partial_tag_len, turn_end_ids
from chatforge.engine import IncrementalDecoder, TokenConstraint
from chatforge.errors import ChatforgeError
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.protocol import APIError
from chatforge.serve.scheduler import Job, QueueFull
from chatforge.serve.state import Inbox, ServerState
from chatforge.tokenizer import TOOL_CALL_CLOSE, Tokenizer

POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


# ---- token ids -> text ---------------------------------------------------------------------
class TextStream:
    """Token ids of one choice -> content deltas, ending at a stop id, a stop string, or (with tools)
    the end of the model's tool call.

    Text that could begin a stop string is held back until it is known not to, so a stop string
    never reaches the client, streamed or not. With tools, everything from `<tool_call>` on is held
    back too: at the end it becomes `tool_calls` if it parses (parse_assistant), else content."""

    def __init__(self, tok: Tokenizer, stop_ids: set[int], stops: list[str], tools: bool = False) -> None:
        self.decoder = IncrementalDecoder(tok.decode)
        self.stop_ids, self.stops = stop_ids, stops
        self.scanner = ToolCallScanner(one_call=True) if tools else None  # one call per turn
        self.text, self.passed = "", 0  # everything decoded; how much of it is clear of stop strings
        self.sent = 0  # characters that went out as content
        self.tokens = 0  # generated tokens, stop id included
        self.ids: list[int] = []  # those tokens (what `logprobs` scores)
        self.finish: str | None = None
        self.tool_calls: list[dict] | None = None
        self.content_end: int | None = None  # set at the end: text[:content_end] is the content

    @property
    def content(self) -> str:
        return self.text[: self.content_end]

    def push(self, tid: int) -> str:
        self.tokens += 1
        self.ids.append(tid)
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
        # hold back a suffix that may begin a stop string, then (with tools) the tool call
        clear = len(self.text) if final else len(self.text) - partial_tag_len(self.text[self.passed :], self.stops)
        out, self.passed = self.text[self.passed : clear], max(self.passed, clear)
        scanner = self.scanner
        if scanner is not None:
            out = scanner.push(out)
            if scanner.calls:  # the turn ends at the call's </tool_call>
                self.text, final = scanner.text, True
            if final:
                out += scanner.end()
                calls = parse_assistant(scanner.text).get("tool_calls") if scanner.calls else None
                if calls:
                    self.tool_calls = [{"id": "call_" + secrets.token_hex(8), **c} for c in calls]
                    self.finish = "tool_calls"
                elif scanner.calls or scanner.open_call:  # a malformed call: all of it is content
                    out += "".join(scanner.calls) + scanner.open_call
                    if scanner.calls:  # it ended at its </tool_call>; an open one ended where the job did
                        self.finish = self.finish or "stop"
        self.sent += len(out)
        if final:
            self.content_end = self.sent
        return out


# ---- jobs and their events -----------------------------------------------------------------
@dataclass
class Choice:
    index: int
    job: Job
    text: TextStream
    message_id: str | None = None  # where the answer is stored, when the request asked to store it


def start_jobs(
    srv: ServerState,
    prompts: list[list[int]],
    n: int,
    budget: int,
    sampling: dict,
    seed,
    stops,
    tools: bool = False,
    forced_ids: Sequence[int] = (),
    banned_ids: frozenset[int] = frozenset(),
    constraint: Callable[[], TokenConstraint] | None = None,
) -> tuple[list[Choice], asyncio.Queue]:
    """Submit n jobs per prompt to the scheduler; their events arrive on the returned queue. With
    tools, generation also stops after the model's `</tool_call>` (TextStream finds it as text too).
    Every answer begins with `forced_ids` and never holds `banned_ids` (tool_choice); with
    `constraint` (response_format), each job gets its own from it."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    if srv.inbox is None or srv.inbox.loop is not loop:
        srv.inbox = Inbox(loop)
    inbox = srv.inbox
    stop_ids = frozenset(turn_end_ids(srv.tok))
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
                forced_ids=forced_ids,
                banned_ids=banned_ids,
                constraint=constraint() if constraint is not None else None,
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


async def pump(
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


async def drain(
    choices: list[Choice], events: asyncio.Queue, request: Request, store: FeedbackStore | None
) -> None:
    """Run a non-streamed request's choices to their end, then finish them."""
    try:
        async for _ in pump(choices, events, request):
            pass
    finally:
        finish_choices(choices, store)


def finish_choices(choices: list[Choice], store: FeedbackStore | None) -> None:
    """The end of every request, however it ended: rows freed, stored answers written."""
    for c in choices:
        c.job.cancel()  # no-op for a finished job; frees the row of one still running
        if c.message_id is not None and store is not None:
            msg = answer_message(c.text)
            store.finish_answer(
                c.message_id, msg["content"], c.text.finish or "cancelled", msg.get("tool_calls")
            )
            c.message_id = None


def answer_message(text: TextStream) -> dict:
    """The assistant message of a finished choice (content None when it is only a tool call)."""
    if text.tool_calls:
        content = text.content if text.content.strip() else None
        return {"role": "assistant", "content": content, "refusal": None, "tool_calls": text.tool_calls}
    return {"role": "assistant", "content": text.content, "refusal": None}


def usage(n_prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.text.tokens for c in choices)
    return {
        "prompt_tokens": n_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": n_prompt_tokens + completion,
    }


# ---- server-sent events --------------------------------------------------------------------
def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream_response(
    chunks: AsyncIterator[str], choices: list[Choice], store: FeedbackStore | None
) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as e:  # a failed generation mid-stream: say so in the stream, then end it
            yield sse({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        finally:  # the end, an error, or the client went away (Starlette cancels us): free the rows
            finish_choices(choices, store)

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def chat_chunks(
    head: dict, choices: list[Choice], events: asyncio.Queue, n_prompt: int, include_usage: bool
) -> AsyncIterator[str]:
    base = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}

    def chunk(c: Choice, delta: dict, finish: str | None = None) -> str:
        return sse(
            {
                **base,
                "choices": [{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
        )

    for c in choices:
        yield chunk(c, {"role": "assistant", "content": ""})
    async for batch in pump(choices, events, None):
        for c, delta, done in batch:
            if delta:
                yield chunk(c, {"content": delta})
            if done and c.text.tool_calls:
                yield chunk(
                    c, {"tool_calls": [{"index": k, **call} for k, call in enumerate(c.text.tool_calls)]}
                )
            if done:
                yield chunk(c, {}, c.text.finish)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(n_prompt, choices)})
    yield "data: [DONE]\n\n"


async def completion_chunks(
    head: dict, choices: list[Choice], events: asyncio.Queue, n_prompt: int, echo: dict[int, str]
) -> AsyncIterator[str]:
    def chunk(c: Choice, text: str, finish: str | None = None) -> str:
        # OpenAI streams completions as "text_completion" objects too
        return sse(
            {**head, "choices": [{"text": text, "index": c.index, "logprobs": None, "finish_reason": finish}]}
        )

    for c in choices:
        if echo[c.index]:
            yield chunk(c, echo[c.index])
    async for batch in pump(choices, events, None):
        for c, delta, done in batch:
            yield chunk(c, delta, c.text.finish if done else None)
    yield sse({**head, "choices": [], "usage": usage(n_prompt, choices)})
    yield "data: [DONE]\n\n"
