import io
import json
from pathlib import Path

import pytest
import torch
from test_tools_runner import ScriptedGPT, calc_policy  # the scripted tool-calling GPT

from chatforge.chat import (
    ChatSession,
    _tidy_files,
    chat_tools,
    chat_turn,
    cmd_chat,
    tool_line,
)
from chatforge.chat_format import (
    conversation_text,
    load_conversations,
    render_conversation,
    render_prompt,
    turn_end_ids,
)
from chatforge.checkpoint import save_model
from chatforge.engine import IncrementalDecoder, generate_batch
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import ChatOptions
from chatforge.options import parse as parse_options
from chatforge.terminal import strip_controls
from chatforge.tokenizer import IM_END, TOOL_CALL_OPEN, Tokenizer
from chatforge.tools.builtin import calculator_registry

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread

TEXTS = [
    "Alice was born in Paris and works as a baker.",
    "Bob lives in Rome; his mother is Alice.",
    "What is 12 plus 30? It is 42.",
    "The quick brown fox jumps over the lazy dog.",
] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


def make_model(tok: Tokenizer, stop_after: bool = False) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size,
        seq_len=64,
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_kv_head=2,
        tie_embeddings=False,
    )
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)  # peaked logits: varied, deterministic answers
        if stop_after:  # <|im_end|> scores 3x a token the model likes, so it ends its answers early
            model.lm_head.weight[tok.special_id(IM_END)] = 3 * model.lm_head.weight[40]
    return model


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return make_model(tok)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok, model):
    d = tmp_path_factory.mktemp("run")
    save_model(d, model, tok.to_json(), {"stage": "test"})
    return d


def parse(*argv: str) -> ChatOptions:
    return parse_options(ChatOptions, list(argv))


def test_prompt_flag_prints_only_the_answer(run_dir, tok, model, capsys):
    cmd_chat(parse("--model", str(run_dir), "-p", "Who is Bob?", "--max-new-tokens", "8", "--device", "cpu"))
    out = capsys.readouterr().out
    # the same answer straight from the engine: greedy is the -p default
    ids = generate_batch(model, [render_prompt(tok, [{"role": "user", "content": "Who is Bob?"}])], 8)[0]
    assert len(ids) == 8 and not set(ids) & set(turn_end_ids(tok))
    assert out == tok.decode(ids).strip() + "\n"
    assert out.strip()


def test_prompt_flag_with_system_and_sampling_is_seeded(run_dir, capsys):
    argv = ["--model", str(run_dir), "-p", "hi", "--system", "Be brief.", "--max-new-tokens", "6"]
    runs = []
    for seed in ("1", "1", "2"):
        cmd_chat(parse(*argv, "--temperature", "1.0", "--top-k", "40", "--seed", seed))
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2]


def test_prompt_flag_errors(run_dir, tmp_path):
    with pytest.raises(ChatforgeError, match="shorten"):
        cmd_chat(parse("--model", str(run_dir), "-p", "Alice was born in Paris. " * 20))
    with pytest.raises(ChatforgeError, match="no such model"):
        cmd_chat(parse("--model", str(tmp_path / "nope"), "-p", "hi"))
    with pytest.raises(ChatforgeError, match="top_p"):
        cmd_chat(parse("--model", str(run_dir), "-p", "hi", "--top-p", "0"))


def test_chat_turn_stops_at_im_end_and_streams_the_same_text(tok):
    model = make_model(tok, stop_after=True)
    messages = [{"role": "user", "content": "What is 12 plus 30?"}]
    ids = generate_batch(model, [render_prompt(tok, messages)], 20, stop_ids=turn_end_ids(tok))[0]
    assert ids[-1] == tok.special_id(IM_END) and 1 < len(ids) < 20  # the model does stop early
    pieces: list[str] = []
    text = chat_turn(model, tok, messages, max_new_tokens=20, on_token=pieces.append)
    assert text == tok.decode(ids[:-1]) == "".join(pieces)
    assert IM_END not in text


def test_incremental_decoder_prints_whole_characters(tok):
    ids = tok.encode("café ☕ naïve")
    dec = IncrementalDecoder(tok.decode)
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) + dec.flush() == "café ☕ naïve"
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # ☕ is three byte tokens here: held back until complete


def session(tok, model, **kw) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    return ChatSession(model, tok, out=out, temperature=0.0, **{"max_new_tokens": 6, **kw}), out


def test_session_answers_and_commands(tok, model, tmp_path):
    s, out = session(tok, model)
    assert "nothing to save" in s.handle("/save " + str(tmp_path / "x.jsonl"))
    reply = s.handle("Where does Alice live?")
    assert reply.startswith("assistant> ") and reply == out.getvalue().split("yet: ", 1)[-1].split("\n", 1)[1]
    answer = reply[len("assistant> ") :].rstrip("\n")
    raw = chat_turn(model, tok, [{"role": "user", "content": "Where does Alice live?"}], max_new_tokens=6)
    assert answer == strip_controls(raw)  # printed without control characters (test_terminal.py)
    assert [m["role"] for m in s.messages] == ["user", "assistant"]

    assert "system prompt set" in s.handle("/system You are terse.")
    assert s.conversation()[0] == {"role": "system", "content": "You are terse."}
    s.handle("And Bob?")
    path = tmp_path / "chats" / "saved.jsonl"
    assert "saved" in s.handle(f"/save {path}")
    s.handle("/save " + str(path))  # appends a second line
    convs = load_conversations(path)
    assert convs == [s.conversation(), s.conversation()]
    assert [m["role"] for m in convs[0]] == ["system", "user", "assistant", "user", "assistant"]

    assert "cleared" in s.handle("/reset")
    assert s.messages == [] and s.conversation() == [{"role": "system", "content": "You are terse."}]
    assert "system prompt cleared" in s.handle("/system")
    assert s.conversation() == []
    assert "unknown command" in s.handle("/frobnicate")
    assert s.handle("   ") == ""
    assert not s.done
    s.handle("/quit")
    assert s.done


def test_session_drops_oldest_turns_when_context_is_full(tok, model):
    s, _ = session(tok, model, system="Be brief.")
    notes = []
    for i in range(6):
        notes.append(s.handle(f"Alice {i}?"))
        prompt = s.conversation()[:1] + s.messages[s.window : -1]  # what the answer was generated from
        assert len(render_prompt(tok, prompt)) + s.reserve <= 64
    assert notes[0].startswith("assistant> ")
    assert any("context full" in n for n in notes)
    assert s.window > 0 and len(s.messages) == 12  # the transcript keeps everything, for /save
    assert s.messages[s.window]["role"] == "user"
    # a single message longer than the context is refused, and the session goes on
    before = list(s.messages)
    assert "shorten it" in s.handle("Alice was born in Paris. " * 20)
    assert s.messages == before


def test_ctrl_c_stops_the_answer_but_keeps_the_session(tok, model):
    class InterruptingOut(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            if self.writes == 4:  # prefix, two pieces of the answer, then Ctrl-C
                raise KeyboardInterrupt
            return super().write(text)

    out = InterruptingOut()
    s = ChatSession(model, tok, out=out, temperature=0.0, max_new_tokens=20)
    s.handle("Who is Bob?")
    assert "(answer stopped)" in out.getvalue() and not s.done
    full = chat_turn(model, tok, [{"role": "user", "content": "Who is Bob?"}], max_new_tokens=20)
    partial = s.messages[-1]["content"]
    assert s.messages[-1]["role"] == "assistant" and partial and len(partial) < len(full.strip())
    assert full.startswith(partial)
    s.handle("/reset")
    assert s.handle("Hello").startswith("assistant> ")  # still works after the interruption


# ---- tools ---------------------------------------------------------------------------------


def test_tool_calls_are_one_line():
    # hiding the markup while it streams: test_chat_format.py (ToolCallScanner)
    assert tool_line("calculator", '{"expression": "48213 * 739"}', "35629407", []) == (
        "[calculator] 48213 * 739 -> 35629407"
    )
    line = tool_line(
        "chart", json.dumps({"code": "import x\nplot()"}), "saved chart_1.png", ["/f/chart_1.png"]
    )
    assert line == "[chart] import x ⏎ plot() -> saved chart_1.png (saved /f/chart_1.png)"
    assert tool_line("python", '{"code": "' + "1+" * 100 + '1"}', "ok", []).count("…") == 1  # clipped
    assert (
        tool_line(None, None, "error: not valid JSON", [])
        == "[tool call not understood] -> error: not valid JSON"
    )


def test_session_with_tools_streams_text_and_tool_lines(tok, tmp_path):
    model = ScriptedGPT(tok, calc_policy)
    out = io.StringIO()
    s = ChatSession(model, tok, out=out, temperature=0.0, registry=calculator_registry())
    reply = s.handle("What is 2 to the 64?")
    lines = [line.rstrip() for line in reply.splitlines()]
    assert lines == ["assistant> Let me compute.", f"[calculator] 2**64 -> {2**64}", f"It is {2**64}."]
    assert TOOL_CALL_OPEN not in out.getvalue() and "GARBAGE" not in out.getvalue()
    assert [m["role"] for m in s.messages] == ["user", "assistant", "tool", "assistant"]
    assert s.messages[-1] == {"role": "assistant", "content": f"It is {2**64}."}
    path = tmp_path / "chat.jsonl"
    s.handle(f"/save {path}")
    saved = json.loads(path.read_text())
    assert saved["tools"] == calculator_registry().schemas()
    assert load_conversations(path)[0][0]["role"] == "system"  # the tools shown, folded back in


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory) -> Path:
    """A tiny real model trained (a few seconds) on one conversation that calls the calculator."""
    tools = calculator_registry().schemas()
    conv = [
        {"role": "user", "content": "What is 48213 * 739?"},
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "48213 * 739"}}}]},
        {"role": "tool", "content": "35629407"},
        {"role": "assistant", "content": "It is 35629407."},
    ]  # fmt: skip
    t = Tokenizer.train(TEXTS + conversation_text(conv, tools) * 10, 400)
    ids, mask = render_conversation(t, conv, tools=tools)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=t.vocab_size, seq_len=160, n_layer=2, n_embd=48, n_head=4, n_kv_head=2))
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[i if m else -1 for i, m in zip(ids[1:], mask[1:], strict=True)]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    d = tmp_path_factory.mktemp("tool_run")
    save_model(d, model.eval(), t.to_json(), {"stage": "test"})
    return d


def test_prompt_flag_with_tools_runs_the_calculator(tool_run, capsys, tmp_path):
    argv = ["--model", str(tool_run), "-p", "What is 48213 * 739?", "--device", "cpu"]
    cmd_chat(parse(*argv, "--tools", "calculator"))
    captured = capsys.readouterr()
    assert captured.out == "It is 35629407.\n"  # only the answer on stdout
    assert "[calculator] 48213 * 739 -> 35629407" in captured.err
    cmd_chat(parse(*argv))  # without tools the call is plain text, and nothing runs
    captured = capsys.readouterr()
    assert "35629407" not in captured.err and "[calculator]" not in captured.out
    # the three default tools' descriptions do not fit a 160-token context: said, with the way out
    with pytest.raises(ChatforgeError, match="try --tools calculator"):
        cmd_chat(parse(*argv, "--tools", "--files", str(tmp_path / "files")))
    with pytest.raises(ChatforgeError, match="no room for an answer; try --tools calculator"):
        cmd_chat(parse("--model", str(tool_run), "--tools", "--device", "cpu"))  # interactive: said at once
    with pytest.raises(ChatforgeError, match="needs --tools"):
        cmd_chat(parse(*argv, "--files", str(tmp_path / "files")))


def test_default_tools_get_a_files_folder_removed_when_unused(tmp_path):
    registry, folder, temporary = chat_tools("all", None)
    assert registry.names() == ["calculator", "python", "chart"] and temporary and folder.is_dir()
    _tidy_files(folder, temporary)
    assert not folder.exists()
    registry, folder, temporary = chat_tools("all", str(tmp_path / "mine"))
    assert folder == tmp_path / "mine" and not temporary
    assert chat_tools(None, None) == (None, None, False)


def test_openai_client_gets_the_tool_call_and_then_the_answer(tool_run):
    """The official `openai` client against `chatforge serve` with a model that calls a tool: the call
    comes back as tool_calls (plain and streamed); the client runs it, sends the result, gets the answer."""
    openai = pytest.importorskip("openai")
    from test_serve import serve  # uvicorn on a loopback port, in a thread

    from chatforge.checkpoint import load_model
    from chatforge.serve.app import create_app

    model, _, model_dir = load_model(tool_run)
    app = create_app(model, Tokenizer.load(model_dir), model_id="tool", max_batch=4)
    tools = calculator_registry().schemas()
    msgs = [{"role": "user", "content": "What is 48213 * 739?"}]
    ask = {"model": "tool", "tools": tools, "temperature": 0, "max_tokens": 60}
    with serve(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        choice = client.chat.completions.create(messages=msgs, **ask).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute."
        (call,) = choice.message.tool_calls
        assert call.function.name == "calculator"
        assert json.loads(call.function.arguments) == {"expression": "48213 * 739"}

        streamed = {"content": "", "arguments": "", "finish": None}
        for chunk in client.chat.completions.create(messages=msgs, stream=True, **ask):
            delta = chunk.choices[0].delta
            streamed["content"] += delta.content or ""
            for c in delta.tool_calls or []:
                streamed["arguments"] += c.function.arguments or ""
            streamed["finish"] = chunk.choices[0].finish_reason or streamed["finish"]
        assert streamed["content"] == "Let me compute." and streamed["finish"] == "tool_calls"
        assert json.loads(streamed["arguments"]) == {"expression": "48213 * 739"}

        result = calculator_registry().call(call.function.name, call.function.arguments).content
        msgs += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": result},
        ]
        answer = client.chat.completions.create(messages=msgs, **{**ask, "max_tokens": 20}).choices[0]
        assert answer.finish_reason == "stop" and answer.message.content == "It is 35629407."


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_prompt_flag_with_quantized_weights(tool_run, capsys, mode):
    cmd_chat(
        parse("--model", str(tool_run), "-p", "What is 48213 * 739?", "--device", "cpu", "--quantize", mode)
    )
    assert capsys.readouterr().out.strip()  # an answer came back through the quantized model
    with pytest.raises(SystemExit):  # argparse refuses an unknown mode, naming the choices
        parse("--model", str(tool_run), "--quantize", "int3")
