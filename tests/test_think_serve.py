"""The server's "think" field: a thinking strategy beside the OpenAI fields, its tokens in `usage`."""

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from chatforge import engine  # noqa: E402
from chatforge.align.reward import RewardModel  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def client():
    tok = Tokenizer.train(["Make 24 from 1 1 4 6. 4 * 6 = 24 (left: 24)\nAnswer: 4 * 6 = 24"] * 20, 300)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    ).eval()
    app = create_app(model, tok, model_id="tiny", store=None, max_batch=4)
    with TestClient(app, base_url="http://localhost") as c:
        yield c


def ask(client, **extra):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Make 24 from 1 1 4 6."}],
        "max_tokens": 12,
    }
    return client.post("/v1/chat/completions", json={**body, **extra})


def test_think_field_counts_every_generated_token_in_usage(client, monkeypatch):
    seen = {"tokens": 0}
    real = engine.stream_batch

    def counting(*a, **kw):
        for event in real(*a, **kw):
            seen["tokens"] += 1
            yield event

    monkeypatch.setattr(engine, "stream_batch", counting)
    r = ask(client, think="vote:3", seed=5)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == usage["think"]["generated_tokens"] == seen["tokens"] > 0
    assert usage["think"]["strategy"] == "vote:3"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
    again = ask(client, think={"strategy": "vote", "n": 3}, seed=5).json()
    assert again["choices"][0]["message"] == r.json()["choices"][0]["message"]


def test_plain_requests_are_unchanged_and_bad_think_is_a_400(client):
    plain = ask(client, temperature=0)
    assert plain.status_code == 200 and "think" not in plain.json()["usage"]
    for think, says in (
        ("vote:0", "at least 1"),
        ("ponder", "unknown thinking strategy"),
        ("tree:b2d2", "start chatforge serve with --prm RUN"),
    ):
        r = ask(client, think=think)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "think"
    r = ask(client, think="vote:2", stream=True)
    assert r.status_code == 400 and "drop stream" in r.json()["error"]["message"]


def test_a_server_given_a_prm_ranks_with_it():
    tok = Tokenizer.train(["Make 24 from 1 1 4 6. 4 * 6 = 24 (left: 24)\nAnswer: 4 * 6 = 24"] * 20, 300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=128, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    model, prm = GPT(cfg).eval(), RewardModel(GPT(cfg)).eval()
    app = create_app(model, tok, model_id="tiny", store=None, max_batch=4, verifiers={"prm": prm})
    with TestClient(app, base_url="http://localhost") as c:
        for think in ("best-of:2:prm", "tree:b2d2"):
            r = ask(c, think=think, seed=1)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["think"]["verifier_tokens"] > 0
        r = ask(c, think="best-of:2:orm")  # an ORM was not given
        assert r.status_code == 400 and "start chatforge serve with --orm RUN" in r.json()["error"]["message"]
