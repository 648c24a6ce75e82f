"""The web page's documents in headless Chromium: a user (with their key) uploads a file into a new
collection, picks it, asks, and the answer's citation [1] opens the cited chunk's text. The model is
a real one run by the server's engine, with weights set so that it writes a fixed answer that cites
[1] (see `citing_model`): a random tiny model would never write a citation."""

from __future__ import annotations

import os

import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("headless test needs Chromium at /usr/bin/chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")
uvicorn = pytest.importorskip("uvicorn")

from test_serve import serve  # noqa: E402  (uvicorn on a loopback port, in a thread)
from test_web import ARGS  # noqa: E402

from chatforge.chat_format import render_prompt, turn_end_ids  # noqa: E402
from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.rag.store import Collection  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.serve.auth import Keys, User  # noqa: E402
from chatforge.serve.feedback import FeedbackStore  # noqa: E402
from chatforge.serve.routes_rag import USERS_DIR  # noqa: E402
from chatforge.serve.state import RagSettings  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

KEY = "carol-key-0123456789"
KEEPER = "# Lighthouse\n\nThe lighthouse keeper is Marta Quill. She lives on Gull Rock.\n"
ANSWER = "Marta Quill [1]"


def citing_model(tok: Tokenizer, answer: str) -> GPT:
    """One layer whose attention and MLP add nothing, so the next token depends on the current one
    alone (a bigram table in the embedding and head), set so that after the chat prompt's last
    token the model writes `answer` and ends its turn."""
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=1024, n_layer=1, n_embd=64, n_head=4, n_kv_head=2,
                    tie_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    start = render_prompt(tok, [{"role": "user", "content": "?"}])[-1]
    chain = [start, *tok.encode(answer), turn_end_ids(tok)[0]]
    assert len(set(chain[:-1])) == len(chain) - 1, "each token of the answer must be new"
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.randn(cfg.vocab_size, cfg.n_embd)
        model.embed_tokens.weight.copy_(emb)
        head = torch.randn(cfg.vocab_size, cfg.n_embd) * 0.01
        unit = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()  # what the final RMSNorm makes of it
        for a, b in zip(chain, chain[1:], strict=False):
            head[b] += 10 * unit[a] / cfg.n_embd
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def page_and_root(tmp_path_factory):
    torch.set_num_threads(1)
    tok = Tokenizer.train([KEEPER, ANSWER, "Who is the lighthouse keeper?"] * 30, 300)
    keys = Keys()
    keys.add(KEY, User("carol"))
    root = tmp_path_factory.mktemp("rag")
    store = FeedbackStore(root / "fb.sqlite")  # the page keeps its conversations
    app = create_app(citing_model(tok, ANSWER), tok, model_id="tiny", store=store, keys=keys, max_batch=2,
                     rag=RagSettings(root=root, embedding="hash-384"))  # fmt: skip
    with serve(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(15_000)
        page.add_init_script(f"localStorage.setItem('chatforge-api-key', '{KEY}')")  # as Settings keeps it
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.click("#settings summary")
        yield page, root
        browser.close()
    store.close()


def test_upload_ask_and_open_a_citation(page_and_root, tmp_path):
    page, root = page_and_root
    page.click("#documents summary")
    page.fill("#upload-name", "lighthouse")
    page.set_input_files("#upload-files", [{"name": "keeper.md", "mimeType": "text/markdown", "buffer": KEEPER.encode()}])
    with page.expect_response("**/v1/collections/lighthouse/files") as r:
        page.click("#upload-send")
    assert r.value.ok
    page.wait_for_selector("#collection-files li")
    assert "keeper.md added (1 chunk)" in page.inner_text("#upload-status")
    assert page.input_value("#collection") == "lighthouse"
    assert page.inner_text("#collection option:checked") == "lighthouse (1 file)"
    assert page.inner_text("#collection-files").strip().startswith("keeper.md")
    # the server's own ingest, in carol's folder
    coll = Collection.open("lighthouse", root / USERS_DIR / "carol")
    (stored,) = coll.chunks([1])
    coll.close()
    assert stored.text == "The lighthouse keeper is Marta Quill. She lives on Gull Rock."

    page.fill("#temperature", "0")
    page.fill("#max-tokens", "16")
    page.fill("#input", "Who is the lighthouse keeper?")
    page.press("#input", "Enter")
    bubble = page.wait_for_selector(".msg.assistant[data-done='1']")
    assert bubble.query_selector(".body").inner_text().strip() == ANSWER
    assert [b.inner_text() for b in bubble.query_selector_all(".sources button")] == ["[1] keeper.md > Lighthouse"]

    with page.expect_response("**/v1/collections/lighthouse/chunks/1") as r:
        bubble.query_selector(".body button.cite").click()
    assert r.value.ok
    page.wait_for_selector("#chunk-view[open]")
    assert page.inner_text("#chunk-title") == "[1] keeper.md"
    assert page.inner_text("#chunk-heading") == "Lighthouse"
    assert page.inner_text("#chunk-text") == stored.text
    page.click("#chunk-close")
    assert page.query_selector("#chunk-view[open]") is None

    # the source button under the answer opens the same chunk
    bubble.query_selector(".sources button").click()
    page.wait_for_selector("#chunk-view[open]")
    assert page.inner_text("#chunk-text") == stored.text
    page.click("#chunk-close")

    # reopened from the conversation list, the answer still has its sources and citations
    cid = page.evaluate("state.conversationId")
    page.click("#new-chat")
    page.wait_for_function("document.querySelectorAll('.msg').length === 0")
    page.click(f"#conversations li[data-id='{cid}'] button.open")
    again = page.wait_for_selector(".msg.assistant .sources")
    assert [b.inner_text() for b in again.query_selector_all("button")] == ["[1] keeper.md > Lighthouse"]
    with page.expect_response("**/v1/collections/lighthouse/chunks/1") as r:
        page.click(".msg.assistant .body button.cite")
    assert r.value.ok
    page.wait_for_selector("#chunk-view[open]")
    assert page.inner_text("#chunk-text") == stored.text
    page.click("#chunk-close")
