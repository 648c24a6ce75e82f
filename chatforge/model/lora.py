"""LoRA: low-rank adapters on the attention and MLP projections of the one GPT class.

A LoRA layer keeps its pretrained weight W frozen and learns a low-rank update beside it
(Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):

    y = x W^T + (alpha / rank) * (x A^T) B^T        A: (rank, in), B: (out, rank)

A starts random and B at zero, so an untrained adapter changes nothing. Only A and B train:
for SmolLM2-135M at rank 8 on all seven projections that is 2.4M of 135M parameters, so the
optimizer state is tiny and a checkpoint of the adapter is 9 MB instead of 540.

`LoRALinear` is an `nn.Linear` (same `weight`, same state-dict name) with two extra tensors, so
the adapted model is still a `GPT`: the engine, chat, eval and the training loop run it as is,
and the frozen weights keep their names (the base fingerprint is the same before and after
`apply_lora`). `merge_lora` folds B @ A into W and gives back plain `nn.Linear`s.

On disk an adapter is two files beside (or inside) a run folder, in PEFT's layout, so PEFT loads
it onto the `chatforge export hf` folder of its base (`PeftModel.from_pretrained(hf_model, RUN)`):

    adapter_model.safetensors  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight / lora_B
                               ... (adapter tensors only); its metadata header carries chatforge's own
                               fields: the model config and a fingerprint of the base weights, so a
                               different base is refused
    adapter_config.json        PEFT's LoraConfig: r, lora_alpha, target_modules, the base run's path

    chatforge merge --adapter runs/lora --out runs/merged [--base runs/smollm2]   (checkpoint.cmd_merge)

This module knows nothing of run folders, so checkpoint.py can build on it without a cycle.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_bytes, atomic_write_json
from chatforge.options import NO_VERIFY_ENV

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTN_TARGETS + MLP_TARGETS
TARGET_GROUPS = {"all": TARGETS, "attn": ATTN_TARGETS, "mlp": MLP_TARGETS}
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's file names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "chatforge-lora"  # the metadata key holding chatforge's fields in ADAPTER_FILE
# GPT's module names are HF Llama's without "model."; PEFT wraps the HF model in base_model.model
PEFT_PREFIX = "base_model.model.model."


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update scaled by alpha / rank.

    It takes over `base`'s weight (and bias) Parameters, so the frozen tensors are not copied and
    keep their state-dict names; only `lora_A` and `lora_B` are new."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        if rank <= 0:
            raise ChatforgeError(f"LoRA rank must be a positive integer, got {rank}")
        if alpha <= 0:
            raise ChatforgeError(f"LoRA alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ChatforgeError(f"LoRA dropout must be in [0, 1), got {dropout}")
        # meta: nn.Linear's own init would allocate (and randomise) a weight we replace at once
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # zero: starts as a no-op
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT does
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(
            F.linear(self.dropout(x), self.lora_A), self.lora_B
        )

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B @ A (trainable again, like any loaded weight)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter(self.weight + self.scale * (self.lora_B @ self.lora_A))
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone())
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


# ---- applying, counting, merging --------------------------------------------------------------


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """ "all", "attn", "mlp", a comma list ("q_proj,v_proj") or a list of names -> module names, in order."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names: list[str] = []
    for item in (t.strip() for t in items):
        for name in TARGET_GROUPS.get(item, (item,)):
            if name not in TARGETS:
                raise ChatforgeError(
                    f"unknown LoRA target {item!r}; use all, attn, mlp or names from {', '.join(TARGETS)}"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise ChatforgeError(f"no LoRA targets given; use all, attn, mlp or names from {', '.join(TARGETS)}")
    return tuple(n for n in TARGETS if n in names)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets: str | Sequence[str] = "all", dropout: float = 0.0
) -> nn.Module:
    """Freeze every parameter of `model` (embeddings and norms too), then replace each targeted
    nn.Linear (by its attribute name, e.g. q_proj) with a LoRALinear in place. Returns the model."""
    if rank <= 0:
        raise ChatforgeError(f"LoRA rank must be a positive integer, got {rank}")
    if has_lora(model):
        raise ChatforgeError("this model already has LoRA adapters; merge them (merge_lora) first")
    names = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = 0
    for parent in list(model.modules()):
        for name in names:
            child = getattr(parent, name, None)
            if isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                replaced += 1
    if not replaced:
        raise ChatforgeError(f"no module named {', '.join(names)} in this model: nothing to adapt")
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (`...q_proj.lora_A`, `...q_proj.lora_B`), on the CPU."""
    return {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if k.endswith((".lora_A", ".lora_B"))
    }


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += scale * B @ A), back to plain nn.Linear, in place.
    All parameters are trainable again afterwards, as in a freshly loaded model."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def base_fingerprint(model: nn.Module) -> str:
    """A hash of the frozen weights (names, shapes, float32 bytes; adapters excluded).

    The same for a plain model and for it after apply_lora (LoRALinear keeps the weight names),
    so an adapter can check it is being put on the weights it was trained on."""
    h = hashlib.blake2b(digest_size=16)
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    for name, t in sorted(model.state_dict().items()):
        if name.endswith((".lora_A", ".lora_B")) or (tied and name == "lm_head.weight"):
            continue
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().view("uint8").reshape(-1).data)
    return "blake2b:" + h.hexdigest()


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A sha256 over the adapter tensors' names, shapes and bytes: stored in the file's metadata
    (a file cannot hold its own hash) and checked by load_adapter."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().reshape(-1).data if t.numel() else b"")
    return h.hexdigest()


# ---- adapter files ------------------------------------------------------------------------------


def adapter_config(model: nn.Module, meta: dict | None = None) -> dict:
    """The adapter's settings and identity (chatforge's view); meta["base"] names the base run."""
    layers = lora_layers(model)
    if not layers:
        raise ChatforgeError("this model has no LoRA adapters to save; apply_lora first")
    first = next(iter(layers.values()))
    cfg = getattr(model, "cfg", None)
    meta = meta or {}
    return {
        "format": ADAPTER_FORMAT,
        "rank": first.rank,
        "alpha": first.alpha,
        "dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "targets": sorted({n.rpartition(".")[2] for n in layers}, key=TARGETS.index),
        "base": str(Path(meta["base"]).resolve()) if meta.get("base") else None,  # absolute: cwd may change
        "base_fingerprint": base_fingerprint(model),
        "model": cfg.to_dict() if cfg is not None else None,
        "step": meta.get("step"),
        "trainable_params": sum(t.numel() for t in lora_state(model).values()),
    }


def peft_config(config: dict) -> dict:
    """adapter_config.json in PEFT's LoraConfig schema for chatforge's `adapter_config` fields."""
    alpha = config["alpha"]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config["base"],
        "revision": None,
        "r": config["rank"],
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config["dropout"],
        "target_modules": config["targets"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,  # scale = alpha / r, as LoRALinear's
        "use_dora": False,
        "inference_mode": True,
    }


def peft_key(name: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return f"{PEFT_PREFIX}{name}.weight"


def write_adapter_files(folder: Path, model: nn.Module, meta: dict | None = None) -> list[str]:
    """Write adapter_model.safetensors and adapter_config.json into `folder` (each atomically)."""
    folder = Path(folder)
    config = adapter_config(model, meta)
    tensors = {peft_key(k): v for k, v in lora_state(model).items()}
    config["tensors_sha256"] = tensors_sha256(tensors)
    data = safetensors_bytes(tensors, metadata={"format": "pt", ADAPTER_FORMAT: json.dumps(config)})
    atomic_write_bytes(folder / ADAPTER_FILE, data)
    atomic_write_json(folder / ADAPTER_CONFIG, peft_config(config))  # config last: it vouches for the tensors
    return [ADAPTER_FILE, ADAPTER_CONFIG]


def save_adapter(model: nn.Module, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Save the adapter (not the frozen base) of `model` into out_dir; meta["base"] names the base run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_adapter_files(out_dir, model, meta)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """chatforge's fields of the adapter in adapter_dir (`adapter_config` keys), read from the PEFT
    config and the tensors file's metadata."""
    path, tensors = Path(adapter_dir) / ADAPTER_CONFIG, Path(adapter_dir) / ADAPTER_FILE
    try:
        peft = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatforgeError(
            f"{path} is missing; is {adapter_dir} a LoRA run (chatforge sft --set sft.lora_rank=8)?"
        ) from None
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{path} is corrupt ({e.msg} at line {e.lineno})") from None
    if isinstance(peft, dict) and peft.get("format") == ADAPTER_FORMAT:
        raise ChatforgeError(
            f"{path} is in the adapter layout of an earlier chatforge (adapter.safetensors); load its "
            "merged model.safetensors instead, or train the adapter again"
        )
    if not isinstance(peft, dict) or peft.get("peft_type") != "LORA":
        raise ChatforgeError(f"{path} is not a LoRA adapter config (peft_type {peft.get('peft_type')!r})")
    try:
        with safe_open(str(tensors), framework="pt") as f:
            own = (f.metadata() or {}).get(ADAPTER_FORMAT)
    except FileNotFoundError:
        raise ChatforgeError(f"{tensors} is missing; the adapter folder is incomplete") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"{tensors} is corrupt or truncated ({e})") from None
    if own is None:
        raise ChatforgeError(
            f"{adapter_dir} is a PEFT adapter chatforge did not write (no base fingerprint): merge it in "
            "PEFT (merge_and_unload, save_pretrained) and `chatforge import` that folder"
        )
    try:
        config = json.loads(own)
    except json.JSONDecodeError:
        raise ChatforgeError(f"{tensors}: chatforge's adapter metadata is corrupt") from None
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise ChatforgeError(f"{tensors}: chatforge's adapter metadata is not a {ADAPTER_FORMAT} config")
    return config


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Put the adapter in adapter_dir on `model` (plain: adapters are added; already adapted: they
    must have the same rank, alpha and targets) after checking the base weights are the ones it
    was trained on. Returns the model. (checkpoint.resolve_adapter_dir finds the folder in a run.)"""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ChatforgeError(
            f"{adapter_dir} holds no LoRA adapter: expected {ADAPTER_CONFIG} and {ADAPTER_FILE} in it"
        )
    config = read_adapter_config(adapter_dir)
    cfg = getattr(model, "cfg", None)
    if config.get("model") is not None and cfg is not None and config["model"] != cfg.to_dict():
        raise ChatforgeError(
            f"adapter {adapter_dir} was trained on a model of another shape; load it on its base "
            f"({config.get('base')})"
        )
    found = base_fingerprint(model)
    if found != config["base_fingerprint"]:
        raise ChatforgeError(
            f"adapter {adapter_dir} was trained on other base weights (fingerprint {found[:20]}... "
            f"!= {config['base_fingerprint'][:20]}...); use the base run it was made from: {config.get('base')}"
        )
    if has_lora(model):
        layer = next(iter(lora_layers(model).values()))
        have = {
            "rank": layer.rank,
            "alpha": layer.alpha,
            "targets": sorted({n.rpartition(".")[2] for n in lora_layers(model)}, key=TARGETS.index),
        }
        want = {k: config[k] for k in have}
        if have != want:
            raise ChatforgeError(f"adapter {adapter_dir} is {want}, but this model's adapters are {have}")
    else:
        apply_lora(model, config["rank"], config["alpha"], config["targets"], config.get("dropout", 0.0))
    path = adapter_dir / ADAPTER_FILE
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise ChatforgeError(f"{path} is missing; the adapter folder is incomplete") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ChatforgeError(f"{path} is corrupt or truncated ({e})") from None
    expected = {peft_key(k): v for k, v in lora_state(model).items()}
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ChatforgeError(
            f"{path} does not match {ADAPTER_CONFIG}: missing {missing[:2]}, unexpected {extra[:2]}"
        )
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ChatforgeError(
                f"{path}: {name} is {tuple(t.shape)}, the adapter config implies {tuple(expected[name].shape)}"
            )
    expected_sha = config.get("tensors_sha256")  # adapters saved before checksums have none
    if expected_sha and os.environ.get(NO_VERIFY_ENV, "") in ("", "0") and tensors_sha256(state) != expected_sha:
        raise ChatforgeError(
            f"{path} does not match the sha256 saved with it (corrupt or edited since it was saved); "
            f"restore it, or pass `chatforge --no-verify ...` (or set {NO_VERIFY_ENV}=1) to load it anyway"
        )
    own = {k.removeprefix(PEFT_PREFIX).removesuffix(".weight"): t for k, t in state.items()}
    model.load_state_dict(own, strict=False)  # strict=False: the frozen base is not in the file
    return model
