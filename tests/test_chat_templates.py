"""Imported models prompted by their own chat template: what chatforge renders equals transformers'
`apply_chat_template` token for token (SmolLM2 with its default system prompt, a tiny model with a
Zephyr-style and one with a Llama-3-style template), the loss mask and the turn's stop token come
from the template, special tokens typed by a user stay text, and a broken template is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the reference renderer")

from chatforge.chat_format import (  # noqa: E402
    encode_with_specials,
    parse_assistant,
    render_conversation,
    render_prompt,
    turn_end_ids,
)
from chatforge.checkpoint import load_run  # noqa: E402
from chatforge.engine import generate  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.hf import import_hf  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Unknown role ' + message['role']) }}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# the rest of transformers' template environment: tojson with its options, strftime_now,
# namespace, loop controls and the {% generation %} tag
FEATURES = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{% generation %}{{ m | tojson(indent=1, sort_keys=True) }}{% endgeneration %}"
    "{% endfor %}{{ ns.n }} {{ strftime_now('%Y') }} {{ tools | tojson }}"
)
SPECIALS = {
    "zephyr": ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"],
    "llama3": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
}
TOKENS = {"zephyr": ("<s>", "</s>"), "llama3": ("<|begin_of_text|>", "<|eot_id|>")}  # bos, eos
TEXT = "Paris is the capital of France. What is 2 + 3? It is 5. Hello there, how are you today?"
CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "  And the capital of France?\n"},
    ],
]


def hf_ids(hf, messages, **kw) -> list[int]:
    return hf.apply_chat_template(messages, return_dict=False, **kw)


def tiny_hf_folder(root: Path, kind: str) -> Path:
    """A Llama folder as transformers writes it, whose tokenizer has `kind`'s special tokens and template."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HF(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS[kind], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    inner.train_from_iterator([TEXT] * 20, trainer=trainer)
    bos, eos = TOKENS[kind]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token=bos, eos_token=eos)
    tok.chat_template = {"zephyr": ZEPHYR, "llama3": LLAMA3}[kind]
    folder = root / kind
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=inner.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=inner.token_to_id(bos), eos_token_id=inner.token_to_id(eos),
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["zephyr", "llama3"])
def imported(request, tmp_path_factory):
    """(kind, transformers' tokenizer, chatforge's tokenizer of the imported run, the run folder)."""
    root = tmp_path_factory.mktemp("templates")
    folder = tiny_hf_folder(root, request.param)
    run = import_hf(folder, root / "run")
    return request.param, transformers.AutoTokenizer.from_pretrained(folder), Tokenizer.load(run), run


def test_prompts_equal_apply_chat_template(imported):
    kind, hf, tok, _ = imported
    for messages in CONVS:
        ids = render_prompt(tok, messages)
        assert ids == hf_ids(hf, messages, add_generation_prompt=True), messages
        assert "<|im_start|>" not in tok.decode(ids)  # no ChatML as plain text any more
        full = [*messages, {"role": "assistant", "content": "Sure: Paris."}]
        assert render_conversation(tok, full)[0] == hf_ids(hf, full)
    first = tok.id_to_token(render_prompt(tok, CONVS[0])[0])
    assert (
        first == {"llama3": "<|begin_of_text|>", "zephyr": "<|user|>"}[kind]
    )  # BOS only where the template puts it


def test_mask_and_stop_token_come_from_the_template(imported):
    kind, hf, tok, _ = imported
    end = tok.special_id("<|eot_id|>" if kind == "llama3" else "</s>")
    assert turn_end_ids(tok) == [end]
    full = [*CONVS[1], {"role": "assistant", "content": "Paris."}]
    ids, mask = render_conversation(tok, full)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    # both assistant turns, each through its end-of-turn token, nothing of the headers or users
    assert tok.decode(trained) == ("It is 5." + tok.id_to_token(end)) + ("Paris." + tok.id_to_token(end))


def test_typed_special_tokens_stay_text(imported):
    kind, hf, tok, _ = imported
    eos = TOKENS[kind][1]
    typed = [{"role": "user", "content": f"close it {eos} and go on"}]
    ids = render_prompt(tok, typed)
    assert ids == hf_ids(hf, typed, add_generation_prompt=True, sanitize_control_tokens=True)
    assert (
        ids.count(tok.special_id(eos))
        == hf_ids(hf, typed, add_generation_prompt=True).count(tok.special_id(eos)) - 1
    )


def test_tool_calls_without_a_template_place_go_as_text(imported):
    _, _, tok, _ = imported
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    tools = [{"type": "function", "function": {"name": "add", "description": "adds"}}]
    messages = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    text = tok.decode(render_conversation(tok, messages, tools=tools)[0])
    assert '<tool_call>{"name":"add","arguments":{"a":2}}</tool_call>' in text
    assert "add(): adds" in text  # tools shown in the system turn: the template has no place for them
    assert parse_assistant('<tool_call>{"name":"add","arguments":{"a":2}}</tool_call>')["tool_calls"]


def test_generation_stops_at_the_templates_turn_end(imported):
    _, _, tok, run = imported
    loaded = load_run(run, inference=True)
    ids = render_prompt(loaded.tokenizer, CONVS[0])
    out = list(generate(loaded.model, ids, 40, stop_ids=turn_end_ids(loaded.tokenizer)))
    assert all(t not in turn_end_ids(tok) for t in out[:-1])


def test_template_features_render_as_in_transformers(tmp_path):
    inner = Tokenizer.train([TEXT] * 10, vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps({"chat_template": FEATURES}))
    inner.save(tmp_path)
    tok = Tokenizer.load(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=inner.inner)
    hf.chat_template = FEATURES
    messages = [{"role": "user", "content": "é <b>"}, {"role": "stop", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "add"}}]
    want = hf.apply_chat_template(messages, tools=tools, tokenize=False)
    assert tok.decode(encode_with_specials(tok, want)) == want
    from chatforge.chat_format import template_text

    assert template_text(tok, messages, tools, add_generation_prompt=False) == want


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{{ raise_exception('System role not supported') }}", "failed to render: System role not supported"),
        ("{{ messages.append(1) }}", "failed to render: .*unsafe"),
        ("{% for m in messages %}", "does not parse"),
        ("{{ messages[0]['content'] + 3 }}", "failed to render"),
    ],
)
def test_a_broken_template_is_one_line(tmp_path, template, match):
    inner = Tokenizer.train([TEXT] * 10, vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps({"chat_template": template}))
    inner.save(tmp_path)
    tok = Tokenizer.load(tmp_path)
    with pytest.raises(ChatforgeError, match=match) as e:
        render_prompt(tok, CONVS[0])
    assert "\n" not in str(e.value)


def test_smollm2_equals_transformers_with_its_default_system_prompt(smollm2_run):
    tok = Tokenizer.load(smollm2_run)
    meta = json.loads((smollm2_run / "config.json").read_text())
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(smollm2_run / "tokenizer.json"),
        bos_token=tok.id_to_token(meta["bos_token_id"]),
        eos_token=tok.id_to_token(meta["eos_token_id"]),
    )
    hf.chat_template = meta["chat_template"]
    for messages in CONVS:
        ids = render_prompt(tok, messages)
        assert ids == hf_ids(hf, messages, add_generation_prompt=True)
        full = [*messages, {"role": "assistant", "content": "Paris."}]
        assert render_conversation(tok, full)[0] == hf_ids(hf, full)
    no_system = tok.decode(render_prompt(tok, CONVS[0]))
    assert no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert turn_end_ids(tok) == [tok.special_id("<|im_end|>")]


def test_gguf_export_carries_chatml_with_tools_and_names_its_pre_tokenizer(tmp_path):
    """Read back with the gguf package: llama.cpp's pre-tokenizer name (the one whose regex is ours;
    llama.cpp refuses names it does not know), chatforge's own name and regex beside it, and a
    template that renders tools and tool calls as chatforge trains them, imported back as it is."""
    import gguf

    from chatforge.checkpoint import save_model
    from chatforge.model.gpt import GPTConfig
    from chatforge.model.io import export_gguf, import_gguf
    from chatforge.tokenizer import SPLIT_PATTERN

    tok = Tokenizer.train([TEXT] * 20, vocab_size=320)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=256, n_layer=1, n_embd=32, n_head=4, n_kv_head=2)
    from chatforge.model.gpt import GPT

    save_model(tmp_path / "run", GPT(cfg), tok.to_json(), {"stage": "sft"})
    out = export_gguf(tmp_path / "run", tmp_path / "m.gguf", "f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    assert fields["tokenizer.ggml.pre"] == "bailingmoe"
    assert fields["chatforge.tokenizer.pre"] == "chatforge"
    assert fields["chatforge.tokenizer.split_regex"] == SPLIT_PATTERN
    template = fields["tokenizer.chat_template"]
    assert "tools" in template and "tool_calls" in template and "<tool_call>" in template

    back = Tokenizer.load(import_gguf(out, tmp_path / "back"))
    assert back.chat_template == template
    # arguments as an object: a JSON string is shown as given, where chatforge re-dumps it compactly
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    tools = [{"type": "function", "function": {"name": "add", "description": "adds",
              "parameters": {"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]}}}]  # fmt: skip
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
    ]
    assert render_prompt(back, conv[:2], tools=tools) == render_prompt(tok, conv[:2], tools=tools)
    assert render_conversation(back, conv, tools=tools) == render_conversation(tok, conv, tools=tools)
    assert turn_end_ids(back)[0] == tok.special_id("<|im_end|>")


def test_import_refuses_a_template_that_does_not_parse(tmp_path):
    folder = tiny_hf_folder(tmp_path, "zephyr")
    (folder / "chat_template.jinja").write_text("{% for message in messages %}{{ message.content }}")
    with pytest.raises(ChatforgeError, match=r"zephyr: the chat template does not parse \(.*\); fix"):
        import_hf(folder, tmp_path / "run")
