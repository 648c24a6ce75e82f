"""HF Llama-format folders in and out of chatforge: `import_hf` (HF folder -> run) and `export_hf` (run -> HF).

GPT's module names are HF LlamaForCausalLM's without the `model.` prefix, and GPT uses HF's half-split
(rotate-half) RoPE, so no weight is renamed beyond that prefix and none is permuted (unlike GGUF, whose
converter interleaves Q/K rows; see io.py). What this file adds is the checking around it:

- import: config.json -> GPTConfig, refusing what GPT cannot express (biases, RoPE scaling, a head_dim
  that is not hidden/heads, sliding windows, other architectures); one or many safetensors shards,
  every tensor shape-checked and cast to float32; tokenizer.json plus the chat template and BOS/EOS
  facts from tokenizer_config.json / generation_config.json, stored in the run's meta like import_gguf.
  The run is then prompted with that template (chat_format.py), stopping at its end-of-turn token.
- export: config.json (LlamaForCausalLM, float32), model.safetensors, the run's tokenizer.json,
  tokenizer_config.json with a chat template that gives the ids `render_prompt` gives (or the imported
  model's own template), generation_config.json whose EOS ids are the stop ids chatforge's chat uses.

Where HF's ids can still differ from chatforge's: HF's tokenizer parses special-token strings written
in text (a user typing "<|im_end|>"), chatforge never does (`apply_chat_template(...,
sanitize_control_tokens=True)`, transformers >= 5, does as chatforge); with `tools=`, the rendered text is
the same but the "<tool_call>" named in the instructions becomes one special id in HF and plain text in
chatforge; an OpenAI-style `arguments` JSON string is shown as given (chatforge re-dumps it compactly).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from chatforge.chat_format import TOOLS_INSTRUCTION, compile_template, turn_end_ids
from chatforge.checkpoint import load_run, model_state, read_config, resolve_model_dir, save_model
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig, rope_tables
from chatforge.tokenizer import (
    IM_END,
    IM_START,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    Tokenizer,
)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
# why the common near-misses cannot be loaded into GPT (said in the error)
_UNSUPPORTED_WHY = {
    "Qwen2ForCausalLM": "it has q/k/v biases",
    "Qwen3ForCausalLM": "it has per-head q/k norms",
    "GemmaForCausalLM": "it scales embeddings, uses GeLU and (1 + w) norms",
    "Gemma2ForCausalLM": "it soft-caps logits and has extra norms",
    "GPT2LMHeadModel": "it uses learned positions, LayerNorm and biases",
    "PhiForCausalLM": "it uses partial RoPE, LayerNorm and biases",
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# weights first, config.json last: a reader that sees the new config also sees the new weights
_EXPORT_ORDER = (
    "model.safetensors",
    "tokenizer.json",
    "chat_template.jinja",
    "tokenizer_config.json",
    "generation_config.json",
    "config.json",
)


# ==================================================================== import


def looks_like_hf_folder(path: str | os.PathLike) -> bool:
    """True for a folder with an HF config.json (model_type/architectures) and safetensors weights.

    A chatforge run folder also has config.json + model.safetensors; its config has a "model" section."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        return False
    if not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return False
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(cfg, dict)
        and not isinstance(cfg.get("model"), dict)
        and ("model_type" in cfg or "architectures" in cfg)
    )


def _read_json(path: Path, what: str, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ChatforgeError(f"{path} is missing; {what}")
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{path} cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise ChatforgeError(f"{path} should hold a JSON object, not a {type(obj).__name__}")
    return obj


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """The GPTConfig an HF Llama/Mistral config.json describes; ChatforgeError for what GPT cannot run."""
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    model_type = hf.get("model_type")
    if arch not in SUPPORTED and not (arch is None and model_type in ("llama", "mistral")):
        name = arch or model_type or "unknown"
        why = f" ({_UNSUPPORTED_WHY[name]})" if name in _UNSUPPORTED_WHY else ""
        raise ChatforgeError(
            f"{where}: architecture {name}{why} is not supported; chatforge imports "
            "LlamaForCausalLM and MistralForCausalLM (without a sliding window)"
        )

    def need(key: str) -> int:
        v = hf.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ChatforgeError(f"{where}: {key!r} must be a positive integer, got {v!r}")
        return v

    n_embd, n_head, n_layer = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    n_kv_head = hf.get("num_key_value_heads") or n_head
    seq_len = hf.get("max_position_embeddings") or 2048  # LlamaConfig's default
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) and window < seq_len:
        raise ChatforgeError(
            f"{where}: sliding_window {window} < max_position_embeddings {seq_len}; chatforge attends "
            "over the whole context and cannot run sliding-window attention"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ChatforgeError(f"{where}: {key} is true; chatforge's Llama has no biases")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ChatforgeError(
            f"{where}: hidden_act {act!r} is not supported; chatforge's MLP is SwiGLU (silu)"
        )
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != n_embd // n_head:
        raise ChatforgeError(
            f"{where}: head_dim {head_dim} differs from hidden_size/num_attention_heads = {n_embd // n_head}; "
            "chatforge supports only head_dim = hidden_size / heads"
        )
    # transformers 4 writes rope_theta + rope_scaling; 5 writes rope_parameters {rope_type, rope_theta, ...}
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for spec in (rope, scaling or {}):
        kind = spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, dict) else spec
        if kind not in ("default", None):
            raise ChatforgeError(
                f"{where}: RoPE scaling {kind!r} is set; chatforge supports only plain RoPE (no rope_scaling)"
            )
    if scaling and not isinstance(scaling, dict):
        raise ChatforgeError(f"{where}: rope_scaling {scaling!r} is set; chatforge supports only plain RoPE")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ChatforgeError(f"{where}: partial_rotary_factor is set; chatforge rotates whole heads only")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return GPTConfig(
        vocab_size=need("vocab_size"),
        seq_len=int(seq_len),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=int(n_kv_head),
        intermediate_size=need("intermediate_size"),
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # LlamaConfig's default
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default is untied
    )


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ChatforgeError(f"{index} has no weight_map; the index is damaged")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ChatforgeError(f"{folder} lacks the shard(s) {missing[:3]} that {index.name} lists")
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise ChatforgeError(
            f"{folder} has only pickle weights (.bin/.pth); chatforge reads safetensors: convert them with "
            "transformers (`model.save_pretrained(folder, safe_serialization=True)`)"
        )
    raise ChatforgeError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def _gpt_name(name: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`; None = skip."""
    if name.endswith("rotary_emb.inv_freq"):  # a derived buffer some old checkpoints saved
        return None
    return name if name == "lm_head.weight" else name.removeprefix("model.")


def state_from_hf(folder: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file(s) as float32 under GPT's names, shape-checked."""

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    key = _gpt_name(name)
                    if key is None:
                        continue
                    if key not in expected:
                        why = " (biases are not supported)" if name.endswith(".bias") else ""
                        raise ChatforgeError(f"{path}: tensor {name!r} has no place in a Llama model{why}")
                    t = f.get_tensor(name)
                    if t.dtype not in _FLOAT_DTYPES:
                        raise ChatforgeError(
                            f"{path}: {name} is {t.dtype}; chatforge reads float32/float16/bfloat16 "
                            "weights, not quantised ones"
                        )
                    if tuple(t.shape) != tuple(expected[key]):
                        raise ChatforgeError(
                            f"{path}: {name} is {tuple(t.shape)}, config.json implies {tuple(expected[key])}"
                        )
                    state[key] = t.to(torch.float32).contiguous()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ChatforgeError(f"{path} is corrupt or truncated ({why}); re-download it") from None
    return state


def _token_str(x) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(x, dict):
        x = x.get("content")
    return x if isinstance(x, str) else None


def _first_id(x) -> int | None:
    if isinstance(x, list):
        x = x[0] if x else None
    return int(x) if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def _chat_template(folder: Path, tok_cfg: dict) -> str:
    """chat_template.jinja (transformers >= 4.50 saves it there and prefers it), else tokenizer_config.json's
    (a string, or a list of named templates)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else ""


def _adds_bos(tokenizer_json: str) -> bool:
    """Whether tokenizer.json's post-processor puts a special token first (Llama 3's TemplateProcessing)."""
    post = json.loads(tokenizer_json).get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs if isinstance(procs, list) else []:
        single = p.get("single") if isinstance(p, dict) and p.get("type") == "TemplateProcessing" else None
        if isinstance(single, list) and single and "SpecialToken" in single[0]:
            return True
    return False


def import_hf(folder: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert an HF Llama-family folder into a chatforge run folder at out_dir; returns out_dir."""

    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise ChatforgeError(f"no such HF model folder: {folder}")
    if out_dir.resolve() == folder.resolve():
        raise ChatforgeError(f"--out {out_dir} is the HF folder itself; importing would overwrite it")
    hf = _read_json(folder / "config.json", "an HF model folder needs config.json")
    cfg = config_from_hf(hf, str(folder / "config.json"))
    if not (folder / "tokenizer.json").is_file():
        raise ChatforgeError(
            f"{folder / 'tokenizer.json'} is missing; chatforge needs the fast-tokenizer file "
            "(re-save the tokenizer with transformers to create it)"
        )
    tok = Tokenizer.load(folder / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise ChatforgeError(
            f"{folder}: the tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size} embeddings"
        )
    tok_cfg = _read_json(folder / "tokenizer_config.json", "", required=False)
    gen = _read_json(folder / "generation_config.json", "", required=False)

    with torch.device("meta"):  # shapes only: no point initialising weights we overwrite
        model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = state_from_hf(folder, expected)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # HF ignores a stored copy when tied, so do we
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ChatforgeError(
            f"{folder} lacks tensors for {missing[:3]} ({len(missing)} in all); the weights are incomplete"
        )
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg, cfg.seq_len)  # to_empty left them uninitialised

    def tok_id(key: str) -> int | None:  # a special token named in tokenizer_config.json -> its id
        s = _token_str(tok_cfg.get(key))
        return tok.inner.token_to_id(s) if s is not None else None

    bos = _first_id(gen.get("bos_token_id", hf.get("bos_token_id")))
    eos = tok_id("eos_token")  # the chat stop token; generation_config may list several
    eos = eos if eos is not None else _first_id(gen.get("eos_token_id", hf.get("eos_token_id")))
    add_bos = tok_cfg.get("add_bos_token")
    pad = tok_id("pad_token")
    template = _chat_template(folder, tok_cfg)
    if template:  # chat_format renders it for every prompt: a template that does not parse fails here
        try:
            compile_template(template)
        except ChatforgeError as e:
            raise ChatforgeError(f"{folder}: {e}") from None
    meta = {
        "stage": "import",
        "source": str(folder),
        "chat_template": template,
        "bos_token_id": bos if bos is not None else tok_id("bos_token"),
        "eos_token_id": eos,
        "padding_token_id": pad if pad is not None else _first_id(hf.get("pad_token_id")),
        "add_bos_token": bool(add_bos) if add_bos is not None else _adds_bos(tok.to_json()),
        "tokenizer_pre": None,  # a GGUF name only; GGUF export detects it from tokenizer.json
        "name": folder.resolve().name,
    }
    save_model(out_dir, model, tok.to_json(), meta)
    return out_dir


# ==================================================================== export


def chatml_template(bos_token: str | None) -> str:
    """A Jinja chat template that renders the text `chat_format.render_prompt` / `render_conversation`
    encode: BOS (when the model starts prompts with one), tools as one-line signatures in the system
    turn (`chat_format.with_tools`), `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, tool calls
    as compact `<tool_call>{"name":..,"arguments":..}</tool_call>`. tests/test_hf.py checks the ids."""

    def lit(s: str) -> str:  # a Jinja string literal (JSON's escapes are also Jinja's)
        return json.dumps(s)

    end = lit(IM_END + "\n")
    return "".join(
        [
            # tool_signature(): `name(arg: type, optional?: type): description`
            "{%- macro signature(t) -%}",
            "{%- set fn = t.function -%}{%- set params = fn.parameters or {} -%}",
            "{%- set props = (params.properties or {}) if params is mapping else {} -%}",
            "{%- set required = (params.required or []) if params is mapping else [] -%}",
            "{{- fn.name ~ '(' -}}",
            "{%- for name, spec in props.items() -%}",
            "{%- if not loop.first -%}{{- ', ' -}}{%- endif -%}",
            "{{- name ~ ('' if name in required else '?') ~ ': ' -}}",
            "{{- (spec.type if spec.type is defined else 'any') if spec is mapping else 'any' -}}",
            "{%- endfor -%}",
            "{{- ')' -}}{%- if fn.description -%}{{- ': ' ~ fn.description -}}{%- endif -%}",
            "{%- endmacro -%}",
            ("{{- " + lit(bos_token) + " -}}") if bos_token else "",
            "{%- set sys_first = tools and messages and messages[0].role == 'system' -%}",
            "{%- if tools -%}",
            "{{- " + lit(IM_START + "system\n") + " -}}",
            "{%- if sys_first -%}{{- messages[0].content ~ '\\n' -}}{%- endif -%}",
            "{{- " + lit(TOOLS_INSTRUCTION) + " -}}",
            "{%- for t in tools -%}{{- '\\n' ~ signature(t) -}}{%- endfor -%}",
            "{{- " + end + " -}}",
            "{%- endif -%}",
            "{%- for m in messages -%}",
            "{%- if not (loop.first and sys_first) -%}",
            "{{- " + lit(IM_START) + " ~ m.role ~ '\\n' -}}",
            "{%- if m.content is string -%}{{- m.content -}}{%- endif -%}",
            "{%- for call in m.tool_calls or [] -%}",
            "{%- set fn = call.function if call.function is defined else call -%}",
            "{{- " + lit(TOOL_CALL_OPEN) + " -}}",
            "{%- if fn.arguments is string -%}",  # OpenAI's JSON string: shown as given (compact it first)
            "{{- '{\"name\":' ~ (fn.name | tojson) ~ ',\"arguments\":' ~ (fn.arguments or '{}') ~ '}' -}}",
            "{%- else -%}",
            "{{- {'name': fn.name, 'arguments': fn.arguments or {}} | tojson(separators=(',', ':')) -}}",
            "{%- endif -%}",
            "{{- " + lit(TOOL_CALL_CLOSE) + " -}}",
            "{%- endfor -%}",
            "{{- " + end + " -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- " + lit(IM_START + "assistant\n") + " -}}{%- endif -%}",
        ]
    )


# `export hf --dtype` -> the weights' torch dtype and the name config.json gives it
HF_DTYPES = {"f32": (torch.float32, "float32"), "f16": (torch.float16, "float16"), "bf16": (torch.bfloat16, "bfloat16")}


def hf_config(
    cfg: GPTConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None, dtype: str = "f32"
) -> dict:
    """config.json for LlamaForCausalLM; both transformers 4 (rope_theta) and 5 (rope_parameters) keys."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": HF_DTYPES[dtype][1],
        "dtype": HF_DTYPES[dtype][1],
    }


def export_hf(run: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write a chatforge run (or checkpoint) folder as an HF Llama folder at out_dir, weights in `dtype`
    (f32: exact; f16 or bf16: half the size); returns out_dir."""
    if dtype not in HF_DTYPES:
        raise ChatforgeError(
            f"export hf writes weights as {', '.join(HF_DTYPES)}, not {dtype!r}"
            + (" (q8_0 is a GGUF type: `chatforge export gguf`)" if dtype == "q8_0" else "")
        )
    out_dir = Path(out_dir)
    model_dir = resolve_model_dir(Path(run))
    cfg = GPTConfig.from_dict(read_config(model_dir).get("model") or {})
    if cfg.qk_norm:
        raise ChatforgeError(
            f"{model_dir} uses qk_norm, which HF's LlamaForCausalLM has no place for; "
            "only models trained with model.qk_norm=false can be exported"
        )
    if _is_chatforge_run(out_dir):  # its config.json / model.safetensors / tokenizer.json would be replaced
        raise ChatforgeError(f"{out_dir} is a chatforge run folder; export into a new folder instead")
    loaded = load_run(model_dir)  # its tokenizer: the folder's config.json says whether prompts start with BOS
    model, meta, model_dir, tok = loaded.model, loaded.meta, loaded.folder, loaded.tokenizer

    def recorded(key: str, default):  # what an import recorded about its tokens, else chatforge's own
        return default if meta.get(key) is None else meta[key]

    # chatforge starts documents and prompts with tok.start_ids(); HF's tokenizer(text) should do the same
    add_bos = bool(tok.start_ids())
    bos_id = tok.bos_id if add_bos else recorded("bos_token_id", tok.bos_id)
    stops = turn_end_ids(tok)  # the ids chatforge's chat stops at: <|im_end|>, then the BOS
    if meta.get("eos_token_id") is not None:
        stops.insert(0, meta["eos_token_id"])
    stops = list(dict.fromkeys(stops))  # de-duplicated, first = the primary EOS
    eos_id = stops[0] if stops else None
    pad_id = recorded("padding_token_id", tok.bos_id if tok.bos_id is not None else eos_id)

    def token(i: int | None) -> str | None:
        return tok.id_to_token(i) if i is not None else None

    template = meta.get("chat_template") or chatml_template(token(bos_id) if add_bos else None)
    tok_json = _with_bos_post_processor(tok.to_json(), token(bos_id), bos_id) if add_bos else tok.to_json()
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(bos_id),
        "eos_token": token(eos_id),
        "pad_token": token(pad_id),
        "unk_token": None,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.seq_len,
        "chat_template": template,
    }
    gen_cfg = {
        "bos_token_id": bos_id,
        "eos_token_id": stops if len(stops) > 1 else eos_id,
        "pad_token_id": pad_id,
        "do_sample": False,
    }
    state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in _export_state(model, dtype).items()}

    if (out_dir / "model.safetensors.index.json").is_file():
        raise ChatforgeError(f"{out_dir} holds a sharded HF model; export into an empty folder instead")
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".export-*"):  # from an export killed before it could clean up
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        t = Path(tmp)
        save_file(state, str(t / "model.safetensors"), metadata={"format": "pt"})
        (t / "tokenizer.json").write_text(tok_json, encoding="utf-8")
        # transformers >= 4.50 keeps the template in its own file, and prefers it to tokenizer_config's
        (t / "chat_template.jinja").write_text(template, encoding="utf-8")
        for name, obj in [
            ("tokenizer_config.json", tok_cfg),
            ("generation_config.json", gen_cfg),
            ("config.json", hf_config(cfg, bos_id, eos_id, pad_id, dtype)),
        ]:
            (t / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for f in t.iterdir():  # on disk before the renames make the files visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            f.chmod(0o644)  # safetensors writes 0600; the files read like a training checkpoint's
        for name in _EXPORT_ORDER:
            os.replace(t / name, out_dir / name)
    return out_dir


def _is_chatforge_run(folder: Path) -> bool:
    try:
        return isinstance(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _with_bos_post_processor(tok_json: str, bos: str | None, bos_id: int | None) -> str:
    """tokenizer.json that puts BOS first when HF's tokenizer(text) adds special tokens.

    chatforge-trained models saw BOS at the start of every document, and transformers 5 takes BOS
    handling from tokenizer.json's post-processor alone (it ignores add_bos_token when that file
    exists). chatforge itself never runs the post-processor (it encodes with add_special_tokens=False)."""

    if bos is None or bos_id is None or _adds_bos(tok_json):
        return tok_json
    inner = HFTokenizer.from_str(tok_json)
    inner.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return inner.to_str(pretty=True)


def _export_state(model: GPT, dtype: str = "f32") -> dict[str, torch.Tensor]:
    return {k: v.to(HF_DTYPES[dtype][0]).contiguous() for k, v in model_state(model).items()}
