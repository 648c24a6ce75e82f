"""Answering from a collection through the one prompt builder: `chatforge chat --rag` (-p and the
session) and the API's `collection` field give the engine the same prompt; re-ranking by the model."""

from __future__ import annotations

import io

import pytest
import torch

from chatforge.chat import ChatSession, cmd_chat
from chatforge.chat_format import render_prompt, turn_end_ids
from chatforge.checkpoint import save_model
from chatforge.engine import generate_batch
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.options import ChatOptions, RagEvalOptions
from chatforge.options import parse as parse_options
from chatforge.rag.answer import rag_prompt
from chatforge.rag.command import add_files
from chatforge.rag.embed import HashEmbedder
from chatforge.rag.retrieve import Hit, rerank_by_likelihood
from chatforge.rag.store import ROOT_ENV, Collection, StoredChunk
from chatforge.terminal import strip_controls
from chatforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run faster on one thread

TEXTS = ["The lighthouse keeper is Marta Quill. She lives on Gull Rock.",
         "Tea is brewed at ninety degrees. The kettle is copper."] * 20  # fmt: skip
QUESTION = "Who is the lighthouse keeper?"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=512, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("rag")
    (d / "keeper.md").write_text("# Lighthouse\n\nThe lighthouse keeper is Marta Quill.\n")
    (d / "tea.txt").write_text("Tea is brewed at ninety degrees.\n")
    coll = Collection.open("notes", d / "root", create_with="hash-384")
    add_files(coll, [(d / "keeper.md", "keeper.md"), (d / "tea.txt", "tea.txt")], HashEmbedder())
    coll.close()
    return d / "root"


def expected_answer(model, tok, root, messages, budget, n=8) -> tuple[str, list]:
    prompt = rag_prompt("notes", messages, tok, budget, root=root)
    ids = generate_batch(model, [render_prompt(tok, prompt.messages)], n)[0]
    return tok.decode([t for t in ids if t not in turn_end_ids(tok)]), prompt.hits


def test_prompt_holds_the_best_chunk_first_and_fits(tok, root):
    messages = [{"role": "user", "content": QUESTION}]
    prompt = rag_prompt("notes", messages, tok, 10_000, root=root, k=2)
    assert prompt.hits[0].chunk.name == "keeper.md" and len(prompt.hits) == 2
    assert '<doc id="1" source="keeper.md > Lighthouse">' in prompt.messages[-1]["content"]
    just_one = len(render_prompt(tok, rag_prompt("notes", messages, tok, 10_000, root=root, k=1).messages))
    fitted = rag_prompt(
        "notes", messages, tok, just_one, root=root, k=2
    )  # room for one: the worst is dropped
    assert [h.chunk.name for h in fitted.hits] == ["keeper.md"]


def test_chat_p_with_rag_answers_from_the_prompt_rag_builds(tok, model, root, tmp_path, capsys):
    run = tmp_path / "run"
    save_model(run, model, tok.to_json(), {"stage": "test"})
    argv = [
        "--model",
        run,
        "-p",
        QUESTION,
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--rag",
        "notes",
        "--rag-root",
        root,
    ]
    cmd_chat(parse_options(ChatOptions, argv))
    captured = capsys.readouterr()
    text, hits = expected_answer(model, tok, root, [{"role": "user", "content": QUESTION}], 512 - 8)
    assert captured.out == strip_controls(text).strip() + "\n"
    assert captured.err.startswith("sources: ") and "keeper.md > Lighthouse" in captured.err


def test_chat_session_with_rag_keeps_the_plain_question_in_the_transcript(tok, model, root):
    out = io.StringIO()
    rag = lambda messages, budget: rag_prompt("notes", messages, tok, budget, root=root)  # noqa: E731
    session = ChatSession(model, tok, max_new_tokens=8, temperature=0.0, out=out, rag=rag)
    printed = session.handle(QUESTION)
    text, _ = expected_answer(model, tok, root, [{"role": "user", "content": QUESTION}], 512 - 8)
    assert printed.startswith("assistant> ") and "\nsources: " in printed
    assert session.messages[0] == {"role": "user", "content": QUESTION}
    assert session.messages[1]["content"] == text.strip()


def test_api_collection_field(tok, model, root, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from chatforge.serve.app import create_app

    monkeypatch.setenv(ROOT_ENV, str(root))
    app = create_app(model, tok, model_id="tiny", store=None, max_batch=2)
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "temperature": 0, "collection": "notes"}  # fmt: skip
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        text, hits = expected_answer(model, tok, root, body["messages"], 512 - 8)
        assert data["choices"][0]["message"]["content"] == text
        assert [d["source"] for d in data["documents"]] == [h.chunk.name for h in hits]
        assert data["documents"][0] == {"id": 1, "source": "keeper.md", "heading": "Lighthouse",
                                        "text": "The lighthouse keeper is Marta Quill.",
                                        "chunk_id": hits[0].chunk.id}  # fmt: skip
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: {")]
        assert '"documents"' in lines[0] and '"choices":[]' in lines[0]
        bad = c.post("/v1/chat/completions", json={**body, "collection": "missing"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "collection"
        assert "no collection 'missing'" in bad.json()["error"]["message"]


def test_rerank_orders_by_the_question_likelihood(tok, model):
    hits = [Hit(StoredChunk(i, f"/{i}", f"{i}.txt", "", t), 0.0) for i, t in enumerate(TEXTS[:2])]
    ranked = rerank_by_likelihood(model, tok, QUESTION, hits)
    assert sorted(h.chunk.id for h in ranked) == [0, 1]
    assert ranked[0].score >= ranked[1].score and all(h.score < 0 for h in ranked)
    # the score is the summed log-probability of the question's tokens after the chunk
    from chatforge.align import sequence_logps

    body = tok.start_ids() + tok.encode(ranked[0].chunk.text)
    q = tok.encode("\nQuestion: " + QUESTION)
    expect = sequence_logps(model, [body + q], [[0] * len(body) + [1] * len(q)], "cpu").item()
    assert ranked[0].score == pytest.approx(expect, rel=1e-5)


def test_scores_exact_match_citations_and_faithfulness():
    from chatforge.rag.evaluate import score_answers

    keeper = Hit(StoredChunk(1, "/k", "k.md", "", "The lighthouse keeper is Marta Quill."), 0.0)
    tea = Hit(StoredChunk(2, "/t", "t.md", "", "Tea is brewed at ninety degrees."), 0.0)
    questions = [{"question": "Keeper?", "answer": "Marta Quill", "kind": "forward"},
                 {"question": "Keeper?", "answer": "Marta Quill", "kind": "reverse"},
                 {"question": "Tea?", "answer": "ninety degrees", "kind": "forward"}]  # fmt: skip
    closed = ["I do not know.", "Marta Quill.", "Hot."]
    opened = ["Marta Quill [1].", "It is Marta Quill [2], see [9].", "Unsure."]
    s = score_answers(questions, closed, opened, [[keeper, tea], [keeper, tea], [tea]])
    assert s["closed_book"] == pytest.approx(1 / 3) and s["with_retrieval"] == pytest.approx(2 / 3)
    assert s["by_kind"]["forward"] == {"closed_book": 0.0, "with_retrieval": 0.5, "n": 2}
    assert s["citation_rate"] == pytest.approx(2 / 3)
    assert s["faithfulness"] == 0.5  # the second answer cites [2] (tea), which does not hold the answer
    assert [r["cited"] for r in s["rows"]] == [[1], [2], []]


def test_rag_eval_end_to_end_on_a_world(tok, model, tmp_path, capsys):
    from chatforge.rag.command import QUESTIONS_FILE, world_questions
    from chatforge.rag.evaluate import cmd_rag_eval
    from chatforge.world import build_world, write_world

    write_world(build_world(5, 40, 8), tmp_path / "world", paraphrases=1)
    coll = Collection.open("world", tmp_path / "root", create_with="hash-384")
    add_files(coll, [(tmp_path / "world" / "heldout.jsonl", "heldout.jsonl")], HashEmbedder())
    (coll.folder / QUESTIONS_FILE).write_text(
        "".join(__import__("json").dumps(q) + "\n" for q in world_questions(tmp_path / "world"))
    )
    coll.close()
    run = tmp_path / "run"
    save_model(run, model, tok.to_json(), {"stage": "test"})
    opts = parse_options(RagEvalOptions, ["--root", tmp_path / "root", "--model", run, "--max-examples", "3",
                                          "--max-new-tokens", "4", "--answer-k", "2", "--out", tmp_path / "out"])  # fmt: skip
    result = cmd_rag_eval(opts)
    assert result["retrieval"]["bm25"]["recall@5"] == 1.0 and set(result["retrieval"]) == {
        "bm25",
        "dense",
        "fused",
    }
    assert len(result["answers"]["rows"]) == 3 and result["answer_k"] == 2
    assert (tmp_path / "out" / "rag_eval.md").read_text().startswith("| retrieval | recall@5 |")
    assert "| bm25 | 1.000 |" in capsys.readouterr().out
