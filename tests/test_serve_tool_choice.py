"""tool_choice as OpenAI has it (none / auto / required / a named function, unknown values a 400),
through the official client; the engine's forced and banned ids under them; and special tokens
written in a raw /v1/completions prompt read as the special tokens."""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_serve import MODEL_ID, TEXTS, TOOLS, _error, serve, tiny_model  # noqa: E402

from chatforge.chat_format import render_prompt, turn_end_ids  # noqa: E402
from chatforge.engine import BatchDecoder, Row, generate  # noqa: E402
from chatforge.model.gpt import GPT  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.tokenizer import TOOL_CALL_OPEN, Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread

MSGS = [{"role": "user", "content": "What is 2 + 3?"}]


class Prefers(GPT):
    """The tiny model, except that its first answer token is `self.prefer` when that is set: a
    model that wants to call a tool, or one that would not call one unless made to."""

    prefer: int | None = None

    def forward(self, idx, *args, **kwargs):
        logits = super().forward(idx, *args, **kwargs)
        if self.prefer is not None and idx.size(1) > 1:  # a prefill: the first new token
            logits = logits.clone()
            logits[..., self.prefer] += 100.0
        return logits


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


@pytest.fixture(scope="module")
def model() -> Prefers:
    plain = tiny_model()
    m = Prefers(plain.cfg).eval()
    m.load_state_dict(plain.state_dict())
    return m


@pytest.fixture(scope="module")
def server(model, tok):
    with serve(create_app(model, tok, model_id=MODEL_ID, max_batch=4)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


def answer_text(msg) -> str:
    """The assistant's answer as the model wrote it: content, or the call it made."""
    if msg.tool_calls:
        fn = msg.tool_calls[0].function
        return (msg.content or "") + f'<tool_call>{{"name":"{fn.name}","arguments":{fn.arguments}'
    return msg.content


def ask(client, model, prefer, **kw):
    model.prefer = prefer
    try:
        r = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=48, temperature=0, **kw)
    finally:
        model.prefer = None
    return r.choices[0]


def test_none_keeps_the_tool_call_token_out(client, model, tok):
    call_id = tok.special_id(TOOL_CALL_OPEN)
    wants = ask(client, model, call_id, tools=TOOLS)  # auto: the model calls (or starts to)
    assert answer_text(wants.message).startswith(TOOL_CALL_OPEN)
    off = ask(client, model, call_id, tools=TOOLS, tool_choice="none")
    assert off.message.tool_calls is None and TOOL_CALL_OPEN not in off.message.content
    assert off.message.content  # it answered in text instead


def test_required_and_named_force_a_call(client, model, tok):
    word = tok.encode(" The")[0]  # a model that would answer in words
    free = ask(client, model, word, tools=TOOLS)
    assert not answer_text(free.message).startswith(TOOL_CALL_OPEN)
    required = ask(client, model, word, tools=TOOLS, tool_choice="required")
    assert answer_text(required.message).startswith(TOOL_CALL_OPEN)
    named = ask(
        client, model, word, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}
    )
    assert answer_text(named.message).startswith('<tool_call>{"name":"add","arguments":')


def test_unknown_tool_choice_is_an_openai_400(server):
    ok = {"model": MODEL_ID, "messages": MSGS, "max_tokens": 2, "tools": TOOLS}
    with httpx.Client(base_url=server, timeout=30) as c:
        post = lambda body: c.post("/v1/chat/completions", json=body)  # noqa: E731
        _error(post({**ok, "tool_choice": "sometimes"}), 400, param="tool_choice")
        _error(post({**ok, "tool_choice": {"type": "function"}}), 400)
        _error(post({**ok, "tool_choice": {"type": "custom", "custom": {"name": "add"}}}), 400)
        unknown = {"type": "function", "function": {"name": "mul"}}
        assert "mul" in _error(post({**ok, "tool_choice": unknown}), 400, param="tool_choice")["message"]
        no_tools = {k: v for k, v in ok.items() if k != "tools"}
        _error(post({**no_tools, "tool_choice": "required"}), 400, param="tool_choice")
        assert post({**ok, "tool_choice": "auto"}).status_code == 200


def test_completions_prompt_special_tokens_are_special(client, tok):
    chatml = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model=MODEL_ID, prompt=chatml, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(render_prompt(tok, MSGS))  # the chat's own ids: BOS + ~12
    assert r.usage.prompt_tokens < len(tok.encode(chatml))  # as plain text it costs far more
    with_bos = client.completions.create(
        model=MODEL_ID, prompt="<|endoftext|>" + chatml, max_tokens=1, temperature=0
    )
    assert with_bos.usage.prompt_tokens == r.usage.prompt_tokens  # a written BOS is not doubled


def test_engine_forces_and_bans_per_row(tok):
    model = tiny_model()
    prompt = render_prompt(tok, MSGS)
    stops = frozenset(turn_end_ids(tok))
    free = list(generate(model, prompt, 6, stop_ids=stops))
    forced = [tok.special_id(TOOL_CALL_OPEN), *tok.encode('{"n')]
    rows = [
        Row(prompt=prompt, budget=6, stop_ids=stops),
        Row(prompt=prompt, budget=6, stop_ids=stops, forced_ids=forced),
        Row(prompt=prompt, budget=6, stop_ids=stops, banned_ids=frozenset({free[0]})),
    ]
    out: dict[int, list[int]] = {id(r): [] for r in rows}
    decoder = BatchDecoder(model, 3, len(prompt) + 6)
    events = decoder.admit(rows)
    while True:
        for row, t, _ in events:
            out[id(row)].append(t)
        if not decoder.rows:
            break
        events = decoder.step()
    assert out[id(rows[0])] == free  # a row without constraints is untouched by its neighbours'
    assert out[id(rows[1])][: len(forced)] == forced
    assert out[id(rows[2])][0] != free[0]


def test_tool_choice_where_the_tokenizer_writes_tags_as_text(tmp_path):
    """A tokenizer without a <tool_call> token (SmolLM2's): "none" stops at the tag's text, and a
    forced call begins with the tag's text tokens."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from chatforge.serve.protocol import ChatCompletionRequest
    from chatforge.serve.routes_openai import _tool_choice

    inner = HF(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    inner.train_from_iterator(TEXTS, trainer=trainer)
    srv = SimpleNamespace(tok=Tokenizer(inner))

    def choice(value):
        return _tool_choice(
            srv, ChatCompletionRequest(model=MODEL_ID, messages=MSGS, tools=TOOLS, tool_choice=value)
        )

    off = choice("none")
    assert off.stops == [TOOL_CALL_OPEN] and not off.banned_ids and not off.tools
    assert srv.tok.decode(choice("required").forced_ids) == TOOL_CALL_OPEN
    named = choice({"type": "function", "function": {"name": "add"}})
    assert srv.tok.decode(named.forced_ids) == '<tool_call>{"name":"add","arguments":'
