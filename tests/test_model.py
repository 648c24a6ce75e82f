import pytest
import torch

from chatforge.engine import generate, sample_next
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig, KVCache, apply_rope, rope_tables


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        **{"vocab_size": 97, "seq_len": 32, "n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2, **kw}
    )
    return GPT(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"tie_embeddings": False}, {"n_kv_head": 4}])
def test_causality(kw):
    model = tiny(**kw)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}])
def test_kv_cache_matches_full_forward(kw):
    model = tiny(**kw)
    x = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 3, 24)
        parts = [model(x[:, :10], cache=cache)]  # prefill
        parts.append(model(x[:, 10:15], cache=cache))  # a chunk after a prefix
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(15, 24)]  # one token at a time
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_cache_equals_without():
    model = tiny()
    prompt = [5, 17, 3, 42]
    new = list(generate(model, prompt, 12, temperature=0.0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert new == ids[len(prompt) :]


def test_sampling_reproducible_with_seed_and_filters():
    model = tiny()
    a = list(generate(model, [1, 2, 3], 10, temperature=1.0, top_k=5, seed=7))
    b = list(generate(model, [1, 2, 3], 10, temperature=1.0, top_k=5, seed=7))
    assert a == b
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(50)}
    assert draws <= {1, 2}
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {1}


def test_generation_respects_context_and_stop():
    model = tiny()
    with pytest.raises(ChatforgeError, match="context"):
        list(generate(model, list(range(30)), 5))
    first = next(generate(model, [1, 2], 1, temperature=0.0))
    assert list(generate(model, [1, 2], 10, temperature=0.0, stop_ids=[first])) == [first]


def test_loss_ignores_masked_targets():
    model = tiny()
    x = torch.randint(0, 97, (1, 8))
    y = torch.randint(0, 97, (1, 8))
    masked = y.clone()
    masked[:, :4] = -1
    with torch.no_grad():
        per_token = model(x, y, loss_reduction="none")
        assert torch.allclose(model(x, masked), per_token[4:].mean())


def test_depth_dial_and_sizes():
    cfg = GPTConfig.from_depth(4, vocab_size=4096, seq_len=256)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_dim) == (4, 256, 4, 64)
    wide = GPTConfig.from_depth(4, vocab_size=4096, seq_len=256, n_embd=384, n_kv_head=2)
    assert (wide.n_layer, wide.n_embd, wide.n_head, wide.n_kv_head) == (4, 384, 6, 2)
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    per_layer = 4 * 256 * 256 + 3 * 256 * cfg.intermediate_size + 2 * 256
    assert n == model.num_params() == 4096 * 256 + 4 * per_layer + 256
    assert model.flops_per_token() == 6 * (n - 4096 * 256 + 4096 * 256) + 12 * 4 * 4 * 64 * 256
    assert GPT(GPTConfig.from_depth(4, 4096, 256, tie_embeddings=False)).num_params() == n + 4096 * 256


def test_bad_configs_raise_one_line_errors():
    with pytest.raises(ChatforgeError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ChatforgeError, match="n_kv_head"):
        GPTConfig(n_embd=64, n_head=4, n_kv_head=3)
    with pytest.raises(ChatforgeError, match="unknown model config"):
        GPTConfig.from_dict({"n_layer": 2, "bogus": 1})


def test_depth_dial_rejects_unknown_or_data_owned_settings():
    with pytest.raises(ChatforgeError, match="unknown model setting"):
        GPTConfig.from_depth(2, 97, 32, n_embdd=64)
    with pytest.raises(ChatforgeError, match="seq_len"):
        GPTConfig.from_depth(2, 97, 32, overrides={"seq_len": 64})


def test_rope_matches_hf_rotate_half():
    # HF Llama: q * cos + rotate_half(q) * sin, rotate_half(x) = cat(-x2, x1), with plain (unsigned) tables
    model = tiny()
    cfg = model.cfg
    T, half = 12, cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    angles = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x = torch.randn(2, cfg.n_head, T, cfg.head_dim)
    expected = x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
    torch.testing.assert_close(apply_rope(x, *rope_tables(cfg, T)), expected)
    torch.testing.assert_close(apply_rope(x, model.rope_cos[:T], model.rope_sin[:T]), expected)


def test_lengthen_context_stretches_the_slowest_rotation_and_keeps_the_fastest():
    model = tiny()
    old = model.cfg

    def inv_freq(cfg):
        return 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim)

    model.lengthen_context(4 * old.seq_len)
    new = model.cfg
    assert new.seq_len == 4 * old.seq_len and new.rope_theta > old.rope_theta
    # the slowest pair turns as far over the new context as it did over the old one; the fastest is unchanged
    assert (inv_freq(new)[-1] * new.seq_len).item() == pytest.approx((inv_freq(old)[-1] * old.seq_len).item())
    assert inv_freq(new)[0].item() == inv_freq(old)[0].item() == 1.0
    torch.testing.assert_close(model.rope_cos, rope_tables(new, new.seq_len)[0])
    model(torch.zeros(1, new.seq_len, dtype=torch.long))  # a whole new-length row runs


def test_last_only_gives_the_last_position():
    model = tiny()
    x = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        full = model(x)
        last = model(x, last_only=True)
        cache = KVCache(model.cfg, 3, 16)
        prefill = model(x[:, :10], cache=cache, last_only=True)
        step = model(x[:, 10:], cache=cache, last_only=True)  # a chunk after a prefix
    assert last.shape == (3, 1, 97) and prefill.shape == (3, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefill, full[:, 9:10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error_and_leaves_the_cache_alone():
    model = tiny()
    cache = KVCache(model.cfg, 1, 8)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 6)), cache=cache)
        with pytest.raises(ChatforgeError, match="context overflow: 9 tokens > cache size 8"):
            model(torch.randint(0, 97, (1, 3)), cache=cache)
        assert cache.pos == 6
        model(torch.randint(0, 97, (1, 2)), cache=cache)  # exactly full is fine
    assert cache.pos == 8
