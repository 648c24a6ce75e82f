"""`chatforge chat`: talk to a model in the terminal, or answer one prompt with -p.

The pieces, from the inside out:
- `chat_turn` renders the conversation as ChatML, generates one assistant answer through the
  engine and streams its text to a callback (whole characters only: see IncrementalDecoder).
- `ChatSession` holds a conversation and turns each input line into output: a user message, or a
  command (/reset, /system, /save, /quit, /help). It keeps the prompt inside the model's context
  by sliding a window over the oldest turns (the system prompt always stays). No TTY needed, so
  tests drive it directly.
- `cmd_chat` is the CLI: `-p` prints only the answer; otherwise a `you> ` loop.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from chatforge.engine import IncrementalDecoder, check_sampling, stream_batch
from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_bytes
from chatforge.model.gpt import GPT
from chatforge.tokenizer import IM_END, Tokenizer, parse_assistant, render_prompt
from chatforge.train.common import pick_device

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt; no TEXT clears it), "
    "/save PATH (append the conversation as a JSON line), /quit (or Ctrl-D); Ctrl-C stops an answer"
)
INTERACTIVE_TEMPERATURE = 0.7  # some variety when talking; -p is greedy (0) so scripts get one answer


def stop_ids(tok: Tokenizer) -> list[int]:
    """An answer ends at <|im_end|>; <|endoftext|> (BOS) also ends it, for models that emit it instead."""
    ids = [tok.special_id(IM_END)] if tok.has_special(IM_END) else []
    if tok.bos_id is not None:
        ids.append(tok.bos_id)
    return ids


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
    stops = set(stop_ids(tok))
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


class ChatSession:
    """One conversation with a model; `handle(line)` runs a command or answers a user message.

    Output is written to `out` as it is produced (the answer streams token by token) and also
    returned by `handle`, so a caller without a terminal can inspect it. `messages` is the full
    transcript (what /save writes); the model sees `messages[window:]` plus the system prompt,
    where the window slides past the oldest turns when the prompt would no longer leave
    min(max_new_tokens, context / 4) tokens for the answer."""

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
                path = save_conversation(Path(arg).expanduser(), self.conversation())
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
        ctx, dropped = self.model.cfg.seq_len, 0
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            visible = head + self.messages[self.window :]
            n = len(render_prompt(self.tok, visible))
            if n + self.reserve <= ctx:
                break
            nxt = self.window + 1  # drop one turn: a user message and the replies after it
            while nxt < len(self.messages) and self.messages[nxt]["role"] != "user":
                nxt += 1
            if nxt >= len(self.messages):
                self.messages.pop()
                self._say(
                    f"(your message makes the prompt {n} tokens; the model's context is {ctx} with "
                    f"{self.reserve} kept for the answer: shorten it)",
                    buf,
                )
                return None
            dropped += 1
            self.window = nxt
        if dropped:
            self._say(
                f"(context full: the model no longer sees the {dropped} oldest turn(s); "
                f"{len(self.messages) - self.window} message(s) still in view)",
                buf,
            )
        return visible

    def _answer(self, user_text: str, buf: list[str]) -> None:
        self.messages.append({"role": "user", "content": user_text})
        visible = self._fit(buf)
        if visible is None:
            return
        seed = None if self.seed is None else self.seed + self.turns
        self.turns += 1
        pieces: list[str] = []

        def on_token(delta: str) -> None:
            pieces.append(delta)
            self._emit(delta, buf)

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
            self._emit("\n", buf)
            self._say("(answer stopped)", buf)
            if not text.strip():
                self.messages.pop()  # nothing was answered: forget the question too
                return
        else:
            self._emit("\n", buf)
        self.messages.append(parse_assistant(text))


def save_conversation(path: Path, messages: list[dict]) -> Path:
    """Append `messages` as one {"messages": [...]} JSON line to `path`, atomically (the file is
    rewritten to a temp file beside it and renamed). `load_conversations` reads it back."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatforgeError("nothing to save yet: the conversation has no answer")
    path = Path(path)
    if path.is_dir():
        raise ChatforgeError(f"{path} is a folder; give a file path such as {path / 'chats.jsonl'}")
    line = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
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
def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="RUN", help="run folder (or checkpoint folder) to load")
    p.add_argument(
        "-p", "--prompt", metavar="TEXT", help="answer this one prompt on stdout and exit (greedy by default)"
    )
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"sampling temperature, 0 = greedy (default: 0 with -p, {INTERACTIVE_TEMPERATURE} interactive)",
    )
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest answer in tokens (default 256; always clamped to what the context leaves, with a note for -p)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")


def cmd_chat(args: argparse.Namespace) -> None:
    from chatforge.checkpoint import load_model

    asked = args.max_new_tokens  # None: the default, clamped to the context without a note
    if asked is not None and asked < 1:
        raise ChatforgeError(f"--max-new-tokens must be >= 1, got {asked}")
    args.max_new_tokens = asked if asked is not None else 256
    model, _meta, model_dir = load_model(Path(args.model), pick_device(args.device))
    tok = Tokenizer.load(model_dir)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ChatforgeError(
            f"{model_dir}: tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}"
        )
    ctx = model.cfg.seq_len
    max_new = min(args.max_new_tokens, ctx - 1)
    if args.prompt is not None:
        temperature = 0.0 if args.temperature is None else args.temperature
        check_sampling(temperature, args.top_k, args.top_p)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        n = len(render_prompt(tok, messages))
        if n >= ctx:
            raise ChatforgeError(f"the prompt is {n} tokens but the model's context is {ctx}; shorten it")
        room = min(max_new, ctx - n)
        if asked is not None and room < asked:
            print(f"chatforge: answer limited to {room} tokens by the {ctx}-token context", file=sys.stderr)
        text = chat_turn(
            model,
            tok,
            messages,
            max_new_tokens=room,
            temperature=temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        print(text.strip(), flush=True)
        return
    temperature = INTERACTIVE_TEMPERATURE if args.temperature is None else args.temperature
    session = ChatSession(
        model,
        tok,
        system=args.system,
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    run_interactive(session, f"{model_dir} ({model.num_params() / 1e6:.1f}M params, context {ctx})")


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
