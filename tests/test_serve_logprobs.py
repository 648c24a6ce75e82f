"""`/v1/completions` with `logprobs` (and `echo`), what lm-evaluation-harness's local-completions
model asks for: each token's log-probability equals the model's own, scored by hand here; the top
alternatives are the model's most likely tokens; the generated token is the greedy one. And
`/v1/chat/completions` with `logprobs`/`top_logprobs`, in OpenAI's chat shape, scored the same way."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from test_serve import MODEL_ID, TEXTS, serve, tiny_model

from chatforge.align import scored_tokens
from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.engine import generate
from chatforge.serve.app import create_app
from chatforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def client(model, tok):
    with serve(create_app(model, tok, model_id=MODEL_ID, max_batch=8)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def by_hand(model, ids: list[int]) -> list[torch.Tensor]:
    """log softmax of the model's logits before each token after the first."""
    with torch.no_grad():
        return list(torch.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], dim=-1))


def test_scored_tokens_are_the_models_log_probabilities(model):
    seqs = [[5, 17, 40, 99, 3], [8, 9], [7]]
    scored = scored_tokens(model, seqs, top_k=3, batch_size=2)  # rows of different lengths share a batch
    assert [len(s) for s in scored] == [4, 1, 0]
    for seq, rows in zip(seqs[:2], scored[:2], strict=True):
        for t, ((lp, top), dist) in enumerate(zip(rows, by_hand(model, seq), strict=True)):
            assert lp == pytest.approx(dist[seq[t + 1]].item(), abs=1e-5)
            best = dist.topk(3)
            assert [i for i, _ in top] == best.indices.tolist()
            assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_echo_logprobs_as_lm_eval_reads_them(client, model, tok):
    ids = tok.start_ids() + tok.encode("The quick brown fox")
    r = client.completions.create(
        model=MODEL_ID, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    dists = by_hand(model, ids + [0])
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(dists[t - 1][ids[t]].item(), abs=1e-4)
        (value,) = lp.top_logprobs[t].values()
        assert value == pytest.approx(dists[t - 1].max().item(), abs=1e-4)
    greedy = int(dists[len(ids) - 1].argmax())  # the one generated token: greedy, with its score
    assert lp.tokens[-1] == tok.decode([greedy])
    assert lp.token_logprobs[-1] == pytest.approx(dists[len(ids) - 1].max().item(), abs=1e-4)
    assert "".join(lp.tokens) == r.choices[0].text
    # lm-eval's log-likelihood of the continuation: the sum over its tokens (between ctxlen and the last)
    ctxlen = 3
    total = sum(lp.token_logprobs[ctxlen:-1])
    assert total == pytest.approx(sum(dists[t - 1][ids[t]].item() for t in range(ctxlen, len(ids))), abs=1e-3)
    assert math.isfinite(total)


def test_logprobs_without_echo_cover_the_answer_only(client, tok):
    r = client.completions.create(model=MODEL_ID, prompt="The quick", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens and all(v is not None for v in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2, logprobs=1, stream=True)


def test_chat_logprobs_are_the_models(client, model, tok):
    msgs = [{"role": "user", "content": "The quick brown fox"}]
    r = client.chat.completions.create(
        model=MODEL_ID, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    prompt = render_prompt(tok, msgs)
    answer = list(generate(model, prompt, 6, stop_ids=turn_end_ids(tok)))  # greedy: what the server said
    answer = answer[:-1] if answer[-1] in turn_end_ids(tok) else answer  # a stop id is not content
    dists = by_hand(model, prompt + answer + [0])[len(prompt) - 1 :]
    content = r.choices[0].logprobs.content
    assert len(content) == len(answer) > 0
    for entry, t, dist in zip(content, answer, dists, strict=False):
        assert entry.token == tok.decode([t]) and bytes(entry.bytes) == tok.decode_bytes([t])
        assert entry.logprob == pytest.approx(dist[t].item(), abs=1e-4)
        best = dist.topk(3)
        assert [tok.decode([i]) for i in best.indices.tolist()] == [a.token for a in entry.top_logprobs]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    # a token may hold part of a character (its `token` then shows U+FFFD): its bytes are exact
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == r.choices[0].message.content
    plain = client.chat.completions.create(
        model=MODEL_ID, messages=msgs, max_tokens=3, temperature=0, logprobs=True
    )
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert (
        client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=3).choices[0].logprobs
        is None
    )


def test_chat_logprobs_refused_where_not_given(client):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(
            model=MODEL_ID, messages=msgs, max_tokens=2, logprobs=True, stream=True
        )
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=2, top_logprobs=2)
