"""Inference weight formats for the one model, picked when a run is loaded for generation.

    run = checkpoint.load_run(RUN, inference=True | "bf16" | "int8")   # inference_model, here

- None (fp32): the weights as trained, laid out for one-token decoding (`decode_layout`): q/k/v fused
  into one matrix and gate/up into another (5 matmuls per layer become 2), each matrix in the memory
  order this CPU's BLAS streams fastest for its shape, and on a CPU split into one block of outputs
  per core (torch's matrix-vector product uses one core). Same values and module names; only the
  memory and the matmul calls change, because one-token decoding is a matrix-vector product per
  projection that streams every weight once, plus a fixed cost per call (bench/infer.py and
  bench/matvec_cores.py measure both).
- "bf16": weights, activations and the KV cache in bfloat16: half the memory. Fast only with bf16
  math (AVX512-BF16 / AMX CPUs, GPUs); on an AVX2-only CPU torch converts in software, so decoding
  (memory-bound) is about as fast as fp32 and prompts (compute-bound) are several times slower
  (bench/infer.py measures both). bf16 keeps torch's layout: column-major bf16 weights decoded 6x
  slower on AVX2 (measured), and fusing them gained nothing.
- "int8": every nn.Linear (lm_head included) becomes an `Int8Linear`: int8 weights with one fp32
  scale per output channel (symmetric: scale = max|row| / 127), a quarter of fp32's bytes. A decode
  step runs fbgemm's int8 matmul, which also rounds each row's activations to 7 bits; a prompt runs
  the int8 weights times their scales in fp32. Why not weight-only everywhere: on AVX2,
  `aten._weight_int8pack_mm`, dequantize-then-matmul and a torch.compile'd dequantizing matmul were
  all slower than fp32 (measured), so only fbgemm's kernel makes int8 decoding faster. The quality
  cost of both paths is in bench/infer.py. CPU only.

The model stays the one GPT class with the same parameter names; each format swaps in its own modules
(FusedAttention, FusedMLP and SplitLinear for fp32, Int8Linear for int8), so gpt.py stays the training
reference, and a converted model is for generation and evaluation, not for training or saving.
"""

from __future__ import annotations

import ctypes
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, MLP, Attention, apply_rope

MODES = ("bf16", "int8")


def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 weight, fp32 scale per output row), symmetric: w ~ q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free nn.Linear holding int8 weights with one fp32 scale per output channel.

    A decode step (one position per row): fbgemm's int8 matmul, once per row, which rounds the row's
    activations to 7 bits over that row's own range (reduce_range: AVX2 sums int8 pairs in int16,
    which 8-bit activations could saturate). One call per row because fbgemm takes one range per call:
    over a whole prompt that range is set by a few huge activations (e.g. at the first token) and
    wipes out the rest (+0.58 bits per byte on SmolLM2, against +0.025 per row), and per row a batch
    computes exactly what its prompts compute one by one. A prompt or an evaluation batch (several
    positions per row): the int8 weights times their scales in fp32, activations unrounded (+0.002)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ChatforgeError("int8: only bias-free nn.Linear layers are supported (GPT has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = int8_weights(linear.weight)
        with warnings.catch_warnings():  # torch flags its quantized-tensor API as deprecated, but it is
            warnings.simplefilter("ignore")  # what fbgemm's prepack takes: the one fast int8 matmul on AVX2
            zero = torch.zeros(q.size(0), dtype=torch.long)
            qw = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(), zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qw, None)  # the only copy of the weights kept

    def dequantized(self) -> torch.Tensor:
        """The fp32 (out, in) weight the int8 values and scales stand for."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-2) != 1:  # several positions per row: a prompt
            return F.linear(x, self.dequantized().to(x.dtype))
        if x.size(0) == 1:  # a decode step of one row
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)
        return torch.cat([torch.ops.quantized.linear_dynamic(row, self._packed, True) for row in x.split(1)])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


def _streaming_order(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) values in the memory order a one-token matmul streams fastest on this CPU:
    column-major (weight.t() contiguous) for a matrix wider than it is tall (out > in: q/k/v, gate/up,
    lm_head), row-major otherwise (down_proj: 10.4 GB/s against 8.2 column-major). bench/infer.py's
    kernels section measures both orders."""
    if weight.size(0) > weight.size(1):
        return weight.t().contiguous().t()
    return weight.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. weight is (out, in), or (parts, in, out / parts) as `_split` lays it out for
    decoding on a CPU: then one batched matmul whose parts run on separate cores, because torch's
    matrix-vector product (a decode step's matmul) runs on one core, and one core cannot draw the
    memory bandwidth two can (bench/matvec_cores.py measures both)."""
    if weight.dim() == 2:
        return F.linear(x, weight)
    parts, n_in, n_out = weight.shape
    y = torch.bmm(x.reshape(1, -1, n_in).expand(parts, -1, -1), weight)  # (parts, rows, out / parts)
    return y.transpose(0, 1).reshape(*x.shape[:-1], parts * n_out)


def _split(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """An (out, in) weight in either streaming order -> a (parts, in, out / parts) view of the same
    memory, the layout `linear` multiplies as one batched matmul: part p computes outputs
    p * out / parts up to (p + 1) * out / parts."""
    n_out, n_in = weight.shape
    if weight.stride(0) == 1:  # column-major: the memory is (in, out)
        return weight.t().view(n_in, parts, n_out // parts).permute(1, 0, 2)
    return weight.view(parts, n_out // parts, n_in).transpose(1, 2)


def _parts_for(n_out: int, parts: int) -> int:
    """The most parts, up to `parts`, that split n_out outputs evenly."""
    while n_out % parts:
        parts -= 1
    return parts


def _fuse(module: nn.Module, names: tuple[str, ...], parts: int) -> torch.Tensor | None:
    """One (sum of outs, in) matrix holding the named projections' weights stacked, in as many parts
    (up to `parts`) as divide it evenly; each projection's weight becomes a view into it (no second
    copy). None when a projection is not a plain nn.Linear (LoRA, int8), which then keep their own
    matmuls."""
    linears = [getattr(module, n) for n in names]
    if not all(type(m) is nn.Linear for m in linears):
        return None
    fused = _streaming_order(torch.cat([m.weight for m in linears]))
    start = 0
    for m in linears:
        m.weight.data = fused[start : start + m.out_features]
        start += m.out_features
    n = _parts_for(fused.size(0), parts)
    return _split(fused, n) if n > 1 else fused


class FusedAttention(Attention):
    """Attention whose q, k and v come from one matrix (`qkv_weight`, 2-D or in parts for `linear`):
    one matmul and one RoPE call instead of three and two. It keeps the trained module's projections,
    whose weights are views into qkv_weight, so names and values are unchanged. Not for qk_norm models:
    the norms sit between the projections and RoPE."""

    def __init__(self, attn: Attention, qkv_weight: torch.Tensor) -> None:
        nn.Module.__init__(self)  # not Attention.__init__: keep attn's projections, allocate none
        self.cfg, self.layer_idx = attn.cfg, attn.layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.register_buffer("qkv_weight", qkv_weight, persistent=False)  # derived: never saved
        self.train(attn.training)

    def heads(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        H, KV, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        heads = linear(x, self.qkv_weight).view(B, T, H + 2 * KV, D).transpose(1, 2)
        q, k = apply_rope(heads[:, : H + KV], cos, sin).split([H, KV], dim=1)
        return q, k, heads[:, H + KV :]


class FusedMLP(MLP):
    """The SwiGLU MLP with gate and up in one matrix (`gate_up_weight`), as FusedAttention."""

    def __init__(self, mlp: MLP, gate_up_weight: torch.Tensor) -> None:
        nn.Module.__init__(self)  # not MLP.__init__: keep mlp's projections, allocate none
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.register_buffer("gate_up_weight", gate_up_weight, persistent=False)  # derived: never saved
        self.train(mlp.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SplitLinear(nn.Module):
    """A bias-free nn.Linear for decoding on a CPU: the same weight Parameter (same name; still shared
    with a tied embedding), multiplied in `parts` blocks of outputs by one batched matmul (`linear`),
    a block per core."""

    def __init__(self, linear: nn.Linear, parts: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_buffer("parts_weight", _split(linear.weight.data, parts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.parts_weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={self.parts_weight.size(0)}"


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule called `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def decode_layout(model: nn.Module, parts: int | None = None) -> nn.Module:
    """Lay the weights out for one-token decoding, which is a matrix-vector product per projection,
    bound by streaming each weight from memory once, plus a fixed cost per call:
    - q, k and v become one matrix (FusedAttention), gate and up another (FusedMLP): 3 + 2 matmuls
      become 1 + 1, and a wider matrix streams faster than two narrow ones;
    - every matrix is stored in its faster memory order (`_streaming_order`);
    - on a CPU, every matrix is split into `parts` blocks of outputs (default: torch's thread count)
      multiplied by one batched matmul, a block per core (`linear`, `SplitLinear`): torch's
      matrix-vector product runs on one core, which streams memory slower than two.
    Same values, names and parameters (q_proj.weight etc. are views into the fused matrices), so
    the model computes what it did; it is for generation, not for training or saving. A tied lm_head
    keeps sharing its Parameter with embed_tokens (an embedding lookup then reads strided rows)."""
    if parts is None:
        parts = torch.get_num_threads()
    if next(model.parameters()).device.type != "cpu":
        parts = 1  # a GPU's matmuls already use the whole device
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear:
                module.weight.data = _streaming_order(module.weight.data)
        for name, module in list(model.named_modules()):  # then stack the projections (weights become views)
            if type(module) is Attention and not module.cfg.qk_norm:  # q/k norms sit between
                weight = _fuse(module, ("q_proj", "k_proj", "v_proj"), parts)
                if weight is not None:
                    _swap(model, name, FusedAttention(module, weight))
            elif type(module) is MLP:
                weight = _fuse(module, ("gate_proj", "up_proj"), parts)
                if weight is not None:
                    _swap(model, name, FusedMLP(module, weight))
        for name, module in list(model.named_modules()):  # the other linears: SplitLinear
            n = _parts_for(module.out_features, parts) if type(module) is nn.Linear else 1
            if n > 1:
                _swap(model, name, SplitLinear(module, n))
    return model


def quantize_model(model: GPT, mode: str) -> GPT:
    """Convert a loaded model in place for inference: mode "bf16" or "int8" (see the module docstring)."""
    if mode not in MODES:
        raise ChatforgeError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)} (or none)")
    if mode == "bf16":
        return model.to(torch.bfloat16)
    if next(model.parameters()).device.type != "cpu":
        raise ChatforgeError("int8 runs on the CPU only (fbgemm kernels); use bf16 on a GPU")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            _swap(model, name, Int8Linear(module))
    return model


def inference_model(model: GPT, mode: str | None = None, parts: int | None = None) -> GPT:
    """A loaded model in an inference format: None (fp32, decode layout), "bf16" or "int8".
    parts: fp32 only, decode_layout's blocks per matrix (default: torch's thread count)."""
    if mode is not None and mode not in MODES:
        raise ChatforgeError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)} (or none)")
    model = decode_layout(model, parts) if mode is None else quantize_model(model, mode)
    _release_freed_memory()  # both copy the weights (decode_layout into its memory orders)
    return model.eval()


def _release_freed_memory() -> None:
    """Hand the freed fp32 weights back to the OS: glibc keeps freed heap pages otherwise, and an int8
    model would show the fp32 model's memory (measured on SmolLM2: 770 MB resident -> 558 MB; fp32 in
    the decode layout: 971 MB -> 806 MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
