"""generate_with_tools with a real engine, parser, registry and tools, and a GPT whose next token is scripted.

A tiny random model will not call tools on its own, so the MODEL is a test double: a GPT subclass
whose forward reads each row's token history (it keeps the ids in the KV cache it is given, so the
engine's batching, padding and row dropping are exercised for real) and puts all probability on the
next token of a scripted reply. Everything else is the real code path.
"""

import json

import pytest
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import IM_END, IM_START, SPLIT_PATTERN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tokenizer
from chatforge.tools.calculator import SCHEMA as CALC_SCHEMA
from chatforge.tools.calculator import calculate
from chatforge.tools.registry import ToolRegistry
from chatforge.tools.runner import generate_with_tools

CORPUS = [
    "The answer is 42. Let me compute that with the calculator tool.",
    '{"name": "calculator", "arguments": {"expression": "2**64"}} tool call result',
    "Hello there, how are you? I am fine, thanks. Numbers: 0 1 2 3 4 5 6 7 8 9.",
] * 20


def _plain_tokenizer() -> Tokenizer:
    """Like an imported SmolLM2 tokenizer: ChatML turn tokens, but no <tool_call> special tokens."""
    inner = HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(CORPUS, trainer=trainer)
    return Tokenizer(inner)


@pytest.fixture(scope="module", params=["special", "plain"])
def tok(request) -> Tokenizer:
    if request.param == "special":
        t = Tokenizer.train(CORPUS, 400)
        assert t.has_special(TOOL_CALL_CLOSE)
    else:
        t = _plain_tokenizer()
        assert not t.has_special(TOOL_CALL_CLOSE)
        assert len(t.encode(TOOL_CALL_CLOSE)) > 1  # the closing tag arrives split over several tokens
    return t


def turns(prompt_text: str) -> list[tuple[str, str]]:
    """(role, content) of each ChatML message in a rendered prompt, the open assistant turn last."""
    out = []
    for chunk in prompt_text.split(IM_START)[1:]:
        role, _, body = chunk.partition("\n")
        out.append((role, body.split(IM_END)[0]))
    return out


def encode_reply(tok: Tokenizer, text: str) -> list[int]:
    """Reply text -> ids, with the tags as special ids where the tokenizer has them (as a model emits)."""
    ids: list[int] = []
    pieces = [text]
    for tag in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, IM_END):
        pieces = [q for p in pieces for q in _split_keep(p, tag)]
    for p in pieces:
        if p in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, IM_END) and tok.has_special(p):
            ids.append(tok.special_id(p))
        elif p:
            ids.extend(tok.encode(p))
    return ids


def _split_keep(s: str, sep: str) -> list[str]:
    parts = s.split(sep)
    return [x for k, part in enumerate(parts) for x in ([sep, part] if k else [part])]


class ScriptedGPT(GPT):
    """A GPT whose forward puts all probability on the next token of policy(conversation so far)."""

    def __init__(self, tok: Tokenizer, policy, seq_len: int = 4096):
        super().__init__(
            GPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=1, n_embd=8, n_head=2, n_kv_head=1)
        )
        self.tok, self.policy = tok, policy
        self.header = [tok.special_id(IM_START)] + tok.encode("assistant\n")
        self.replies: dict[tuple[int, ...], list[int]] = {}
        self.rows_seen: list[int] = []  # batch size of every prefill, to check batching

    def forward(self, idx, targets=None, *, cache=None, positions=None, attn_mask=None, **kw):
        B, T = idx.shape
        start = cache.pos
        if start == 0:  # prefill: remember which columns are real tokens (not left padding)
            real = attn_mask[:, 0, -1, :T] if attn_mask is not None else torch.ones(B, T, dtype=torch.bool)
            cache.v[0][:, 0, :T, 0] = real.float()
            self.rows_seen.append(B)
        else:
            cache.v[0][:, 0, start : start + T, 0] = 1.0
        cache.k[0][:, 0, start : start + T, 0] = idx.float()  # the engine's cache carries the history
        cache.pos += T
        logits = torch.full((B, T, self.cfg.vocab_size), -1e4)
        for b in range(B):
            keep = cache.v[0][b, 0, : cache.pos, 0] > 0
            history = cache.k[0][b, 0, : cache.pos, 0][keep].long().tolist()
            logits[b, -1, self.next_token(history)] = 1e4
        return logits

    def next_token(self, history: list[int]) -> int:
        h = len(self.header)
        k = max(s for s in range(len(history) - h + 1) if history[s : s + h] == self.header) + h
        prompt, generated = tuple(history[:k]), history[k:]
        if prompt not in self.replies:
            reply = self.policy(turns(self.tok.decode(prompt)))
            self.replies[prompt] = encode_reply(self.tok, reply) + [self.tok.special_id(IM_END)]
        script = self.replies[prompt]
        assert generated == script[: len(generated)], "the runner fed back something the model did not write"
        return script[len(generated)] if len(generated) < len(script) else self.tok.special_id(IM_END)


def call(name: str, **arguments) -> str:
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + TOOL_CALL_CLOSE


def calc_policy(msgs: list[tuple[str, str]]) -> str:
    """Ask the calculator for 2**64, then report what it said; text after the call must be ignored."""
    last_role, last = msgs[-2]
    if last_role == "tool":
        return f"It is {last}."
    return "Let me compute. " + call("calculator", expression="2**64") + " GARBAGE after the call"


def registry() -> ToolRegistry:
    reg = ToolRegistry()
    reg.add(calculate, CALC_SCHEMA, name="calculator", description="Exact arithmetic.")

    @reg.tool({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    def broken(x: int) -> str:
        """A tool that always fails."""
        raise RuntimeError("disk on fire")

    return reg


USER = [{"role": "user", "content": "What is 2 to the 64?"}]


def test_call_is_run_and_answer_uses_the_result(tok):
    model = ScriptedGPT(tok, calc_policy)
    events = []
    [new] = generate_with_tools(model, tok, [USER], registry(), on_event=events.append)
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant"]
    tc = new[0]["tool_calls"][0]
    assert new[0]["content"] == "Let me compute."
    assert tc["function"]["name"] == "calculator"
    assert json.loads(tc["function"]["arguments"]) == {"expression": "2**64"}
    assert new[1] == {"role": "tool", "content": str(2**64), "tool_call_id": tc["id"]}
    assert new[2] == {"role": "assistant", "content": f"It is {2**64}."}
    assert "GARBAGE" not in json.dumps(new)
    # the streamed text is what the messages hold, and the events come in order
    text = "".join(e["text"] for e in events if e["type"] == "text")
    assert text.startswith("Let me compute. " + TOOL_CALL_OPEN) and text.endswith(f"It is {2**64}.")
    assert "GARBAGE" not in text
    kinds = [e["type"] for e in events if e["type"] != "text"]
    assert kinds == ["tool_call", "tool_result", "done"]
    assert events[-1] == {"type": "done", "row": 0, "reason": "stop"}


def test_errors_are_tool_messages_the_model_sees(tok):
    script = [
        call("nosuchtool", x=1),
        TOOL_CALL_OPEN + '{"name": "calculator", "arguments": {"expression": ' + TOOL_CALL_CLOSE,
        call("broken", x=3),
        call("calculator", expression="1/0"),
        call("calculator", expresion="1+1"),
        "I give up.",
    ]

    def policy(msgs):
        return script[sum(role == "tool" for role, _ in msgs)]

    [new] = generate_with_tools(ScriptedGPT(tok, policy), tok, [USER], registry(), max_calls=5)
    tools = [m["content"] for m in new if m["role"] == "tool"]
    assert len(tools) == 5 and all(t.startswith("error: ") for t in tools)
    assert "unknown tool 'nosuchtool'" in tools[0] and "calculator, broken" in tools[0]
    assert "not valid JSON" in tools[1]
    assert "broken failed: RuntimeError: disk on fire" in tools[2]
    assert "division by zero" in tools[3]
    assert "missing the required field 'expression'" in tools[4]
    assert new[2]["content"].startswith(TOOL_CALL_OPEN)  # the malformed call stays as the model wrote it
    assert "tool_calls" not in new[2] and "tool_call_id" not in new[3]
    assert new[-1] == {"role": "assistant", "content": "I give up."}


def test_max_calls_then_answer_without_tools(tok):
    def always_calls(msgs):
        n = sum(role == "tool" for role, _ in msgs)
        return call("calculator", expression=f"{n}+1")

    events = []
    [new] = generate_with_tools(
        ScriptedGPT(tok, always_calls), tok, [USER], registry(), max_calls=2, on_event=events.append
    )
    assert [m["role"] for m in new] == ["assistant", "tool"] * 3 + ["assistant"]
    assert [m["content"] for m in new if m["role"] == "tool"][:2] == ["1", "2"]  # two calls really ran
    assert "tool call limit reached (2 per answer)" in new[5]["content"]
    assert new[-1]["content"] == call("calculator", expression="3+1")  # kept as text, not run
    assert "tool_calls" not in new[-1]
    assert events[-1] == {"type": "done", "row": 0, "reason": "limit"}


def test_batch_rows_with_and_without_calls(tok):
    def policy(msgs):
        question = msgs[1][1]
        if "2 to the 64" in question:
            return calc_policy(msgs)
        if "twice" in question:  # two calls in a row, then the answer
            n = sum(role == "tool" for role, _ in msgs)
            return call("calculator", expression=f"{n + 1}*7") if n < 2 else "Done: 7 and 14."
        return "Hello! No tools needed."

    convs = [
        USER,
        [{"role": "user", "content": "Say hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Use it twice"}],
    ]
    model = ScriptedGPT(tok, policy)
    batched = generate_with_tools(model, tok, convs, registry(), seed=1)
    assert model.rows_seen[0] == 3  # the first round really ran as one batch
    assert batched[1] == [
        {"role": "assistant", "content": "Hello! No tools needed."}
    ]  # finished rows stay so
    assert batched[0][1]["content"] == str(2**64)
    assert [m["content"] for m in batched[2] if m["role"] == "tool"] == ["7", "14"]
    assert batched[2][-1]["content"] == "Done: 7 and 14."
    one_by_one = [generate_with_tools(ScriptedGPT(tok, policy), tok, [c], registry())[0] for c in convs]
    assert batched == one_by_one


def test_per_conversation_registries_and_bad_input(tok):
    model = ScriptedGPT(tok, calc_policy)
    only_broken = ToolRegistry()
    only_broken.add(lambda x: "x", {"type": "object"}, name="other", description="Not a calculator.")
    new = generate_with_tools(model, tok, [USER, USER], [registry(), only_broken])
    assert new[0][1]["content"] == str(2**64)
    assert new[1][1]["content"].startswith("error: unknown tool 'calculator'; the tools are: other")
    with pytest.raises(ChatforgeError, match="one per conversation"):
        generate_with_tools(model, tok, [USER, USER], [registry()])
    with pytest.raises(ChatforgeError, match="context"):
        generate_with_tools(ScriptedGPT(tok, calc_policy, seq_len=64), tok, [USER], registry())
    with pytest.raises(ChatforgeError, match="unknown role"):
        generate_with_tools(model, tok, [[{"role": "robot", "content": "x"}]], registry())


# ---- the registry ------------------------------------------------------------------------------
def test_registry_schemas_and_registration():
    reg = registry()
    assert reg.schemas()[1] == {
        "type": "function",
        "function": {
            "name": "broken",
            "description": "A tool that always fails.",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
        },
    }
    with pytest.raises(ChatforgeError, match="already registered"):
        reg.add(calculate, CALC_SCHEMA, name="calculator", description="again")
    with pytest.raises(ChatforgeError, match="letters, digits"):
        reg.add(calculate, CALC_SCHEMA, name="calc ulator", description="x")
    with pytest.raises(ChatforgeError, match='"type": "object"'):
        reg.add(calculate, {"type": "string"}, name="c2", description="x")
    with pytest.raises(ChatforgeError, match="needs a description"):
        reg.add(lambda: "x", {"type": "object"}, name="c3")


SCHEMA = {
    "type": "object",
    "properties": {
        "mode": {"type": "string", "enum": ["fast", "exact"]},
        "n": {"type": "integer", "minimum": 1, "maximum": 10},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "items": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "note": {"type": ["string", "null"], "maxLength": 5},
    },
    "required": ["mode"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ('{"mode": "fast"', "not valid JSON"),
        ("[1, 2]", "arguments must be object, got array"),
        ({}, "missing the required field 'mode'"),
        ({"mode": "slow"}, 'arguments.mode must be one of ["fast", "exact"], got "slow"'),
        ({"mode": "fast", "n": True}, "arguments.n must be integer, got boolean"),
        ({"mode": "fast", "n": 2.5}, "arguments.n must be integer, got number"),
        ({"mode": "fast", "n": 11}, "arguments.n must be <= 10, got 11"),
        ({"mode": "fast", "ratio": "1"}, "arguments.ratio must be number, got string"),
        ({"mode": "fast", "flag": 1}, "arguments.flag must be boolean, got integer"),
        ({"mode": "fast", "items": ["a", 2]}, "arguments.items[1] must be string, got integer"),
        ({"mode": "fast", "items": ["a", "b", "c"]}, "at most 2 items"),
        ({"mode": "fast", "note": "toolong"}, "at most 5 characters"),
        ({"mode": "fast", "extra": 1}, "unknown field 'extra'"),
    ],
)
def test_registry_rejects_bad_arguments(arguments, problem):
    seen = []
    reg = ToolRegistry()
    reg.add(lambda **kw: seen.append(kw) or "ran", SCHEMA, name="t", description="Test tool.")
    res = reg.call("t", arguments)
    assert res.error and res.content.startswith("error: ") and problem in res.content
    assert seen == []  # the function never ran
    ok = {"mode": "exact", "n": 3, "ratio": 0.5, "flag": False, "items": ["a"], "note": None}
    assert reg.call("t", json.dumps(ok)).content == "ran" and seen == [ok]


def test_registry_timeouts_results_and_truncation():
    import threading

    release = threading.Event()
    reg = ToolRegistry()
    reg.add(
        lambda: release.wait(5) and "late",
        {"type": "object"},
        name="slow",
        description="Hangs.",
        timeout_s=0.2,
    )
    reg.add(lambda: {"a": [1, 2]}, {"type": "object"}, name="obj", description="Returns a dict.")
    reg.add(lambda: "x" * 20_000, {"type": "object"}, name="long", description="Says a lot.")
    res = reg.call("slow", "")
    release.set()
    assert res.error and res.content == "error: slow did not finish within 0.2 s"
    assert reg.call("obj", None).content == '{"a": [1, 2]}'
    long = reg.call("long", {}).content
    assert long.startswith("x" * 8000) and long.endswith("[... 12,000 more characters cut]")
    assert reg.call(None, {}).content.startswith("error: unknown tool None")
