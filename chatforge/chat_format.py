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

An imported model keeps its own chat template (`tok.chat_template`, from the run's config.json):
it is rendered as transformers' `apply_chat_template` renders it (a jinja2 sandbox with trim_blocks,
lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`; messages, tools, add_generation_prompt,
bos_token, eos_token), and the text is encoded with the template's own special-token strings as
special ids while the same strings inside messages stay text (`sanitize_control_tokens=True`).
Tool calls and tools go to a template that knows them; to one that does not, as chatforge writes
them (tools in the system turn, calls as `<tool_call>{json}</tool_call>` text).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
    render = _render_templated if tok.chat_template else _render
    ids, mask = render(tok, messages, tools)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict], *, tools: list[dict] | None = None) -> list[int]:
    """The conversation so far followed by `<|im_start|>assistant\\n`: what generation continues."""
    validate_conversation(messages, require_assistant=False)
    if tok.chat_template:
        return _template_ids(tok, messages, tools, add_generation_prompt=True)
    ids, _ = _render(tok, messages, tools)
    return ids + _tag(tok, IM_START) + tok.encode("assistant\n")


# ---- a model's own chat template -----------------------------------------------------------
# Private-use characters put around special-token strings found in what a user wrote: after the
# template has run, a marked token is their text and an unmarked one is the template's own.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_PROBE = "chatforge turn-end probe"  # an assistant message whose end shows the turn-end token


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' tojson: jinja's own escapes HTML characters, which a prompt must not
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass(frozen=True)
class CompiledTemplate:
    template: jinja2.Template
    uses_tools: bool  # reads the `tools` variable
    uses_tool_calls: bool  # renders an assistant message's tool_calls


@lru_cache(maxsize=16)
def compile_template(source: str) -> CompiledTemplate:
    """A chat template compiled as transformers compiles it; ChatforgeError when it does not parse."""
    if not isinstance(source, str):
        raise ChatforgeError("chat_template in the run's config.json must be a string (a jinja template)")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatforgeError(
            f"the chat template does not parse ({_one_line(e)}); fix chat_template"
        ) from None
    uses_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
    return CompiledTemplate(template, uses_tools, "tool_calls" in source)


def _alternation(specials: tuple[str, ...]) -> str:
    return "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)"  # longest first


@lru_cache(maxsize=16)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern:
    """A marked special token, a lone marker, or an unmarked special token."""
    alt = _alternation(specials)
    return re.compile(f"{_MARK_OPEN}({alt}){_MARK_CLOSE}|[{_MARK_OPEN}{_MARK_CLOSE}]|({alt})")


@lru_cache(maxsize=16)
def _plain_specials_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile(_alternation(specials))


def _specials(tok: Tokenizer) -> tuple[str, ...]:
    return tuple(sorted(tok.id_to_token(i) for i in tok.special_ids))


def encode_with_specials(tok: Tokenizer, text: str) -> list[int]:
    """Text in which special-token strings are the special tokens (a rendered template, a raw
    completions prompt, as vLLM and llama.cpp read one); marked ones (user text) stay text."""
    ids: list[int] = []
    plain: list[str] = []
    pos = 0
    for m in _specials_pattern(_specials(tok)).finditer(text):
        plain.append(text[pos : m.start()])
        pos = m.end()
        if m.group(1) is not None:  # a special token a user wrote: text
            plain.append(m.group(1))
        elif m.group(2) is not None:  # the template's own
            ids += tok.encode("".join(plain)) if any(plain) else []
            plain = []
            ids.append(tok.special_id(m.group(2)))
    plain.append(text[pos:])
    return ids + (tok.encode("".join(plain)) if any(plain) else [])


def _marked(obj: Any, pattern: re.Pattern) -> Any:
    """Strings (in dicts and lists) with their special-token strings marked as user text."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")
        return pattern.sub(lambda m: _MARK_OPEN + m.group(0) + _MARK_CLOSE, obj)
    if isinstance(obj, dict):
        return {k: _marked(v, pattern) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_marked(v, pattern) for v in obj]
    return obj


def _template_messages(messages: list[dict], template: CompiledTemplate, specials: re.Pattern) -> list[dict]:
    """Messages as the template sees them: keys with None dropped (as transformers does), user text
    marked; tool calls as chatforge's text form when the template has no place for them."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        m = _marked({k: v for k, v in m.items() if v is not None}, specials)
        if calls and not template.uses_tool_calls:
            m.pop("tool_calls")
            text = "".join(
                TOOL_CALL_OPEN + _marked(_tool_call_json(c), specials) + TOOL_CALL_CLOSE for c in calls
            )
            m["content"] = m.get("content", "") + text
        out.append(m)
    return out


def template_text(
    tok: Tokenizer, messages: list[dict], tools: list[dict] | None, *, add_generation_prompt: bool
) -> str:
    """The model's template rendered (special tokens a user wrote marked); ChatforgeError if it fails."""
    template = compile_template(tok.chat_template)
    if tools and not template.uses_tools:  # shown as chatforge shows them, not silently dropped
        messages, tools = with_tools(messages, tools), None
    plain = _plain_specials_pattern(_specials(tok))

    def token(i: int | None) -> str | None:
        return tok.id_to_token(i) if i is not None and 0 <= i < tok.vocab_size else None

    bos = token(tok.chat_bos_id if tok.chat_bos_id is not None else tok.bos_id)
    variables = {"bos_token": bos, "eos_token": token(tok.chat_eos_id)}
    try:
        return template.template.render(
            messages=_template_messages(messages, template, plain),
            tools=_marked(tools, plain) if tools else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in variables.items() if v is not None},
        )
    except Exception as e:  # the template is the model's code: any failure is its message, one line
        raise ChatforgeError(f"the model's chat template failed to render: {_one_line(e)}") from None


def _template_ids(tok: Tokenizer, messages: list[dict], tools, *, add_generation_prompt: bool) -> list[int]:
    return encode_with_specials(
        tok, template_text(tok, messages, tools, add_generation_prompt=add_generation_prompt)
    )


def _render_templated(tok: Tokenizer, messages: list[dict], tools) -> tuple[list[int], list[int]]:
    """Ids and a loss mask through the model's template: an assistant turn's tokens are those its
    message adds after the generation prompt, up to and including the turn-end token."""
    ids = _template_ids(tok, messages, tools, add_generation_prompt=False)
    mask = [0] * len(ids)
    ends = set(turn_end_ids(tok))
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template_ids(tok, messages[:i], tools, add_generation_prompt=True)
        through = _template_ids(tok, messages[: i + 1], tools, add_generation_prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise ChatforgeError(
                "the model's chat template renders earlier turns differently once later ones follow, "
                "so its assistant tokens cannot be told apart for training"
            )
        end = next((k + 1 for k in range(len(before), len(through)) if ids[k] in ends), len(through))
        mask[len(before) : end] = [1] * (end - len(before))
    return ids, mask


def _template_turn_end(tok: Tokenizer) -> int | None:
    """The special token the model's template writes right after an assistant message, if any."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = template_text(tok, probe, None, add_generation_prompt=False)
    except ChatforgeError:
        return None
    k = text.find(_PROBE)
    if k < 0:
        return None
    after = text[k + len(_PROBE) :].lstrip()
    hit = next((s for s in sorted(_specials(tok), key=len, reverse=True) if after.startswith(s)), None)
    return tok.special_id(hit) if hit is not None else None


def tool_call_start(tok: Tokenizer, name: str | None = None) -> list[int]:
    """The ids an assistant answer begins with when it makes a tool call (to `name`, when given):
    `<tool_call>`, then `{"name":"NAME","arguments":` as `parse_assistant` reads a call."""
    ids = _tag(tok, TOOL_CALL_OPEN)
    if name is not None:
        ids += tok.encode('{"name":' + json.dumps(name, ensure_ascii=False) + ',"arguments":')
    return ids


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
    (<|endoftext|>), which a model that has not learned <|im_end|> writes at a document's end.
    With a model's own template: the special token its template writes after an assistant's
    message (Llama 3's <|eot_id|>, Zephyr's </s>), then the model's recorded EOS."""
    if tok.chat_template:
        return list(dict.fromkeys(i for i in (_template_turn_end(tok), tok.chat_eos_id) if i is not None))
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
