"""Fitting bigger models and training faster: activation checkpointing gives the same gradients while
keeping less for backward, every GPU preset's memory plan fits the GPU it names, and the faster kernel
path (bf16 autocast on a CPU with native bf16) stays within tolerance of fp32."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatforge.config import PRESETS, get_preset
from chatforge.device import autocast, cpu_has_native_bf16
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.plan import describe_plan, fits, plan


def saved_bytes_and_grads(model: GPT, idx: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for backward in one forward pass, and the gradients of the loss."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return kept, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, seq_len=32, n_layer=3, n_embd=64, n_head=4, n_kv_head=2))
    idx = torch.randint(0, 97, (4, 33))
    kept_plain, grads_plain = saved_bytes_and_grads(model, idx)
    model.set_activation_checkpointing(True)
    kept_ckpt, grads_ckpt = saved_bytes_and_grads(model, idx)
    assert kept_ckpt < kept_plain / 2
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-7)
    # generation never checkpoints: no gradients there to save memory for
    with torch.no_grad():
        torch.testing.assert_close(model(idx), (model.set_activation_checkpointing(False), model(idx))[1])


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.gpu])
def test_every_gpu_preset_fits_the_gpu_it_names(name):
    preset = get_preset(name)
    p = plan(preset.pretrain, preset.vocab_size, world_size=preset.gpus)
    assert fits(p, preset.gpu), describe_plan(preset.pretrain, preset.vocab_size, preset.gpus, preset.gpu)
    assert p["tokens_per_step"] == preset.pretrain.total_batch_tokens
    text = describe_plan(preset.pretrain, preset.vocab_size, preset.gpus, preset.gpu)
    assert f"fits {preset.gpus} x {preset.gpu}" in text


def test_the_memory_plan_counts_batch_checkpointing_and_sharding():
    d20 = get_preset("d20")
    at = lambda **kw: plan(dataclasses.replace(d20.pretrain, **kw), d20.vocab_size, world_size=8)  # noqa: E731
    base = at()
    assert not fits(at(device_batch_size=32), "H100")  # the recipe as it stood: ~96 GiB per GPU
    assert at(device_batch_size=32)["grad_accum"] == 1 and base["grad_accum"] == 2
    checkpointed = at(device_batch_size=32, activation_checkpointing=True)
    assert checkpointed["memory_gib_activations"] < base["memory_gib_activations"] and fits(
        checkpointed, "H100"
    )
    sharded = at(parallel="fsdp")
    assert sharded["memory_gib_state"] < base["memory_gib_state"] / 3
    assert sharded["memory_gib_activations"] == base["memory_gib_activations"]
    with pytest.raises(ChatforgeError, match="not a multiple"):
        at(device_batch_size=24)


# ---- faster kernel paths, each against the fp32 reference ----------------------------------


def tiny_model_and_batch() -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, seq_len=32, n_layer=2, n_embd=64, n_head=4, n_kv_head=2))
    return model, torch.randint(0, 97, (4, 33))


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_autocast_on_a_cpu_stays_near_fp32():
    model, idx = tiny_model_and_batch()
    _, want = saved_bytes_and_grads(model, idx)
    with torch.no_grad():
        loss32 = float(model(idx[:, :-1], idx[:, 1:]))
    with autocast(torch.device("cpu"), "bf16"):
        with torch.no_grad():
            loss16 = model(idx[:, :-1], idx[:, 1:])
        _, got = saved_bytes_and_grads(model, idx)
    assert loss16.dtype == torch.float32 and float(loss16) == pytest.approx(loss32, rel=1e-2)
    for name, grad in want.items():  # bf16 keeps 8 bits of mantissa: directions agree, not digits
        cos = torch.nn.functional.cosine_similarity(got[name].flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, name


def test_bf16_on_a_cpu_without_native_bf16_is_refused(monkeypatch):
    import chatforge.device as device

    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(ChatforgeError, match="precision=fp32"):
        autocast(torch.device("cpu"), "bf16")
    with pytest.raises(ChatforgeError, match="unknown precision"):
        autocast(torch.device("cpu"), "fp16")
