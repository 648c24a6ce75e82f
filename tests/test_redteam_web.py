"""The chat page applies the server's output policy: with `--defenses output-policy` and a link
host list, links keep no query string and links to other hosts are text; without it, links are as
before. Headless Chromium, as tests/test_web.py."""

from __future__ import annotations

import os

import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("headless test needs Chromium at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs `pip install playwright`"
)
pytest.importorskip("uvicorn")

from test_serve import serve  # noqa: E402
from test_web import ARGS  # noqa: E402

from chatforge.model.gpt import GPT, GPTConfig  # noqa: E402
from chatforge.redteam.defenses import parse_defenses  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

SRC = "[a](https://docs.example/p?q=4417#x) [b](https://evil.example/x?d=4417) ![i](https://evil.example/i.png?d=2)"


def links(defenses: str | None) -> list[list]:
    """(text, href or None) of each link the page renders from SRC."""
    tok = Tokenizer.train(["Hello there, how are you today?"] * 20, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, seq_len=64, n_layer=1, n_embd=16, n_head=2, n_kv_head=1)).eval()
    stack = parse_defenses(defenses, allowed_hosts=("docs.example",))
    app = create_app(model, tok, model_id="tiny", defenses=stack)
    with serve(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        found = page.evaluate(
            """src => {
                const box = document.createElement("div");
                box.innerHTML = renderMarkdown(src);
                return [...box.querySelectorAll("a")].map(a => [a.textContent, a.getAttribute("href")]);
            }""",
            SRC,
        )
        browser.close()
    return found


def test_page_applies_the_link_host_list():
    assert links("output-policy") == [
        ["a", "https://docs.example/p"],
        ["b", None],
        ["image: i", None],
    ]
    assert links(None) == [
        ["a", "https://docs.example/p?q=4417#x"],
        ["b", "https://evil.example/x?d=4417"],
        ["image: i", "https://evil.example/i.png?d=2"],
    ]
