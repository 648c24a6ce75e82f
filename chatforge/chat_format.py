"""ChatML: how a conversation becomes token ids, and how generated text becomes a message again.

- `render_conversation` (ids + loss mask, 1 only on the assistant's own tokens) for training,
  `render_prompt` (the conversation so far + an open assistant turn) for generation.
- `parse_assistant`: generated text -> an OpenAI message, `<tool_call>{json}</tool_call>` spans
  as `tool_calls`. `ToolCallScanner` finds those spans while the text is still streaming.
- `turn_end_ids`: the ids that end an assistant turn (where generation stops).
- `validate_conversation`, `load_conversations`, and tools shown in the system turn
  (`tool_signature`, `with_tools`).

Every message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; the tags are special tokens
(tokenizer.py) inserted by id, so text typed by a user can never close a turn or forge a call.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError
from chatforge.fileio import read_jsonl
from chatforge.tokenizer import IM_END, IM_START, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tokenizer

ROLES = ("system", "user", "assistant", "tool")
# How tools are shown in the system turn: a one-line call format, then one line per tool,
# `name(arg: type, optional?: type): description`. Compact on purpose: the `cpu` preset's
# model has a 128-token context, and full JSON schemas would not fit beside a conversation.
# No <tool_call> tags in it: a tag is a special token only where the renderer puts one.
TOOLS_INSTRUCTION = 'Tools (call one with {"name": ..., "arguments": {...}}):'


def validate_conversation(messages: Any, where: str = "", *, require_assistant: bool = True) -> None:
    """Raise ChatforgeError (prefixed with `where`, e.g. "convs.jsonl line 12") if `messages`
    is not a valid OpenAI-schema conversation with at least one assistant turn."""
    prefix = f"{where}: " if where else ""

    def fail(msg: str) -> None:
        raise ChatforgeError(prefix + msg)

    if not isinstance(messages, list) or not messages:
        fail("a conversation must be a non-empty list of {role, content} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            fail(f"message {i} is a {type(m).__name__}, not a {{role, content}} object")
        role = m.get("role")
        if role not in ROLES:
            fail(f"message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        tool_calls = m.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                fail(f"message {i} ({role}) has tool_calls; only assistant messages may")
            _validate_tool_calls(tool_calls, f"message {i}", fail)
        content = m.get("content")
        if content is None:
            if not (role == "assistant" and tool_calls):
                fail(f"message {i} ({role}) has no content; give it a string")
        elif not isinstance(content, str):
            fail(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        fail("conversation has no assistant turn")


def _validate_tool_calls(tool_calls: Any, what: str, fail) -> None:
    if not isinstance(tool_calls, list):
        fail(f"{what} tool_calls must be a list")
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            fail(
                f'{what} tool_calls[{j}] must be {{"type": "function", "function": {{"name", "arguments"}}}}'
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            fail(f"{what} tool_calls[{j}] has no function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                fail(f"{what} tool_calls[{j}] arguments are not valid JSON")
        if not isinstance(args, dict):
            fail(f"{what} tool_calls[{j}] arguments must be a JSON object")


def _tool_call_json(call: dict) -> str:
    fn = call["function"]
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    return json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False, separators=(",", ":"))


def tool_signature(tool: dict) -> str:
    """An OpenAI tool schema as one line: `calculator(expression: string): exact arithmetic`."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatforgeError(
            'each tool must be {"type": "function", "function": {"name", "description", "parameters"}}'
        )
    params = fn.get("parameters") or {}
    props = params.get("properties") or {} if isinstance(params, dict) else {}
    required = set(params.get("required") or []) if isinstance(params, dict) else set()
    args = ", ".join(
        f"{name}{'' if name in required else '?'}: {spec.get('type', 'any') if isinstance(spec, dict) else 'any'}"
        for name, spec in props.items()
    )
    desc = fn.get("description")
    return f"{fn['name']}({args})" + (f": {desc}" if desc else "")


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Show the tools in the system turn (extend the first system message, or add one)."""
    if not tools:
        return messages
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ChatforgeError("tools must be a list of OpenAI tool schemas (JSON objects)")
    block = "\n".join([TOOLS_INSTRUCTION, *(tool_signature(t) for t in tools)])
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=messages[0]["content"] + "\n" + block)
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def conversation_text(messages: list[dict], tools: list[dict] | None = None) -> list[str]:
    """The text pieces the renderer shows for a conversation (contents, tool blocks, tool-call
    JSON): what a tokenizer should be trained on so that chats tokenize compactly."""
    pieces = []
    for m in with_tools(messages, tools):
        pieces.append(m["role"] + "\n")  # the header's role names, so they merge into one token each
        if m.get("content"):
            pieces.append(m["content"])
        pieces += [_tool_call_json(c) for c in m.get("tool_calls") or []]
    return pieces


def _tag(tok: Tokenizer, tag: str) -> list[int]:
    # Imported tokenizers may lack our tags (SmolLM2 has no <tool_call>): fall back to text.
    return [tok.special_id(tag)] if tok.has_special(tag) else tok.encode(tag)


def _render(tok: Tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []

    def add(part: list[int], m: int) -> None:
        ids.extend(part)
        mask.extend([m] * len(part))

    add(tok.start_ids(), 0)
    im_start, im_end, newline = _tag(tok, IM_START), _tag(tok, IM_END), tok.encode("\n")
    for msg in with_tools(messages, tools):
        train = 1 if msg["role"] == "assistant" else 0
        add(im_start + tok.encode(msg["role"] + "\n"), 0)  # header: never trained on
        body = tok.encode(msg["content"]) if msg.get("content") else []
        for call in msg.get("tool_calls") or []:
            body += _tag(tok, TOOL_CALL_OPEN) + tok.encode(_tool_call_json(call)) + _tag(tok, TOOL_CALL_CLOSE)
        add(body + im_end, train)  # the assistant learns its content and when to stop
        add(newline, 0)
    return ids, mask


def render_conversation(
    tok: Tokenizer,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    max_len: int | None = None,
) -> tuple[list[int], list[int]]:
    """ChatML ids and a loss mask (1 only on assistant content, tool calls and its <|im_end|>).

    Starts with `tok.start_ids()` (the BOS, unless the model adds none); each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`.
    `max_len` cuts both lists (reporting the truncation is the caller's job)."""
    validate_conversation(messages)
    ids, mask = _render(tok, messages, tools)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict], *, tools: list[dict] | None = None) -> list[int]:
    """The conversation so far followed by `<|im_start|>assistant\\n`: what generation continues."""
    validate_conversation(messages, require_assistant=False)
    ids, _ = _render(tok, messages, tools)
    return ids + _tag(tok, IM_START) + tok.encode("assistant\n")


_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def parse_assistant(text: str) -> dict:
    """Generated assistant text (decoded, special tokens as strings) → an OpenAI message.

    Text up to <|im_end|> is kept; well-formed <tool_call>{json}</tool_call> spans become
    `tool_calls` (arguments as a JSON string, as the OpenAI schema has it); malformed ones
    stay in the content so nothing the model wrote is silently lost."""
    text = text.split(IM_END, 1)[0]
    calls, kept, pos = [], [], 0
    for m in _TOOL_CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
            name, args = obj["name"], obj.get("arguments", {})
            if not isinstance(name, str) or not name or not isinstance(args, dict):
                raise ValueError  # what validate_conversation would refuse stays text
        except (ValueError, KeyError, TypeError):
            continue  # malformed: left in the content
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append({"type": "function", "function": {"name": name, "arguments": json.dumps(args)}})
    kept.append(text[pos:])
    content = "".join(kept).strip()
    msg: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def load_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """Read a jsonl file: one conversation per line, a list of messages or {"messages": [...]},
    optionally with "tools" (OpenAI schemas, as in OpenAI's fine-tuning files): those are
    folded into the system turn exactly as `render_prompt(..., tools=...)` shows them."""
    p = Path(path)
    if not p.is_file():
        raise ChatforgeError(f"no conversations file at {p}")
    convs = []
    for n, obj in read_jsonl(p, objects_only=False):
        messages = obj.get("messages") if isinstance(obj, dict) else obj
        where = f"{p} line {n}"
        validate_conversation(messages, where)
        tools = obj.get("tools") if isinstance(obj, dict) else None
        if tools:
            try:
                messages = with_tools(messages, tools)
            except ChatforgeError as e:
                raise ChatforgeError(f"{where}: {e}") from None
        convs.append(messages)
    if not convs:
        raise ChatforgeError(f"{p} holds no conversations")
    return convs


def turn_end_ids(tok: Tokenizer) -> list[int]:
    """The ids that end an assistant turn, where generation stops: <|im_end|>, and the BOS
    (<|endoftext|>), which a model that has not learned <|im_end|> writes at a document's end."""
    ids = [tok.special_id(IM_END)] if tok.has_special(IM_END) else []
    if tok.bos_id is not None:
        ids.append(tok.bos_id)
    return ids


def partial_tag_len(text: str, tags: list[str]) -> int:
    """How many characters at the end of `text` could begin one of `tags` (without being all of it):
    a streamed text must hold them back until the next piece shows whether the tag follows."""
    longest = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:k]):
                longest = k
                break
    return longest


class ToolCallScanner:
    """Streamed assistant text in, the text safe to show out, `<tool_call>...</tool_call>` blocks held back.

    `push(piece)` returns the new text that lies outside every call. A tail that may be the start of
    `<tool_call>` waits until the next piece decides (the tags arrive split over several tokens when
    the tokenizer has no special token for them); text after a finished call is shown again.
    Finished blocks, tags included, collect in `calls`; `call_end` marks the end of the first
    `</tool_call>`, opened or not: where a turn that makes one call stops. `end()` releases a held
    tail that was plain text after all; an unfinished call is never shown (`open_call` holds it).
    With `one_call` the text ends at the first finished call: what follows is dropped."""

    def __init__(self, *, one_call: bool = False) -> None:
        self.one_call = one_call
        self.text = ""  # everything pushed (with one_call: up to the first call's end)
        self.calls: list[str] = []
        self.call_end: int | None = None
        self._done = 0  # text[:_done] is settled: shown, or inside a finished call
        self._open: int | None = None  # where the unfinished call's <tool_call> starts

    @property
    def open_call(self) -> str:
        return "" if self._open is None else self.text[self._open :]

    def push(self, piece: str) -> str:
        if self.one_call and self.calls:
            return ""
        before = len(self.text)
        self.text += piece
        if self.call_end is None:
            k = self.text.find(TOOL_CALL_CLOSE, max(0, before - len(TOOL_CALL_CLOSE) + 1))
            self.call_end = None if k < 0 else k + len(TOOL_CALL_CLOSE)
        shown = []
        while True:
            if self._open is None:
                k = self.text.find(TOOL_CALL_OPEN, self._done)
                if k < 0:
                    safe = len(self.text) - partial_tag_len(self.text[self._done :], [TOOL_CALL_OPEN])
                    shown.append(self.text[self._done : safe])
                    self._done = safe
                    return "".join(shown)
                shown.append(self.text[self._done : k])
                self._open = self._done = k
            close = self.text.find(TOOL_CALL_CLOSE, self._open + len(TOOL_CALL_OPEN))
            if close < 0:
                return "".join(shown)
            end = close + len(TOOL_CALL_CLOSE)
            self.calls.append(self.text[self._open : end])
            self._open, self._done = None, end
            if self.one_call:
                self.text = self.text[:end]
                return "".join(shown)

    def end(self) -> str:
        """The text ends here: what was held back as a possible tag start ("" inside a call)."""
        if self._open is not None:
            return ""
        rest, self._done = self.text[self._done :], len(self.text)
        return rest
