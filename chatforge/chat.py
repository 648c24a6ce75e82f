"""`chatforge chat`: talk to a model in the terminal, or answer one prompt with -p.

The pieces, from the inside out:
- `chat_turn` renders the conversation as ChatML, generates one assistant answer through the
  engine and streams its text to a callback (whole characters only: see IncrementalDecoder).
- `chat_turn_with_tools` does the same through `tools.runner.generate_with_tools`: the model may
  call tools; their markup is hidden from the stream and each call is shown as one line,
  `[calculator] 48213 * 739 -> 35629407`.
- `ChatSession` holds a conversation and turns each input line into output: a user message, or a
  command (/reset, /system, /save, /quit, /help). It keeps the prompt inside the model's context
  by sliding a window over the oldest turns (the system prompt always stays). No TTY needed, so
  tests drive it directly.
- `cmd_chat` is the CLI: `-p` prints only the answer (tool lines go to stderr); otherwise a `you> `
  loop. `--tools` shows the model calculator, python and chart (`tools.builtin.default_registry`;
  files and charts land in `--files DIR`, default a new temporary folder), `--tools calculator` only
  the calculator as the world models are trained to see it (short enough for a 128-token context).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from chatforge.chat_format import ToolCallScanner, parse_assistant, render_prompt, turn_end_ids
from chatforge.checkpoint import load_run
from chatforge.device import pick_device
from chatforge.engine import IncrementalDecoder, check_sampling, stream_batch
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_bytes
from chatforge.model.gpt import GPT
from chatforge.model.quant import compile_decode
from chatforge.options import ChatOptions
from chatforge.rag.answer import RagPrompt, rag_prompt, sources_line
from chatforge.redteam.defenses import DefenseStack, InputBlocked, parse_defenses
from chatforge.terminal import ControlStripper, strip_controls
from chatforge.think import Thinker, load_thinker, parse_spec, think_defended, usage_note
from chatforge.tokenizer import Tokenizer
from chatforge.tools.builtin import calculator_registry, default_registry
from chatforge.tools.registry import ToolRegistry
from chatforge.tools.runner import generate_with_tools
from chatforge.tools.sandbox import SandboxConfig, layers_line

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt; no TEXT clears it), "
    "/save PATH (append the conversation as a JSON line), /quit (or Ctrl-D); Ctrl-C stops an answer"
)
INTERACTIVE_TEMPERATURE = 0.7  # some variety when talking; -p is greedy (0) so scripts get one answer


def chat_turn(
    model: GPT,
    tok: Tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_token: Callable[[str], None] | None = None,
) -> str:
    """Generate the assistant's reply to `messages` (OpenAI schema) and return its text.

    The text is every generated token decoded, without the final stop token (tool calls stay as
    `<tool_call>...` text; `parse_assistant` turns it into a message). `on_token` receives each
    printable piece as it is produced. The answer gets min(max_new_tokens, room left in the
    context) tokens; a prompt that fills the context raises ChatforgeError."""
    ids = render_prompt(tok, messages)
    if len(ids) >= model.cfg.seq_len:
        raise ChatforgeError(
            f"the conversation is {len(ids)} tokens but the model's context is {model.cfg.seq_len}; "
            "shorten it"
        )
    stops = set(turn_end_ids(tok))
    decoder = IncrementalDecoder(tok.decode)
    for _, tid in stream_batch(
        model,
        [ids],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seeds=seed,
        stop_ids=stops,
    ):
        if tid in stops:
            break
        delta = decoder.push(tid)
        if delta and on_token is not None:
            on_token(delta)
    rest = decoder.flush()
    if rest and on_token is not None:
        on_token(rest)
    return decoder.emitted


def _clip(text: str, n: int) -> str:
    text = " ⏎ ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= n else text[: n - 1] + "…"


def tool_line(name: str | None, arguments: str | None, content: str, files: list[str]) -> str:
    """One tool call as a line: `[calculator] 48213 * 739 -> 35629407`. A single string argument (an
    expression, code) is shown bare, anything else as compact JSON; long text is clipped."""
    try:
        args = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        args = arguments
    if isinstance(args, dict) and len(args) == 1 and isinstance(next(iter(args.values())), str):
        shown = next(iter(args.values()))
    elif isinstance(args, dict):
        shown = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    else:
        shown = str(args or "")
    saved = f" (saved {', '.join(files)})" if files else ""
    head = f"[{name}] {_clip(shown, 100)}" if name else "[tool call not understood]"
    return f"{head} -> {_clip(content, 200)}{saved}"


def chat_turn_with_tools(
    model: GPT,
    tok: Tokenizer,
    messages: list[dict],
    registry: ToolRegistry,
    *,
    max_new_tokens: int = 256,
    max_calls: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    on_tool: Callable[[str], None] | None = None,
) -> tuple[list[dict], str]:
    """One assistant turn in which the model may call the tools of `registry`; returns the messages the
    turn added (assistant calls, tool results, the answer) and how it ended ("stop", "length",
    "limit" or "context": see `generate_with_tools`). `on_text` receives the assistant's text as it is
    produced, tool-call markup left out; `on_tool` one `tool_line` per call once it has run."""
    scanner, reason = ToolCallScanner(), "stop"
    call_args: list[str | None] = [None]  # the arguments of the call whose result comes next

    def on_event(event: dict) -> None:
        nonlocal reason, scanner
        kind = event["type"]
        if kind == "text":
            shown = scanner.push(event["text"])
            if shown and on_text is not None:
                on_text(shown)
            return
        rest = scanner.end()  # any other event ends the message being streamed
        scanner = ToolCallScanner()
        if rest and on_text is not None:
            on_text(rest)
        if kind == "tool_call":
            call_args[0] = event["arguments"]
        elif kind == "tool_result":
            args, call_args[0] = call_args[0], None
            if on_tool is not None:
                on_tool(tool_line(event["name"], args, event["content"], event["files"]))
        elif kind == "done":
            reason = event["reason"]

    new = generate_with_tools(
        model, tok, [messages], registry, max_calls=max_calls, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, on_event=on_event,
    )[0]  # fmt: skip
    return new, reason


def final_answer(new: list[dict]) -> str:
    """The content of the last assistant message of a turn ("" when the turn ended on a tool result)."""
    last = new[-1] if new else {}
    return (last.get("content") or "") if last.get("role") == "assistant" else ""


def fit_window(
    head: list[dict],
    messages: list[dict],
    start: int,
    prompt_len: Callable[[list[dict]], int],
    limit: int,
) -> tuple[int, int]:
    """Where the window over `messages` starts so that `head + messages[start:]` (head: the system
    prompt, always kept) renders to at most `limit` tokens: whole turns (a user message and the
    replies after it) leave from the oldest on, as few as will do. Returns (start, prompt tokens);
    when even the newest turn is too long, that turn's start and its length, which is then over
    `limit`. `chatforge chat` and the server's `trim_history` both slide their window with it."""
    starts = [start] + [i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"]
    lengths: dict[int, int] = {}

    def length(k: int) -> int:
        if k not in lengths:
            lengths[k] = prompt_len(head + messages[starts[k] :])
        return lengths[k]

    # fewer messages never render longer, so a binary search finds the first start that fits
    # with a few renders, not one per turn (a long conversation is many turns)
    lo, hi = 0, len(starts) - 1
    if length(hi) > limit:
        return starts[hi], length(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if length(mid) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return starts[lo], length(lo)


class ChatSession:
    """One conversation with a model; `handle(line)` runs a command or answers a user message.

    Output is written to `out` as it is produced (the answer streams token by token) and also
    returned by `handle`, so a caller without a terminal can inspect it. `messages` is the full
    transcript (what /save writes); the model sees `messages[window:]` plus the system prompt,
    where the window slides past the oldest turns when the prompt would no longer leave
    min(max_new_tokens, context / 4) tokens for the answer. With a `registry`, its tools are shown
    in the system turn and the model may call them (at most `max_calls` per answer); the calls and
    their results stay in the transcript."""

    def __init__(
        self,
        model: GPT,
        tok: Tokenizer,
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = INTERACTIVE_TEMPERATURE,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        out: TextIO | None = None,
        assistant_prefix: str = "assistant> ",
        registry: ToolRegistry | None = None,
        max_calls: int = 4,
        defenses: DefenseStack | None = None,
        rag: Callable[[list[dict], int], RagPrompt] | None = None,
    ) -> None:
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ChatforgeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tok = model, tok
        self.system = system or None
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.out = out if out is not None else sys.stdout
        self.assistant_prefix = assistant_prefix
        self.registry = registry
        self.max_calls = max_calls
        self.defenses = defenses  # what each prompt and answer passes through (redteam/defenses.py)
        self.tools = registry.schemas() if registry is not None else None
        self.rag = rag  # (messages, prompt token budget) -> the prompt with retrieved documents
        self.thinker = None  # set by --think: answers come from think.think, not one sample
        self.messages: list[dict] = []  # user / assistant turns, the system prompt kept apart
        self.window = 0  # index of the oldest message the model still sees
        self.turns = 0  # answers generated, to vary the seed per answer
        self.done = False
        ctx = model.cfg.seq_len
        self.reserve = max(1, min(max_new_tokens, ctx // 4))  # tokens kept free for each answer (at least)

    # ---- output ------------------------------------------------------------------------
    def _emit(self, text: str, buf: list[str]) -> None:
        buf.append(text)
        self.out.write(text)
        self.out.flush()

    def _say(self, line: str, buf: list[str]) -> None:
        self._emit(line + "\n", buf)

    def conversation(self) -> list[dict]:
        """The whole transcript in the OpenAI messages schema, system prompt first if set."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]

    # ---- input -------------------------------------------------------------------------
    def handle(self, line: str) -> str:
        """Process one input line; return everything it printed. Sets `done` on /quit."""
        buf: list[str] = []
        text = line.strip()
        if not text:
            return ""
        if text.startswith("/"):
            self._command(text, buf)
        else:
            self._answer(line.rstrip("\n"), buf)
        return "".join(buf)

    def _command(self, text: str, buf: list[str]) -> None:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            self.done = True
        elif name == "/reset":
            self.messages, self.window = [], 0
            self._say("(conversation cleared)", buf)
        elif name == "/system":
            self.system = arg or None
            self._say(f"(system prompt set: {arg})" if arg else "(system prompt cleared)", buf)
        elif name == "/save":
            if not arg:
                self._say("usage: /save PATH", buf)
                return
            try:
                path = save_conversation(Path(arg).expanduser(), self.conversation(), self.tools)
            except ChatforgeError as e:
                self._say(f"(not saved: {e})", buf)
                return
            self._say(f"(conversation saved to {path})", buf)
        elif name == "/help":
            self._say(HELP, buf)
        else:
            self._say(f"unknown command {name}; {HELP}", buf)

    def _fit(self, buf: list[str]) -> list[dict] | None:
        """The messages to prompt with, sliding the window so an answer still fits; None when the
        newest user message alone is too long (it is then removed)."""
        ctx, limit = self.model.cfg.seq_len, self.model.cfg.seq_len - self.reserve
        head = [{"role": "system", "content": self.system}] if self.system else []
        old = self.window
        self.window, n = fit_window(
            head, self.messages, old, lambda ms: len(render_prompt(self.tok, ms, tools=self.tools)), limit
        )
        if n > limit:
            self.messages.pop()
            self._say(
                f"(your message makes the prompt {n} tokens; the model's context is {ctx} with "
                f"{self.reserve} kept for the answer: shorten it)",
                buf,
            )
            return None
        dropped = sum(m["role"] == "user" for m in self.messages[old : self.window])
        if dropped:
            self._say(
                f"(context full: the model no longer sees the {dropped} oldest turn(s); "
                f"{len(self.messages) - self.window} message(s) still in view)",
                buf,
            )
        return head + self.messages[self.window :]

    def _answer(self, user_text: str, buf: list[str]) -> None:
        self.messages.append({"role": "user", "content": user_text})
        visible = self._fit(buf)
        if visible is None:
            return
        rag = self.rag(visible, self.model.cfg.seq_len - self.reserve) if self.rag is not None else None
        visible = rag.messages if rag is not None else visible  # retrieved documents go through the defenses too
        if self.thinker is not None:
            self._think(visible, rag, buf)
            return
        if self.defenses is not None:
            try:
                visible = self.defenses.prepare(visible)
            except InputBlocked as e:  # fail closed: the message is not sent and not kept
                self.messages.pop()
                self._say(f"({e})", buf)
                return
        seed = None if self.seed is None else self.seed + self.turns
        self.turns += 1
        if self.registry is not None:
            self._answer_with_tools(visible, seed, buf)
            return
        pieces: list[str] = []
        stripper = ControlStripper()  # the model's text may hold terminal control sequences
        checked = self.defenses is not None and self.defenses.checks_output  # shown whole, once checked

        def on_token(delta: str) -> None:
            pieces.append(delta)
            if not checked:
                self._emit(stripper.push(delta), buf)

        self._emit(self.assistant_prefix, buf)
        try:
            text = chat_turn(
                self.model,
                self.tok,
                visible,
                max_new_tokens=self.max_new_tokens,
                seed=seed,
                on_token=on_token,
                **self.sampling,
            )
        except KeyboardInterrupt:  # Ctrl-C: keep what was said so far, keep the session
            text = "".join(pieces)
            self._emit(stripper.end() + "\n", buf)
            self._say("(answer stopped)", buf)
            if not text.strip():
                self.messages.pop()  # nothing was answered: forget the question too
                return
        else:
            self._emit(stripper.end() + ("" if checked else "\n"), buf)
        if checked:
            text = self.defenses.check_answer(text)
            self._emit(strip_controls(text) + "\n", buf)
        if rag is not None:
            self._say(strip_controls(sources_line(text, rag.hits)), buf)
        self.messages.append(parse_assistant(text))

    def _think(self, visible: list[dict], rag: RagPrompt | None, buf: list[str]) -> None:
        """--think: the strategy answers, through the same defenses as one sample (think_defended)."""
        try:
            r = think_defended(self.thinker, self.thinker.spec, visible, self.defenses)
        except InputBlocked as e:  # fail closed: the message is not sent and not kept
            self.messages.pop()
            self._say(f"({e})", buf)
            return
        self._emit(self.assistant_prefix + strip_controls(r.text) + "\n", buf)
        if rag is not None:
            self._say(strip_controls(sources_line(r.text, rag.hits)), buf)
        self._say(f"({usage_note(r)})", buf)
        self.messages.append({"role": "assistant", "content": r.text})

    def _answer_with_tools(self, visible: list[dict], seed: int | None, buf: list[str]) -> None:
        at_start = [False]  # the cursor is at the start of a line (after a tool line)
        stripper = ControlStripper()  # model text and tool output may hold terminal control sequences
        checked = self.defenses is not None and self.defenses.checks_output  # the answer shown once checked
        registry = self.registry if self.defenses is None else self.defenses.guard_registry(self.registry, visible)

        def on_text(delta: str) -> None:
            delta = "" if checked else stripper.push(delta)
            if at_start[0]:
                delta = delta.lstrip()
            if delta:
                at_start[0] = False
                self._emit(delta, buf)

        def on_tool(line: str) -> None:
            on_text(stripper.end())  # a sequence left unfinished before the call ends with the text
            self._emit(("" if at_start[0] else "\n") + strip_controls(line) + "\n", buf)
            at_start[0] = True

        self._emit(self.assistant_prefix, buf)
        try:
            new, reason = chat_turn_with_tools(
                self.model, self.tok, visible, registry, max_new_tokens=self.max_new_tokens,
                max_calls=self.max_calls, seed=seed, on_text=on_text, on_tool=on_tool, **self.sampling,
            )  # fmt: skip
        except KeyboardInterrupt:  # the runner keeps nothing of an interrupted turn: forget the question
            on_text(stripper.end())
            self._emit("" if at_start[0] else "\n", buf)
            self._say("(answer stopped; this question is forgotten)", buf)
            self.messages.pop()
            return
        on_text(stripper.end())
        if checked and new and new[-1]["role"] == "assistant" and new[-1].get("content"):
            new[-1] = self.defenses.checked_message(new[-1], visible)
            self._emit(strip_controls(new[-1]["content"]), buf)
            at_start[0] = False
        if not at_start[0]:
            self._emit("\n", buf)
        if reason == "context":
            self._say("(the tool result filled the context: no answer; /reset to start over)", buf)
        self.messages.extend(new)


def save_conversation(path: Path, messages: list[dict], tools: list[dict] | None = None) -> Path:
    """Append `messages` as one {"messages": [...]} JSON line (with "tools", the schemas shown, when
    given) to `path`, atomically (the file is rewritten to a temp file beside it and renamed).
    `load_conversations` reads it back."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatforgeError("nothing to save yet: the conversation has no answer")
    path = Path(path)
    if path.is_dir():
        raise ChatforgeError(f"{path} is a folder; give a file path such as {path / 'chats.jsonl'}")
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_write_bytes(path, old + line.encode("utf-8"))
    except OSError as e:
        raise ChatforgeError(f"cannot write {path} ({e.strerror or e}); check the path") from None
    return path


# ---- CLI -----------------------------------------------------------------------------------
def chat_tools(
    choice: str | None, files: str | None, unsafe: bool = False
) -> tuple[ToolRegistry | None, Path | None, bool]:
    """The registry for `--tools CHOICE [--files DIR] [--unsafe-python]`: (registry, files folder,
    whether the folder is a temporary one made here); (None, None, False) without --tools."""
    if choice is None:
        for flag, value in (("--files", files), ("--unsafe-python", unsafe or None)):
            if value is not None:
                raise ChatforgeError(f"{flag} is about the tools' python code: it needs --tools")
        return None, None, False
    if choice == "calculator":
        return calculator_registry(), None, False
    if files is not None:
        folder = Path(files).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ChatforgeError(f"--files {folder} is a file; give a folder for the tools' files")
        return default_registry(folder, unsafe), folder, False
    folder = Path(tempfile.mkdtemp(prefix="chatforge-files-"))
    return default_registry(folder, unsafe), folder, True


def _tidy_files(folder: Path | None, temporary: bool) -> None:
    """Remove a temporary files folder nothing was saved in; otherwise say where the files are."""
    if folder is None:
        return
    if temporary and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    elif folder.is_dir() and any(folder.iterdir()):
        print(f"chatforge: the tools' files are in {folder}", file=sys.stderr)


def cmd_chat(args: ChatOptions) -> None:
    asked = args.max_new_tokens  # None: the default, clamped to the context without a note
    if asked is not None and asked < 1:
        raise ChatforgeError(f"--max-new-tokens must be >= 1, got {asked}")
    if args.max_calls < 0:
        raise ChatforgeError(f"--max-calls must be >= 0, got {args.max_calls}")
    args.max_new_tokens = asked if asked is not None else 256
    defenses = parse_defenses(args.defenses)  # a bad name fails before the model loads
    run = load_run(args.model, args.quantize or True, pick_device(args.device))
    model, tok, model_dir = run.model, run.tokenizer, run.folder
    if args.compile:
        compile_decode(model)
    if defenses is not None:  # for defenses that score text with the model
        defenses.model, defenses.tok = model, tok
    ctx = model.cfg.seq_len
    max_new = min(args.max_new_tokens, ctx - 1)
    registry, folder, temporary = chat_tools(args.tools, args.files, args.unsafe_python)
    rag = None
    if args.rag is not None:
        if registry is not None:
            raise ChatforgeError("--rag and --tools: use one of them")
        rag = lambda messages, budget: rag_prompt(args.rag, messages, tok, budget, root=args.rag_root, k=args.rag_k)  # noqa: E731
    tools = registry.schemas() if registry is not None else None
    thinker = _thinker(args, model, tok, max_new)
    try:
        if args.tools == "all":  # what guards the model's code, said before any of it runs
            print(layers_line(SandboxConfig(unsafe=args.unsafe_python)), file=sys.stderr, flush=True)
        if args.prompt is not None:
            _one_prompt(args, model, tok, registry, tools, max_new, asked, rag, defenses, thinker)
            return
        if tools:  # the tool descriptions alone must leave room for a question and its answer
            head = [{"role": "system", "content": args.system}] if args.system else []
            n = len(render_prompt(tok, [*head, {"role": "user", "content": "?"}], tools=tools))
            if n + min(max_new, ctx // 4) > ctx:
                hint = "; try --tools calculator" if args.tools == "all" else ""
                raise ChatforgeError(
                    f"with the tool descriptions a one-word question is already {n} tokens and the model's "
                    f"context is {ctx}: no room for an answer{hint}"
                )
        temperature = INTERACTIVE_TEMPERATURE if args.temperature is None else args.temperature
        session = ChatSession(
            model, tok, system=args.system, max_new_tokens=max_new, temperature=temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, registry=registry, max_calls=args.max_calls,
            rag=rag,
            defenses=defenses,
        )  # fmt: skip
        session.thinker = thinker
        banner = f"{model_dir} ({model.num_params() / 1e6:.1f}M params, context {ctx})"
        if registry is not None:
            banner += f"\ntools: {', '.join(registry.names())}"
            banner += f"; files and charts are saved in {folder}" if folder is not None else ""
        run_interactive(session, banner)
    finally:
        _tidy_files(folder, temporary)


def _thinker(args, model: GPT, tok: Tokenizer, max_new: int):
    """--think SPEC: the Thinker that answers instead of one sample (None without --think)."""
    if args.think is None:
        return None
    if args.tools:
        raise ChatforgeError("--think samples plain answers and ranks them; drop --tools to use it")
    return load_thinker(
        model, tok, parse_spec(args.think), prm=args.prm, orm=args.orm, device=next(model.parameters()).device,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed, max_new_tokens=max_new,
    )  # fmt: skip


def _one_prompt(
    args, model: GPT, tok: Tokenizer, registry, tools, max_new: int, asked: int | None, rag=None,
    defenses: DefenseStack | None = None, thinker: Thinker | None = None,
) -> None:
    """-p: the answer alone on stdout (greedy by default); tool lines and notes on stderr. With
    --think the strategy answers, through the same defenses (think_defended)."""
    ctx = model.cfg.seq_len
    temperature = 0.0 if args.temperature is None else args.temperature
    check_sampling(temperature, args.top_k, args.top_p)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    retrieved = rag(messages, ctx - min(max_new, ctx // 4)) if rag is not None else None
    messages = retrieved.messages if retrieved is not None else messages
    if thinker is not None:  # a scanner's refusal is an error there too
        r = think_defended(thinker, thinker.spec, messages, defenses)
        print(f"chatforge: {usage_note(r)}", file=sys.stderr)
        print(strip_controls(r.text).strip(), flush=True)
        if retrieved is not None:
            print(strip_controls(sources_line(r.text, retrieved.hits)), file=sys.stderr, flush=True)
        return
    if defenses is not None:  # a scanner's refusal is an error: nothing is generated
        messages = defenses.prepare(messages)
        registry = registry if registry is None else defenses.guard_registry(registry, messages)
    n = len(render_prompt(tok, messages, tools=tools))
    if n >= ctx:
        hint = ""
        if tools and args.tools == "all":
            n_tools = n - len(render_prompt(tok, messages))
            hint = f" (the tool descriptions take {n_tools}: try --tools calculator)"
        raise ChatforgeError(f"the prompt is {n} tokens{hint} but the model's context is {ctx}; shorten it")
    room = min(max_new, ctx - n)
    if asked is not None and room < asked:
        print(f"chatforge: answer limited to {room} tokens by the {ctx}-token context", file=sys.stderr)
    sampling = {"temperature": temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if registry is None:
        text = chat_turn(model, tok, messages, max_new_tokens=room, **sampling)
    else:
        new, reason = chat_turn_with_tools(
            model, tok, messages, registry, max_new_tokens=room, max_calls=args.max_calls,
            on_tool=lambda line: print(strip_controls(line), file=sys.stderr, flush=True), **sampling,
        )  # fmt: skip
        if reason == "context":
            print("chatforge: a tool result filled the context; no answer", file=sys.stderr)
        text = final_answer(new)
    if defenses is not None:
        text = defenses.check_answer(text)
    print(strip_controls(text).strip(), flush=True)
    if retrieved is not None:
        print(strip_controls(sources_line(text, retrieved.hits)), file=sys.stderr, flush=True)


def run_interactive(session: ChatSession, banner: str) -> None:
    """The `you> ` loop: Ctrl-D or /quit exits, Ctrl-C at the prompt just starts a new line."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    print(f"chatting with {banner}\n{HELP}", flush=True)
    while not session.done:
        try:
            line = input("you> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            continue
        session.handle(line)
