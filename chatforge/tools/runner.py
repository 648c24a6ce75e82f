"""Generation with tool calls: the assistant writes <tool_call>{json}</tool_call>, the registry runs it,
the result goes back into the conversation as a `tool` message, and generation continues.

    new = generate_with_tools(model, tok, conversations, registry, max_calls=4)
    # new[i]: the messages this turn added to conversations[i], e.g.
    #   {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", ...}]}
    #   {"role": "tool", "tool_call_id": "call_1", "content": "18446744073709551616"}
    #   {"role": "assistant", "content": "2**64 is 18446744073709551616."}

One round = one batched generation (`engine.stream_batch`) over the conversations still running.
A row stops at <|im_end|>, at its token budget, or at the end of its first tool call: the
`</tool_call>` special token, or the text "</tool_call>" in the decoded output when the tokenizer
has no such token (imported SmolLM2): each token's text goes through `chat_format.ToolCallScanner`,
so a tag split over several tokens is found. Rows that stopped early are ignored until the round ends (the engine
keeps a row's slot until every row in the batch stops or the round is abandoned once all are done).

After a round, each call is parsed, run through the registry (calls of different rows in parallel
threads), and the row's prompt is rendered again from its messages with `render_prompt(...,
tools=registry.schemas())`: simple, and exactly the format the model is trained on. A malformed call,
an unknown tool or a failing tool becomes an error tool message ("error: ...") the model reads.
After `max_calls` calls in a turn, the next call is answered with an error telling the model to
answer without tools; whatever it writes next is its final answer (a call in it is kept as text).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from chatforge.chat_format import (
    ToolCallScanner,
    parse_assistant,
    render_prompt,
    turn_end_ids,
    validate_conversation,
)
from chatforge.engine import IncrementalDecoder, check_sampling, stream_batch
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.tokenizer import IM_END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tokenizer
from chatforge.tools.registry import ToolRegistry, ToolResult, error_result

MAX_PARALLEL_TOOLS = 4


def generate_with_tools(
    model: GPT,
    tok: Tokenizer,
    conversations: list[list[dict]],
    registry: ToolRegistry | Sequence[ToolRegistry],
    *,
    max_calls: int = 4,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> list[list[dict]]:
    """One assistant turn for each conversation, with tool calls; returns the new messages of each.

    `registry` is shared by all rows, or one per conversation (e.g. `default_registry(folder_i)`, so
    each conversation has its own files folder). `max_new_tokens` bounds each generated message;
    `seed` gives conversation i in round r the seed seed + i + 1_000_003 * r. `on_event` receives
    dicts with "type" ("text", "tool_call", "tool_result", "done") and "row", as they happen; "done"
    has a "reason": "stop" (<|im_end|>), "length" (token budget), "limit" (the answer after the tool
    limit) or "context" (a tool result filled the context: the row ends with that tool message)."""
    n = len(conversations)
    if n == 0:
        raise ChatforgeError("no conversations to generate for")
    registries = [registry] * n if isinstance(registry, ToolRegistry) else list(registry)
    if len(registries) != n or not all(isinstance(r, ToolRegistry) for r in registries):
        raise ChatforgeError(f"give one ToolRegistry, or one per conversation ({n}); got {len(registries)}")
    if not isinstance(max_calls, int) or max_calls < 0:
        raise ChatforgeError(f"max_calls must be an integer >= 0, got {max_calls!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ChatforgeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    for i, conv in enumerate(conversations):
        validate_conversation(conv, f"conversation {i}", require_assistant=False)
    emit = on_event or (lambda event: None)

    new: list[list[dict]] = [[] for _ in range(n)]
    calls = [0] * n  # calls made this turn (malformed ones count: they also cost a round)
    last_round = [False] * n  # the limit was hit: the next message is the answer, whatever it holds
    active = list(range(n))
    ctx = model.cfg.seq_len
    for rnd in range(max_calls + 2):  # at most max_calls calls, one refused call, one answer
        if not active:
            break
        rows, prompts = [], []
        for i in active:
            ids = render_prompt(tok, conversations[i] + new[i], tools=registries[i].schemas())
            if len(ids) < ctx:
                rows.append(i)
                prompts.append(ids)
            elif rnd == 0:
                raise ChatforgeError(
                    f"conversation {i} is {len(ids)} tokens with the tool descriptions, but the model's "
                    f"context is {ctx}; shorten it"
                )
            else:
                emit({"type": "done", "row": i, "reason": "context"})
        if not rows:
            break
        seeds = None if seed is None else [seed + i + 1_000_003 * rnd for i in rows]
        outputs = _generate_round(
            model, tok, rows, prompts, max_new_tokens, temperature, top_k, top_p, seeds, emit
        )

        pending: list[tuple[int, str, str]] = []  # (row, tool name, arguments JSON) to run
        active = []
        for i in rows:
            text, reason = outputs[i]
            if reason != "tool_call":
                new[i].append(parse_assistant(text))
                emit({"type": "done", "row": i, "reason": "limit" if last_round[i] else reason})
                continue
            if last_round[i]:  # told to answer without tools and called one anyway: keep it as text
                new[i].append({"role": "assistant", "content": text.strip()})
                emit({"type": "done", "row": i, "reason": "limit"})
                continue
            call_id = f"call_{sum(m['role'] == 'tool' for m in conversations[i] + new[i]) + 1}"
            msg = parse_assistant(text)
            active.append(i)
            if not msg.get("tool_calls"):  # malformed: the raw text stays, the model is told what is wrong
                new[i].append({"role": "assistant", "content": text.strip()})
                new[i].append(_tool_message(None, _malformed(text)))
                calls[i] += 1
                emit({"type": "tool_result", "row": i, "name": None, **_result_fields(_malformed(text))})
                continue
            call = msg["tool_calls"][0]
            call["id"] = call_id
            new[i].append(msg)
            fn = call["function"]
            emit({"type": "tool_call", "row": i, "name": fn["name"], "arguments": fn["arguments"]})
            if calls[i] >= max_calls:
                limit = error_result(
                    f"tool call limit reached ({max_calls} per answer); answer now without calling tools"
                )
                new[i].append(_tool_message(call_id, limit))
                emit({"type": "tool_result", "row": i, "name": fn["name"], **_result_fields(limit)})
                last_round[i] = True
                continue
            calls[i] += 1
            pending.append((i, fn["name"], fn["arguments"]))

        if pending:
            with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_TOOLS, len(pending))) as pool:
                results = list(pool.map(lambda c: registries[c[0]].call(c[1], c[2]), pending))
            for (i, name, _), result in zip(pending, results, strict=True):
                new[i].append(_tool_message(new[i][-1]["tool_calls"][0]["id"], result))
                emit({"type": "tool_result", "row": i, "name": name, **_result_fields(result)})
    return new


def _generate_round(model, tok, rows, prompts, max_new_tokens, temperature, top_k, top_p, seeds, emit):
    """One batched generation; {row: (text, reason)} with reason "stop", "length" or "tool_call".

    The text is what the model wrote without the final stop token, ending with the closing tag when
    the reason is "tool_call"."""
    ends = set(turn_end_ids(tok))
    close_id = tok.special_id(TOOL_CALL_CLOSE) if tok.has_special(TOOL_CALL_CLOSE) else None
    stops = ends | ({close_id} if close_id is not None else set())
    decoders = {i: IncrementalDecoder(tok.decode) for i in rows}
    scanners = {i: ToolCallScanner() for i in rows}  # the tags may arrive split over several tokens
    shown = {i: 0 for i in rows}  # characters of the text already sent as "text" events
    result: dict[int, tuple[str, str]] = {}
    done: set[int] = set()  # batch rows that stopped on text: the engine drops them
    for j, tid in stream_batch(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seeds=seeds,
        stop_ids=stops,
        finished=done,
    ):
        i = rows[j]
        if tid in ends:
            result[i] = (decoders[i].text, "stop")
        else:
            scan = scanners[i]
            scan.push(decoders[i].push(tid))
            k_end, call_end = scan.text.find(IM_END), scan.call_end
            if call_end is not None and (k_end < 0 or call_end - len(TOOL_CALL_CLOSE) < k_end):
                result[i] = (scan.text[:call_end], "tool_call")
            elif k_end >= 0:
                result[i] = (scan.text[:k_end], "stop")
        if i in result:
            visible = result[i][0]
            done.add(j)
        else:
            visible = decoders[i].emitted  # whole characters only (see IncrementalDecoder)
        if len(visible) > shown[i]:
            emit({"type": "text", "row": i, "text": visible[shown[i] :]})
            shown[i] = len(visible)
        if len(result) == len(rows):
            break  # every row is done: abandon the round (closes the engine's generator)
    for i in rows:
        if i not in result:
            text = decoders[i].text
            if len(text) > shown[i]:
                emit({"type": "text", "row": i, "text": text[shown[i] :]})
            result[i] = (text, "length")
    return result


def _malformed(text: str) -> ToolResult:
    """Why a <tool_call>...</tool_call> span did not parse, in words the model can act on."""
    body = text[: text.rfind(TOOL_CALL_CLOSE)]
    k = body.rfind(TOOL_CALL_OPEN)
    if k < 0:
        return error_result(
            f"{TOOL_CALL_CLOSE} without {TOOL_CALL_OPEN}; write {TOOL_CALL_OPEN}{{...}}{TOOL_CALL_CLOSE}"
        )
    body = body[k + len(TOOL_CALL_OPEN) :]
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return error_result(f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return error_result('a tool call must be {"name": <tool name>, "arguments": {...}}')
    return error_result("the tool call's arguments must be a JSON object")


def _tool_message(call_id: str | None, result: ToolResult) -> dict:
    msg = {"role": "tool", "content": result.content}
    if call_id is not None:
        msg["tool_call_id"] = call_id
    return msg


def _result_fields(result: ToolResult) -> dict:
    return {"content": result.content, "error": result.error, "files": list(result.files)}
