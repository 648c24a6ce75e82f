"""Inference weight formats for the one model, picked when a run is loaded for generation.

    run = checkpoint.load_run(RUN, inference=True | "bf16" | "int8" | "int4")   # inference_model, here

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
- "int8" / "int4": weight-only quantisation for CPU decoding. q/k/v and gate/up are stacked into
  one matrix each (as in fp32), then every matrix (lm_head included; the embedding lookup stays
  fp32) becomes an `Int8Linear` (int8, one fp32 scale per output channel, symmetric) or an
  `Int4Linear` (4-bit codes with a scale and a zero per group of INT4_GROUP_SIZE inputs). The
  matmul ("kernel") is picked once per process by `pick_kernel`: the fastest measured for the mode
  that runs on this CPU and torch build (each is probed on a small matrix; a missing one gives one
  line on stderr and the next is used). int8: fbgemm's dynamic int8 matmul (activations rounded to
  7 bits per row), then aten's weight-only `_weight_int8pack_mm`, then fp32 on the dequantized
  weights; int4: aten's `_weight_int4pack_mm_for_cpu`, then fp32 on the dequantized weights.
  aten's packed kernels take bf16 activations (with fp32 ones they ran slower than fp32 itself).
  On Zen 4 (AVX-512, 1 thread, SmolLM2-135M) int4 (groups of 32) and int8 decode 2.5x fp32, and int4's
  prompts run faster than fp32's too; docs/decode.md has the figures, their commands and the
  bits-per-byte cost of each. CPU only.

The model stays the one GPT class with the same parameter names; each format swaps in its own modules
(FusedAttention, FusedMLP and SplitLinear for fp32, Int8Linear / Int4Linear for int8 / int4), so
gpt.py stays the training reference, and a converted model is for generation and evaluation, not for
training or saving.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, MLP, Attention, apply_rope

MODES = ("bf16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes aten's CPU int4 kernel takes
# inputs per int4 scale and zero: on SmolLM2 groups of 32 cost +0.022 bits per byte, groups of 64
# +0.126 (its shipped weights are Q4_1, blocks of 32), for 5% less decode speed (docs/decode.md)
INT4_GROUP_SIZE = 32
INT8_KERNELS = ("fbgemm", "int8pack", "dequant")
INT4_KERNELS = ("int4pack", "dequant")
# aten's packed CPU kernels are vectorised for bf16 activations: with fp32 ones they ran 2-5x slower
# than fp32 F.linear on Zen 4 (docs/decode.md), so they get bf16 activations and give bf16 outputs
PACKED_DTYPE = torch.bfloat16
KERNEL_OPS = {  # what each kernel calls, as the bench JSON records it
    "int8pack": "aten._weight_int8pack_mm (int8 weights, bf16 activations)",
    "fbgemm": "quantized.linear_dynamic (fbgemm: int8 weights, activations rounded to 7 bits per row)",
    "int4pack": "aten._weight_int4pack_mm_for_cpu (int4 weights, bf16 activations)",
    "dequant": "F.linear on the weights dequantized to fp32 (same values, no speedup)",
}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_features() -> dict:
    """What decides the kernels: torch's vector capability and the matmul-relevant CPU flags."""
    wanted = (
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_int8",
        "amx_bf16",
    )
    return {
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in wanted if f in cpu_flags()],
    }


_noted: set[str] = set()


def _note(message: str) -> None:
    """One line on stderr, once per process."""
    if message not in _noted:
        _noted.add(message)
        print(f"chatforge: {message}", file=sys.stderr, flush=True)


def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 weight, fp32 scale per output row), symmetric: w ~ q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_weights(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int32 codes 0..15 (out, in), scales and zeros (in / group, out, 2)),
    asymmetric per group of `group_size` inputs: w ~ (q - 8) * scale + zero, the layout aten's int4
    kernels read (zero = the group's min + 8 * scale, so q spans min..max in 15 steps)."""
    w = weight.detach().float()
    n_out, n_in = w.shape
    groups = w.reshape(n_out, n_in // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = (high - low).clamp(min=1e-12) / 15
    q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).reshape(n_out, n_in)
    scales_zeros = torch.cat([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
    return q, scales_zeros


def int4_dequantized(q: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 (out, in) weight that int4 codes and their scales and zeros stand for."""
    n_out, n_in = q.shape
    scale, zero = scales_zeros.transpose(0, 1).unbind(-1)  # each (out, in / group)
    groups = q.reshape(n_out, scale.size(1), -1).float()
    return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(n_out, n_in)


def int8pack_fits(n_in: int) -> bool:
    """Whether aten's int8 kernel takes a weight with n_in inputs: with bf16 activations it read past
    the row (wrong results, or a crash) when n_in was not a multiple of 16 (torch 2.13, AVX-512)."""
    return n_in % 16 == 0


def int4_fits(n_out: int, n_in: int, group_size: int) -> bool:
    """Whether aten's int4 layout takes an (out, in) weight: outputs in 16s, inputs in whole groups."""
    return n_out % 16 == 0 and n_in % group_size == 0


# ---- kernels: which matmul each weight format runs, probed once per process ---------------------------
def _probe(kernel: str) -> None:
    """Run `kernel` on a small weight against the fp32 reference; raises if it is missing or wrong."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(2, 1, 64)
    module = Int4Linear(linear, 32, kernel) if kernel in INT4_KERNELS else Int8Linear(linear, kernel)
    with torch.no_grad():
        got, ref = module(x), F.linear(x, module.dequantized())
    if not torch.allclose(got, ref, rtol=0.05, atol=0.05):
        raise RuntimeError("its result differs from the fp32 reference")


@functools.cache
def kernel_problem(kernel: str) -> str | None:
    """None when `kernel` runs on this CPU and torch build; else the reason it does not, in a few words."""
    try:
        _probe(kernel)
    except Exception as e:  # a missing op, an unsupported CPU, a wrong result: the kernel is unusable here
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else 'failed'}"
    return None


def kernel_order(mode: str) -> tuple[str, ...]:
    """The kernels to try for `mode`, fastest first as measured (docs/decode.md). int8: fbgemm's
    beat aten's weight-only int8 kernel on AVX2 and on AVX-512 alike (Zen 4, SmolLM2, 1 thread:
    65 against 37 tokens/s). int4: aten's packed kernel, where torch has vector kernels for this CPU
    (without them it runs scalar code, slower than fp32)."""
    if mode == "int8":
        return INT8_KERNELS
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return INT4_KERNELS[::-1]
    return INT4_KERNELS


@functools.cache
def pick_kernel(mode: str, requested: str | None = None) -> str:
    """The first kernel for `mode` (int8 / int4) that runs here, starting from `requested` if given.
    One line on stderr when the first choice is missing; "dequant" always runs."""
    order = kernel_order(mode)
    if requested is not None:
        if requested not in order:
            raise ChatforgeError(f"{mode}: unknown kernel {requested!r}; choose one of {', '.join(order)}")
        order = (requested, *[k for k in order if k != requested])
    for kernel in order:
        problem = kernel_problem(kernel)
        if problem is None:
            if kernel != order[0]:
                _note(
                    f"{mode}: {order[0]} kernel unavailable here ({kernel_problem(order[0])}); using {kernel}"
                )
            return kernel
    raise ChatforgeError(f"{mode}: no kernel runs here")  # unreachable while dequant is plain F.linear


class QuantizedLinear(nn.Module):
    """A bias-free linear holding its weights in fewer bits; `kernel` names the matmul it runs."""

    in_features: int
    out_features: int
    kernel: str

    def dequantized(self) -> torch.Tensor:
        """The fp32 (out, in) weight the stored values stand for."""
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """A bias-free nn.Linear holding int8 weights with one fp32 scale per output channel. Kernels:
    - "int8pack" (`aten._weight_int8pack_mm`): weight-only, activations stay fp32, for decode steps
      and prompts alike. The fastest on AVX-512 (docs/decode.md).
    - "fbgemm" (`quantized.linear_dynamic`), once per decode row: it rounds the row's activations to
      7 bits over that row's own range (reduce_range: AVX2 sums int8 pairs in int16, which 8-bit
      activations could saturate). One call per row because fbgemm takes one range per call: over a
      whole prompt that range is set by a few huge activations (e.g. at the first token) and wipes
      out the rest (+0.58 bits per byte on SmolLM2, against +0.025 per row), and per row a batch
      computes exactly what its prompts compute one by one. A prompt (several positions per row):
      the int8 weights times their scales in fp32, activations unrounded (+0.002).
    - "dequant": the int8 values times their scales, stored in fp32 (a fallback: no gain)."""

    def __init__(self, linear: nn.Linear, kernel: str = "fbgemm") -> None:
        super().__init__()
        if linear.bias is not None:
            raise ChatforgeError("int8: only bias-free nn.Linear layers are supported (GPT has no biases)")
        self.in_features, self.out_features, self.kernel = linear.in_features, linear.out_features, kernel
        if kernel == "int8pack" and not int8pack_fits(self.in_features):
            raise ChatforgeError(f"int8: the int8pack kernel needs inputs in 16s, not {self.in_features}")
        q, scale = int8_weights(linear.weight)
        if kernel == "fbgemm":
            # torch flags its quantized-tensor API as deprecated, but it is what fbgemm's prepack takes:
            # the one fast int8 matmul on AVX2
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zero = torch.zeros(q.size(0), dtype=torch.long)
                qw = torch.quantize_per_channel(
                    q.float() * scale[:, None], scale.double(), zero, 0, torch.qint8
                )
                self._packed = torch.ops.quantized.linear_prepack(qw, None)  # the only copy kept
        elif kernel == "int8pack":
            self.register_buffer("weight_int8", q.contiguous(), persistent=False)
            self.register_buffer("scale", scale.to(PACKED_DTYPE), persistent=False)
        else:
            self.register_buffer("weight", q.float() * scale[:, None], persistent=False)

    def dequantized(self) -> torch.Tensor:
        if self.kernel == "fbgemm":
            return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize()
        if self.kernel == "int8pack":
            return self.weight_int8.float() * self.scale.float()[:, None]
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8pack":
            x2 = x.reshape(-1, self.in_features).to(PACKED_DTYPE)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.kernel == "dequant" or x.size(-2) != 1:  # a fallback, or several positions per row: a prompt
            return F.linear(x, self.dequantized().to(x.dtype))
        return _fbgemm_rows(x, self._packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel, {self.kernel}"


@torch.compiler.disable  # dynamo cannot trace fbgemm's packed weights: a compiled step calls this eagerly
def _fbgemm_rows(x: torch.Tensor, packed) -> torch.Tensor:
    """fbgemm's dynamic int8 matmul, one call per row of a decode step (see Int8Linear)."""
    if x.size(0) == 1:
        return torch.ops.quantized.linear_dynamic(x, packed, True)
    return torch.cat([torch.ops.quantized.linear_dynamic(row, packed, True) for row in x.split(1)])


class Int4Linear(QuantizedLinear):
    """A bias-free nn.Linear holding 4-bit weights with an fp32 scale and zero per group of
    `group_size` inputs of each output (`int4_weights`): an eighth of fp32's bytes plus a scale and a
    zero per group. Kernel "int4pack" (`aten._weight_int4pack_mm_for_cpu`, weights packed once by
    `aten._convert_weight_to_int4pack_for_cpu`), weight-only, for decode steps and prompts; "dequant"
    keeps the same values in fp32 (a fallback). Needs outputs in 16s and inputs in whole groups
    (`int4_fits`); quantize_model keeps other layers in int8."""

    def __init__(
        self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE, kernel: str = "int4pack"
    ) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ChatforgeError("int4: only bias-free nn.Linear layers are supported (GPT has no biases)")
        if group_size not in INT4_GROUP_SIZES:
            raise ChatforgeError(
                f"int4 group size {group_size}: use one of {', '.join(map(str, INT4_GROUP_SIZES))}"
            )
        self.in_features, self.out_features, self.kernel = linear.in_features, linear.out_features, kernel
        self.group_size = group_size
        if not int4_fits(self.out_features, self.in_features, group_size):
            raise ChatforgeError(
                f"int4: a {self.out_features}x{self.in_features} weight needs outputs in 16s and inputs in groups of {group_size}"
            )
        q, scales_zeros = int4_weights(linear.weight, group_size)
        if kernel == "int4pack":
            self.register_buffer(
                "weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), persistent=False
            )
            self.register_buffer("scales_zeros", scales_zeros.to(PACKED_DTYPE), persistent=False)
        else:
            self.register_buffer("weight", int4_dequantized(q, scales_zeros), persistent=False)

    def dequantized(self) -> torch.Tensor:
        if self.kernel == "int4pack":
            return int4_dequantized(self.codes(), self.scales_zeros.float())
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dequant":
            return F.linear(x, self.weight.to(x.dtype))
        x2 = x.reshape(-1, self.in_features).to(PACKED_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.weight_int4, self.group_size, self.scales_zeros
        )
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def codes(self) -> torch.Tensor:
        """The (out, in) int4 codes 0..15, read back through the kernel: x = one-hot rows picks each
        input's column, and with scale 1, zero 0 the kernel returns code - 8."""
        if self.kernel != "int4pack":
            raise ChatforgeError("int4: only the int4pack kernel keeps codes")
        groups = self.in_features // self.group_size
        unit = torch.tensor([1.0, 0.0], dtype=PACKED_DTYPE).expand(groups, self.out_features, 2).contiguous()
        eye = torch.eye(self.in_features, dtype=PACKED_DTYPE)
        raw = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size, unit)
        return (raw.float().t() + 8).round().to(torch.int32)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 in groups of {self.group_size}, {self.kernel}"
        )


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


class Projection(nn.Module):
    """A derived weight matrix of the fp32 decode layout (the fused q/k/v or gate/up matrix, 2-D or
    in parts), multiplied by `linear`. A buffer, never saved: the trained weights are views into it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class FusedAttention(Attention):
    """Attention whose q, k and v come from one matrix, `qkv` (a Projection in fp32, a QuantizedLinear
    in int8 / int4): one matmul and one RoPE call instead of three and two. In fp32 it keeps the
    trained module's projections, whose weights are views into qkv's, so names and values are
    unchanged; a quantized one keeps no fp32 copy of them. Not for qk_norm models: the norms sit
    between the projections and RoPE."""

    def __init__(self, attn: Attention, qkv: nn.Module, keep_projections: bool = True) -> None:
        nn.Module.__init__(self)  # not Attention.__init__: keep attn's projections, allocate none
        self.cfg, self.layer_idx, self.o_proj, self.qkv = attn.cfg, attn.layer_idx, attn.o_proj, qkv
        if keep_projections:
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.train(attn.training)

    def heads(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        H, KV, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        heads = self.qkv(x).view(B, T, H + 2 * KV, D).transpose(1, 2)
        q, k = apply_rope(heads[:, : H + KV], cos, sin).split([H, KV], dim=1)
        return q, k, heads[:, H + KV :]


class FusedMLP(MLP):
    """The SwiGLU MLP with gate and up in one matrix, `gate_up`, as FusedAttention."""

    def __init__(self, mlp: MLP, gate_up: nn.Module, keep_projections: bool = True) -> None:
        nn.Module.__init__(self)  # not MLP.__init__: keep mlp's projections, allocate none
        self.down_proj, self.gate_up = mlp.down_proj, gate_up
        if keep_projections:
            self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.train(mlp.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
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
                    _swap(model, name, FusedAttention(module, Projection(weight)))
            elif type(module) is MLP:
                weight = _fuse(module, ("gate_proj", "up_proj"), parts)
                if weight is not None:
                    _swap(model, name, FusedMLP(module, Projection(weight)))
        for name, module in list(model.named_modules()):  # the other linears: SplitLinear
            n = _parts_for(module.out_features, parts) if type(module) is nn.Linear else 1
            if n > 1:
                _swap(model, name, SplitLinear(module, n))
    return model


def _stacked(module: nn.Module, names: tuple[str, ...]) -> nn.Linear | None:
    """One nn.Linear whose weight is the named projections' weights stacked (a copy), or None when
    one is not a plain nn.Linear (LoRA) and they must stay apart."""
    linears = [getattr(module, n) for n in names]
    if not all(type(m) is nn.Linear and m.bias is None for m in linears):
        return None
    stacked = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=False)
    stacked.weight.data = torch.cat([m.weight.detach() for m in linears])
    return stacked


def quantize_model(
    model: GPT, mode: str, kernel: str | None = None, group_size: int = INT4_GROUP_SIZE
) -> GPT:
    """Convert a loaded model in place for inference: mode "bf16", "int8" or "int4" (see the module
    docstring). int8 / int4: q/k/v and gate/up are stacked into one matrix each before quantizing
    (one matmul instead of three and two, as in the fp32 decode layout), and every weight matrix is
    stored in that format and multiplied by `pick_kernel`'s choice (`kernel` asks for one first).
    int4 keeps in int8 a matrix whose shape aten's int4 layout does not take (`int4_fits`), and the
    int8pack kernel leaves one it cannot take (`int8pack_fits`) to fp32 on the dequantized weights."""
    if mode not in MODES:
        raise ChatforgeError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)} (or none)")
    if mode == "bf16":
        return model.to(torch.bfloat16)
    if next(model.parameters()).device.type != "cpu":
        raise ChatforgeError(f"{mode} runs on the CPU only (torch's CPU kernels); use bf16 on a GPU")
    int8_kernel = pick_kernel("int8", kernel if mode == "int8" else None)
    int4_kernel = pick_kernel("int4", kernel) if mode == "int4" else None

    def quantized(lin: nn.Linear) -> QuantizedLinear:
        if int4_kernel and int4_fits(lin.out_features, lin.in_features, group_size):
            return Int4Linear(lin, group_size, int4_kernel)
        if int8_kernel == "int8pack" and not int8pack_fits(lin.in_features):
            return Int8Linear(lin, "dequant")
        return Int8Linear(lin, int8_kernel)

    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if type(module) is Attention and not module.cfg.qk_norm:  # q/k norms sit between
                stacked = _stacked(module, ("q_proj", "k_proj", "v_proj"))
                if stacked is not None:
                    _swap(model, name, FusedAttention(module, quantized(stacked), keep_projections=False))
            elif type(module) is MLP:
                stacked = _stacked(module, ("gate_proj", "up_proj"))
                if stacked is not None:
                    _swap(model, name, FusedMLP(module, quantized(stacked), keep_projections=False))
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                _swap(model, name, quantized(module))
    return model


def quantization_kernels(model: nn.Module) -> dict[str, int]:
    """How many of the model's matrices each kernel multiplies, e.g. {"int4 int4pack": 91, "int8 int8pack": 1}:
    what a benchmark records beside its speed."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            key = f"{'int4' if isinstance(m, Int4Linear) else 'int8'} {m.kernel}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def inference_model(
    model: GPT,
    mode: str | None = None,
    parts: int | None = None,
    kernel: str | None = None,
    group_size: int = INT4_GROUP_SIZE,
) -> GPT:
    """A loaded model in an inference format: None (fp32, decode layout), "bf16", "int8" or "int4".
    parts: fp32 only, decode_layout's blocks per matrix (default: torch's thread count).
    kernel: int8 / int4 only, the matmul to try first (default: pick_kernel's order for this CPU).
    group_size: int4 only, inputs per scale and zero."""
    if mode is not None and mode not in MODES:
        raise ChatforgeError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)} (or none)")
    if mode is None:
        model = decode_layout(model, parts)
    else:
        model = quantize_model(model, mode, kernel, group_size)
    _release_freed_memory()  # both copy the weights (decode_layout into its memory orders)
    return model.eval()


def compile_problem() -> str | None:
    """None when torch.compile can build kernels for this model's device here; else what is missing.
    On a CPU inductor writes C++ and needs a compiler ($CXX, g++ or clang++)."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c):
        return "no C++ compiler found (install g++, or set $CXX)"
    return None


def compile_decode(model: GPT) -> GPT:
    """Compile the model's one-token decode step (GPT.forward with a cache and one new token per row,
    which engine.BatchDecoder.step calls as `model.decode_step`) with torch.compile into one graph: inductor fuses the norms, RoPE, SiLU, the casts around the
    packed int4 / int8 kernels and the cache writes into a few C++ loops, which removes most of the
    Python and dispatch cost of the ~40 small ops per layer that dominate a small model's decode step
    (docs/decode.md measures it). Prompts (several tokens per row) stay eager. The graph is dynamic in
    the cache length and batch from the first compile (one compile, not one per step), and torch
    keeps what it compiled on disk ($TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_USER), so the
    next process reuses it. The first decode step pays the compile (SmolLM2 on one Zen 4 core: about
    a minute cold, 20 s from the cache; docs/decode.md)."""
    problem = compile_problem()
    if problem is not None:
        raise ChatforgeError(f"--compile: {problem}; or run without --compile")
    kernels = quantization_kernels(model)
    if 2 * kernels.get("int8 fbgemm", 0) > sum(kernels.values()):
        # each fbgemm matmul runs outside the graph: SmolLM2 int8 decoded at 0.70x its eager speed
        raise ChatforgeError("--compile does not speed up int8's fbgemm kernel; use --quantize int4 with it")
    model.decode_step = torch.compile(model.forward, dynamic=True)
    return model


def _release_freed_memory() -> None:
    """Hand the freed fp32 weights back to the OS: glibc keeps freed heap pages otherwise, and an int8
    model would show the fp32 model's memory (measured on SmolLM2: 770 MB resident -> 558 MB; fp32 in
    the decode layout: 971 MB -> 806 MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
