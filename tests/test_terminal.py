"""Model and tool text reaches the terminal without control sequences (clipboard, title, cursor, screen)."""

import io
import random
from types import SimpleNamespace

import pytest
from test_tools_runner import ScriptedGPT, call

from chatforge.chat import ChatSession, _one_prompt
from chatforge.terminal import MAX_SEQUENCE, ControlStripper, strip_controls
from chatforge.tokenizer import Tokenizer
from chatforge.tools.registry import ToolRegistry

OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # writes "echo pwned" to the clipboard
TITLE = "\x1b]0;you have been pwned\x1b\\"  # sets the window title, ended by ST
ATTACKS = [
    (f"a{OSC52}b", "ab"),
    (f"a{TITLE}b", "ab"),
    ("a\x1b[2J\x1b[Hb", "ab"),  # clear the screen, cursor home
    ("a\x1b[?1049hb", "ab"),  # private CSI (alternate screen)
    ("a\x1b[38;2;255;0;0mred\x1b[0m", "ared"),
    ("a\x1bPq#0;2;0;0;0\x1b\\b", "ab"),  # DCS (sixel)
    ("a\x1b_Gf=100;AAAA\x1b\\b", "ab"),  # APC (kitty graphics)
    ("a\x1b(Bb\x1bcz", "abz"),  # charset, full reset
    ("a\x9d52;c;eA==\x9cb", "ab"),  # 8-bit OSC ... ST
    ("a\x9b2Jb", "ab"),  # 8-bit CSI
    ("a\x85\x8e\x9fb", "ab"),  # lone C1 controls
    ("safe\rpwned", "safepwned"),  # a carriage return would overwrite the line
    ("a\x00\x07\x08\x0b\x0c\x7fb", "ab"),  # other C0 controls, DEL
    ("line 1\n\tline 2 é ⏎ 日本", "line 1\n\tline 2 é ⏎ 日本"),  # newlines, tabs, text kept
    ("a\x1b]unterminated title", "aunterminated title"),  # only the introducer goes
    ("a\x1b[12\x1b[1mb", "a12b"),
    ("a\x1b", "a"),
]


@pytest.mark.parametrize("text, shown", ATTACKS)
def test_strip_controls(text, shown):
    assert strip_controls(text) == shown


def test_a_long_string_sequence_loses_its_introducer():
    payload = "x" * (MAX_SEQUENCE + 1)
    assert strip_controls(f"\x1b]0;{payload}\x07!") == f"0;{payload}!"


def test_stream_equals_whole_text_for_every_split():
    """A sequence split across streamed pieces is held back until it ends: ESC in one piece and
    `]52;...` in the next cannot slip through, and what is shown equals stripping the whole."""
    for text, shown in ATTACKS:
        for cut in range(len(text) + 1):
            s = ControlStripper()
            assert s.push(text[:cut]) + s.push(text[cut:]) + s.end() == shown, (text, cut)
    rng = random.Random(0)
    alphabet = ["\x1b", "[", "]", "P", "_", "\\", "\x07", "\x9c", "\x9b", "\x9d", "\x85", "a", "1", ";",
                "m", "?", " ", "(", "\n", "\r", "é"]  # fmt: skip
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        s, shown = ControlStripper(), []
        pos = 0
        while pos < len(text):
            step = rng.randint(1, 5)
            shown.append(s.push(text[pos : pos + step]))
            pos += step
        out = "".join(shown) + s.end()
        assert out == strip_controls(text), repr(text)
        assert not any(c in out for c in "\x1b\x07\r\x9b\x9c\x9d\x85")


def test_stream_shows_plain_text_at_once():
    s = ControlStripper()
    assert s.push("hello ") == "hello "
    assert s.push("\x1b]52;c;") == ""  # held: it may be (and is) a clipboard write
    assert s.push("eA==\x07 world") == " world"
    assert s.push("\x1b") == "" and s.end() == ""


# ---- chat prints model text and tool output stripped ------------------------------------


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["plain text for a tiny tokenizer, numbers 0123456789"] * 20, 300)


def hostile_registry() -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool({"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]})
    def echo(x: str) -> str:
        """Returns its argument and a title change."""
        return f"{x} \x1b]0;tool title\x07done"

    return reg


def hostile_policy(msgs: list[tuple[str, str]]) -> str:
    """Control sequences in the answer, in a tool's arguments, and split over many tokens."""
    last_role, _ = msgs[-2]
    if last_role == "tool":
        return f"Done{OSC52}.\x1b[2J"
    return f"Hi{TITLE} there " + call("echo", x="\x1b[31mred")


def assert_clean(text: str) -> None:
    assert not any(c in text for c in "\x1b\x07\x9b\x9c\x9d"), repr(text)
    assert "52;c" not in text and "pwned" not in text and "title" not in text


def test_session_strips_streamed_answers(tok):
    out = io.StringIO()
    s = ChatSession(ScriptedGPT(tok, lambda msgs: f"Hi{OSC52} there\x1b[2J{TITLE}"), tok, out=out,
                    temperature=0.0)  # fmt: skip
    reply = s.handle("hello")
    assert reply == out.getvalue() == "assistant> Hi there\n"
    assert s.messages[-1]["content"].startswith(f"Hi{OSC52}")  # the transcript keeps the raw text


def test_session_with_tools_strips_text_and_tool_lines(tok):
    out = io.StringIO()
    s = ChatSession(
        ScriptedGPT(tok, hostile_policy), tok, out=out, temperature=0.0, registry=hostile_registry()
    )
    reply = s.handle("go")
    assert reply == out.getvalue()
    assert_clean(reply)
    assert [line.rstrip() for line in reply.splitlines()] == [
        "assistant> Hi there",
        "[echo] red -> red done",
        "Done.",
    ]


def test_prompt_flag_strips_answer_and_tool_lines(tok, capsys):
    args = SimpleNamespace(temperature=None, top_k=None, top_p=None, seed=None, system=None, prompt="go",
                           max_calls=4, tools="all")  # fmt: skip
    reg = hostile_registry()
    _one_prompt(args, ScriptedGPT(tok, hostile_policy), tok, reg, reg.schemas(), 200, None)
    captured = capsys.readouterr()
    assert captured.out == "Done.\n"
    assert_clean(captured.err)
    assert "[echo] red -> red done" in captured.err
