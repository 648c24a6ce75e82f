"""The one checkpoint format, shared by every stage.

A run folder looks like this:

    RUN/
      config.json          {"model": GPTConfig fields, "stage": ..., "step": ..., ...}
      model.safetensors    the weights (tied lm_head stored once)
      tokenizer.json       the HF tokenizer, so a run folder is self-contained
      metrics.jsonl        one JSON line per logged step / eval
      ckpt/step_000200/    periodic checkpoints: the three files above + train_state.pt
                           (optimizer, RNG, data loader position, step)

A LoRA run (model/lora.py) checkpoints only its adapter: adapter_model.safetensors and
adapter_config.json take the place of model.safetensors, and the frozen base stays in the base
run the config names. Its run root holds the adapter and the merged model.safetensors.

Why a folder per checkpoint: a checkpoint is several files, and only a directory rename
is atomic for all of them together. Each is written under a temporary name and renamed
when complete, so a kill at any moment leaves either the previous checkpoint or the new
one, never a torn mix. Single files (the run-root copies) go through temp + os.replace.

`load_run` is how every stage opens a run: the model (as trained, or in the inference format chat
and the server decode with), its tokenizer and its config.json. LoRA is a model-level layer (like
gpt.py and quant.py) that this module builds on; `chatforge merge` lives here with the run folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from chatforge.errors import ChatforgeError
from chatforge.model import lora
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.quant import inference_model
from chatforge.options import NO_VERIFY_ENV, MergeOptions
from chatforge.tokenizer import Tokenizer

CKPT_DIR = "ckpt"
WEIGHTS_SHA256 = "weights_sha256"  # config.json's key for model.safetensors' checksum


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The weights to store: lm_head dropped when tied (safetensors refuses shared tensors)."""
    model = unwrap(model)
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model  # type: ignore[return-value]


# keys of config.json that describe a run rather than its model's format (chat_template, add_bos_token, ...)
RUN_KEYS = frozenset(
    {"model", "stage", "step", "train", "summary", "data", "base", "base_stage", "lora", "adapter"}
    | {WEIGHTS_SHA256}
)


def inherited_meta(meta: dict) -> dict:
    """What a run started from another one keeps of its config.json: the chat format, token ids, name."""
    return {k: v for k, v in meta.items() if k not in RUN_KEYS}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_model_files(folder: Path, model: GPT, tokenizer_json: str, meta: dict) -> None:
    meta = {k: v for k, v in meta.items() if k != WEIGHTS_SHA256}
    if lora.has_lora(unwrap(model)):  # only the adapter: the frozen base stays in the base run
        lora.write_adapter_files(folder, unwrap(model), meta)  # carries its own checksum
    else:
        save_file(model_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
        meta[WEIGHTS_SHA256] = file_sha256(folder / "model.safetensors")  # checked by load_weights
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (folder / "config.json").write_text(
        json.dumps({"model": unwrap(model).cfg.to_dict(), **meta}, indent=2) + "\n", encoding="utf-8"
    )
    for f in folder.iterdir():  # safetensors writes through a private temp file (0600): share like the rest
        if f.is_file():
            f.chmod(0o644)


def save_model(run_dir: Path, model: GPT, tokenizer_json: str, meta: dict) -> None:
    """Write config.json, model.safetensors and tokenizer.json at the run root (each atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".save-*"):  # leftovers of a save killed before it could clean up
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".save-") as tmp:
        os.chmod(tmp, 0o755)
        _write_model_files(Path(tmp), model, tokenizer_json, meta)
        # weights first, config last: a reader that sees the new config also sees the new weights
        for name in (
            "model.safetensors",
            lora.ADAPTER_FILE,
            lora.ADAPTER_CONFIG,
            "tokenizer.json",
            "config.json",
        ):
            if (Path(tmp) / name).exists():  # a LoRA model writes its adapter instead of the weights
                os.replace(Path(tmp) / name, run_dir / name)


def save_checkpoint(
    run_dir: Path, step: int, model: GPT, tokenizer_json: str, meta: dict, train_state: dict, keep: int = 2
) -> Path:
    """Write RUN/ckpt/step_NNNNNN atomically (temp folder + rename), then prune old ones."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_step_{step:06d}_"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        _write_model_files(tmp, model, tokenizer_json, {**meta, "step": step})
        torch.save(train_state, tmp / "train_state.pt")
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if final.exists():  # re-saving a step: move the old one aside first, so one always exists
            old = root / f".old_step_{step:06d}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp_step_*"), *root.glob(".old_step_*")]:  # leftovers of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))  # by number: step_1000000 after step_999999


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_model_dir(path: Path) -> Path:
    """A run folder's root weights, else its newest checkpoint; or a checkpoint folder itself."""
    path = Path(path)
    if not path.exists():
        raise ChatforgeError(f"no such model folder: {path}")
    if (path / "model.safetensors").is_file() or (path / lora.ADAPTER_CONFIG).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise ChatforgeError(f"{path} holds no model: expected model.safetensors or ckpt/step_*/ in it")


def read_config(model_dir: Path) -> dict:
    cfg_path = Path(model_dir) / "config.json"
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatforgeError(f"{cfg_path} is missing; is {model_dir} a chatforge run folder?") from None
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{cfg_path} is corrupt ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"cannot read {cfg_path} ({e}); restore it") from None
    if not isinstance(meta, dict):
        raise ChatforgeError(f"{cfg_path} is not a JSON object; is {model_dir} a chatforge run folder?")
    return meta


def verify_weights(model_dir: Path) -> None:
    """Check model.safetensors against the sha256 its config.json recorded when it was saved (a run
    saved before checksums has none: nothing to check). `chatforge --no-verify` (CHATFORGE_NO_VERIFY=1) skips the check."""
    path = Path(model_dir) / "model.safetensors"
    expected = (
        read_config(model_dir).get(WEIGHTS_SHA256) if (Path(model_dir) / "config.json").is_file() else None
    )
    if expected is None or os.environ.get(NO_VERIFY_ENV, "") not in ("", "0") or not path.is_file():
        return
    if file_sha256(path) != expected:
        raise ChatforgeError(
            f"{path} does not match the sha256 in its config.json (corrupt, truncated or edited since it was saved); "
            f"restore it, or pass `chatforge --no-verify ...` (or set {NO_VERIFY_ENV}=1) to load it anyway"
        )


def check_weight_shapes(cfg: GPTConfig, model_dir: Path) -> None:
    """Compare config.json's model against model.safetensors' header before any memory is spent:
    the model is built on the meta device, so an edited config with absurd sizes fails in
    milliseconds instead of allocating them."""
    path = Path(model_dir) / "model.safetensors"
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in unwrap(GPT(cfg)).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise ChatforgeError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"{path} is corrupt or truncated ({e}); restore it or retrain") from None
    for name, shape in expected.items():
        if name in found and found[name] != shape:
            raise ChatforgeError(
                f"{path} does not match its config: {name} is {found[name]}, config says {shape}"
            )


def load_weights(model: GPT, model_dir: Path) -> None:
    """Load model.safetensors into `model`, checking its checksum and every name and shape against its config."""
    path = Path(model_dir) / "model.safetensors"
    verify_weights(model_dir)
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise ChatforgeError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"{path} is corrupt or truncated ({e}); restore it or retrain") from None
    model = unwrap(model)
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ChatforgeError(
            f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ChatforgeError(
                f"{path} does not match its config: {name} is {tuple(tensor.shape)}, "
                f"config says {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=not model.cfg.tie_embeddings)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict, Path]:
    """Build the GPT a run folder (or checkpoint folder) describes and load its weights.

    Returns (model in eval mode, the config.json dict, the folder the weights came from).
    """
    model_dir = resolve_model_dir(path)
    meta = read_config(model_dir)
    if "model" not in meta:
        raise ChatforgeError(f"{model_dir / 'config.json'} has no 'model' section; not a chatforge run")
    if not (model_dir / "model.safetensors").is_file() and (model_dir / lora.ADAPTER_CONFIG).is_file():
        # a LoRA checkpoint: its base run's weights + the adapter, merged into a plain GPT
        base = lora.read_adapter_config(model_dir).get("base")
        if not base:
            raise ChatforgeError(
                f"{model_dir / lora.ADAPTER_CONFIG} names no base run; use `chatforge merge --base`"
            )
        model = lora.merge_lora(lora.load_adapter(load_model(base)[0], resolve_adapter_dir(model_dir)))
        return model.to(device).eval(), meta, model_dir
    try:
        cfg = GPTConfig.from_dict(meta["model"])
    except ChatforgeError as e:
        raise ChatforgeError(f"{model_dir / 'config.json'}: {e}") from None
    check_weight_shapes(cfg, model_dir)
    model = GPT(cfg)
    load_weights(model, model_dir)
    return model.to(device).eval(), meta, model_dir


def load_train_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ChatforgeError(f"{path} is missing; cannot resume from {ckpt_dir}") from None
    except Exception as e:  # torch raises several types for a damaged pickle/zip
        raise ChatforgeError(
            f"{path} is corrupt ({type(e).__name__}); delete {ckpt_dir} to resume from an older one"
        ) from None


@dataclass
class Run:
    """A loaded run: the model (eval mode), its tokenizer, its config.json and the folder the
    weights came from (the run root, or its newest checkpoint)."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict
    folder: Path


def load_run(
    path: str | Path, inference: bool | str = False, device: str | torch.device = "cpu", parts: int | None = None
) -> Run:
    """Open a run folder (or checkpoint folder). inference=False: the model as trained (for
    training, scoring and saving); True: the fp32 decode layout chat and the server generate with;
    "bf16" / "int8": those formats (model/quant.py). Same logits in every layout but int8 / bf16.
    parts: with inference=True, decode_layout's blocks per matrix (default: torch's thread count)."""
    model, meta, folder = load_model(Path(path), device)
    if inference is not False:
        model = inference_model(model, None if inference is True else inference, parts)
    # the folder's tokenizer: its config.json says whether prompts start with BOS
    tok = Tokenizer.load(folder)
    if tok.vocab_size > model.cfg.vocab_size:  # its ids past the embedding would crash every stage
        raise ChatforgeError(
            f"{folder}: tokenizer.json has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}; "
            "restore the run's tokenizer.json"
        )
    return Run(model, tok, meta, folder)


def resolve_adapter_dir(path: str | Path) -> Path:
    """A folder with adapter_config.json, or a LoRA run whose newest checkpoint has one."""
    path = Path(path)
    if not path.exists():
        raise ChatforgeError(f"no such adapter folder: {path}")
    if (path / lora.ADAPTER_CONFIG).is_file():
        return path
    ckpts = [p for p in list_checkpoints(path) if (p / lora.ADAPTER_CONFIG).is_file()]
    if ckpts:
        return ckpts[-1]
    raise ChatforgeError(
        f"{path} holds no LoRA adapter: expected {lora.ADAPTER_CONFIG} and {lora.ADAPTER_FILE} in it"
    )


def cmd_merge(args: MergeOptions) -> None:
    """`chatforge merge`: fold a LoRA run's adapter into its base -> a plain run folder."""
    adapter_dir = resolve_adapter_dir(args.adapter)
    config = lora.read_adapter_config(adapter_dir)
    base = args.base or config.get("base")
    if not base:
        raise ChatforgeError(f"{adapter_dir / lora.ADAPTER_CONFIG} names no base run; pass --base")
    out = Path(args.out)
    if (out / "model.safetensors").exists() and not args.force:
        raise ChatforgeError(f"{out} already holds a model; pick another --out or pass --force")
    model, base_meta, base_dir = load_model(base)
    lora.load_adapter(model, adapter_dir)
    lora.merge_lora(model)
    # the adapter run's config carries the base's chat format (chat_template, add_bos_token, ...)
    run_meta = read_config(adapter_dir) if (adapter_dir / "config.json").is_file() else base_meta
    tok_dir = adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base_dir
    meta = inherited_meta(run_meta)
    meta.update(
        stage="merge",
        base=str(Path(base_dir).resolve()),
        adapter=str(adapter_dir.resolve()),
        lora={k: config[k] for k in ("rank", "alpha", "targets", "base_fingerprint", "step")},
    )
    save_model(out, model, Tokenizer.load(tok_dir).to_json(), meta)
    print(f"merged {adapter_dir} into {base_dir} -> {out} (chat with: chatforge chat --model {out})")
