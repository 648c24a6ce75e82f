"""GCG adversarial suffixes and the perplexity filter, on tiny models: the one-hot gradient equals finite
differences, the cached batched candidate loss equals a plain forward, the attack lowers the target
loss and makes greedy decoding write the target, candidates never hold special tokens, the filter flags
a random-token suffix and passes a benign sentence, and bad input gets one line."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from chatforge.chat_format import render_prompt
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.quant import quantize_model
from chatforge.redteam.defenses import DefenseStack, InputBlocked
from chatforge.redteam.gcg import (
    allowed_tokens,
    candidate_losses,
    gcg_attack,
    one_hot_gradient,
    prefix_cache,
    sample_candidates,
    suffix_slot,
    suffix_success,
    universal_gcg,
)
from chatforge.redteam.perplexity import calibrate_threshold, max_window_perplexities, perplexity_filter
from chatforge.tokenizer import Tokenizer

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "the baker"]
VERBS = ["walks to", "looks at", "talks about", "runs past", "paints", "visits"]
OBJECTS = ["the park", "the river", "a small house", "the old bridge", "the market", "the garden"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} today." for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tok()


def make_tok() -> Tokenizer:
    words = " ".join(SUBJECTS + VERBS + OBJECTS)
    texts = (
        sentences(300, 0)
        + [words, "Sure, here is how. Tell me a story! ? ; : ( ) [ ] 0123456789 xyz qvw"] * 5
    )
    return Tokenizer.train(texts, 400)


def tiny_model(tok: Tokenizer, seed: int = 0, std: float = 0.02) -> GPT:
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    )
    if std != 0.02:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tok) -> GPT:
    """A tiny GPT trained 80 steps on ordinary sentences: they are likely under it, random tokens are not."""
    model = tiny_model(tok, seed=1)
    model.train()
    ids = [tok.start_ids() + tok.encode(s) for s in sentences(400, 2)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(3)
    for _ in range(80):
        rows = rng.sample(ids, 16)
        width = max(map(len, rows))
        x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        y = torch.tensor([r[1:] + [-1] * (width - len(r) + 1) for r in rows])
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_one_hot_gradient_equals_finite_differences(tok):
    model = tiny_model(tok, std=0.2).double()
    slot = suffix_slot(tok, "the cat walks to", "Sure")
    suffix = torch.tensor(tok.encode(" ! ! !"))
    grad, loss = one_hot_gradient(model, [slot], suffix)
    weight = model.embed_tokens.weight.detach()

    def loss_at(pos: int, token: int, eps: float) -> float:
        one_hot = F.one_hot(suffix, weight.size(0)).double()
        one_hot[pos, token] += eps
        embeds = torch.cat([weight[slot.before], one_hot @ weight, weight[slot.after + slot.target]])[None]
        logits = model(None, inputs_embeds=embeds)[0]
        t, n = len(slot.target), embeds.size(1)
        return float(F.cross_entropy(logits.detach()[n - t - 1 : n - 1], torch.tensor(slot.target)))

    assert loss_at(0, 0, 0.0) == pytest.approx(loss, rel=1e-9)
    for pos, token in [(0, 50), (1, 300), (2, int(suffix[2]))]:
        eps = 1e-5
        numeric = (loss_at(pos, token, eps) - loss_at(pos, token, -eps)) / (2 * eps)
        assert float(grad[pos, token]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_cached_candidate_losses_equal_a_plain_forward(tok):
    model = tiny_model(tok, std=0.2)
    slot = suffix_slot(tok, "my friend paints", "Sure, here")
    candidates = torch.tensor(
        [tok.encode(" ! ! ! !")[:4], tok.encode(" the park x y")[:4], [300, 301, 302, 303]]
    )
    losses, hits = candidate_losses(model, slot, prefix_cache(model, slot.before), candidates, chunk=2)
    for row, loss, hit in zip(candidates.tolist(), losses, hits, strict=True):
        ids = torch.tensor([slot.before + row + slot.after + slot.target])
        with torch.no_grad():
            logits = model(ids)[0]
        t, n = len(slot.target), ids.size(1)
        want = logits[n - t - 1 : n - 1]
        assert float(loss) == pytest.approx(float(F.cross_entropy(want, torch.tensor(slot.target))), abs=1e-5)
        assert bool(hit) == bool((want.argmax(-1) == torch.tensor(slot.target)).all())


def test_suffix_sits_at_the_end_of_the_users_text(tok):
    slot = suffix_slot(tok, "the cat walks to", "Sure")
    suffix = tok.encode(" ! !")
    assert slot.before + suffix + slot.after == render_prompt(
        tok, [{"role": "user", "content": "the cat walks to ! !"}]
    )


def test_gcg_lowers_the_loss_and_greedy_decoding_writes_the_target(tok):
    torch.manual_seed(0)
    model = tiny_model(tok, seed=4, std=0.3)
    goal, target = "the teacher visits the market", "Sure"
    before = suffix_success(model, tok, [goal], target, " ! ! ! ! !")
    assert not before[0][1]
    result = gcg_attack(model, tok, goal, target, suffix_len=5, steps=40, top_k=32, batch=64, seed=0)
    assert result.success_step is not None and result.success_step <= 40
    assert result.loss_curve[-1] < result.loss_curve[0]
    drops = sum(b <= a + 1e-6 for a, b in zip(result.loss_curve, result.loss_curve[1:], strict=False))
    # the best candidate is kept even when worse than the suffix before it: mostly down, not always
    assert drops >= 0.6 * (len(result.loss_curve) - 1)
    assert not set(result.suffix_ids) & tok.special_ids
    ((answer, ok),) = suffix_success(model, tok, [goal], target, result.suffix_text)
    assert ok, answer  # re-rendered from the text and decoded by the engine, as chat would
    again = gcg_attack(model, tok, goal, target, suffix_len=5, steps=40, top_k=32, batch=64, seed=0)
    assert again.suffix_ids == result.suffix_ids and again.loss_curve == result.loss_curve


def test_universal_suffix_adds_goals_incrementally(tok):
    model = tiny_model(tok, seed=4, std=0.3)
    goals = ["the teacher visits the market", "a dog runs past the river"]
    result = universal_gcg(model, tok, goals, "Sure", suffix_len=5, steps=60, top_k=32, batch=64, seed=1)
    assert result.history[0]["goals"] == 1
    assert result.success_step is not None and result.goals_used == 2
    assert all(ok for _, ok in suffix_success(model, tok, goals, "Sure", result.suffix_text))


def test_candidates_never_hold_special_tokens(tok):
    allowed = allowed_tokens(tok, tok.vocab_size + 16)  # a model vocabulary larger than the tokenizer's
    specials = sorted(tok.special_ids)
    assert not allowed[specials].any() and not allowed[tok.vocab_size :].any()
    grad = torch.zeros(4, tok.vocab_size + 16)
    grad[:, specials] = -100.0  # the gradient prefers the special tokens: they must still not appear
    grad[:, tok.vocab_size :] = -100.0
    suffix = torch.full((4,), int(allowed.nonzero()[0]))
    candidates = sample_candidates(suffix, grad, allowed, 8, 200, torch.Generator().manual_seed(0))
    assert allowed[candidates].all()
    for i in allowed.nonzero().flatten().tolist():
        assert tok.encode(tok.decode([i])) == [i]


def test_perplexity_filter_flags_a_random_suffix_and_passes_a_benign_sentence(tok, trained):
    benign = sentences(60, 9)
    threshold = calibrate_threshold(trained, tok, benign, false_positive_rate=0.0)
    assert max(max_window_perplexities(trained, tok, benign)) == threshold
    flagged, ppl = perplexity_filter(
        trained, tok, "the baker looks at the old bridge today.", threshold=threshold
    )
    assert not flagged and ppl <= threshold
    rng = random.Random(5)
    noise = tok.decode(rng.sample(allowed_tokens(tok, tok.vocab_size).nonzero().flatten().tolist(), 12))
    flagged, ppl = perplexity_filter(
        trained, tok, "the baker looks at the old bridge today." + noise, threshold=threshold
    )
    assert flagged and ppl > threshold


def test_calibration_keeps_the_false_positive_rate(tok, trained):
    benign = sentences(50, 11) + ["zq xv 7 ]( ;;"]  # one odd benign text
    threshold = calibrate_threshold(trained, tok, benign, false_positive_rate=0.02)
    scores = max_window_perplexities(trained, tok, benign)
    assert sum(s > threshold for s in scores) <= 1


def test_bad_input_gets_one_line(tok):
    model = tiny_model(tok)
    with pytest.raises(ChatforgeError, match="load it in fp32"):
        gcg_attack(quantize_model(copy.deepcopy(model), "int8"), tok, "the cat", "Sure", steps=1)
    with pytest.raises(ChatforgeError, match="load it in fp32"):
        gcg_attack(copy.deepcopy(model).to(torch.bfloat16), tok, "the cat", "Sure", steps=1)
    with pytest.raises(ChatforgeError, match="goal must be a non-empty"):
        gcg_attack(model, tok, "  ", "Sure", steps=1)
    with pytest.raises(ChatforgeError, match="target must be a non-empty"):
        gcg_attack(model, tok, "the cat", "", steps=1)
    with pytest.raises(ChatforgeError, match="steps must be an integer"):
        gcg_attack(model, tok, "the cat", "Sure", steps=0)
    with pytest.raises(ChatforgeError, match="2 goals but 3 targets"):
        universal_gcg(model, tok, ["a", "b"], ["x", "y", "z"], steps=1)
    with pytest.raises(ChatforgeError, match="at least one goal"):
        universal_gcg(model, tok, [], "Sure", steps=1)
    with pytest.raises(ChatforgeError, match="window must be"):
        max_window_perplexities(model, tok, ["hi"], window=0)
    with pytest.raises(ChatforgeError, match="threshold must be a positive"):
        perplexity_filter(model, tok, "hi", threshold=-1)
    with pytest.raises(ChatforgeError, match="needs benign prompts"):
        calibrate_threshold(model, tok, [])
    with pytest.raises(ChatforgeError, match="false_positive_rate"):
        calibrate_threshold(model, tok, ["hi"], false_positive_rate=1.0)


def test_perplexity_defense_blocks_a_gcg_style_suffix_through_the_stack(tok, trained):
    benign = sentences(60, 9)
    threshold = calibrate_threshold(trained, tok, benign, false_positive_rate=0.0)
    stack = DefenseStack(("perplexity",), model=trained, tok=tok, perplexity_threshold=threshold)
    plain = [{"role": "user", "content": "the baker looks at the old bridge today."}]
    assert stack.prepare(plain) == plain
    rng = random.Random(5)
    noise = tok.decode(rng.sample(allowed_tokens(tok, tok.vocab_size).nonzero().flatten().tolist(), 12))
    with pytest.raises(InputBlocked, match="perplexity"):
        stack.prepare([{"role": "user", "content": plain[0]["content"] + noise}])
    with pytest.raises(ChatforgeError, match="scores text with the model"):
        DefenseStack(("perplexity",)).prepare(plain)
