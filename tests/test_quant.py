import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.checkpoint import model_state
from chatforge.engine import BatchDecoder, Row, generate, generate_batch
from chatforge.errors import ChatforgeError
from chatforge.model import quant
from chatforge.model.gpt import GPT, MLP, Attention, GPTConfig, KVCache
from chatforge.model.lora import apply_lora
from chatforge.model.quant import (
    FusedAttention,
    FusedMLP,
    Int4Linear,
    Int8Linear,
    SplitLinear,
    decode_layout,
    int4_dequantized,
    int4_weights,
    int8_weights,
    kernel_problem,
    pick_kernel,
    quantization_kernels,
    quantize_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread

V = 300


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = {"vocab_size": V, "seq_len": 64, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, **kw}
    return GPT(GPTConfig(**cfg)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def stepwise(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """Logits one token per forward through the KV cache: the decode path."""
    cache = KVCache(model.cfg, x.size(0), x.size(1), dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return torch.cat([model(x[:, t : t + 1], cache=cache) for t in range(x.size(1))], dim=1)


def test_int8_weights_round_trip_within_half_a_step():
    w = torch.randn(48, 40) * torch.linspace(0.01, 3.0, 48)[:, None]  # rows of very different ranges
    q, scale = int8_weights(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) == 127  # each row's largest weight uses the full range
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all())
    linear = nn.Linear(40, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    assert torch.equal(Int8Linear(linear).dequantized(), q.float() * scale[:, None])  # fbgemm's copy is exact


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kernel", ["int8pack", "fbgemm"])
def test_int8_logits_close_to_fp32(tie, kernel):
    if kernel_problem(kernel):
        pytest.skip(f"{kernel} does not run here: {kernel_problem(kernel)}")
    model = tiny(tie_embeddings=tie)
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref_full, ref_steps = model(x), stepwise(model, x)
    q = quantize_model(copy.deepcopy(model), "int8", kernel=kernel)
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    # per layer: q/k/v stacked, o, gate/up stacked, down; plus lm_head; no fp32 matrix left
    assert len(linears) == 2 * 4 + 1 and not any(isinstance(m, nn.Linear) for m in q.modules())
    assert quantization_kernels(q) == {f"int8 {kernel}": 9}
    assert q.embed_tokens.weight.dtype == torch.float32  # the lookup table stays exact
    with torch.no_grad():
        full = q(x)
    steps_1 = torch.cat([stepwise(q, x[i : i + 1]) for i in range(2)])  # one row: fbgemm's int8 kernel
    # bounded error on both paths, but not zero: the weights really are int8
    assert 1e-5 < rel_err(full, ref_full) < 0.015
    assert 1e-5 < rel_err(steps_1, ref_steps) < 0.03
    assert rel_err(stepwise(q, x), ref_steps) < 0.015  # two rows: the prompt path, step by step


def test_int8_greedy_generation_mostly_agrees_with_fp32():
    model = tiny()
    with torch.no_grad():  # larger weights: peaked, varied next-token choices instead of one repeated token
        for p in model.parameters():
            p.mul_(3.0)
    q = quantize_model(copy.deepcopy(model), "int8")
    prompts = [[5, 17, 3, 42, 9], [1, 2, 3], [250, 7, 7]]
    fp32 = [t for p in prompts for t in generate(model, p, 12)]
    int8 = [t for p in prompts for t in generate(q, p, 12)]
    assert len(set(fp32)) > 10  # not a degenerate repeat, so agreement means something
    assert sum(a == b for a, b in zip(fp32, int8, strict=True)) >= 18


def test_int8_batch_equals_one_by_one():
    # each decode row gets its own activation range, so a batch computes what each prompt computes alone
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    q = quantize_model(model, "int8")
    prompts = [[5, 17, 3, 42, 9, 11, 200], [1, 2], [7, 8, 9, 10]]
    for kw in ({}, {"temperature": 1.0, "top_k": 20, "seeds": 3}):
        batched = generate_batch(q, prompts, 10, **kw)
        seeds = [None] * 3 if not kw else [3, 4, 5]
        alone = [
            generate_batch(q, [p], 10, **{**kw, "seeds": s})[0] for p, s in zip(prompts, seeds, strict=True)
        ]
        assert batched == alone and len({tuple(r) for r in batched}) == 3


def test_bf16_weights_compute_and_cache():
    model = tiny()
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref = model(x)
    b = quantize_model(copy.deepcopy(model), "bf16")
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = b(x)
    assert out.dtype == torch.bfloat16 and 1e-5 < rel_err(out, ref) < 0.02
    assert rel_err(stepwise(b, x), ref) < 0.02  # the KV cache takes the model's dtype
    assert len(list(generate(b, [1, 2, 3], 5))) == 5


@pytest.mark.parametrize("mode", ["int3", "fp16", "", "INT8"])
def test_unknown_modes_are_refused_in_one_line(mode):
    with pytest.raises(ChatforgeError, match="unknown quantization") as e:
        quantize_model(tiny(), mode)
    assert "\n" not in str(e.value) and "bf16, int8, int4" in str(e.value)


def test_decode_layout_fuses_projections_and_keeps_values_names_and_ties():
    model = tiny()
    x = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model_state(model).items()}
    decode_layout(model)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn, FusedAttention) and isinstance(mlp, FusedMLP)
    # one matrix each for q/k/v and gate/up; the projections' weights are views into it (no copy)
    assert attn.qkv.weight.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, 64)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv.weight.untyped_storage().data_ptr()
    assert mlp.gate_up.weight.shape == (2 * mlp.up_proj.out_features, 64)
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up.weight.untyped_storage().data_ptr()
    # the faster memory order per shape: column-major when wider than tall, row-major otherwise
    assert attn.qkv.weight.t().is_contiguous() and model.lm_head.weight.t().is_contiguous()
    assert mlp.down_proj.weight.is_contiguous() and attn.o_proj.weight.is_contiguous()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied, one Parameter
    after = model_state(model)  # what a save would write: same names, same values
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert "layers.0.self_attn.qkv.weight" not in model.state_dict()  # derived, never saved
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"tie_embeddings": False, "n_kv_head": 4}])
def test_decode_layout_in_parts_computes_what_the_model_computes(kw):
    model = tiny(**kw)
    before = {k: v.clone() for k, v in model_state(model).items()}
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # two lengths: a padded batch, then batched decoding
    x = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        ref_logits = model(x)
        ref_cache = KVCache(model.cfg, 3, 21)
        model(x, cache=ref_cache)
        ref_step = model(x[:, :1], cache=ref_cache)
    expected = generate_batch(model, prompts, 12)
    decode_layout(model, parts=3)  # 3 does not divide every width: each matrix takes the most that do
    attn = model.layers[0].self_attn
    if kw.get("qk_norm"):  # the q/k norms sit between the projections and RoPE: q/k/v stay apart
        assert type(attn) is Attention and isinstance(attn.q_proj, SplitLinear)
    else:  # q 64 + k/v 2 x 32 (or 2 x 64) outputs: 128 in 2 parts (or 192 in 3), views of one memory
        parts = 3 if kw.get("n_kv_head") == 4 else 2
        assert attn.qkv.weight.shape == (parts, 64, 64)
        assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv.weight.untyped_storage().data_ptr()
    assert isinstance(model.lm_head, SplitLinear) and model.lm_head.parts_weight.shape == (3, 64, V // 3)
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight  # still one Parameter
    after = model_state(model)  # what a save would write: same names, same values
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("parts_weight" in k for k in model.state_dict())  # derived, never saved
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_logits, atol=1e-5, rtol=1e-5)
        cache = KVCache(model.cfg, 3, 21)
        model(x, cache=cache)
        torch.testing.assert_close(model(x[:, :1], cache=cache), ref_step, atol=1e-5, rtol=1e-5)
    assert generate_batch(model, prompts, 12) == expected


def test_decode_layout_leaves_lora_projections_unfused():
    model = tiny()
    apply_lora(model, rank=2, alpha=4.0)
    decode_layout(model)
    assert type(model.layers[0].self_attn) is Attention and type(model.layers[0].mlp) is MLP


# ---- packed int8 / int4 kernels ---------------------------------------------------------------------
def needs(kernel: str) -> None:
    if kernel_problem(kernel):
        pytest.skip(f"{kernel} does not run here: {kernel_problem(kernel)}")


@pytest.fixture
def fresh_kernels():
    """Kernel choices are cached per process; a test that breaks a kernel must not leak its choice."""

    def clear() -> None:
        quant.kernel_problem.cache_clear()
        quant.pick_kernel.cache_clear()
        quant._noted.clear()

    clear()
    yield
    clear()


def linear_with(n_out: int, n_in: int) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():  # rows of different ranges, as trained weights have
        lin.weight.copy_(torch.randn(n_out, n_in) * torch.linspace(0.05, 2.0, n_out)[:, None])
    return lin


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the packed kernels compute: activations rounded to bf16, fp32 sums, outputs rounded to bf16."""
    return F.linear(x.to(torch.bfloat16).float(), weight).to(torch.bfloat16).float()


# bf16 outputs carry 8 significant bits (relative step 2^-8): the packed kernels equal the reference
# within rtol 1e-2 (two steps) plus atol 1e-2 for outputs near zero, where sums cancel
PACKED_TOL = {"rtol": 1e-2, "atol": 1e-2}


@pytest.mark.parametrize("shape", [(48, 64), (7, 48), (320, 96)])
def test_int8pack_equals_the_reference_matmul(shape):
    needs("int8pack")
    torch.manual_seed(0)
    lin = linear_with(*shape)
    module = Int8Linear(lin, "int8pack")
    q, scale = int8_weights(lin.weight)
    ref_weight = q.float() * scale.to(torch.bfloat16).float()[:, None]  # the kernel's scales are bf16
    torch.testing.assert_close(module.dequantized(), ref_weight, rtol=0, atol=0)
    for x in (torch.randn(1, 1, shape[1]), torch.randn(3, 5, shape[1])):  # a decode step; a prompt batch
        with torch.no_grad():
            y = module(x)
        assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], shape[0])
        torch.testing.assert_close(y, bf16_linear(x, ref_weight), **PACKED_TOL)
        assert rel_err(y, F.linear(x, q.float() * scale[:, None])) < 1e-2  # against fp32 int8 too


def test_int4_weights_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.linspace(0.01, 3.0, 32)[:, None]
    q, scales_zeros = int4_weights(w, 32)
    assert q.dtype == torch.int32 and int(q.min()) == 0 and int(q.max()) == 15
    assert scales_zeros.shape == (128 // 32, 32, 2)  # (groups, outputs, scale and zero), aten's layout
    step = scales_zeros[..., 0].t().repeat_interleave(32, dim=1)  # each weight's group step, (32, 128)
    err = (int4_dequantized(q, scales_zeros) - w).abs()
    assert bool((err <= step / 2 + 1e-5).all()) and float(err.max()) > 1e-3  # really 4 bits


@pytest.mark.parametrize(
    ("shape", "group"), [((48, 64), 32), ((16, 128), 64), ((320, 256), 128), ((32, 256), 256)]
)
def test_int4pack_equals_the_reference_matmul(shape, group):
    needs("int4pack")
    torch.manual_seed(0)
    lin = linear_with(*shape)
    module = Int4Linear(lin, group, "int4pack")
    q, scales_zeros = int4_weights(lin.weight, group)
    assert torch.equal(module.codes(), q)  # the packed codes read back exactly
    ref_weight = int4_dequantized(q, scales_zeros.to(torch.bfloat16).float())  # its scales are bf16
    torch.testing.assert_close(module.dequantized(), ref_weight, rtol=0, atol=0)
    assert float((ref_weight - lin.weight.detach()).abs().max()) > 1e-3  # the weights really are 4-bit
    for x in (torch.randn(1, 1, shape[1]), torch.randn(3, 5, shape[1])):
        with torch.no_grad():
            y = module(x)
        torch.testing.assert_close(y, bf16_linear(x, ref_weight), **PACKED_TOL)
        assert rel_err(y, F.linear(x, int4_dequantized(q, scales_zeros))) < 1e-2  # against fp32 int4


def test_int8pack_refuses_inputs_it_cannot_read_and_quantize_model_routes_around_them():
    with pytest.raises(ChatforgeError, match="inputs in 16s, not 40"):
        Int8Linear(nn.Linear(40, 48, bias=False), "int8pack")  # it read past such rows
    needs("int8pack")
    model = tiny(n_embd=72, n_head=2, n_kv_head=2, intermediate_size=128)  # 72 inputs: not in 16s
    q = quantize_model(model, "int8", kernel="int8pack")
    assert quantization_kernels(q) == {"int8 dequant": 7, "int8 int8pack": 2}  # down_proj reads 128
    assert len(generate_batch(q, PROMPTS, 4)[0]) == 4


def test_int4_refuses_shapes_and_groups_its_layout_cannot_hold():
    with pytest.raises(ChatforgeError, match="outputs in 16s"):
        Int4Linear(nn.Linear(64, 300, bias=False), 32, "dequant")
    with pytest.raises(ChatforgeError, match="group size 16"):
        Int4Linear(nn.Linear(64, 32, bias=False), 16, "dequant")


class Rounded(nn.Linear):
    """The reference for a packed kernel: its fp32 weight values through bf16_linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(x, self.weight)


def reference_model(model: GPT, weights, rounded: bool = False) -> GPT:
    """The model with every matmul weight replaced by weights(linear), unfused, in fp32 F.linear
    (rounded: through bf16_linear, as the packed kernels compute). A tied lm_head gets its own
    Parameter, so the embedding lookup stays fp32 as quantize_model keeps it."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                m.weight = nn.Parameter(weights(m).clone())
                if rounded:
                    m.__class__ = Rounded
    return ref


def peaked(**kw) -> GPT:
    model = tiny(**kw)
    with torch.no_grad():  # larger weights: varied next-token choices instead of one repeated token
        for p in model.parameters():
            p.mul_(3.0)
    return model


PROMPTS = [[5, 17, 3, 42, 9, 11, 200], [1, 2], [7, 8, 9, 10]]


def int8_reference(m: nn.Linear, scale_dtype=torch.float32) -> torch.Tensor:
    q, scale = int8_weights(m.weight)
    return q.float() * scale.to(scale_dtype).float()[:, None]


def int4_reference(m: nn.Linear, scale_dtype=torch.float32) -> torch.Tensor:
    q, scales_zeros = int4_weights(m.weight, 32)
    return int4_dequantized(q, scales_zeros.to(scale_dtype).float())


@pytest.mark.parametrize("kernel", ["int8pack", "dequant"])
def test_engine_greedy_with_packed_int8_equals_the_reference_int8_path(kernel):
    # the same int8 values in plain F.linear, unfused (for int8pack: with its bf16 scales, activations
    # and outputs): the engine gives the same tokens
    needs(kernel)
    model = peaked()
    packed = kernel == "int8pack"
    weights = partial(int8_reference, scale_dtype=torch.bfloat16 if packed else torch.float32)
    expected = generate_batch(reference_model(model, weights, rounded=packed), PROMPTS, 16)
    q = quantize_model(copy.deepcopy(model), "int8", kernel=kernel)
    assert quantization_kernels(q) == {f"int8 {kernel}": 9}
    got = generate_batch(q, PROMPTS, 16)
    assert got == expected and len({t for row in got for t in row}) > 10  # not one repeated token
    assert generate_batch(model, PROMPTS, 16) != expected  # int8 really changes something here


def test_engine_greedy_with_packed_int4_equals_the_reference_int4_path():
    # vocab 320 = 20 x 16: lm_head is int4 too
    needs("int4pack")
    model = peaked(vocab_size=320)
    weights = partial(int4_reference, scale_dtype=torch.bfloat16)
    expected = generate_batch(reference_model(model, weights, rounded=True), PROMPTS, 16)
    q = quantize_model(copy.deepcopy(model), "int4", group_size=32)
    assert quantization_kernels(q) == {"int4 int4pack": 9}
    got = generate_batch(q, PROMPTS, 16)
    assert got == expected and len({t for row in got for t in row}) > 10
    assert generate_batch(model, PROMPTS, 16) != expected


def test_int4_keeps_matrices_its_layout_cannot_hold_in_int8():
    needs("int4pack")
    q = quantize_model(peaked(), "int4", group_size=32)  # vocab 300 is not a multiple of 16
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.layers[0].mlp.down_proj, Int4Linear)
    assert quantization_kernels(q) == {"int4 int4pack": 8, f"int8 {pick_kernel('int8')}": 1}
    assert len(generate_batch(q, PROMPTS, 4)[0]) == 4


def missing(name: str):
    def op(*args, **kwargs):
        raise AttributeError(f"'_OpNamespace' 'aten' object has no attribute '{name}'")

    return op


def test_a_missing_kernel_falls_back_with_one_line(monkeypatch, capsys, fresh_kernels):
    for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"):
        monkeypatch.setattr(torch.ops.aten, name, missing(name))
    model = peaked(vocab_size=320)  # every matrix fits int4
    q8 = quantize_model(copy.deepcopy(model), "int8", kernel="int8pack")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "int8pack kernel unavailable" in lines[0] and "_weight_int8pack_mm" in lines[0]
    assert pick_kernel("int8", "int8pack") != "int8pack" and quantization_kernels(q8) != {"int8 int8pack": 9}
    assert len(generate_batch(q8, PROMPTS, 6)[0]) == 6  # still generates
    q4 = quantize_model(copy.deepcopy(model), "int4", group_size=32)
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "int4pack kernel unavailable" in line and line.endswith("using dequant")
    int4_values = reference_model(model, int4_reference)
    assert generate_batch(q4, PROMPTS, 10) == generate_batch(int4_values, PROMPTS, 10)  # same values, in fp32


def test_kernel_choice_is_refused_in_one_line_when_unknown():
    with pytest.raises(ChatforgeError, match="unknown kernel 'int4pack'") as e:
        quantize_model(tiny(), "int8", kernel="int4pack")
    assert "\n" not in str(e.value) and "int8pack" in str(e.value)


def _engine_steps(model: GPT, prompts: list[list[int]], n: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each decode step's logits (through the engine's own cache and padding) and the greedy ids."""
    seen: list[torch.Tensor] = []
    name = "decode_step" if model.decode_step is not None else "forward"  # what the engine's steps call
    forward = getattr(model, name)

    def spy(idx, *a, **kw):
        out = forward(idx, *a, **kw)
        if idx.size(1) == 1:
            seen.append(out.detach().clone())
        return out

    setattr(model, name, spy)
    try:
        decoder = BatchDecoder(model, capacity=len(prompts), max_len=64)
        rows = [Row(prompt=p, budget=n) for p in prompts]
        out = {id(r): [] for r in rows}
        with torch.inference_mode():
            for row, t, _ in decoder.admit(rows):
                out[id(row)].append(t)
            while decoder.rows:
                for row, t, _ in decoder.step():
                    out[id(row)].append(t)
    finally:
        if name == "decode_step":
            model.decode_step = forward
        else:
            del model.forward
    return seen, [out[id(r)] for r in rows]


@pytest.mark.skipif(quant.compile_problem() is not None, reason="torch.compile needs a C++ compiler")
def test_compiled_decode_steps_compute_what_eager_steps_compute(tmp_path, monkeypatch):
    """The compiled step (one graph, dynamic in cache length and batch) against the same model eager,
    with left-padded rows of two lengths: every step's logits within float rounding, same tokens.
    The tiny model's lm_head (300 outputs) does not fit int4's layout and stays int8 (fbgemm), which
    the compiled step calls eagerly: both paths are covered."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    eager = quant.inference_model(tiny(), "int4")  # the format it is for (about 30 s to compile here)
    compiled = quant.compile_decode(quant.inference_model(tiny(), "int4"))
    assert set(quant.quantization_kernels(compiled)) == {"int4 int4pack", f"int8 {pick_kernel('int8')}"}
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    want_logits, want = _engine_steps(eager, prompts, 6)
    got_logits, got = _engine_steps(compiled, prompts, 6)
    assert got == want
    assert len(got_logits) == len(want_logits) == 5
    for g, w in zip(got_logits, want_logits, strict=True):
        assert g.shape == w.shape and rel_err(g, w) < 1e-3
    _, one = _engine_steps(compiled, [[3, 4, 5]], 4)  # batch 1, no padding: the same graph or one more
    assert one == _engine_steps(eager, [[3, 4, 5]], 4)[1]
    assert any(tmp_path.iterdir())  # kernels kept on disk for the next process


def test_compile_without_a_compiler_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(quant.shutil, "which", lambda name: None)
    with pytest.raises(ChatforgeError, match="no C.. compiler"):
        quant.compile_decode(tiny())


@pytest.mark.skipif(kernel_problem("fbgemm") is not None, reason="fbgemm is not built into this torch")
def test_compile_refuses_a_model_of_fbgemm_int8_matrices_in_one_line():
    model = quantize_model(tiny(), "int8", "fbgemm")
    with pytest.raises(ChatforgeError, match="does not speed up int8's fbgemm kernel; use --quantize int4"):
        quant.compile_decode(model)
    assert model.decode_step is None
