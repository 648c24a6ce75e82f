import copy

import pytest
import torch
import torch.nn as nn

from chatforge.checkpoint import model_state
from chatforge.engine import generate, generate_batch
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, MLP, Attention, GPTConfig, KVCache
from chatforge.model.lora import apply_lora
from chatforge.model.quant import (
    FusedAttention,
    FusedMLP,
    Int8Linear,
    SplitLinear,
    decode_layout,
    int8_weights,
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
def test_int8_logits_close_to_fp32(tie):
    model = tiny(tie_embeddings=tie)
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref_full, ref_steps = model(x), stepwise(model, x)
    q = quantize_model(copy.deepcopy(model), "int8")
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 7 + 1 and not any(isinstance(m, nn.Linear) for m in q.modules())
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


@pytest.mark.parametrize("mode", ["int4", "fp16", "", "INT8"])
def test_unknown_modes_are_refused_in_one_line(mode):
    with pytest.raises(ChatforgeError, match="unknown quantization") as e:
        quantize_model(tiny(), mode)
    assert "\n" not in str(e.value) and "bf16, int8" in str(e.value)


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
    assert attn.qkv_weight.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, 64)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert mlp.gate_up_weight.shape == (2 * mlp.up_proj.out_features, 64)
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    # the faster memory order per shape: column-major when wider than tall, row-major otherwise
    assert attn.qkv_weight.t().is_contiguous() and model.lm_head.weight.t().is_contiguous()
    assert mlp.down_proj.weight.is_contiguous() and attn.o_proj.weight.is_contiguous()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied, one Parameter
    after = model_state(model)  # what a save would write: same names, same values
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert "layers.0.self_attn.qkv_weight" not in model.state_dict()  # derived, never saved
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
        assert attn.qkv_weight.shape == (parts, 64, 64)
        assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
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
